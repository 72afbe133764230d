"""Fuzzing the runtime's inputs (hypothesis): request arguments, load arguments, manifest mutations.

Whatever a caller passes, only EngineError subclasses escape (a manifest mutation: LoadError at load),
and afterwards the engine serves a valid request bit-identically to a fresh engine. The examples are
bounded and derandomized for CI; MESA_FUZZ_EXAMPLES=2000 runs a longer, random search.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil

import numpy as np
import pytest
from conftest import export_engine, tiny_checkpoint
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from runtime.artifact import CONTRACT_FIELDS, MANIFEST
from runtime.engine import BackendError, EngineError, LoadError, MesaEngine

MAX_LEN, VOCAB = 96, 96  # tiny_checkpoint's vocabulary; T = 64, so long prompts have middle chunks
EXAMPLES = int(os.environ.get("MESA_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXAMPLES or 200, deadline=None, derandomize=not EXAMPLES,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
WORDS = [f"w{i}" for i in range(VOCAB - 3)]
VALID = [(7 * i) % VOCAB for i in range(80)]


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    """A tiny exported engine with a word-level tokenizer.json (so text, encode and decode are fuzzed too)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tmp = tmp_path_factory.mktemp("fuzz")
    with contextlib.redirect_stdout(io.StringIO()):  # the export summary
        out = export_engine(tiny_checkpoint(tmp / "ckpt"), tmp / "engine", MAX_LEN, ["--no-verify"])
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    return out


def served(engine: MesaEngine):
    """What a valid request gives: greedy tokens and logits over a prompt with middle chunks, a seeded sample."""
    g = engine.generate(VALID, 6, return_logits=True, stop_tokens=())
    sampled = engine.generate(VALID[:20], 6, temperature=0.9, top_k=20, top_p=0.9, seed=7, stop_tokens=())
    return g.tokens, g.prefill_logits, g.decode_logits, sampled.tokens


@pytest.fixture(scope="module")
def fresh(engine_dir):
    return served(MesaEngine.load(engine_dir, backend="ort-cpu"))


@pytest.fixture(scope="module")
def engine(engine_dir):
    return MesaEngine.load(engine_dir, backend="ort-cpu")


def assert_serves_like_fresh(engine: MesaEngine, fresh, slots: int = 1) -> None:
    assert engine.stats()["free_slots"] == slots  # no request kept a cache slot
    tokens, prefill, decode, sampled = served(engine)
    assert tokens == fresh[0] and sampled == fresh[3]
    assert np.array_equal(prefill, fresh[1]) and np.array_equal(decode, fresh[2])


# ------------------------------------------------------------------------------ request arguments

junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=4),
                 st.lists(st.integers(-2, VOCAB + 2), max_size=3), st.sampled_from([b"7", {}, object(), 1j]))
text = st.one_of(
    st.lists(st.sampled_from([*WORDS[:20], "<s>", "</s>", "unknown", "caf\udce9", "\udcff", ""]), max_size=120)
    .map(" ".join),
    st.text(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=20),  # lone surrogates too
)
leaf = st.one_of(st.integers(-3, VOCAB + 3), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=3),
                 st.none(), st.booleans())
valid_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=MAX_LEN + 4)  # some too long
prompts = st.one_of(
    valid_ids, valid_ids, st.lists(st.integers(0, VOCAB - 1), min_size=60, max_size=80),  # middle chunks
    st.lists(st.integers(-2**70, 2**70), max_size=6),  # negatives, beyond int64
    hnp.arrays(st.sampled_from([np.int8, np.int32, np.int64, np.uint8, np.uint64, np.float16, np.float64,
                                np.bool_, np.complex64, "U2"]),
               hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)),
    st.recursive(leaf, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner), max_leaves=12),
    st.lists(st.lists(st.integers(0, VOCAB - 1), max_size=30), min_size=1, max_size=3),  # batches
    text, junk,
)


def one_broken(good: dict):
    """Arguments drawn from `good`, most of the time with one of them junk (all of them junk at once
    would only ever reach the first check)."""
    return st.tuples(st.fixed_dictionaries(good), st.sampled_from([None, None, *good]), junk).map(
        lambda t: {**t[0], **({t[1]: t[2]} if t[1] else {})})


GOOD_SETTINGS = {
    "max_new_tokens": st.integers(1, 24),
    "temperature": st.sampled_from([0, 0.0, 1e-300, 0.7, 1, 5.0]),
    "top_k": st.integers(0, VOCAB + 5),
    "top_p": st.floats(1e-9, 1),
    "seed": st.none() | st.integers(0, 2**70),
    "stop_tokens": st.none() | st.lists(st.integers(0, VOCAB - 1), max_size=3),
    "progress": st.none() | st.just(lambda done, total: None),
}


def call(engine: MesaEngine, method: str, prompt, kwargs: dict, return_logits: bool):
    if method == "generate":
        return engine.generate(prompt, **kwargs, return_logits=return_logits)
    if method == "stream":
        return list(engine.stream(prompt, **kwargs))
    if method == "score":
        return engine.score(prompt, progress=kwargs["progress"])
    return getattr(engine, method)(prompt)  # encode / decode


@FUZZ
@given(method=st.sampled_from(["generate", "generate", "stream", "score", "encode", "decode"]), prompt=prompts,
       kwargs=one_broken(GOOD_SETTINGS), return_logits=st.booleans())
def test_requests_raise_only_engine_errors(engine, fresh, method, prompt, kwargs, return_logits):
    try:
        call(engine, method, prompt, kwargs, return_logits)
        event(f"{method}: served")
    except EngineError as e:  # anything else fails the test
        event(f"{method}: {type(e).__name__}")
    assert_serves_like_fresh(engine, fresh)


GOOD_LOAD = {"where": st.sampled_from(["engine", "str", "file", "missing", "empty"]),
             "backend": st.sampled_from(["auto", "ort-cpu", "ort-cuda", "tensorrt"]), "slots": st.integers(-1, 3)}


@settings(FUZZ, max_examples=EXAMPLES // 4 or 40)
@given(args=one_broken(GOOD_LOAD))
def test_load_arguments_raise_only_engine_errors(engine_dir, fresh, args):
    named = {"engine": engine_dir, "str": str(engine_dir), "file": engine_dir / MANIFEST,
             "missing": engine_dir / "nowhere", "empty": ""}
    where = named.get(args["where"], args["where"]) if isinstance(args["where"], str) else args["where"]
    try:
        engine = MesaEngine.load(where, args["backend"], args["slots"])
    except EngineError as e:
        event(type(e).__name__)
        return
    event("loaded")
    assert_serves_like_fresh(engine, fresh, args["slots"])


# ------------------------------------------------------------------------------ manifest mutations

scalars = {"NoneType": st.none(), "bool": st.booleans(), "int": st.integers(-2**70, 2**70), "float": st.floats(),
           "str": st.text(max_size=5)}
BY_KIND = {**scalars, "list": st.lists(st.one_of(*scalars.values()), max_size=3),
           "dict": st.dictionaries(st.text(max_size=4), st.one_of(*scalars.values()), max_size=3)}
strings = st.sampled_from(["bf16", "fp16", "fp32", "origin", "mesa", "float16", "int32", "batch", "q", ""]) | \
    st.text(max_size=6)


def paths(node, path=()):
    """Every path into the manifest: keys of objects, indices of arrays."""
    yield path
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from paths(value, (*path, key))


def kind(x) -> str:
    return "int" if isinstance(x, int) and not isinstance(x, bool) else type(x).__name__


def mutate(data, m: dict):
    """(how, mutated manifest or raw bytes, must_fail): one drop / add / retype / edit of a key or value, or
    a whole-file replacement. must_fail: the schema forbids it, or it changes a contract field."""
    leaves = list(paths(m))[1:]
    how = data.draw(st.sampled_from(["drop", "add", "retype", "number", "string", "method", "whole", "bytes"]))
    if how == "whole":
        return how, data.draw(st.sampled_from([[], "mesa", 1, None, True, [m]])), True
    if how == "bytes":
        raw = json.dumps(m).encode()
        cut = data.draw(st.integers(0, len(raw) - 1))
        broken = st.sampled_from([raw[:cut], raw[:cut] + b"\xff" + raw[cut:]]) | st.binary(max_size=40)
        return how, data.draw(broken), True
    if how == "method":
        m["method"] = data.draw(strings.filter(lambda s: s != "mesa"))
        return how, m, True
    if how == "add":
        path = data.draw(st.sampled_from([()] + [p for p in leaves if isinstance(get(m, p), dict)]))
        key = data.draw(st.text(min_size=1, max_size=6).filter(lambda k: k not in get(m, path)))
        get(m, path)[key] = data.draw(st.one_of(*BY_KIND.values()))
        return how, m, True
    candidates = {"drop": leaves, "retype": leaves,
                  "number": [p for p in leaves if kind(get(m, p)) == "int"],
                  "string": [p for p in leaves if isinstance(get(m, p), str)]}[how]
    path = data.draw(st.sampled_from(candidates))
    parent, old, contract = get(m, path[:-1]), get(m, path), path[0] in CONTRACT_FIELDS
    if how == "drop":
        del parent[path[-1]]
        return how, m, contract or isinstance(path[-1], str)  # every key is required; some arrays may shrink
    if how == "retype":
        new = data.draw(BY_KIND[data.draw(st.sampled_from([k for k in BY_KIND if k != kind(old)]))])
        parent[path[-1]] = new
        return how, m, not (kind(old) == "float" and kind(new) == "int")  # JSON numbers may be written as integers
    if how == "number":
        new = old + data.draw(st.sampled_from([-3, -2, -1, 1, 2, 3, 2**40, -2**40]))
        parent[path[-1]] = new
        return how, m, contract or new < 0
    parent[path[-1]] = data.draw(strings.filter(lambda s: s != old))
    return how, m, contract


def get(node, path):
    for key in path:
        node = node[key]
    return node


@pytest.fixture(scope="module")
def scratch(engine_dir, tmp_path_factory):
    """A copy of the engine whose mesa.json each example rewrites."""
    return shutil.copytree(engine_dir, tmp_path_factory.mktemp("mutated") / "engine")


@FUZZ
@given(data=st.data())
def test_manifest_mutations_are_load_errors(engine_dir, scratch, fresh, data):
    original = json.loads((engine_dir / MANIFEST).read_text())
    how, mutated, must_fail = mutate(data, copy.deepcopy(original))
    raw = mutated if isinstance(mutated, bytes) else json.dumps(mutated).encode()
    (scratch / MANIFEST).write_bytes(raw)
    try:
        engine = MesaEngine.load(scratch, backend="ort-cpu")
    except LoadError:
        event(f"{how}: LoadError")
        return
    except BackendError:  # the one manifest field checked by the backend before the graph: bf16 is unservable
        assert isinstance(mutated, dict) and mutated.get("dtype") == "bf16"
        event(f"{how}: BackendError (bf16)")
        return
    event(f"{how}: loaded")
    assert not must_fail, "loaded a manifest the schema or the graph's metadata should refuse"
    assert {k: mutated[k] for k in CONTRACT_FIELDS} == {k: original[k] for k in CONTRACT_FIELDS}
    assert_serves_like_fresh(engine, fresh)

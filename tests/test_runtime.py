"""MesaEngine (runtime/engine.py) on ONNX Runtime CPU: parity, batches, streaming, sampling, the
static cache, errors, threads, and the device (IO binding) code path run on CPU."""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
from conftest import export_engine, load_official

from runtime import artifact, backends, device_cache, mesa, methods, scheduler
from runtime.artifact import MANIFEST, MODEL_FILE
from runtime.engine import BackendError, EngineError, LoadError, MesaEngine, RequestError
from runtime.kv_cache import CacheShape
from runtime.sampling import Sampling, pick
from runtime.score import perplexity

CASE = "a_L300_gqa"  # T=128: several middle chunks, stairs in decode; max_len = 300 + 32
TOL = 1e-4
AVAILABLE = ort.get_available_providers()


@pytest.fixture(scope="module")
def case():
    return load_official(CASE)


@pytest.fixture(scope="module")
def engine_dir(official_engine):
    return official_engine(CASE)


@pytest.fixture(scope="module")
def engine(engine_dir):
    return MesaEngine.load(engine_dir, backend="ort-cpu")


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


# ------------------------------------------------------------------------------ parity

def test_generate_reproduces_published_logits(engine, case):
    g = engine.generate(case.input_ids, 17, return_logits=True)
    assert max_diff(g.prefill_logits, case.prefill_logits) <= TOL
    assert g.decode_logits.shape == case.decode_logits.shape
    assert max_diff(g.decode_logits, case.decode_logits) <= TOL
    assert g.tokens == [case.fed_tokens[0], *case.argmax_tokens]
    assert g.finish_reason == "length" and g.prompt_tokens == len(case.input_ids) and g.text is None


def test_score_is_every_prompt_position(engine, case):
    logits = engine.score(case.input_ids)
    assert logits.shape == case.prefill_logits.shape
    assert max_diff(logits, case.prefill_logits) <= TOL


def test_perplexity_definition():
    rng = np.random.default_rng(0)
    logits, ids = rng.normal(size=(6, 11)), rng.integers(0, 11, 6)
    nll = [-np.log(np.exp(logits[i, ids[i + 1]]) / np.exp(logits[i]).sum()) for i in range(5)]
    assert perplexity(logits, ids) == pytest.approx(np.exp(np.mean(nll)), rel=1e-9)


# ------------------------------------------------------------------------------ batches, streaming, sampling

def prompts(case):  # four different plans: one chunk, first+last, DynamicSplit with one middle, several middles
    ids = case.input_ids
    return [ids[:5], ids[100:140], ids[:150], ids[:300]]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_k": 50, "top_p": 0.9, "seed": 3}])
def test_batch_rows_equal_single_runs(engine, case, sampling):
    batch = engine.generate(prompts(case), 9, return_logits=True, stop_tokens=(), **sampling)
    assert len(batch) == 4
    for ids, row in zip(prompts(case), batch):
        alone = engine.generate(ids, 9, return_logits=True, stop_tokens=(), **sampling)
        assert row.tokens == alone.tokens and len(row.tokens) == 9
        assert max_diff(row.prefill_logits, alone.prefill_logits) <= TOL
        assert max_diff(row.decode_logits, alone.decode_logits) <= TOL
        assert row.prefill_logits.shape[0] == len(ids) and row.decode_logits.shape[0] == 8


def test_2d_array_and_list_of_lists_are_batches(engine, case):
    rows = np.stack([case.input_ids[:20], case.input_ids[30:50]])
    from_array = engine.generate(rows, 4, stop_tokens=())
    from_lists = engine.generate([r.tolist() for r in rows], 4, stop_tokens=())
    assert [g.tokens for g in from_array] == [g.tokens for g in from_lists]
    assert from_array[1].tokens == engine.generate(rows[1], 4, stop_tokens=()).tokens


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.2, "top_p": 0.95, "seed": 11}])
def test_stream_yields_the_generated_tokens(engine, case, sampling):
    ids = case.input_ids[:200]
    assert list(engine.stream(ids, 12, stop_tokens=(), **sampling)) == \
        engine.generate(ids, 12, stop_tokens=(), **sampling).tokens


def test_closed_stream_frees_its_slot(engine, case):
    it = engine.stream(case.input_ids[:50], 200, stop_tokens=())
    next(it)
    assert engine.stats()["free_slots"] == 0
    it.close()  # the caller stops reading: the request is cancelled and its slot freed now
    assert engine.stats()["free_slots"] == 1
    assert engine.generate(case.input_ids[:5], 2).tokens


def test_an_unread_stream_does_not_block_its_own_thread(engine, case):
    """The batcher generates a stream's tokens whether or not they are read yet, so a second request
    of the same thread waits for the only slot instead of waiting forever."""
    alone = engine.generate(case.input_ids[:50], 10, stop_tokens=()).tokens
    it = engine.stream(case.input_ids[:50], 10, stop_tokens=())
    assert next(it) == alone[0]
    assert engine.generate(case.input_ids[:5], 2).tokens
    assert [alone[0], *it] == alone


def test_sampling_is_seeded(engine, case):
    ids = case.input_ids[:64]
    greedy = engine.generate(ids, 10, stop_tokens=()).tokens
    a = engine.generate(ids, 10, temperature=1.0, seed=5, stop_tokens=()).tokens
    assert a == engine.generate(ids, 10, temperature=1.0, seed=5, stop_tokens=()).tokens
    assert a != engine.generate(ids, 10, temperature=1.0, seed=6, stop_tokens=()).tokens
    assert engine.generate(ids, 10, temperature=1.0, top_k=1, seed=5, stop_tokens=()).tokens == greedy
    assert engine.generate(ids, 10, temperature=1.0, top_p=1e-9, seed=5, stop_tokens=()).tokens == greedy


def test_pick_respects_top_k_and_top_p():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    rng = np.random.default_rng(0)
    draw = lambda **kw: {pick(logits, Sampling(temperature=1.0, **kw), rng) for _ in range(300)}  # noqa: E731
    assert draw() == {0, 1, 2, 3}
    assert draw(top_k=2) == {0, 1}
    assert draw(top_p=0.5) == {0, 1}  # 0.4 alone is below 0.5; 0.4 + 0.3 reaches it
    assert draw(top_p=0.4) == {0}
    assert pick(logits, Sampling(), rng) == 0


def test_stop_tokens(engine, case):
    ids = case.input_ids[:64]
    full = engine.generate(ids, 12, stop_tokens=())
    stop = full.tokens[4]
    first = full.tokens.index(stop)
    g = engine.generate(ids, 12, stop_tokens=[stop])
    assert g.tokens == full.tokens[:first + 1] and g.finish_reason == "stop"
    assert engine.manifest.eos_token_ids == [2]  # the default stop tokens come from the checkpoint


# ------------------------------------------------------------------------------ the static cache

def test_cache_allocated_once_and_reused(engine_dir, case):
    engine = MesaEngine.load(engine_dir, backend="ort-cpu")
    decoder = engine._decoder  # the in-place decoder: one decode-cache slot and one prefill buffer
    arrays = (decoder.cache.k, decoder.cache.v, decoder.prefills[0].k, decoder.prefills[0].v)
    assert len(decoder.prefills) == 1
    assert decoder.cache.k.shape == (2, 1, 2, case.max_len, 16) and decoder.prefills[0].k.shape == (2, 1, 2, case.max_len, 16)
    assert engine.stats()["cache_bytes"] == sum(a.nbytes for a in arrays) == 4 * 2 * 2 * case.max_len * 16 * 4
    buffers = [a.ctypes.data for a in arrays]
    short = engine.generate(case.input_ids[:40], 8, stop_tokens=())
    engine.generate(case.input_ids, 20, stop_tokens=())  # fills far more of the cache
    again = engine.generate(case.input_ids[:40], 8, stop_tokens=())
    assert [a.ctypes.data for a in (decoder.cache.k, decoder.cache.v, decoder.prefills[0].k, decoder.prefills[0].v)] == buffers
    assert again.tokens == short.tokens  # nothing of one request leaks into the next


# ------------------------------------------------------------------------------ errors

BAD_REQUESTS = {
    "too long": (lambda e, ids: e.generate(ids, 33), "exceeds max_len 332"),
    "too long to score": (lambda e, ids: e.score(np.concatenate([ids, ids])), "exceeds max_len"),
    "empty list": (lambda e, ids: e.generate([]), "empty prompt"),
    "empty array": (lambda e, ids: e.generate(np.array([], dtype=np.int64)), "empty prompt"),
    "empty row": (lambda e, ids: e.generate([[1, 2], []]), "empty prompt"),
    "id too large": (lambda e, ids: e.generate([1, 2, 512]), r"token id 512 is outside the vocabulary \[0, 512\)"),
    "negative id": (lambda e, ids: e.generate(np.array([-1, 4])), "token id -1 is outside"),
    "float ids": (lambda e, ids: e.generate(np.array([1.0, 2.0])), "must be integers, got float64"),
    "mixed list": (lambda e, ids: e.generate([1, 2.5]), "must be integers"),
    "3-D": (lambda e, ids: e.generate(np.zeros((2, 2, 2), dtype=np.int64)), r"1-D .* shape \(2, 2, 2\)"),
    "ragged": (lambda e, ids: e.generate([[1, 2], 3]), "flat list of token ids"),
    "no new tokens": (lambda e, ids: e.generate(ids[:5], 0), "max_new_tokens must be a positive integer"),
    "negative temperature": (lambda e, ids: e.generate(ids[:5], 2, temperature=-1), "temperature must be >= 0"),
    "top_p zero": (lambda e, ids: e.generate(ids[:5], 2, temperature=1, top_p=0), r"top_p must be in \(0, 1\]"),
    "top_k negative": (lambda e, ids: e.generate(ids[:5], 2, top_k=-3), "top_k must be >= 0"),
    "text without tokenizer": (lambda e, ids: e.generate("hello"), "has no tokenizer.json"),
    "batch to stream": (lambda e, ids: e.stream([ids[:3], ids[:4]]), "stream\\(\\) takes one prompt"),
    "batch to score": (lambda e, ids: e.score([ids[:3], ids[:4]]), "score\\(\\) takes one prompt"),
    # once ValueError / TypeError / OverflowError from numpy, int(), the tokenizer or the generator
    "seed negative": (lambda e, ids: e.generate(ids[:5], 2, temperature=1, seed=-1), "seed must be >= 0"),
    "seed text": (lambda e, ids: e.generate(ids[:5], 2, temperature=1, seed="abc"), "seed must be .* got 'abc'"),
    "top_k inf": (lambda e, ids: e.generate(ids[:5], 2, temperature=1, top_k=float("inf")), "top_k .* got inf"),
    "top_k fraction": (lambda e, ids: e.generate(ids[:5], 2, temperature=1, top_k=2.5), "top_k .* an integer"),
    "temperature nan": (lambda e, ids: e.generate(ids[:5], 2, temperature=float("nan")), "temperature .* got nan"),
    "temperature text": (lambda e, ids: e.generate(ids[:5], 2, temperature="0.5"), "temperature .* got '0.5'"),
    "top_p bool": (lambda e, ids: e.generate(ids[:5], 2, temperature=1, top_p=True), "top_p .* got True"),
    "stop token inf": (lambda e, ids: e.generate(ids[:5], 2, stop_tokens=[float("inf")]), "stop_tokens: inf"),
    "stop token outside": (lambda e, ids: e.generate(ids[:5], 2, stop_tokens=[512]), r"stop_tokens: 512 .*\[0, 512\)"),
    "stop tokens number": (lambda e, ids: e.generate(ids[:5], 2, stop_tokens=5), "stop_tokens must be a sequence"),
    "max_new_tokens float": (lambda e, ids: e.generate(ids[:5], 2.0), "max_new_tokens must be a positive integer"),
    "progress not callable": (lambda e, ids: e.score(ids[:5], progress=3), "progress must be a callable"),
    "huge id": (lambda e, ids: e.generate([1, 2**64]), "must be integers"),
    "empty 2-D batch": (lambda e, ids: e.generate(np.zeros((0, 4), dtype=np.int64)), "empty batch"),
    "encode a number": (lambda e, ids: e.encode(123), r"encode\(\) takes text \(a str\), got int"),
    "decode negative": (lambda e, ids: e.decode([-1]), r"decode\(\) tokens: -1 is not a token id in \[0, 512\)"),
    "decode floats": (lambda e, ids: e.decode([1.0]), r"decode\(\) tokens: 1.0 is not a token id"),
    "decode a number": (lambda e, ids: e.decode(7), r"decode\(\) tokens must be a sequence"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_request_is_refused_and_engine_stays_usable(engine, case, name):
    call, message = BAD_REQUESTS[name]
    ids = case.input_ids
    expected = engine.generate(ids[:30], 3, stop_tokens=()).tokens
    with pytest.raises(RequestError, match=message):
        call(engine, ids)
    assert engine.stats()["free_slots"] == 1
    assert engine.generate(ids[:30], 3, stop_tokens=()).tokens == expected


def test_scoring_too_long_names_no_new_tokens(engine, case):
    with pytest.raises(RequestError) as e:
        engine.score(np.concatenate([case.input_ids, case.input_ids]))
    assert str(e.value) == "prompt (600 tokens) exceeds max_len 332"  # was "+ max_new_tokens (0)"


def test_sampling_survives_a_tiny_temperature(engine, case):
    greedy = engine.generate(case.input_ids[:40], 4, stop_tokens=()).tokens
    assert engine.generate(case.input_ids[:40], 4, temperature=1e-300, seed=0, stop_tokens=()).tokens == greedy


def edited_copy(src, dst, **manifest_changes):
    shutil.copytree(src, dst)
    m = json.loads((dst / MANIFEST).read_text())
    for key, value in manifest_changes.items():
        m[key] = value
    (dst / MANIFEST).write_text(json.dumps(m))
    return dst


def test_load_errors(engine_dir, tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        MesaEngine.load(tmp_path / "nowhere")
    with pytest.raises(LoadError, match="mesa.json is not a directory"):  # was "does not exist"
        MesaEngine.load(engine_dir / MANIFEST)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="has no mesa.json"):
        MesaEngine.load(tmp_path / "empty")
    no_model = edited_copy(engine_dir, tmp_path / "no_model")
    (no_model / MODEL_FILE).unlink()
    with pytest.raises(LoadError, match="incomplete: model.onnx is missing"):
        MesaEngine.load(no_model)
    corrupt = edited_copy(engine_dir, tmp_path / "corrupt")
    (corrupt / MODEL_FILE).write_bytes(b"not a model")
    with pytest.raises(LoadError, match="ONNX Runtime cannot load"):
        MesaEngine.load(corrupt)
    with pytest.raises(LoadError, match="format version 99 is not supported"):
        MesaEngine.load(edited_copy(engine_dir, tmp_path / "v99", format_version=99))
    with pytest.raises(LoadError, match="unreadable"):
        MesaEngine.load(edited_copy(engine_dir, tmp_path / "fields", max_len=None, vocab_size=None,
                                    inputs=None, outputs=None, params=None))


@pytest.mark.parametrize("change, message", [
    ({"max_len": 400}, r"k_cache has shape \[2, 'batch', 2, 332, 16\] in the graph, \[2, 'batch', 2, 400, 16\]"),
    ({"vocab_size": 1000}, "logits has shape"),
    ({"num_key_value_heads": 4}, "k_cache has shape"),
    ({"dtype": "fp16"}, "k_cache is float32 in the graph but the manifest says dtype fp16"),
])
def test_manifest_graph_mismatch(engine_dir, tmp_path, change, message):
    with pytest.raises(LoadError, match=message):
        MesaEngine.load(edited_copy(engine_dir, tmp_path / "e", **change))


def test_manifest_io_mismatch(engine_dir, tmp_path):
    m = json.loads((engine_dir / MANIFEST).read_text())
    m["inputs"][0]["name"] = "tokens"
    with pytest.raises(LoadError, match="graph I/O"):
        MesaEngine.load(edited_copy(engine_dir, tmp_path / "e", inputs=m["inputs"]))


# ------------------------------------------------------------------------------ the manifest, bound to its graph

def rewritten_copy(src, dst, edit):
    """A copy of the engine whose mesa.json is edit(manifest dict) (edit may mutate it and return None)."""
    shutil.copytree(src, dst)
    m = json.loads((dst / MANIFEST).read_text())
    out = edit(m)
    (dst / MANIFEST).write_text(json.dumps(m if out is None else out))
    return dst


def without(d: dict, key: str) -> None:
    del d[key]


@pytest.mark.parametrize("edit, message", [
    (lambda m: [], r"field \(the whole manifest\): \[\] is not of type 'object'"),
    (lambda m: m.update(max_len="332"), "field max_len: '332' is not of type 'integer'"),
    (lambda m: m.update(max_len=332.0), "field max_len: 332.0 is not of type 'integer'"),
    (lambda m: m["params"].update(stairs=2), "field params.stairs is not a manifest field"),
    (lambda m: without(m["params"], "push_width"), "field params.push_width is missing"),
    (lambda m: m.update(notes="hi"), "field notes is not a manifest field"),
    (lambda m: without(m, "passes"), "field passes is missing"),
    (lambda m: m["inputs"][1]["shape"].__setitem__(0, 2.5), r"field inputs\[1\].shape\[0\]: 2.5 is not of type"),
    (lambda m: m.update(method="stairs"), r"field method: 'stairs' is not one of \['mesa', 'origin', 'rerope', "),
    (lambda m: m["params"].update(first_chunk=200), "field params: first_chunk F=200 must be below train_length"),
    (lambda m: m["generation"].update(eos_token_ids=[-2]),
     r"field generation.eos_token_ids\[0\]: -2 is less than the minimum of 0"),
])
def test_malformed_manifest_is_one_load_error_naming_the_field(engine_dir, tmp_path, edit, message):
    """Once AttributeError / TypeError from the dataclass, or (method) a RequestError on every request."""
    with pytest.raises(LoadError, match=f"mesa.json is unreadable: {message}"):
        MesaEngine.load(rewritten_copy(engine_dir, tmp_path / "e", edit), backend="ort-cpu")


def test_manifest_that_is_not_utf8(engine_dir, tmp_path):
    bad = edited_copy(engine_dir, tmp_path / "e")
    (bad / MANIFEST).write_bytes(b'{"method": "\xff"}')
    with pytest.raises(LoadError, match="mesa.json is unreadable: 'utf-8' codec can't decode byte 0xff"):
        MesaEngine.load(bad)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["params"].update(train_length=100), "params.train_length is 128 in the graph, 100 in the manifest"),
    (lambda m: m.update(method="origin"), "method is mesa in the graph, origin in the manifest"),
    (lambda m: m.update(largest_distance=9), r"the manifest's contract fields \(.*\) are not those .* exported for"),
])
def test_edited_manifest_is_refused_by_the_graph(engine_dir, tmp_path, edit, message):
    """Schema-valid edits that once loaded and silently changed the logits."""
    with pytest.raises(LoadError, match=f"does not describe model.onnx \\({message}\\)"):
        MesaEngine.load(rewritten_copy(engine_dir, tmp_path / "e", edit), backend="ort-cpu")


def test_descriptive_fields_may_be_edited(engine_dir, engine, case, tmp_path):
    edit = lambda m: m.update(generation={**m["generation"], "eos_token_ids": [7]}, passes=[],  # noqa: E731
                              source={**m["source"], "model": "renamed"})
    edited = MesaEngine.load(rewritten_copy(engine_dir, tmp_path / "e", edit), backend="ort-cpu")
    assert edited.manifest.eos_token_ids == [7]
    assert edited.generate(case.input_ids[:40], 5, stop_tokens=()).tokens == \
        engine.generate(case.input_ids[:40], 5, stop_tokens=()).tokens


def test_graph_of_another_export_is_refused(engine_dir, case, tmp_path):
    """model.onnx of an export with another --push-width beside this manifest: same I/O, other logits."""
    import contextlib
    import io

    from conftest import export_engine

    flags = case.export_args()
    flags[flags.index("--push-width") + 1] = "8"
    with contextlib.redirect_stdout(io.StringIO()):
        other = export_engine(case.model_dir, tmp_path / "pw8", case.max_len, [*flags, "--no-verify"])
    mixed = edited_copy(engine_dir, tmp_path / "mixed")
    shutil.copyfile(other / MODEL_FILE, mixed / MODEL_FILE)
    with pytest.raises(LoadError, match=r"\(params.push_width is 8 in the graph, 4 in the manifest\)"):
        MesaEngine.load(mixed, backend="ort-cpu")


def test_exported_graph_carries_its_manifest(engine_dir, tmp_path):
    import onnx

    session = ort.InferenceSession(str(engine_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
    found = session.get_modelmeta().custom_metadata_map
    manifest = artifact.load_manifest(engine_dir)
    assert {k: found[k] for k in artifact.graph_metadata(manifest)} == artifact.graph_metadata(manifest)
    assert json.loads(found["mesa.params"]) == manifest.params and found["mesa.max_len"] == "332"
    bare = edited_copy(engine_dir, tmp_path / "bare")  # as exported before graphs carried their manifest
    model = onnx.load(bare / MODEL_FILE)
    del model.metadata_props[:]
    onnx.save(model, bare / MODEL_FILE)
    with pytest.raises(LoadError, match="the graph carries no mesa.method, mesa.params"):
        MesaEngine.load(bare, backend="ort-cpu")


def test_schema_file_is_the_manifest(engine_dir):
    """mesa.schema.json mirrors the runtime: its methods, its fields, and it ships with the package."""
    import tomllib

    schema = json.loads(artifact.SCHEMA_FILE.read_text())
    assert schema["properties"]["method"]["enum"] == list(methods.METHODS)
    assert set(schema["properties"]) == set(artifact.Manifest.__dataclass_fields__)
    assert set(schema["properties"]) - set(schema["required"]) == {"method_params"}  # optional: {} when absent
    assert set(schema["properties"]["params"]["required"]) == set(mesa.MesaParams.__dataclass_fields__)
    assert set(artifact.CONTRACT_FIELDS) <= set(schema["properties"])
    project = tomllib.loads((artifact.SCHEMA_FILE.parents[1] / "pyproject.toml").read_text())
    assert "mesa.schema.json" in project["tool"]["setuptools"]["package-data"]["runtime"]
    assert any(d.startswith("jsonschema") for d in project["project"]["dependencies"])


def test_malformed_tokenizer(engine_dir, tmp_path):
    bad = edited_copy(engine_dir, tmp_path / "e")
    (bad / "tokenizer.json").write_text("{")
    with pytest.raises(LoadError, match="tokenizer.json cannot be read"):
        MesaEngine.load(bad)


def test_backend_errors(engine_dir, tmp_path):
    with pytest.raises(BackendError, match="unknown backend 'onnx-gpu'"):
        MesaEngine.load(engine_dir, backend="onnx-gpu")
    with pytest.raises(BackendError, match="bfloat16"):
        MesaEngine.load(edited_copy(engine_dir, tmp_path / "bf16", dtype="bf16"))
    with pytest.raises(RequestError, match="slots"):
        MesaEngine.load(engine_dir, slots=0)
    for slots in (1.5, "2", True, None):  # once TypeError from range() or <
        with pytest.raises(RequestError, match=f"slots must be an integer >= 1, got {slots!r}"):
            MesaEngine.load(engine_dir, slots=slots)
    with pytest.raises(RequestError, match=r"slots=1000000000000: .* GiB, more than this machine's"):
        MesaEngine.load(engine_dir, slots=10**12)  # refused before allocating, not by the OOM killer
    with pytest.raises(RequestError, match="directory must be a path"):
        MesaEngine.load(123)
    assert issubclass(LoadError, EngineError) and issubclass(RequestError, ValueError)


@pytest.mark.parametrize("backend", ["ort-cuda", "tensorrt"])
def test_missing_backend_is_named(engine_dir, backend, tmp_path):
    if backends.PROVIDERS[backend] in AVAILABLE:
        pytest.skip(f"{backends.PROVIDERS[backend]} is installed here")
    anywhere = rewritten_copy(engine_dir, tmp_path / "e", lambda m: m.update(target="portable"))  # runs on any backend
    with pytest.raises(BackendError, match=f"backend {backend} is not installed.*pip install"):
        MesaEngine.load(anywhere, backend=backend)


def test_auto_picks_cpu_here(engine_dir):
    if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(AVAILABLE):
        pytest.skip("a GPU provider is installed: auto would pick it")
    assert MesaEngine.load(engine_dir, backend="auto").backend == "ort-cpu"


# ------------------------------------------------------------------------------ backends by the manifest's target

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize("available, target, chosen", [
    (ALL, "ort-cpu", "ort-cpu"), (ALL, "ort-cuda", "ort-cuda"), (ALL, "tensorrt", "tensorrt"),
    (ALL, "portable", "tensorrt"),
    (ALL[1:], "tensorrt", "ort-cuda"), (ALL[1:], "portable", "ort-cuda"), (ALL[1:], "ort-cpu", "ort-cpu"),
    (ALL[2:], "ort-cuda", "ort-cpu"), (ALL[2:], "portable", "ort-cpu"),
])
def test_auto_picks_among_the_backends_the_target_was_made_for(monkeypatch, available, target, chosen):
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)
    assert backends.pick_backend("auto", target) == chosen


def test_auto_without_a_backend_for_the_target_is_one_error(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ALL[2:])
    with pytest.raises(BackendError, match="no backend for a tensorrt engine is installed: it runs on tensorrt or "
                                           "ort-cuda") as e:
        backends.pick_backend("auto", "tensorrt")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("requested, target", [("ort-cuda", "ort-cpu"), ("tensorrt", "ort-cpu"),
                                               ("ort-cpu", "tensorrt"), ("tensorrt", "ort-cuda")])
def test_an_explicit_backend_the_target_was_not_made_for_is_refused(monkeypatch, requested, target):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ALL)  # installed: the target alone refuses it
    with pytest.raises(BackendError, match=f"backend {requested} cannot run this engine: it was exported for "
                                           f"target {target}") as e:
        backends.pick_backend(requested, target)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("requested", backends.BACKENDS)
def test_a_portable_engine_takes_any_backend(monkeypatch, requested):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ALL)
    assert backends.pick_backend(requested, "portable") == requested


def test_load_respects_the_manifest_target(engine_dir, tmp_path):
    assert artifact.load_manifest(engine_dir).target == "ort-cpu"
    with pytest.raises(BackendError, match="backend ort-cuda cannot run this engine: it was exported for target "
                                           "ort-cpu, which runs on ort-cpu"):
        MesaEngine.load(engine_dir, backend="ort-cuda")
    gpu_only = rewritten_copy(engine_dir, tmp_path / "e", lambda m: m.update(target="tensorrt"))
    with pytest.raises(BackendError, match="backend ort-cpu cannot run this engine: it was exported for target "
                                           "tensorrt"):
        MesaEngine.load(gpu_only, backend="ort-cpu")


# ------------------------------------------------------------------------------ threads

def test_concurrent_requests_match_single_threaded(engine_dir, case):
    ids = case.input_ids
    jobs = [(ids[:300], {}), (ids[:150], {"temperature": 0.8, "seed": 1}), (ids[40:45], {}),
            (ids[:200], {"temperature": 1.0, "top_k": 20, "seed": 2}), (ids[10:130], {}), (ids[:260], {})] * 2
    for slots in (1, 2):
        engine = MesaEngine.load(engine_dir, backend="ort-cpu", slots=slots)
        run = lambda job: engine.generate(job[0], 8, stop_tokens=(), **job[1]).tokens  # noqa: E731
        stream = lambda job: list(engine.stream(job[0], 8, stop_tokens=(), **job[1]))  # noqa: E731
        alone = [run(job) for job in jobs]
        scored = engine.score(ids[:100])
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda ij: (run if ij[0] % 2 else stream)(ij[1]), enumerate(jobs)))
            scores = list(pool.map(lambda _: engine.score(ids[:100]), range(3)))
        assert together == alone
        assert all(max_diff(s, scored) == 0 for s in scores)
        assert engine.stats()["free_slots"] == slots


def test_slots_run_requests_at_once(engine_dir, case):
    """With 2 slots, two sequences hold a cache each at the same time; a third request waits."""
    engine = MesaEngine.load(engine_dir, backend="ort-cpu", slots=2)
    a, b = engine.sequence(case.input_ids[:20]), engine.sequence(case.input_ids[:30])
    a.step(), b.step()  # prefilled; they keep their slots until cancelled
    assert engine.stats()["free_slots"] == 0
    done = threading.Event()
    worker = threading.Thread(target=lambda: (engine.generate(case.input_ids[:10], 2), done.set()))
    worker.start()
    assert not done.wait(0.3)  # waiting for a slot
    a.cancel()
    assert done.wait(10)
    worker.join()
    b.cancel()
    assert engine.stats()["free_slots"] == 2


# ------------------------------------------------------------------------------ the device code path, on CPU

def test_device_step_on_cpu_reproduces_published_logits(case, tmp_path):
    """ort-cuda/tensorrt's path (IO binding, cache as OrtValues, TensorScatter writes) on CPUExecutionProvider,
    with the graph the ort-cuda target makes (in fp32, so that CPU kernels exist for it)."""
    engine_dir = export_engine(case.model_dir, tmp_path / "cuda", case.max_len,
                               [*case.export_args(), "--no-verify", "--target", "ort-cuda", "--precision", "fp32"])
    session = ort.InferenceSession(str(engine_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
    step = backends.OrtDeviceStep(session, device="cpu")
    cache = step.new_cache(CacheShape(2, 2, case.max_len, 16))
    logits, seq = scheduler.prefill(step, case.input_ids, mesa.prefill_steps(len(case.input_ids), case.params), cache)
    decode = np.stack([scheduler.decode(step, t, seq, cache) for t in case.fed_tokens])
    assert max_diff(logits, case.prefill_logits) <= TOL
    assert max_diff(decode, case.decode_logits) <= TOL


def test_device_cache_write_is_in_place():
    shape = CacheShape(layers=3, kv_heads=2, max_len=50, head_dim=4)
    writer = device_cache.cache_writer(shape, np.float32, ["CPUExecutionProvider"])
    cache = device_cache.DeviceKVCache(shape, np.float32, writer, "cpu", 0)
    zeros = np.zeros(shape.full(), np.float32)
    cache.k.update_inplace(zeros)
    cache.v.update_inplace(zeros)
    buffers = (cache.k.data_ptr(), cache.v.data_ptr())
    rows = np.random.default_rng(0).normal(size=(3, 1, 2, 5, 4)).astype(np.float32)
    cache.write(7, ort.OrtValue.ortvalue_from_numpy(rows), ort.OrtValue.ortvalue_from_numpy(-rows))
    assert (cache.k.data_ptr(), cache.v.data_ptr()) == buffers
    k, v = cache.k.numpy(), cache.v.numpy()
    assert np.array_equal(k[:, :, :, 7:12], rows) and np.array_equal(v[:, :, :, 7:12], -rows)
    k[:, :, :, 7:12] = 0
    assert not k.any()
    with pytest.raises(ValueError, match="cannot write"):
        cache.write(48, ort.OrtValue.ortvalue_from_numpy(rows), ort.OrtValue.ortvalue_from_numpy(rows))


@pytest.mark.parametrize("backend", ["ort-cuda", "tensorrt"])
def test_gpu_backend_reproduces_published_logits(engine_dir, case, backend):
    if backends.PROVIDERS[backend] not in AVAILABLE:
        pytest.skip(f"untested here: this onnxruntime has no {backends.PROVIDERS[backend]} (CPU-only machine, "
                    "no onnxruntime-gpu / TensorRT)")
    engine = MesaEngine.load(engine_dir, backend=backend)
    g = engine.generate(case.input_ids, 17, return_logits=True)
    assert max_diff(g.prefill_logits, case.prefill_logits) <= TOL
    assert max_diff(g.decode_logits, case.decode_logits) <= TOL

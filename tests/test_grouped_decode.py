"""`--decode-kernel grouped`: decode steps on the Mesa CPU kernel (runtime/ops/decode_attention.cpp).

The kernel is checked against ONNX Runtime's own com.microsoft::GroupQueryAttention on the same inputs
(share-buffer and copying modes, rows of different lengths, a head size off the vector path), and the
engines exported with it against the published logits, the PyTorch reference decoder over 300-step
decodes across anchor jumps, and the same requests alone. The library comes from scripts/build_cpp.sh
(the `cpp_build` fixture, which skips only where the build tools cannot be had)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto

from runtime import custom_ops, mesa
from runtime.engine import LoadError, MesaEngine
from tests.conftest import (
    KERNEL_LOOPS,
    MESA_T64,
    MESA_T64_FLAGS,
    OFFICIAL_CASES,
    anchor_jumps,
    assert_published_generation,
    assert_refused_in_one_line,
    export_engine,
    load_official,
    one_node_session,
    prompt,
    reference_greedy,
    tiny_checkpoint,
)

TOL = 1e-4
GROUPED = ["--decode-kernel", "grouped"]


# ------------------------------------------------------------------------------ the kernel against GQA

def attention_session(op: str, domain: str, B: int, H: int, Hkv: int, d: int, M: int):
    f = TensorProto.FLOAT
    inputs = [("query", f, [B, 1, H * d]), ("key", f, [B, 1, Hkv * d]), ("value", f, [B, 1, Hkv * d]),
              ("past_key", f, [B, Hkv, M, d]), ("past_value", f, [B, Hkv, M, d]), ("seqlens_k", TensorProto.INT32, [B]),
              ("total", TensorProto.INT32, []), ("cos", f, [M, d // 2]), ("sin", f, [M, d // 2])]
    outputs = [("out", f, [B, 1, H * d]), ("present_key", f, [B, Hkv, M, d]), ("present_value", f, [B, Hkv, M, d])]
    return one_node_session(op, domain, inputs, outputs, num_heads=H, kv_num_heads=Hkv, do_rotary=1,
                            rotary_interleaved=0)


def run_attention(op, domain, feeds, cache, share: bool):
    """(out, present_key, present_value); share binds one buffer as past and present, as the engine does."""
    B, Hkv, M, d = cache[0].shape
    H = feeds["query"].shape[-1] // d
    session = attention_session(op, domain, B, H, Hkv, d, M)
    past_k, past_v = (c.copy() for c in cache)
    b = session.io_binding()
    for name, value in feeds.items():
        b.bind_cpu_input(name, value)
    pk, pv = ort.OrtValue.ortvalue_from_numpy(past_k), ort.OrtValue.ortvalue_from_numpy(past_v)
    b.bind_ortvalue_input("past_key", pk)
    b.bind_ortvalue_input("past_value", pv)
    b.bind_output("out", "cpu")
    if share:
        b.bind_ortvalue_output("present_key", pk)
        b.bind_ortvalue_output("present_value", pv)
    else:
        b.bind_output("present_key", "cpu")
        b.bind_output("present_value", "cpu")
    session.run_with_iobinding(b)
    out = [o.numpy().copy() for o in b.get_outputs()]
    return (out[0], past_k, past_v) if share else tuple(out)


def numpy_decode(feeds, cache, H: int, Hkv: int):
    """The step in numpy: rotate the new key and each query at the row's index, attend over keys 0..index."""
    B, _, M, d = cache[0].shape
    out = np.zeros((B, 1, H * d))

    def rotate(x, pos):
        c, s = feeds["cos"][pos].astype(np.float64), feeds["sin"][pos].astype(np.float64)
        a, b = x[..., :d // 2], x[..., d // 2:]
        return np.concatenate([a * c - b * s, b * c + a * s], -1)

    for b, pos in enumerate(feeds["seqlens_k"]):
        for g in range(Hkv):
            keys = cache[0][b, g, :pos + 1].astype(np.float64)
            values = cache[1][b, g, :pos + 1].astype(np.float64)
            keys[pos] = rotate(feeds["key"][b, 0, g * d:(g + 1) * d], pos)
            values[pos] = feeds["value"][b, 0, g * d:(g + 1) * d]
            for h in range(g * H // Hkv, (g + 1) * H // Hkv):
                scores = keys @ rotate(feeds["query"][b, 0, h * d:(h + 1) * d], pos) / np.sqrt(d)
                p = np.exp(scores - scores.max())
                out[b, 0, h * d:(h + 1) * d] = p @ values / p.sum()
    return out


# B, H, Hkv, d, M, the new token's index per row: the first key, 16-key groups and 64-key blocks whole
# and cut, the last slot; d 64 (model M), 128 (Llama 2), 16 / 48 / 80 (other AVX-512 widths), 40 (AVX2 only
# on an AVX-512 CPU), 136 / 144 (past the vector forms; 40 and 136 against numpy only); query heads per KV head 1, 4, 8
SHAPES = [(3, 8, 2, 64, 300, [0, 130, 299]), (2, 16, 4, 64, 200, [15, 16]), (2, 4, 4, 128, 150, [63, 64]),
          (1, 8, 1, 16, 100, [99]), (2, 4, 1, 48, 90, [31, 80]), (1, 6, 2, 80, 70, [65]),
          (1, 4, 2, 40, 50, [33]), (1, 2, 1, 136, 40, [17]), (1, 4, 2, 144, 40, [20])]


@pytest.mark.parametrize("loops", KERNEL_LOOPS)
@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"H{s[1]}-{s[2]}_d{s[3]}_n{'-'.join(map(str, s[5]))}")
def test_kernel_equals_group_query_attention(mesa_ops_library, monkeypatch, loops, share, shape):
    for k, v in KERNEL_LOOPS[loops].items():  # read when the session creates the kernel
        monkeypatch.setenv(k, v)
    B, H, Hkv, d, M, lens = shape
    lens = np.array(lens, np.int32)
    rng = np.random.default_rng(d + M)
    feeds = {"query": rng.standard_normal((B, 1, H * d), np.float32),
             "key": rng.standard_normal((B, 1, Hkv * d), np.float32),
             "value": rng.standard_normal((B, 1, Hkv * d), np.float32), "seqlens_k": lens,
             "total": np.array(lens.max() + 1, np.int32)}
    angles = np.arange(M)[:, None] / 10000 ** (np.arange(0, d, 2) / d)[None]
    feeds.update(cos=np.cos(angles).astype(np.float32), sin=np.sin(angles).astype(np.float32))
    cache = tuple(rng.standard_normal((B, Hkv, M, d), np.float32) for _ in range(2))
    got = run_attention("GroupedDecodeAttention", custom_ops.DOMAIN, feeds, cache, share)
    assert np.abs(got[0] - numpy_decode(feeds, cache, H, Hkv)).max() <= 1e-5
    for new, old in zip(got[1:], cache):
        for b, n in enumerate(lens):  # nothing but the new row written
            assert np.array_equal(np.delete(new[b], n, axis=1), np.delete(old[b], n, axis=1))
    if d % 16:  # ONNX Runtime's GroupQueryAttention takes head sizes of multiples of 16 only
        return
    want = run_attention("GroupQueryAttention", "com.microsoft", feeds, cache, share)
    assert np.abs(got[0] - want[0]).max() <= 1e-5
    for new, ref in zip(got[1:], want[1:]):
        for b, n in enumerate(lens):
            # the row's keys with the new one, rotated as GQA rotates it (GQA leaves the slots past a row's
            # length undefined in a present buffer of its own)
            assert np.abs(new[b, :, :n + 1] - ref[b, :, :n + 1]).max() <= 1e-5


# ------------------------------------------------------------------------------ engines exported with it

@pytest.mark.parametrize("name", OFFICIAL_CASES)
def test_published_logits_through_the_grouped_kernel(mesa_ops_library, tmp_path, name):
    case = load_official(name)
    with contextlib.redirect_stdout(io.StringIO()):
        out = export_engine(case.model_dir, tmp_path / "engine", case.max_len, [*case.export_args(), *GROUPED])
    with MesaEngine.load(out, backend="ort-cpu") as engine:
        assert engine.stats()["inplace_decode"]
        g = engine.generate(case.input_ids, len(case.fed_tokens) + 1, return_logits=True)
    assert_published_generation(g, case, TOL)


@pytest.fixture(scope="module")
def tiny(mesa_ops_library, tmp_path_factory):
    """(checkpoint, the gqa engine, the grouped engine) of a tiny Llama trained at T = 64."""
    d = tmp_path_factory.mktemp("grouped")
    ckpt = tiny_checkpoint(d / "ckpt", max_position_embeddings=MESA_T64["train_length"])
    with contextlib.redirect_stdout(io.StringIO()):
        gqa = export_engine(ckpt, d / "gqa", 480, [*MESA_T64_FLAGS, "--no-verify"])
        grouped = export_engine(ckpt, d / "grouped", 480, [*MESA_T64_FLAGS, "--no-verify", *GROUPED])
    return ckpt, gqa, grouped


def test_the_pass_moves_every_decode_attention(tiny):
    _, gqa, grouped = tiny
    model = ir.load(grouped / "model.onnx")
    nodes = [n for n in ir.traversal.RecursiveGraphIterator(model.graph)]
    moved = [n for n in nodes if (n.domain, n.op_type) == (custom_ops.DOMAIN, "GroupedDecodeAttention")]
    left = [n for n in nodes if n.op_type == "GroupQueryAttention" and n.attributes.get_int("do_rotary", 0)]
    layers = len([v for v in model.graph.inputs if v.name.startswith("past_key_")])
    assert len(moved) == layers and not left and model.opset_imports[custom_ops.DOMAIN] == 1
    prefill = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    assert len(prefill) == layers  # the prefill branches keep ORT's kernel
    import json

    assert "grouped_decode" in json.loads((grouped / "mesa.json").read_text())["passes"]
    assert "grouped_decode" not in json.loads((gqa / "mesa.json").read_text())["passes"]


def test_long_decode_matches_the_reference_across_anchor_jumps(tiny):
    ckpt, _, grouped = tiny
    L, steps = 150, 300
    params = mesa.MesaParams(**MESA_T64)
    assert anchor_jumps(L, steps, mesa.dynamic_split(L, params)) >= 4
    ids = prompt(L, L)
    fed, expected = reference_greedy(ckpt, ids, steps, 480)
    with MesaEngine.load(grouped, backend="ort-cpu") as engine, engine.sequence(ids) as seq:
        assert int(np.argmax(seq.step())) == fed[0]
        got = np.stack([seq.feed([t])[0] for t in fed])
    assert np.abs(got - expected).max() <= TOL
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()


def test_batch_rows_equal_each_alone_and_the_gqa_engine(tiny):
    _, gqa, grouped = tiny
    prompts = [prompt(n, n) for n in (5, 40, 70, 150)]
    with MesaEngine.load(grouped, backend="ort-cpu", slots=4) as engine:
        together = engine.generate(prompts, max_new_tokens=60, return_logits=True)
        alone = [engine.generate(p, max_new_tokens=60, return_logits=True) for p in prompts]
    with MesaEngine.load(gqa, backend="ort-cpu", slots=4) as engine:
        theirs = engine.generate(prompts, max_new_tokens=60, return_logits=True)
    for row, one, other in zip(together, alone, theirs):
        assert row.tokens == one.tokens == other.tokens
        assert np.abs(row.decode_logits - one.decode_logits).max() <= TOL
        assert np.abs(row.decode_logits - other.decode_logits).max() <= TOL


# ------------------------------------------------------------------------------ refusals

def test_an_engine_that_needs_the_kernels_says_how_to_build_them(tiny, monkeypatch, tmp_path):
    monkeypatch.delenv(custom_ops.ENV, raising=False)
    monkeypatch.setattr(custom_ops, "BUILT", tmp_path / "absent.so")
    with pytest.raises(LoadError) as e:
        MesaEngine.load(tiny[2], backend="ort-cpu")
    assert "scripts/build_cpp.sh" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv(custom_ops.ENV, str(tmp_path / "nowhere.so"))
    with pytest.raises(LoadError, match="is not a file"):
        MesaEngine.load(tiny[1], backend="ort-cpu")  # a set variable must name a library, whatever the engine


@pytest.mark.parametrize("flags, says", [(["--target", "portable"], "is for --target ort-cpu"),
                                         (["--method", "rerope"], "is for --target ort-cpu"),
                                         (["--precision", "fp16"], "runs float32 attention")])
def test_export_refuses_grouped_where_it_cannot_run(mesa_ops_library, tiny, tmp_path, flags, says):
    assert_refused_in_one_line(tiny[0], tmp_path / "engine", [*GROUPED, *flags], says)

"""`--prefill-kernel tiled`: prefill chunks on the Mesa CPU kernel (runtime/ops/prefill_attention.cpp).

The kernel is checked against ONNX Runtime's own com.microsoft::GroupQueryAttention on the same inputs and,
for batches (which GQA refuses with a past), against attention written out in numpy; in each of its loop
forms (AVX-512, AVX2, plain, picked by environment variables when the CPU has them). Engines exported with
it are checked against the published logits, the PyTorch reference decoder over long prompts with many
middle chunks followed by long decodes, and the same engine without it for another method. The library
comes from scripts/build_cpp.sh (the `cpp_build` fixture, which skips only where the build tools cannot
be had)."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto

from runtime import custom_ops, mesa
from runtime.engine import MesaEngine
from tests.conftest import (
    KERNEL_LOOPS,
    MESA_T64,
    MESA_T64_FLAGS,
    OFFICIAL_CASES,
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
TILED = ["--prefill-kernel", "tiled"]
BOTH = [*TILED, "--decode-kernel", "grouped"]


# ------------------------------------------------------------------------------ the kernel

def prefill_session(op: str, domain: str, B: int, H: int, Hkv: int, d: int, s: int, P: int):
    f = TensorProto.FLOAT
    inputs = [("query", f, [B, s, H * d]), ("key", f, [B, s, Hkv * d]), ("value", f, [B, s, Hkv * d]),
              ("past_key", f, [B, Hkv, P, d]), ("past_value", f, [B, Hkv, P, d]),
              ("seqlens_k", TensorProto.INT32, [B]), ("total", TensorProto.INT32, [])]
    presents = [("present_key", f, None), ("present_value", f, None)] if domain == "com.microsoft" else []
    return one_node_session(op, domain, inputs, [("out", f, [B, s, H * d]), *presents], num_heads=H,
                            kv_num_heads=Hkv)


def inputs(B, H, Hkv, d, s, P, pasts, seed=0):
    rng = np.random.default_rng(seed)
    return {"query": rng.standard_normal((B, s, H * d), np.float32),
            "key": rng.standard_normal((B, s, Hkv * d), np.float32),
            "value": rng.standard_normal((B, s, Hkv * d), np.float32),
            "past_key": rng.standard_normal((B, Hkv, P, d), np.float32),
            "past_value": rng.standard_normal((B, Hkv, P, d), np.float32),
            "seqlens_k": np.array([p + s - 1 for p in pasts], np.int32),
            "total": np.array(max(pasts) + s, np.int32)}


def run(op, domain, feeds, H, Hkv):
    B, s, _ = feeds["query"].shape
    _, _, P, d = feeds["past_key"].shape
    return prefill_session(op, domain, B, H, Hkv, d, s, P).run(["out"], feeds)[0]


def numpy_attention(feeds, H, Hkv):
    """Query i of row b sees the row's past keys (total - s of them) and the chunk's keys 0..i."""
    B, s, _ = feeds["query"].shape
    d = feeds["past_key"].shape[-1]
    out = np.zeros((B, s, H * d))
    for b in range(B):
        past = int(feeds["seqlens_k"][b]) + 1 - s
        for h in range(H):
            g = h // (H // Hkv)
            keys = np.concatenate([feeds["past_key"][b, g, :past], feeds["key"][b, :, g * d:(g + 1) * d]]).astype(float)
            values = np.concatenate([feeds["past_value"][b, g, :past], feeds["value"][b, :, g * d:(g + 1) * d]])
            q = feeds["query"][b, :, h * d:(h + 1) * d].astype(float) / np.sqrt(d)
            scores = q @ keys.T
            scores[np.arange(s)[:, None] < np.arange(past + s)[None] - past] = -np.inf
            p = np.exp(scores - scores.max(-1, keepdims=True))
            out[b, :, h * d:(h + 1) * d] = (p / p.sum(-1, keepdims=True)) @ values
    return out


SHAPES = [  # B, H, Hkv, d, s, P, pasts: no past, past not a whole block, chunk off the tile size, d 16 / 64 / 128
    (1, 4, 2, 64, 5, 0, [0]), (1, 8, 2, 64, 70, 100, [100]), (1, 16, 4, 64, 130, 200, [200]),
    (1, 4, 4, 16, 40, 7, [7]), (1, 6, 2, 128, 65, 64, [64]), (1, 4, 1, 32, 97, 129, [129])]


@pytest.mark.parametrize("loops", KERNEL_LOOPS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"H{s[1]}-{s[2]}_d{s[3]}_s{s[4]}_past{s[6][0]}")
def test_kernel_equals_group_query_attention(mesa_ops_library, monkeypatch, loops, shape):
    for k, v in KERNEL_LOOPS[loops].items():  # read when the session creates the kernel
        monkeypatch.setenv(k, v)
    B, H, Hkv, d, s, P, pasts = shape
    feeds = inputs(*shape)
    want = run("GroupQueryAttention", "com.microsoft", feeds, H, Hkv)
    got = run("TiledPrefillAttention", custom_ops.DOMAIN, feeds, H, Hkv)
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(got - numpy_attention(feeds, H, Hkv)).max() <= 1e-5


@pytest.mark.parametrize("loops", KERNEL_LOOPS)
def test_rows_of_a_batch_see_their_own_past(mesa_ops_library, monkeypatch, loops):
    for k, v in KERNEL_LOOPS[loops].items():
        monkeypatch.setenv(k, v)
    feeds = inputs(3, 8, 2, 64, 50, 150, [150, 0, 77], seed=1)  # rows with a full, no, and a partial past
    got = run("TiledPrefillAttention", custom_ops.DOMAIN, feeds, 8, 2)
    assert np.abs(got - numpy_attention(feeds, 8, 2)).max() <= 1e-5


def test_kernel_refuses_a_past_that_does_not_fit(mesa_ops_library):
    feeds = inputs(1, 4, 2, 64, 10, 20, [20])
    feeds["seqlens_k"] = np.array([40], np.int32)  # 31 past keys claimed, 20 rows given
    with pytest.raises(Exception, match="seqlens_k does not fit"):
        run("TiledPrefillAttention", custom_ops.DOMAIN, feeds, 4, 2)


# ------------------------------------------------------------------------------ engines exported with it

@pytest.mark.parametrize("name", OFFICIAL_CASES)
def test_published_logits_through_both_kernels(mesa_ops_library, tmp_path, name):
    case = load_official(name)
    with contextlib.redirect_stdout(io.StringIO()):
        out = export_engine(case.model_dir, tmp_path / "engine", case.max_len, [*case.export_args(), *BOTH])
    with MesaEngine.load(out, backend="ort-cpu") as engine:
        g = engine.generate(case.input_ids, len(case.fed_tokens) + 1, return_logits=True)
    assert_published_generation(g, case, TOL)


@pytest.fixture(scope="module")
def wide(mesa_ops_library, tmp_path_factory):
    """(checkpoint, engine with both Mesa kernels) of a small Llama with head size 64 (the vector loops), T = 64.
    Weights at half the usual spread: at 0.2 its logits reach ~12, where float32 alone (ORT's own kernels
    too) drifts past 1e-4 from the reference within 100 steps; at 0.1 they reach ~7 and stay within 3e-5."""
    d = tmp_path_factory.mktemp("tiled")
    ckpt = tiny_checkpoint(d / "ckpt", hidden_size=256, intermediate_size=256, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=MESA_T64["train_length"],
                           initializer_range=0.1)
    with contextlib.redirect_stdout(io.StringIO()):
        both = export_engine(ckpt, d / "both", 720, [*MESA_T64_FLAGS, "--no-verify", *BOTH])
    return ckpt, both


def test_the_pass_moves_every_prefill_attention(wide):
    model = ir.load(wide[1] / "model.onnx")
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    tiled = [n for n in nodes if (n.domain, n.op_type) == (custom_ops.DOMAIN, "TiledPrefillAttention")]
    layers = len([v for v in model.graph.inputs if v.name.startswith("past_key_")])
    assert len(tiled) == layers and len(tiled[0].outputs) == 1
    assert not [n for n in nodes if n.op_type == "GroupQueryAttention"]  # decode is on the grouped kernel
    passes = json.loads((wide[1] / "mesa.json").read_text())["passes"]
    assert passes[-2:] == ["grouped_decode", "tiled_prefill"]


def test_long_prompt_and_decode_match_the_reference(wide):
    """A 600-token prompt at T = 64: a first chunk, several middle chunks and a last chunk, all on the tiled
    kernel; then 100 decode steps on the grouped one."""
    ckpt, both = wide
    L, steps = 600, 100
    params = mesa.MesaParams(**MESA_T64)
    assert sum(s.kind == "middle" for s in mesa.prefill_steps(L, params)) >= 3
    ids = prompt(L, L)
    fed, expected = reference_greedy(ckpt, ids, steps, 720)
    with MesaEngine.load(both, backend="ort-cpu") as engine, engine.sequence(ids) as seq:
        assert int(np.argmax(seq.step())) == fed[0]
        got = np.stack([seq.feed([t])[0] for t in fed])
    assert np.abs(got - expected).max() <= TOL
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()


def test_another_method_gives_the_same_logits(wide, tmp_path):
    """streaming-llm lowers with the `auto` kernel (its prefill chunks on GQA, so on the tiled kernel here)."""
    ckpt, _ = wide
    flags = ["--method", "streaming-llm", "--train-length", "64", "--no-verify"]
    with contextlib.redirect_stdout(io.StringIO()):
        plain = export_engine(ckpt, tmp_path / "plain", 400, flags)
        tiled = export_engine(ckpt, tmp_path / "tiled", 400, [*flags, *TILED])
    ids = prompt(300, 3)
    results = []
    for engine_dir in (plain, tiled):
        with MesaEngine.load(engine_dir, backend="ort-cpu") as engine:
            results.append(engine.generate(ids, 20, return_logits=True))
    assert np.abs(results[0].prefill_logits - results[1].prefill_logits).max() <= TOL
    assert np.abs(results[0].decode_logits - results[1].decode_logits).max() <= TOL
    assert results[0].tokens == results[1].tokens


@pytest.mark.parametrize("flags, says", [(["--target", "portable"], "is for --target ort-cpu"),
                                         (["--method", "rerope"], "is for --target ort-cpu"),
                                         (["--precision", "fp16"], "runs float32 attention")])
def test_export_refuses_tiled_where_it_cannot_run(mesa_ops_library, wide, tmp_path, flags, says):
    assert_refused_in_one_line(wide[0], tmp_path / "engine", [*TILED, *flags], says)


def test_quantized_engines_run_on_the_kernels(wide, tmp_path):
    """int8-int4: the quantization passes run after the kernel passes, on both graphs (int8 prefill, int4 decode),
    and the engine answers as the same quantized engine without the kernels. Not to 1e-4: dynamic int8 quantizes
    each call's activations with their own scale, so the kernels' 1e-6 differences in attention occasionally
    flip one rounding (0.06 at worst here, against int8's own ~9 % error); almost every logit is identical."""
    ckpt, _ = wide
    flags = [*MESA_T64_FLAGS, "--precision", "int8-int4", "--no-verify"]
    with contextlib.redirect_stdout(io.StringIO()):
        plain = export_engine(ckpt, tmp_path / "plain", 400, flags)
        kernels = export_engine(ckpt, tmp_path / "kernels", 400, [*flags, *BOTH])
    for graph in ("model.onnx", "decode.onnx"):
        ops = {(n.domain, n.op_type) for n in ir.traversal.RecursiveGraphIterator(ir.load(kernels / graph).graph)}
        assert (custom_ops.DOMAIN, "TiledPrefillAttention") in ops or graph == "decode.onnx"
        assert (custom_ops.DOMAIN, "GroupedDecodeAttention") in ops
    ids = prompt(300, 5)
    results = []
    for engine_dir in (plain, kernels):
        with MesaEngine.load(engine_dir, backend="ort-cpu") as engine:
            results.append(engine.generate(ids, 20, return_logits=True))
    for kind in ("prefill_logits", "decode_logits"):
        diff = np.abs(getattr(results[0], kind) - getattr(results[1], kind))
        assert np.median(diff) <= 1e-5 and diff.max() <= 0.2, kind
    assert results[0].tokens == results[1].tokens

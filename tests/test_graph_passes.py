"""The graph passes (graph_ops/pipeline.py): each pass's op counts before/after and its outputs.

Every test starts from the same engine, the published fixture a_L300_gqa exported with `--target
portable` (no passes), runs the pass(es) on a copy and drives the result through the fixture's Mesa plan
(runtime.scheduler + OrtStep): 300 prompt tokens in several chunks, stairs and log-n in decode. Outputs
must stay within 1e-4 of the unpassed graph and of the published logits (fp32).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graph_ops import cleanup, inline_parts, lower_attention, mesa_op, pipeline, precision, step_positions, tensorrt_ops
from runtime import artifact, mesa
from runtime.backends import OrtStep
from runtime.batch_decoder import InplaceDecoder
from runtime.sequence import replay
from runtime.kv_cache import CacheShape, KVCache
from tests.conftest import export_engine, load_official, run_fixture

TOL = 1e-4
CASE = "a_L300_gqa"
KERNEL_OP = {"attention": "Attention", "gqa": "com.microsoft::GroupQueryAttention", "auto": "If", "inplace": "If",
             "decomposed": "ai.mesa::MesaAttend"}


@pytest.fixture(scope="module")
def case():
    return load_official(CASE)


@pytest.fixture(scope="module")
def portable(case, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("passes") / "portable"
    return export_engine(case.model_dir, out, case.max_len, [*case.export_args(), "--target", "portable"])


def load(engine: Path) -> ir.Model:
    return ir.load(engine / artifact.MODEL_FILE)


def ops(model: ir.Model) -> Counter:
    return Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in model.graph)


def run(model: ir.Model, case, tmp_path: Path, rope: Path | None = None) -> np.ndarray:
    """Prefill + 16 decode logits of the fixture through `model`: decode steps through the in-place
    decode branch (runtime.batcher over a DecodeCache) when the graph has one."""
    path = tmp_path / f"m{len(list(tmp_path.iterdir()))}.onnx"
    ir.save(model, path)
    step = OrtStep(path)
    if not step.inplace:
        prefill, decode, _ = run_fixture(step, KVCache(load_manifest_shape(case)), case)
        return np.concatenate([prefill, decode])
    decoder = InplaceDecoder(step, load_manifest_shape(case), 1, np.load(rope), case.params)
    prefill, decode = replay(step, decoder, case.input_ids, mesa.prefill_steps(len(case.input_ids), case.params),
                             case.fed_tokens)
    return np.concatenate([prefill, decode])


def load_manifest_shape(case) -> CacheShape:
    """The cache shape of the fixture's checkpoint, read from its config.json (not from our loader)."""
    import json

    cfg = json.loads((case.model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return CacheShape(cfg["num_hidden_layers"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                      case.max_len, head_dim)


@pytest.fixture(scope="module")
def baseline(portable, case, tmp_path_factory) -> np.ndarray:
    return run(load(portable), case, tmp_path_factory.mktemp("baseline"))


def assert_same(out: np.ndarray, baseline: np.ndarray, case) -> None:
    published = np.concatenate([case.prefill_logits, case.decode_logits])
    d_base, d_pub = np.abs(out - baseline).max(), np.abs(out - published).max()
    print(f"max |dlogit| vs unpassed {d_base:.2e}, vs published {d_pub:.2e}")
    assert d_base <= TOL and d_pub <= TOL
    assert out[len(case.prefill_logits):].argmax(-1).tolist() == case.argmax_tokens


# ------------------------------------------------------------------------------ mesa_op parts

def test_function_body_is_self_contained():
    body = mesa_op.function_proto()
    assert not [n.op_type for n in body.node if n.domain], "parts must be inlined into MesaAttention's body"
    assert [f.name for f in mesa_op.part_functions()] == ["MesaCachedKV", "MesaStepPositions", "MesaAttend"]


def step_positions_model(max_len: int, T: int, pw: int) -> onnx.ModelProto:
    """A graph that calls ai.mesa::MesaStepPositions alone, to read what it computes."""
    from onnx import TensorProto, helper

    outs = ["cos_k", "sin_k", "cos_q", "sin_q", "scale", "visible", "key_ids", "cached_ids", "query_ids", "total_len"]
    node = helper.make_node("MesaStepPositions", ["q", "cos", "sin", *mesa_op.SCALAR_INPUTS], outs,
                            domain=mesa_op.DOMAIN, train_length=T, push_width=pw)
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 1, "q", 2]),
              helper.make_tensor_value_info("cos", TensorProto.FLOAT, [max_len, 1]),
              helper.make_tensor_value_info("sin", TensorProto.FLOAT, [max_len, 1])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.INT64, []) for n in mesa_op.SCALAR_INPUTS]
    graph = helper.make_graph([node], "step", inputs, [helper.make_value_info(o, onnx.TypeProto()) for o in outs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", mesa_op.OPSET),
                                                   helper.make_opsetid(mesa_op.DOMAIN, 1)],
                             functions=[ir.serde.serialize_function(f) for f in mesa_op.part_functions()])


@pytest.mark.parametrize("step", [
    mesa.Step(0, 8, 0, 0, 112, "first"), mesa.Step(120, 232, 8, 120, 112, "middle"),
    mesa.Step(232, 340, 0, 0, 112, "last"), mesa.decode_step(1008, 112), mesa.decode_step(1009, 112)])
def test_step_positions_follow_runtime_mesa(step):
    """The shared subgraph's positions, log-n scale and mask are runtime.mesa's, over the S visible keys."""
    import onnxruntime as ort

    max_len, T, pw = 1100, 128, 4
    sess = ort.InferenceSession(step_positions_model(max_len, T, pw).SerializeToString())
    table = np.arange(max_len, dtype=np.float32)[:, None]
    feeds = {"q": np.zeros((1, 1, step.q, 2), np.float32), "cos": table, "sin": -table,
             **{k: np.array(v, dtype=np.int64) for k, v in step.scalars().items()}}
    cos_k, _, cos_q, _, scale, visible, key_ids, cached_ids, query_ids, total = sess.run(None, feeds)
    S = step.kv_len
    pos = mesa.key_positions(S, step.chunk_width, T, pw)
    assert int(total) == S and visible.shape == (step.q, S)  # never the max_len cache slots
    np.testing.assert_array_equal(key_ids[0], pos)
    np.testing.assert_array_equal(np.concatenate([cached_ids[0], query_ids[0]]), pos)
    np.testing.assert_array_equal(cos_k[:, 0], pos.astype(np.float32))
    np.testing.assert_array_equal(cos_q[:, 0], pos[S - step.q:].astype(np.float32))
    np.testing.assert_allclose(scale[:, 0], mesa.logn_scale(np.arange(S - step.q, S), T), rtol=2e-7)  # 1 ulp of ln
    expected = np.arange(S)[None, :] <= np.arange(S - step.q, S)[:, None]
    np.testing.assert_array_equal(visible, expected)


# ------------------------------------------------------------------------------ one test per pass

@pytest.mark.parametrize("kernel", lower_attention.KERNELS)
def test_lower_attention(kernel, portable, baseline, case, tmp_path):
    model = load(portable)
    before = ops(model)
    assert before["ai.mesa::MesaAttention"] == 2 and not before[KERNEL_OP[kernel]]
    assert lower_attention.lower_attention(model, kernel) == 2
    after = ops(model)
    print(kernel, "before", dict(before.most_common(6)), "after", dict(after.most_common(6)))
    assert after["ai.mesa::MesaAttention"] == 0 and after[KERNEL_OP[kernel]] == 2
    assert after["ai.mesa::MesaStepPositions"] == 2 and after["ai.mesa::MesaCachedKV"] == 2
    assert_same(run(model, case, tmp_path, portable / artifact.ROPE_FILE), baseline, case)  # the part functions run as they are


def test_fuse_step_positions(portable, baseline, case, tmp_path):
    model = load(portable)
    lower_attention.lower_attention(model, "attention")
    assert ops(model)["ai.mesa::MesaStepPositions"] == 2
    assert step_positions.fuse_step_positions(model) == 1
    assert_same(run(model, case, tmp_path, portable / artifact.ROPE_FILE), baseline, case)
    inline_parts.inline_parts(model)
    counts = ops(model)
    # one mask / stair-position computation per step, whatever the number of layers
    assert counts["LessOrEqual"] == 1 and counts["Mod"] == 1 and counts["Range"] == 2
    # nothing new crosses the graph boundary: no mask input, same step I/O
    assert [v.name for v in model.graph.inputs] == list(artifact.STEP_INPUTS)
    assert [v.name for v in model.graph.outputs] == list(artifact.STEP_OUTPUTS)


def test_fuse_step_positions_keeps_calls_it_cannot_prove_equal(portable):
    model = load(portable)
    lower_attention.lower_attention(model, "attention")
    calls = [n for n in model.graph if n.op_type == "MesaStepPositions"]
    calls[1].inputs[0].shape = None  # q's batch/length no longer known for layer 1
    assert step_positions.fuse_step_positions(model) == 2


def test_inline_parts(portable, baseline, case, tmp_path):
    model = load(portable)
    lower_attention.lower_attention(model, "gqa")
    step_positions.fuse_step_positions(model)
    inline_parts.inline_parts(model)
    counts = ops(model)
    assert not [k for k in counts if k.startswith("ai.mesa::")] and not model.functions
    assert counts["com.microsoft::GroupQueryAttention"] == 2 and counts["RotaryEmbedding"] == 6
    assert_same(run(model, case, tmp_path, portable / artifact.ROPE_FILE), baseline, case)


def test_cleanup(portable, baseline, case, tmp_path):
    model = load(portable)
    for p in (lower_attention.lower_attention, step_positions.fuse_step_positions, inline_parts.inline_parts):
        p(model)
    before = sum(1 for _ in model.graph)
    cleanup.cleanup(model)
    after = sum(1 for _ in model.graph)
    print(f"cleanup: {before} -> {after} nodes")
    assert after < before
    assert all(v.dtype is not None for n in model.graph for v in n.outputs)  # shape/type inference ran
    assert_same(run(model, case, tmp_path, portable / artifact.ROPE_FILE), baseline, case)


# What each target's pipeline must run, written out here (not read from graph_ops/pipeline.py): the
# lowering of the attention op, the fusions, and the checks the target's runtime needs.
EXPECTED_PASSES = {
    "portable": [],
    "ort-cpu": ["lower_attention[inplace]", "fuse_step_positions", "inline_parts", "cleanup"],
    "ort-cuda": ["lower_attention[attention]", "fuse_step_positions", "inline_parts", "cleanup", "check_half_precision"],
    "tensorrt": ["lower_attention[decomposed]", "fuse_step_positions", "inline_parts", "cleanup",
                 "check_half_precision", "check_tensorrt_ops"],
}


@pytest.mark.parametrize("target", pipeline.TARGETS)
def test_pipeline(target, portable, baseline, case, tmp_path):
    model = load(portable)
    names = pipeline.run_passes(model, target)
    assert names == EXPECTED_PASSES[target]
    counts = ops(model)
    assert counts["ai.mesa::MesaAttention"] == (2 if target == "portable" else 0)
    if target == "tensorrt":
        assert tensorrt_ops.unsupported(model) == []
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    assert_same(run(model, case, tmp_path, portable / artifact.ROPE_FILE), baseline, case)  # fp32 here, so all four run on ORT CPU


def test_polygraphy_lint_clean(portable, case, tmp_path):
    pytest.importorskip("onnx_graphsurgeon", reason="polygraphy's lint needs onnx-graphsurgeon")
    model = load(portable)
    pipeline.run_passes(model, "ort-cpu")
    ir.save(model, tmp_path / "model.onnx")
    (tmp_path / "loader.py").write_text(
        "import numpy as np\n"
        "def load_data():\n"
        f"    cache = np.zeros((2, 1, 2, {case.max_len}, 16), np.float32)\n"
        "    yield {'input_ids': np.arange(12, dtype=np.int64)[None], 'k_cache': cache, 'v_cache': cache,\n"
        "           'sink_len': np.array(0), 'window_start': np.array(0), 'write_pos': np.array(0),\n"
        "           'chunk_width': np.array(128), 'logits_to_keep': np.array(1),\n"
        "           'decode_step': np.array(False), 'seqlens_k': np.zeros(1, np.int32),\n"
        "           'total_sequence_length': np.array(1, np.int32),\n"
        "           **{f'past_{kind}_{l}': cache[l] for kind in ('key', 'value') for l in range(2)}}\n")
    polygraphy = Path(sys.executable).with_name("polygraphy")
    result = subprocess.run([str(polygraphy if polygraphy.exists() else shutil.which("polygraphy")), "check", "lint",
                             str(tmp_path / "model.onnx"), "--data-loader-script", f"{tmp_path / 'loader.py'}:load_data",
                             "-o", str(tmp_path / "lint.json")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    import json

    report = json.loads((tmp_path / "lint.json").read_text())
    assert not report["summary"].get("failing") and not report.get("linting_entries")


# ------------------------------------------------------------------------------ TensorRT op list

def test_tensorrt_check_names_unsupported_ops(portable):
    model = load(portable)
    assert any("ai.mesa::MesaAttention" in p for p in tensorrt_ops.unsupported(model))
    lower_attention.lower_attention(model, "gqa")
    step_positions.fuse_step_positions(model)
    inline_parts.inline_parts(model)
    problems = tensorrt_ops.unsupported(model)
    assert problems == ["com.microsoft::GroupQueryAttention (custom domain)"]
    with pytest.raises(pipeline.PassError, match="GroupQueryAttention"):
        pipeline.CHECK_TENSORRT.run(model)
    node = ir.node("Unique", [model.graph.inputs[0]])
    model.graph.append(node)
    assert "Unique (not in TensorRT 10.15's operator list)" in tensorrt_ops.unsupported(model)


def test_tensorrt_pipeline_uses_listed_ops_only(portable):
    model = load(portable)
    pipeline.run_passes(model, "tensorrt")
    assert set(ops(model)) <= tensorrt_ops.SUPPORTED
    assert ops(model)["Softmax"] == 2 and ops(model)["Mod"] == 1


# ------------------------------------------------------------------------------ precision

def dequantized(model: ir.Model) -> dict[str, np.ndarray]:
    """The float weights a MatMulNBits graph multiplies by (symmetric int4: (q - 8) * scale per block)."""
    weights = {}
    for n in model.graph:
        if n.op_type != "MatMulNBits":
            continue
        a = {k: v.value for k, v in n.attributes.items()}
        K, N, bs = a["K"], a["N"], a["block_size"]
        packed = n.inputs[1].const_value.numpy()  # [N, blocks, bs / 2]
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(N, -1, bs).astype(np.float32)
        scales = n.inputs[2].const_value.numpy().reshape(N, -1, 1)
        weights[n.outputs[0].name] = ((q - 8) * scales).reshape(N, -1)[:, :K].T
    return weights


def test_quantize_int4(portable, case, tmp_path):
    model = load(portable)
    pipeline.run_passes(model, "ort-cpu")
    float_model = load(portable)
    pipeline.run_passes(float_model, "ort-cpu")
    weight_matmuls = sum(n.op_type == "MatMul" and n.inputs[1].is_initializer() for n in model.graph)
    assert precision.quantize_int4(model, accuracy_level=None) == weight_matmuls == 15  # 2 x 7 + lm_head
    assert not any(n.op_type == "MatMul" and n.inputs[1].is_initializer() for n in model.graph)
    # the same graph with the dequantized weights in float32 must give the same logits: the pass
    # changes the weights' storage and nothing else
    deq = dequantized(model)
    for n in float_model.graph:
        if n.op_type == "MatMul" and n.outputs[0].name in deq:
            n.inputs[1].const_value = ir.tensor(np.ascontiguousarray(deq[n.outputs[0].name], dtype=np.float32))
    out, ref = run(model, case, tmp_path, portable / artifact.ROPE_FILE), run(float_model, case, tmp_path, portable / artifact.ROPE_FILE)
    print(f"int4 vs dequantized float32: max |dlogit| {np.abs(out - ref).max():.2e}")
    assert np.abs(out - ref).max() <= 1e-3


def test_passes_for_rejects_bad_combinations():
    with pytest.raises(pipeline.PassError, match="ort-cpu"):
        pipeline.passes_for("tensorrt", "int4")
    with pytest.raises(pipeline.PassError, match="unknown target"):
        pipeline.passes_for("onnx-web")
    with pytest.raises(pipeline.PassError, match="int4 block size 48"):
        pipeline.passes_for("ort-cpu", "int4", int4_block_size=48)
    assert [p.name for p in pipeline.passes_for("ort-cpu", "int4")] == [*EXPECTED_PASSES["ort-cpu"], "quantize_int4[128]"]


def test_cli_records_target_and_passes(case, tmp_path):
    import json

    engine = export_engine(case.model_dir, tmp_path / "e", case.max_len,
                           [*case.export_args(), "--target", "ort-cpu", "--precision", "int4"])
    m = json.loads((engine / artifact.MANIFEST).read_text())
    assert m["target"] == "ort-cpu" and m["dtype"] == "fp32"
    assert m["passes"] == [*EXPECTED_PASSES["ort-cpu"], "quantize_int4[128]"]
    model = onnx.load(engine / artifact.MODEL_FILE)
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 15 and not model.functions

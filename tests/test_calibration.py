"""Quantized precisions (export --precision), calibration data per Mesa phase, the TensorRT calibration
table and the threshold analysis, on tiny random checkpoints (T = 64, prompts past T run every phase)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from calibration import data, tensorrt, thresholds
from runtime import artifact, mesa, scheduler
from runtime.engine import MesaEngine
from tests.conftest import MESA_T64, MESA_T64_FLAGS, export_engine, reference, tiny_checkpoint

MAX_LEN = 200
PROMPT = 150  # > T = 64: first chunk, middle chunks, last chunk


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama")


@pytest.fixture(scope="module")
def engines(ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    return {p: export_engine(ckpt, root / p, MAX_LEN, [*MESA_T64_FLAGS, "--precision", p])
            for p in ("fp32", "int8", "int4", "int8-int4")}


def ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(path).graph.node}


def run(engine_dir, ids, fed) -> tuple[np.ndarray, np.ndarray]:
    with MesaEngine.load(engine_dir) as engine, engine.sequence(ids, all_logits=True) as seq:
        return seq.step(), seq.feed(fed)


def relative_error(a, b) -> float:
    return float(np.median(np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)))


def test_quantized_engines_record_their_precision_and_graphs(engines):
    for precision, engine in engines.items():
        m = artifact.load_manifest(engine)
        assert m.precision == precision and m.dtype == "fp32"
        assert m.decode_model == ("decode.onnx" if precision == "int8-int4" else None)
    assert "MatMulInteger" in ops(engines["int8"] / "model.onnx") and "MatMulNBits" not in ops(engines["int8"] / "model.onnx")
    assert "MatMulNBits" in ops(engines["int4"] / "model.onnx")
    assert "MatMulInteger" in ops(engines["int8-int4"] / "model.onnx")
    decode_ops = ops(engines["int8-int4"] / "decode.onnx")
    assert "MatMulNBits" in decode_ops and "MatMulInteger" not in decode_ops


def test_quantized_engines_stay_close_to_fp32_and_int8_int4_runs_both_graphs(engines):
    rng = np.random.default_rng(1)
    ids, fed = rng.integers(3, 96, PROMPT), [int(t) for t in rng.integers(3, 96, 12)]
    out = {p: run(e, ids, fed) for p, e in engines.items()}
    ref_prefill, ref_decode = out["fp32"]
    err = {}
    for precision in ("int8", "int4", "int8-int4"):
        prefill, decode = out[precision]
        assert np.isfinite(prefill).all() and np.isfinite(decode).all()
        err[precision] = (relative_error(prefill, ref_prefill), relative_error(decode, ref_decode))
    print("relative logit error (prefill, decode):", err)
    # random weights are the worst case (int4 blocks of 128 on a 64-wide model); what must hold: every
    # precision is quantized for real, stays in fp32's neighbourhood, and 8 bits beat 4
    assert all(1e-4 < e < 1.0 for pair in err.values() for e in pair)
    assert err["int8"][0] < err["int4"][0] and err["int8"][1] < err["int4"][1]
    assert err["int8-int4"][0] == err["int8"][0] and err["int8-int4"][1] > err["int8"][1]
    # int8-int4: prefill by the int8 graph (the same logits), decode by the int4 graph (not the int8 one's)
    np.testing.assert_allclose(out["int8-int4"][0], out["int8"][0], rtol=0, atol=1e-5)
    assert np.abs(out["int8-int4"][1] - out["int8"][1]).max() > 1e-3


def block_sizes(path) -> set[int]:
    return {a.i for n in onnx.load(path).graph.node if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "block_size"}


def test_int4_block_size_is_chosen_recorded_and_smaller_blocks_are_closer(ckpt, engines, tmp_path):
    assert block_sizes(engines["int4"] / "model.onnx") == block_sizes(engines["int8-int4"] / "decode.onnx") == {128}
    assert artifact.load_manifest(engines["int8-int4"]).passes[-2:] == ["quantize_int8", "quantize_int4[128]"]
    small = export_engine(ckpt, tmp_path / "b16", MAX_LEN, [*MESA_T64_FLAGS, "--precision", "int4",
                                                            "--int4-block-size", "16"])
    assert block_sizes(small / "model.onnx") == {16}
    assert artifact.load_manifest(small).passes[-1] == "quantize_int4[16]"
    rng = np.random.default_rng(3)
    ids, fed = rng.integers(3, 96, PROMPT), [int(t) for t in rng.integers(3, 96, 8)]
    ref = run(engines["fp32"], ids, fed)
    err = {name: [relative_error(got, want) for got, want in zip(run(e, ids, fed), ref)]
           for name, e in (("b16", small), ("b128", engines["int4"]))}
    print("int4 relative logit error (prefill, decode) by block size:", err)
    assert err["b16"][0] < err["b128"][0] and err["b16"][1] < err["b128"][1]  # 8x the scales


def test_an_int8_int4_engine_without_its_decode_graph_is_incomplete(engines, tmp_path):
    import shutil

    broken = shutil.copytree(engines["int8-int4"], tmp_path / "e")
    (broken / "decode.onnx").unlink()
    with pytest.raises(artifact.ArtifactError, match="decode.onnx is missing"):
        artifact.load_manifest(broken)


@pytest.mark.parametrize("options, message", [
    (["--precision", "int8", "--target", "ort-cuda"], "precision int8 is for target ort-cpu"),
    (["--precision", "int3"], "invalid choice: 'int3'"),
    (["--int4-block-size", "64"], "an int4 block size is for precision int4 or int8-int4, not fp32"),
    (["--precision", "int4", "--int4-block-size", "48"], "invalid choice: 48"),
])
def test_bad_precision_is_refused(ckpt, tmp_path, capsys, options, message):
    from export import cli

    try:
        code = cli.main(["--model", str(ckpt), "--max-len", "100", "--out", str(tmp_path / "e"), *options])
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


# ------------------------------------------------------------------------------ calibration data

def test_calibration_data_covers_every_phase_and_matches_the_reference(ckpt, engines):
    """The lm_head input of each decode step, recorded through the engine, against the PyTorch reference
    decoder's final-norm output for the same tokens (an independent forward pass)."""
    rng = np.random.default_rng(2)
    prompt = [int(t) for t in rng.integers(3, 96, PROMPT + 6)]
    got = data.collect(engines["fp32"], [prompt], decode_tokens=6)
    lm_head = next(a for a, m in got["taps"].items() if m == "lm_head")
    q_proj = [a for a, m in got["taps"].items() if "q_proj" in m]
    # per layer: q/k/v share their input, gate/up theirs, o and down one each; then lm_head
    layer0 = {m for m in got["taps"].values() if m.startswith("model.layers.0.")}
    assert layer0 == {"model.layers.0.self_attn.q_proj,model.layers.0.self_attn.k_proj,model.layers.0.self_attn.v_proj",
                      "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj,model.layers.0.mlp.up_proj",
                      "model.layers.0.mlp.down_proj"}
    assert len(q_proj) == 2 and len(got["taps"]) == 2 * 4 + 1
    for act in q_proj:
        assert set(got["stats"][act]) == {"first", "middle", "last", "decode"}
        assert got["stats"][act]["decode"]["calls"] == 6

    step, cache = reference(ckpt, mesa.MesaParams(**MESA_T64), MAX_LEN)
    seen = []
    hook = step.model.model.norm.register_forward_hook(lambda m, i, out: seen.append(out.detach().numpy().copy()))
    _, seq = scheduler.prefill(step, np.asarray(prompt[:-6]), mesa.prefill_steps(PROMPT, mesa.MesaParams(**MESA_T64)),
                               cache)
    seen.clear()
    for t in prompt[-6:]:
        scheduler.decode(step, t, seq, cache)
    hook.remove()
    expect = max(float(np.abs(x).max()) for x in seen)
    assert abs(got["stats"][lm_head]["decode"]["absmax"] - expect) <= 1e-4 * max(1.0, expect)


def test_clipping_counts_what_a_static_scale_would_cut():
    made = {"stats": {"a": {"first": {"absmax": 2.0}, "middle": {"absmax": 1.0}, "decode": {"absmax": 4.0}}},
            "samples": {"a": {"first": [0.5, 2.0], "middle": [1.0], "decode": [1.0, 3.0, 4.0, 0.1]}}}
    clip = data.clipping(made)
    assert clip["decode"] == {"clipped": 0.5, "absmax_ratio": 2.0}  # 3.0 and 4.0 exceed the first phase's 2.0
    assert clip["first"]["clipped"] == 0.0


def test_calibration_cli_refuses_bad_input(engines, tmp_path, capsys):
    (tmp_path / "bad.json").write_text("[[1, 2], []]")
    assert data.main([str(engines["fp32"]), "--ids-file", str(tmp_path / "bad.json")]) == 2
    assert "non-empty lists of token ids" in capsys.readouterr().err
    assert data.main([str(engines["fp32"]), "--text-file", str(tmp_path / "bad.json")]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    assert data.main([str(tmp_path / "missing"), "--ids-file", str(tmp_path / "bad.json")]) == 2


def test_tensorrt_calibration_table(ckpt, tmp_path):
    """Runs here up to the table (no TensorRT): ranges of every float tensor over every phase, and the
    TensorRT EP options that read it."""
    from runtime.backends import TRT_CACHE_DIR, provider_chain

    engine = export_engine(ckpt, tmp_path / "trt", MAX_LEN, [*MESA_T64_FLAGS, "--target", "tensorrt", "--precision",
                                                            "fp32", "--no-verify"])
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([[3 + i % 90 for i in range(PROMPT)]]))
    assert tensorrt.main([str(engine), "--ids-file", str(prompts)]) == 0
    table = json.loads((engine / TRT_CACHE_DIR / "calibration.json").read_text())
    assert len(table) > 50 and (engine / TRT_CACHE_DIR / "calibration.flatbuffers").stat().st_size > 0
    m = artifact.load_manifest(engine)
    options = provider_chain("tensorrt", engine, m.cache_shape, m.max_len, "fp32")[0][1]
    assert options["trt_int8_enable"] is True and options["trt_int8_calibration_table_name"] == "calibration.flatbuffers"
    assert tensorrt.main([str(tmp_path / "nothing"), "--ids-file", str(prompts)]) == 2
    prompts.write_text(json.dumps([[500] * 20]))
    assert tensorrt.main([str(engine), "--ids-file", str(prompts)]) == 2


# ------------------------------------------------------------------------------ thresholds

def test_threshold_hidden_states_equal_transformers_for_origin(ckpt):
    """Origin is plain attention: our hidden states at every position are transformers' own hidden_states."""
    import torch
    import transformers

    from export import loading

    config = loading.load_config(ckpt)
    prompts = np.random.default_rng(3).integers(3, 96, (2, 80))
    ours = thresholds.hidden_states(ckpt, config, mesa.MesaParams(**MESA_T64), "origin", prompts, 0)
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt).eval()
    with torch.no_grad():  # hidden_states[1]: the output of layer 0 (the last entry would carry the final norm)
        h = hf(torch.from_numpy(prompts), output_hidden_states=True).hidden_states[1].numpy()
    np.testing.assert_allclose(ours, h, atol=1e-4)


def test_threshold_hidden_states_under_mesa_are_the_engines_chunks(ckpt):
    """Under Mesa, a middle-chunk position sees only the first chunk and its own chunk: its state equals a
    plain forward of exactly those tokens (transformers, positions 0.. as in the chunk's call)."""
    import torch
    import transformers

    from export import loading

    params = mesa.MesaParams(**MESA_T64)
    prompts = np.random.default_rng(4).integers(3, 96, (1, 200))
    ours = thresholds.hidden_states(ckpt, loading.load_config(ckpt), params, "mesa", prompts, 0)
    middle = next(s for s in mesa.prefill_steps(200, params) if s.kind == "middle")
    ids = np.concatenate([prompts[0, :params.first_chunk], prompts[0, middle.start:middle.stop]])
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt).eval()
    with torch.no_grad():
        h = hf(torch.from_numpy(ids)[None], output_hidden_states=True).hidden_states[1][0].numpy()
    np.testing.assert_allclose(ours[0, middle.start:middle.stop], h[params.first_chunk:], atol=1e-4)


def test_thresholds_cli(ckpt, tmp_path, capsys):
    code = thresholds.main([str(ckpt), "--layer", "1", "--length", "192", "--bin", "16", "--prompts", "3",
                            "--dims", "2", "--push-widths", "4,8", "--out", str(tmp_path)])
    assert code == 0
    r = json.loads((tmp_path / "thresholds.json").read_text())
    assert len(r["dims"]) == 2 and set(r["last_chunk_excursion"]) >= {"origin", "mesa pw=4", "mesa pw=8"}
    assert r["bins"][:2] == [0, 16]
    origin = np.asarray(r["means"]["origin"])  # [bins, dims]
    for k, d in enumerate(r["dims"]):  # the threshold is the trained range's extreme; a crossing is past T
        sign = 1 if d["direction"] == "up" else -1
        inside = [sign * m for b, m in zip(r["bins"], origin[:, k]) if b + 16 <= 64]
        assert sign * d["threshold"] == pytest.approx(max(inside))
        beyond = [b for b, m in zip(r["bins"], origin[:, k]) if b >= 64 and sign * m > sign * d["threshold"]]
        assert d["origin_crosses_at"] == (beyond[0] if beyond else None)
    assert (tmp_path / "thresholds.png").stat().st_size > 0
    assert thresholds.main([str(ckpt), "--layer", "9", "--out", str(tmp_path)]) == 2
    assert "not a layer of this model" in capsys.readouterr().err

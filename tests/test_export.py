"""The exported ONNX step graph, run by ONNX Runtime through the Mesa plan, and the export CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from export import commit
from runtime import artifact, mesa, scheduler
from runtime.backends import OrtStep
from runtime.kv_cache import KVCache
from tests.conftest import (
    OfficialCase,
    export_engine,
    greedy_sequence,
    hf_logits,
    reference,
    run_fixture,
    tiny_checkpoint,
)

TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]


def ort_runner(engine: Path):
    m = artifact.load_manifest(engine)
    cache = KVCache(m.cache_shape)
    return OrtStep(engine / artifact.MODEL_FILE), cache


def test_official_fixture_through_onnx(official_case: OfficialCase, official_engine):
    engine = official_engine(official_case.name)
    prefill, decode, seq = run_fixture(*ort_runner(engine), official_case)
    dp = np.abs(prefill - official_case.prefill_logits).max()
    dd = np.abs(decode - official_case.decode_logits).max()
    print(f"{official_case.name} (ONNX Runtime): prefill max|dlogit| {dp:.2e}, decode {dd:.2e}")
    assert dp <= TOL and dd <= TOL
    assert decode.argmax(-1).tolist() == official_case.argmax_tokens
    # and the reference decoder agrees with the engine
    ref_prefill, ref_decode, _ = run_fixture(*reference(official_case.model_dir, official_case.params,
                                                        official_case.max_len), official_case)
    assert np.abs(prefill - ref_prefill).max() <= TOL and np.abs(decode - ref_decode).max() <= TOL


def test_engine_directory(official_engine):
    engine = official_engine("a_L300_gqa")
    m = json.loads((engine / artifact.MANIFEST).read_text())
    assert m["format_version"] == artifact.FORMAT_VERSION and m["opset"] >= 24
    assert m["params"]["push_width"] == 4 and m["max_len"] == 332
    # the default target, ort-cpu, adds in-place decode: its flag, per-row lengths and per-layer caches
    assert [i["name"] for i in m["inputs"]] == [
        "input_ids", "k_cache", "v_cache", "sink_len", "window_start", "write_pos", "chunk_width", "logits_to_keep",
        "decode_step", "seqlens_k", "total_sequence_length", "past_key_0", "past_value_0", "past_key_1", "past_value_1"]
    assert [o["name"] for o in m["outputs"]] == [
        "logits", "new_keys", "new_values", "present_key_0", "present_value_0", "present_key_1", "present_value_1"]
    assert m["target"] == "ort-cpu"
    assert m["passes"] == ["lower_attention[inplace]", "fuse_step_positions", "inline_parts", "cleanup"]
    assert (engine / artifact.ROPE_FILE).is_file()
    model = onnx.load(engine / artifact.MODEL_FILE)
    assert not any(n.domain == "ai.mesa" for n in model.graph.node) and not model.functions
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    assert len(ifs) == 2  # one per layer: decode in place, or the prefill kernel
    branches = [[x.op_type for x in a.g.node] for n in ifs for a in n.attribute]
    assert all(b.count("GroupQueryAttention") == 1 for b in branches)
    cache = next(i for i in model.graph.input if i.name == "k_cache")
    dims = [d.dim_value or d.dim_param for d in cache.type.tensor_type.shape.dim]
    assert dims == [2, "batch", 2, 332, 16]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.mark.parametrize("chunk", [1024, 48])
def test_origin_engine_equals_transformers(tiny, tmp_path, chunk, monkeypatch):
    """Also with origin's prefill split into calls of 48 tokens (runtime.mesa.FULL_PREFILL_CHUNK): the split
    changes no logit."""
    monkeypatch.setattr(mesa, "FULL_PREFILL_CHUNK", chunk)
    engine = export_engine(tiny, tmp_path / "origin", 240, ["--method", "origin"])
    step, cache = ort_runner(engine)
    for length in (3, 64, 200):  # T = 64: below, at and far beyond the trained length
        ids = np.random.default_rng(length).integers(0, 96, length, dtype=np.int64)
        cache = KVCache(cache.shape)
        ours, tokens = greedy_sequence(step, cache, ids, mesa.prefill_steps(length, mesa.origin_params(240), "origin"), 5)
        assert np.abs(ours - hf_logits(tiny, tokens)).max() <= TOL


# ------------------------------------------------------------------------------ CLI errors

def run_cli(*args, env=None):
    return subprocess.run([sys.executable, str(REPO / "export.py"), *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=300)


def assert_one_clear_line(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_cli_unknown_alias(tmp_path):
    assert_one_clear_line(run_cli("--model", "llama9-70b", "--max-len", "64", "--out", str(tmp_path / "o")),
                          "llama9-70b")


def test_cli_alias_not_downloaded(tmp_path):
    r = run_cli("--model", "llama2-7b", "--max-len", "64", "--out", str(tmp_path / "o"),
                env={"HF_HUB_CACHE": str(tmp_path / "cache")})
    assert_one_clear_line(r, "meta-llama/Llama-2-7b-hf")


def test_cli_missing_weights(tmp_path, tiny):
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text((tiny / "config.json").read_text())
    assert_one_clear_line(run_cli("--model", str(folder), "--max-len", "64", "--out", str(tmp_path / "o")),
                          str(folder))


def test_cli_unsupported_architecture(tmp_path):
    import transformers

    transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    assert_one_clear_line(run_cli("--model", str(tmp_path / "gpt2"), "--max-len", "64", "--out",
                                  str(tmp_path / "o")), "LlamaForCausalLM")


@pytest.mark.parametrize("flags, fragment", [
    (["--max-len", "0"], "--max-len"),
    (["--max-len", "3"], "first chunk"),
    (["--max-len", "200", "--first-chunk-cache", "0"], "W="),  # W = T - F, so W + F = T
    (["--max-len", "200", "--train-length", "8", "--first-chunk", "8"], "first_chunk"),
])
def test_cli_bad_lengths_and_parameters(tmp_path, tiny, flags, fragment):
    assert_one_clear_line(run_cli("--model", str(tiny), "--out", str(tmp_path / "o"), "--first-chunk", "4",
                                  *flags), fragment)
    assert not (tmp_path / "o").exists()


def test_cli_existing_directory_needs_force(tmp_path, tiny):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_clear_line(run_cli("--model", str(tiny), "--max-len", "64", "--out", str(out)), "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_cli_help_names_the_paper_symbols():
    r = run_cli("--help")
    assert r.returncode == 0
    for sym in ("T:", "F:", "Fc:", "C:", "G:", "pw:", "W0:"):
        assert sym in r.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_export_leaves_nothing_complete(tmp_path, tiny, sig):
    out = tmp_path / "engine"
    env = {**os.environ, commit.FAULT_ENV: "passes:WAIT"}  # the export pauses at its graph passes, mid-way
    # a job started in the background by a non-interactive shell (nohup, CI runners) inherits SIGINT as
    # ignored, and Python then installs no KeyboardInterrupt handler: give the export a terminal's default
    proc = subprocess.Popen([sys.executable, str(REPO / "export.py"), "--model", str(tiny), "--max-len", "64",
                             "--out", str(out)], cwd=REPO, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    for line in proc.stderr:  # wait until it is there, then interrupt it
        if "export paused at passes" in line or time.time() > deadline:
            break
    assert list(tmp_path.glob(".engine.partial-*")), "the export should be under way"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    assert not out.exists()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and not list(tmp_path.glob(".engine.partial-*"))
    for partial in tmp_path.glob(".engine.partial-*"):  # SIGKILL cannot clean up: never a manifest
        assert not (partial / artifact.MANIFEST).exists()


def test_external_data_engine_runs(tiny, tmp_path, monkeypatch):
    """Checkpoints above the protobuf limit go to model.onnx.data; force that path on a tiny model."""
    from export import onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    engine = export_engine(tiny, tmp_path / "ext", 80)
    assert (engine / "model.onnx.data").stat().st_size > (engine / "model.onnx").stat().st_size
    step, cache = ort_runner(engine)
    ids = np.arange(1, 40, dtype=np.int64)
    params = artifact.load_manifest(engine).mesa_params
    ours, _ = scheduler.prefill(step, ids, mesa.prefill_steps(len(ids), params), cache)
    ref_step, ref_cache = reference(tiny, params, 80)
    ref, _ = scheduler.prefill(ref_step, ids, mesa.prefill_steps(len(ids), params), ref_cache)
    assert np.abs(ours - ref).max() <= TOL

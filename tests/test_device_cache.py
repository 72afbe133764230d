"""The device backends' in-place decode (runtime/device_cache.py, backends.OrtDeviceStep.decode), run on
CPUExecutionProvider over CPU OrtValues: the code path ort-cuda takes, with ORT's CPU kernels in place of
its CUDA ones (no GPU here; the CUDA kernels themselves are untested, README says so).

Every check compares with something the device path did not compute: the published logits, the PyTorch
reference decoder over 300-step decodes across anchor jumps, and the host engine (OrtStep over numpy)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import onnxruntime as ort
import pytest

from graph_ops import pipeline
from runtime import backends, custom_ops, mesa
from runtime.artifact import MODEL_FILE, load_manifest
from runtime.device_cache import DeviceDecodeCache
from runtime.engine import MesaEngine
from tests.conftest import (
    MESA_T64,
    MESA_T64_FLAGS,
    anchor_jumps,
    assert_published_generation,
    export_engine,
    load_official,
    prompt,
    reference_greedy,
    tiny_checkpoint,
)

TOL = 1e-4
MAX_LEN = 480


def device_engine(directory, slots: int = 1) -> MesaEngine:
    """MesaEngine over OrtDeviceStep(device="cpu"), as MesaEngine.load builds it for ort-cuda."""
    session = ort.InferenceSession(str(directory / MODEL_FILE), custom_ops.register(ort.SessionOptions()),
                                   providers=["CPUExecutionProvider"])
    step = backends.OrtDeviceStep(session, device="cpu")
    assert step.inplace
    return MesaEngine(directory, load_manifest(directory), "ort-cpu", step, slots, None)


def quiet_export(ckpt, out, max_len, flags):
    with contextlib.redirect_stdout(io.StringIO()):
        return export_engine(ckpt, out, max_len, flags)


def test_published_logits_through_the_device_decode_cache(official_engine):
    case = load_official("a_L300_gqa")  # T = 128: middle chunks, stairs in every decode step
    with device_engine(official_engine(case.name)) as engine:
        assert isinstance(engine._decoder.cache, DeviceDecodeCache)
        g = engine.generate(case.input_ids, len(case.fed_tokens) + 1, return_logits=True)
    assert_published_generation(g, case, TOL)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("device")
    ckpt = tiny_checkpoint(d / "ckpt", max_position_embeddings=MESA_T64["train_length"])
    return ckpt, quiet_export(ckpt, d / "engine", MAX_LEN, [*MESA_T64_FLAGS, "--no-verify"])


def test_long_decode_rerotates_on_the_device_like_the_reference(tiny):
    """300 steps after a 150-token prompt: S passes T and the anchor moves >= 4 times, each a device re-rotation."""
    ckpt, engine_dir = tiny
    L, steps = 150, 300
    assert anchor_jumps(L, steps, mesa.dynamic_split(L, mesa.MesaParams(**MESA_T64))) >= 4
    ids = prompt(L, L)
    fed, expected = reference_greedy(ckpt, ids, steps, MAX_LEN)
    with device_engine(engine_dir) as engine, engine.sequence(ids) as seq:
        assert int(np.argmax(seq.step())) == fed[0]
        got = np.stack([seq.feed([t])[0] for t in fed])
        assert engine.stats()["rotations"] >= 4
    assert np.abs(got - expected).max() <= TOL
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()


def test_batched_device_rows_equal_the_host_engine(tiny):
    _, engine_dir = tiny
    prompts = [prompt(n, n) for n in (5, 40, 70, 150)]
    with device_engine(engine_dir, slots=4) as engine:
        together = engine.generate(prompts, max_new_tokens=60, return_logits=True)
        assert engine._decoder.prefills.__len__() == 1  # device memory: one prefill buffer
    with MesaEngine.load(engine_dir, backend="ort-cpu", slots=4) as host:
        alone = [host.generate(p, max_new_tokens=60, return_logits=True) for p in prompts]
    for row, one in zip(together, alone):
        assert row.tokens == one.tokens
        assert np.abs(row.decode_logits - one.decode_logits).max() <= TOL
        assert np.abs(row.prefill_logits - one.prefill_logits).max() <= TOL


def test_rows_past_a_sequence_are_left_as_they_are(tiny):
    """The rotation graphs run over a slot's whole block; rows past its length are rotated by position 0."""
    _, engine_dir = tiny
    with device_engine(engine_dir, slots=2) as engine:
        cache = engine._decoder.cache
        marker = np.full(cache.block, 7.0, np.float32)
        for layer in range(cache.layers):
            keys = cache.k[layer].numpy()
            keys[1] = marker
            cache.k[layer].update_inplace(keys)
        engine.generate(prompt(150, 1), max_new_tokens=80)  # slot 0: load, then anchor jumps
        other = cache.host_keys(1)
    assert np.array_equal(other, np.broadcast_to(marker, other.shape))


def test_ort_cuda_lowers_in_place_at_half_precision():
    first = lambda *a: pipeline.passes_for("ort-cuda", *a)[0].name  # noqa: E731
    assert first("fp16") == first("bf16") == "lower_attention[inplace]"
    assert first("fp32") == "lower_attention[attention]"  # no CUDA GroupQueryAttention kernel in fp32
    assert first("fp16", "streaming-llm") == "lower_attention[attention]"  # positions move every step


def test_the_ort_cuda_half_engine_decodes_in_place_on_the_cpu_kernels(tiny, tmp_path):
    """--target ort-cuda (fp16): the in-place graph and its fp16 RoPE tables (rope.npy), run through the device
    path and the host path on ORT CPU's fp16 kernels: the two agree, and teacher-forced on the fp32 engine's
    tokens over 100 steps (anchor jumps included) its logits stay within fp16 rounding of fp32's."""
    ckpt, engine_fp32 = tiny
    half = quiet_export(ckpt, tmp_path / "half", MAX_LEN, [*MESA_T64_FLAGS, "--target", "ort-cuda", "--no-verify"])
    assert load_manifest(half).dtype == "fp16" and load_manifest(half).passes[0] == "lower_attention[inplace]"
    ids = prompt(150, 3)
    with MesaEngine.load(engine_fp32, backend="ort-cpu") as e:
        want = e.generate(ids, 100, return_logits=True, stop_tokens=())
    with device_engine(half) as e, e.sequence(ids) as seq:
        seq.step()
        on_device = seq.feed(want.tokens[:-1])
    with MesaEngine.load(half, backend="ort-cpu") as e, e.sequence(ids) as seq:
        seq.step()
        on_host = seq.feed(want.tokens[:-1])
    assert np.abs(on_device - on_host).max() <= 1e-3
    assert np.abs(on_device - want.decode_logits).max() <= 0.1  # measured 0.035; logits reach ~6.5

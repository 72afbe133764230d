"""The PyTorch reference decoder against the published code's logits and against transformers."""

from __future__ import annotations

import numpy as np
import pytest

from export import loading
from runtime import mesa, scheduler
from tests.conftest import OfficialCase, greedy_sequence, hf_logits, reference, run_fixture, tiny_checkpoint

TOL = 1e-4


def test_official_fixture(official_case: OfficialCase):
    step, cache = reference(official_case.model_dir, official_case.params, official_case.max_len)
    prefill, decode, seq = run_fixture(step, cache, official_case)
    assert seq.chunk_width == official_case.chunk_width_after
    dp = np.abs(prefill - official_case.prefill_logits).max()
    dd = np.abs(decode - official_case.decode_logits).max()
    print(f"{official_case.name}: prefill max|dlogit| {dp:.2e}, decode {dd:.2e}")
    assert dp <= TOL and dd <= TOL
    assert decode.argmax(-1).tolist() == official_case.argmax_tokens
    assert int(prefill[-1].argmax()) == official_case.fed_tokens[0]


ARCHS = {
    "llama": dict(rope_theta=500000.0),
    "llama-linear-rope-tied": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=True),
    "llama-mha": dict(num_key_value_heads=4),
    "mistral": dict(),
    "qwen2": dict(),
}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def checkpoint(request, tmp_path_factory):
    arch = request.param.split("-")[0]
    return tiny_checkpoint(tmp_path_factory.mktemp(request.param), arch=arch, **ARCHS[request.param])


def test_mesa_equals_transformers_below_train_length(checkpoint):
    """L < T - G and every step with S <= T: Mesa is plain attention, so transformers' logits match."""
    params = mesa.MesaParams(train_length=64, first_chunk=4, first_chunk_cache=4, last_context=8,
                             reserve_tokens=8, push_width=4)
    ids = np.random.default_rng(1).integers(0, 96, 50, dtype=np.int64)  # 50 < T - G = 56
    step, cache = reference(checkpoint, params, max_len=64)
    ours, tokens = greedy_sequence(step, cache, ids, mesa.prefill_steps(len(ids), params), new_tokens=13)
    theirs = hf_logits(checkpoint, tokens)  # S reaches 64 = T, still plain
    assert np.abs(ours - theirs).max() <= TOL


@pytest.mark.parametrize("length", [1, 63, 200])
def test_origin_equals_transformers_at_every_length(checkpoint, length):
    params = mesa.default_params(loading.load_config(checkpoint).max_position_embeddings)
    ids = np.random.default_rng(length).integers(0, 96, length, dtype=np.int64)
    step, cache = reference(checkpoint, params, max_len=length + 8, method="origin")
    ours, tokens = greedy_sequence(step, cache, ids, mesa.prefill_steps(length, params, "origin"), new_tokens=6)
    theirs = hf_logits(checkpoint, tokens)
    assert np.abs(ours - theirs).max() <= TOL


def test_mesa_differs_from_plain_beyond_train_length(tmp_path):
    """A guard that the comparisons above can fail: past T with stairs and log-n, outputs change."""
    ckpt = tiny_checkpoint(tmp_path / "m")
    params = mesa.MesaParams(train_length=64, first_chunk=4, first_chunk_cache=4, last_context=8,
                             reserve_tokens=8, push_width=4)
    ids = np.random.default_rng(2).integers(0, 96, 150, dtype=np.int64)
    step, cache = reference(ckpt, params, max_len=160)
    ours, _ = scheduler.prefill(step, ids, mesa.prefill_steps(150, params), cache)
    assert np.abs(ours - hf_logits(ckpt, ids)).max() > 1e-2

"""The other methods (runtime/methods.py) through exported engines, against a plain-torch restatement of
each written here from its paper, and against transformers where it implements the method (dynamic, yarn).

The restatement is a whole Llama forward whose attention scores every (query i, key j) pair by its
definition: which keys i sees, and the relative position the pair is encoded at (RoPE depends on the
difference only, so the query is rotated by it and the key not at all). It never calls the code under
test: no Step, no p1/p2 encodings, no single-pass trick.
"""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest

from tests.conftest import export_engine, tiny_checkpoint

T = 64  # the checkpoint's max_position_embeddings
MAX_LEN = 240
PROMPT = 150  # past T: far pairs in every method, several prefill blocks
DECODE = 65  # new tokens: 64 decode steps after the prefill
THETA = 10000.0

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("methods") / "ckpt", seed=3)


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


# ------------------------------------------------------------------------ the definitions, restated
# Each returns, for absolute positions i (queries) and j (keys) [L, L]: visible (bool), the relative
# position of the pair (float), and the query's scale [L]. `block_start[i]` is the first position of the
# call query i is computed in (prefill blocks of c tokens, then one call per decoded token).

def rerope(i, j, w=8, **_):  # Su: distance as is inside the window, w beyond; log-n at absolute positions
    d = i - j
    return d >= 0, np.minimum(d, w).astype(np.float64), np.maximum(1, np.log(i[:, 0] + 1) / math.log(T))


def leaky_rerope(i, j, w=8, k=16.0, **_):  # Su: beyond w the distance grows 1/k as fast
    d = (i - j).astype(np.float64)
    rel = np.where(d < w, d, w + (d - w) / k)
    return d >= 0, rel, np.maximum(1, np.log(i[:, 0] + 1) / math.log(T))


def self_extend(i, j, wn=16, G=5, **_):  # Jin et al. Alg. 1: neighbor window, grouped positions beyond
    d = i - j
    rel = np.where(d < wn, d, (i // G + wn - wn // G) - j // G).astype(np.float64)
    return d >= 0, rel, np.ones(len(i))


def _lambda_visible(i, j, block_start, sink, R):
    """Sink tokens, the R tokens before the query's call, the call up to the query."""
    return (j <= i) & ((j < sink) | (j >= block_start[:, None] - R))


def lm_infinite(i, j, block_start, sink=10, R=48, L=T, **_):  # Han et al.: Λ mask, distances capped at L
    visible = _lambda_visible(i, j, block_start, sink, R)
    return visible, np.minimum(i - j, L).astype(np.float64), np.ones(len(i))


def streaming_llm(i, j, block_start, sink=4, R=44, **_):
    """Xiao et al.: sink + recent tokens, positions counted inside the cache: the pair's relative position
    is how many visible keys lie between them."""
    visible = _lambda_visible(i, j, block_start, sink, R)
    rank = np.cumsum(visible, axis=1) - 1  # index of key j among query i's visible keys
    rel = rank[np.arange(len(i)), i[:, 0]][:, None] - rank
    return visible, rel.astype(np.float64), np.ones(len(i))


def causal(i, j, **_):
    return i >= j, (i - j).astype(np.float64), np.ones(len(i))


def default_inv_freq(d=16):
    return 1.0 / THETA ** (np.arange(0, d, 2) / d)


def dynamic_inv_freq(S, f=2.0, d=16):
    """transformers' dynamic NTK: base (f S / T - (f - 1))^(d / (d - 2)) for S > T."""
    base = THETA * ((f * max(S, T) / T) - (f - 1)) ** (d / (d - 2))
    return 1.0 / base ** (np.arange(0, d, 2) / d)


def yarn_inv_freq(s, d=16, beta_fast=32, beta_slow=1):
    """YaRN (Peng et al. eq. 17-19, transformers' truncated correction range): frequencies that turn
    fewer than beta_slow times over T are divided by s, more than beta_fast kept, a linear ramp between."""
    dim_of = lambda rot: d * math.log(T / (rot * 2 * math.pi)) / (2 * math.log(THETA))  # noqa: E731
    low, high = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), d - 1)
    ramp = np.clip((np.arange(d // 2) - low) / (high - low), 0, 1)
    base = default_inv_freq(d)
    return base / s * ramp + base * (1 - ramp), 0.1 * math.log(s) + 1


def restated_logits(hf, ids, pairs, inv_freq_of, block_start, score_scale=1.0):
    """Logits [L, vocab] of a Llama forward whose attention follows `pairs`; inv_freq_of(i) gives query i's
    frequencies (they differ per call for dynamic NTK). Float64 throughout."""
    L = len(ids)
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    visible, rel, scale = pairs(i, j, block_start=block_start)
    freqs = np.stack([inv_freq_of(q) for q in range(L)])  # [L, d/2]
    angles = torch.from_numpy(rel[:, :, None] * freqs[:, None, :])  # [L, L, d/2]
    cos, sin = angles.cos(), angles.sin()
    mask = torch.from_numpy(visible)
    m = hf.model.double()
    x = m.embed_tokens(torch.from_numpy(np.asarray(ids))[None])
    with torch.no_grad():
        for layer in m.layers:
            a = layer.self_attn
            h = layer.input_layernorm(x)
            H, Hkv, d = hf.config.num_attention_heads, hf.config.num_key_value_heads, a.head_dim
            q = a.q_proj(h).view(L, H, d).transpose(0, 1) * torch.from_numpy(scale)[None, :, None]
            k = a.k_proj(h).view(L, Hkv, d).transpose(0, 1).repeat_interleave(H // Hkv, dim=0)
            v = a.v_proj(h).view(L, Hkv, d).transpose(0, 1).repeat_interleave(H // Hkv, dim=0)
            q1, q2 = q[..., : d // 2, None], q[..., d // 2:, None]  # [H, L, d/2, 1]
            # q rotated by the pair's relative position, per pair: [H, L(i), L(j), d]
            qr = torch.cat((q1[..., 0][:, :, None] * cos - q2[..., 0][:, :, None] * sin,
                            q2[..., 0][:, :, None] * cos + q1[..., 0][:, :, None] * sin), dim=-1)
            scores = (qr * k[:, None]).sum(-1) * score_scale / math.sqrt(d)
            probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            out = (probs @ v).transpose(0, 1).reshape(1, L, H * d)
            x = x + a.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = hf.lm_head.double()(m.norm(x))[0].numpy()
    hf.float()
    return logits


def block_starts(prompt_len: int, total: int, block: int) -> np.ndarray:
    """The first position of the call each position is computed in: prefill blocks, then one per token."""
    starts = np.arange(total)
    starts[:prompt_len] = (starts[:prompt_len] // block) * block
    return starts


# method -> (export flags, pairs, inv_freq_of(prompt_len) -> f(i), prefill block, score scale)
CASES = {
    "rerope": (["--window", "8"], rerope, None, 1, 1.0),
    "leaky-rerope": (["--window", "8", "--leaky-k", "16"], leaky_rerope, None, 1, 1.0),
    "self-extend": (["--window", "16", "--group", "5"], self_extend, None, 1, 1.0),
    "lm-infinite": (["--sink", "10", "--window", "48", "--block", "16"], lm_infinite, None, 16, 1.0),
    "streaming-llm": (["--sink", "4", "--window", "44", "--block", "16"], streaming_llm, None, 16, 1.0),
    "dynamic-ntk": (["--factor", "2"], causal, "dynamic", 1, 1.0),
    "yarn": (["--factor", "4"], causal, "yarn", 1, None),
}


def _run_engine(directory, prompt, target_logits=True):
    from runtime.engine import MesaEngine

    with MesaEngine.load(directory) as engine:
        g = engine.generate(prompt, max_new_tokens=DECODE, stop_tokens=(), return_logits=target_logits)
    return g


@pytest.fixture(scope="module")
def engines(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("method-engines")
    made = {}
    for name, (flags, *_rest) in CASES.items():
        with contextlib.redirect_stdout(io.StringIO()):
            made[name] = export_engine(checkpoint, root / name, MAX_LEN, ["--method", name, *flags])
    return made


@pytest.mark.parametrize("name", list(CASES))
def test_method_matches_its_definition(name, engines, hf_model):
    flags, pairs, freq_kind, block, score_scale = CASES[name]
    prompt = np.random.default_rng(1).integers(0, hf_model.config.vocab_size, PROMPT)
    g = _run_engine(engines[name], prompt)
    ids = np.concatenate([prompt, g.tokens[:-1]])
    ours = np.concatenate([g.prefill_logits, g.decode_logits])
    assert ours.shape[0] == PROMPT + DECODE - 1
    inv = {None: lambda i: default_inv_freq(),
           "dynamic": lambda i: dynamic_inv_freq(PROMPT if i < PROMPT else i + 1),
           "yarn": lambda i: yarn_inv_freq(4.0)[0]}[freq_kind]
    if score_scale is None:  # yarn: cos and sin of q and k both times the attention factor
        score_scale = yarn_inv_freq(4.0)[1] ** 2
    want = restated_logits(hf_model, ids, pairs, inv, block_starts(PROMPT, len(ids), block), score_scale)
    np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)


def test_yarn_matches_transformers(engines, checkpoint):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": T,
                         "rope_theta": THETA}).eval()
    prompt = np.random.default_rng(2).integers(0, hf.config.vocab_size, PROMPT)
    g = _run_engine(engines["yarn"], prompt)
    ids = np.concatenate([prompt, g.tokens[:-1]])
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)[None]).logits[0].numpy()
    np.testing.assert_allclose(np.concatenate([g.prefill_logits, g.decode_logits]), want, atol=1e-4, rtol=0)


def test_dynamic_ntk_matches_transformers_forward(engines, checkpoint, tmp_path):
    """A prompt is one call, as transformers' forward: the same logits. A decode step re-rotates every
    cached key with the base of its own length S; transformers computes that only in a forward over the
    whole prefix without a cache, which also recomputes the earlier tokens' hidden states with the new
    base. The two agree for the last row of a one-layer model (its keys come from the embeddings), so the
    decode steps are checked there (transformers' cached generate keeps keys rotated with older bases:
    neither of these)."""
    import transformers

    def hf(path):
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                        "rope_theta": THETA}).eval()

    prompt = np.random.default_rng(4).integers(0, 96, PROMPT)
    with torch.no_grad():
        g = _run_engine(engines["dynamic-ntk"], prompt)
        want = hf(checkpoint)(torch.from_numpy(prompt)[None]).logits[0].numpy()
        np.testing.assert_allclose(g.prefill_logits, want, atol=1e-4, rtol=0)

        one = tiny_checkpoint(tmp_path / "one-layer", seed=3, num_hidden_layers=1)
        with contextlib.redirect_stdout(io.StringIO()):
            engine = export_engine(one, tmp_path / "e", MAX_LEN, ["--method", "dynamic-ntk", "--factor", "2"])
        g = _run_engine(engine, prompt)
        ids = np.concatenate([prompt, g.tokens[:-1]])
        model = hf(one)
        for t in range(0, DECODE - 1, 9):  # every 9th decode step: a no-cache forward of its prefix
            row = model(torch.from_numpy(ids[:PROMPT + t + 1])[None]).logits[0, -1].numpy()
            np.testing.assert_allclose(g.decode_logits[t], row, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["rerope", "streaming-llm"])
def test_batch_rows_match_single_requests(name, engines, hf_model):
    from runtime.engine import MesaEngine

    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, hf_model.config.vocab_size, n) for n in (150, 97)]
    with MesaEngine.load(engines[name], slots=2) as engine:
        together = engine.generate(prompts, max_new_tokens=20, stop_tokens=(), return_logits=True)
        alone = [engine.generate(p, max_new_tokens=20, stop_tokens=(), return_logits=True) for p in prompts]
    for a, b in zip(together, alone):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.decode_logits, b.decode_logits, atol=1e-5, rtol=0)


def test_portable_target_gives_the_same_logits(checkpoint, engines, tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        portable = export_engine(checkpoint, tmp_path / "p", MAX_LEN, ["--method", "self-extend", "--window", "16",
                                                                       "--group", "5", "--target", "portable"])
    prompt = np.random.default_rng(6).integers(0, 96, PROMPT)
    a, b = _run_engine(engines["self-extend"], prompt), _run_engine(portable, prompt)
    np.testing.assert_allclose(a.decode_logits, b.decode_logits, atol=1e-5, rtol=0)


def test_bad_method_parameters_are_refused_in_one_line(checkpoint, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "e"
    r = subprocess.run([sys.executable, "export.py", "--model", str(checkpoint), "--max-len", "2048", "--out",
                        str(out), "--method", "self-extend", "--window", "16", "--group", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().startswith("error:") and "--group" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    r = subprocess.run([sys.executable, "export.py", "--model", str(checkpoint), "--max-len", "240", "--out",
                        str(out), "--method", "rerope", "--group", "3"], capture_output=True, text=True)
    assert r.returncode == 2 and "takes no parameter group" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "export.py", "--model", str(checkpoint), "--max-len", "240", "--out",
                        str(out), "--method", "rerope", "--push-width", "4"], capture_output=True, text=True)
    assert r.returncode == 2 and "push_width: Mesa parameter(s), unused by --method rerope" in r.stderr, r.stderr
    assert not out.exists()


@pytest.mark.parametrize("name", ["rerope", "self-extend", "dynamic-ntk", "yarn"])
def test_prefill_chunks_change_no_logit(name, engines, monkeypatch):
    """Full-attention methods prefill in chunks of PREFILL_CHUNK; prompts here are shorter than the default,
    so a chunk of 40 tokens checks that the split changes nothing (dynamic-ntk: every chunk takes the
    base of the whole prompt)."""
    from runtime import methods

    prompt = np.random.default_rng(7).integers(0, 96, PROMPT)
    whole = _run_engine(engines[name], prompt)
    monkeypatch.setattr(methods, "PREFILL_CHUNK", 40)
    assert len(methods.CLASSES[name].prefill_steps(methods.default_method(name, T, MAX_LEN), PROMPT)) == 4
    chunked = _run_engine(engines[name], prompt)
    np.testing.assert_allclose(chunked.prefill_logits, whole.prefill_logits, atol=2e-5, rtol=0)
    np.testing.assert_allclose(chunked.decode_logits, whole.decode_logits, atol=2e-5, rtol=0)

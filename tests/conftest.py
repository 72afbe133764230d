"""Shared test helpers: the published fixtures, tiny random checkpoints, exported engines."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from runtime import mesa
from scripts import fixtures

TRAINED = fixtures.TRAINED
OFFICIAL_CASES = fixtures.official_cases()

# our MesaParams field <- the published position_set field
PUBLISHED_NAMES = {"train_length": "train_length", "first_chunk": "first_chunk",
                   "first_chunk_cache": "first_chunk_cache", "last_context": "last_context",
                   "reserve_tokens": "max_token_len", "push_width": "push_width",
                   "chunk_width": "context_window_length"}


@dataclass
class OfficialCase:
    name: str
    model_dir: Path
    params: mesa.MesaParams
    input_ids: np.ndarray  # [L]
    prefill_logits: np.ndarray  # [L, vocab]
    decode_logits: np.ndarray  # [16, vocab]
    fed_tokens: list[int]
    argmax_tokens: list[int]
    chunk_width_after: int

    @property
    def max_len(self) -> int:  # prompt + 16 decode steps, with room to spare
        return len(self.input_ids) + 32

    def export_args(self) -> list[str]:
        """The export CLI flags that reproduce this case's Mesa parameters."""
        flags = []
        for field, value in self.params.as_dict().items():
            flags += [f"--{field.replace('_', '-')}", str(value)]
        return flags


def load_official(name: str) -> OfficialCase:
    d = fixtures.official(name)
    inputs = json.loads((d / "inputs.json").read_text())
    ps = inputs["position_set_before_prefill"]
    tokens = json.loads((d / "decode_tokens.json").read_text())
    return OfficialCase(
        name=name, model_dir=d / "model",
        params=mesa.MesaParams(**{ours: ps[theirs] for ours, theirs in PUBLISHED_NAMES.items()}),
        input_ids=np.asarray(inputs["input_ids"], dtype=np.int64).reshape(-1),
        prefill_logits=np.load(d / "prefill_logits.npy"), decode_logits=np.load(d / "decode_logits.npy"),
        fed_tokens=tokens["fed_tokens"], argmax_tokens=tokens["argmax_tokens"],
        chunk_width_after=inputs["position_set_after_prefill"]["context_window_length"],
    )


@pytest.fixture(params=OFFICIAL_CASES)
def official_case(request) -> OfficialCase:
    return load_official(request.param)


def tiny_checkpoint(directory: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a small random-weight HF model (llama | mistral | qwen2) with save_pretrained."""
    import torch
    import transformers

    base = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.2)
    base.update(overrides)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    if arch in ("mistral", "qwen2"):
        base.setdefault("sliding_window", None)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**base))
    with torch.no_grad():  # non-trivial norms so RMSNorm mistakes show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:  # biases
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return Path(directory)


def reference(model_dir, params: mesa.MesaParams, max_len: int, method: str = "mesa"):
    """(step, cache): the PyTorch reference decoder (export.reference.TorchStep) over a fresh cache."""
    from export import loading, onnx_export
    from export.reference import TorchStep
    from runtime.kv_cache import CacheShape, KVCache

    path, alias = loading.resolve_model(str(model_dir))
    config = loading.load_config(path)
    lm = onnx_export.build_model(path, config, params, method, max_len, "fp32", alias)
    a = lm.model.args
    cache = KVCache(CacheShape(a.num_hidden_layers, a.num_key_value_heads, max_len, a.head_dim))
    return TorchStep(lm.model), cache


def export_engine(model_dir: Path, out: Path, max_len: int, extra: list[str] = ()) -> Path:
    """Run the real export CLI in-process; fails the test on a non-zero exit."""
    from export.cli import main

    code = main(["--model", str(model_dir), "--max-len", str(max_len), "--out", str(out), *extra])
    assert code == 0, f"export exited with {code}"
    return out


@pytest.fixture(scope="session")
def official_engine(tmp_path_factory):
    """engine(name) -> the directory of that official case exported at its max_len (once per session)."""
    import contextlib
    import io

    engines: dict[str, Path] = {}

    def engine(name: str) -> Path:
        if name not in engines:
            case = load_official(name)
            out = tmp_path_factory.mktemp("official") / name
            with contextlib.redirect_stdout(io.StringIO()):  # the export summary
                export_engine(case.model_dir, out, case.max_len, [*case.export_args(), "--no-verify"])
            engines[name] = out
        return engines[name]

    return engine

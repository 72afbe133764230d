"""Where the repository's test fixtures live: the one place tests and scripts resolve them.

    tests/fixtures/official/<case>/   logits the published Mesa code produced on small random models
    tests/fixtures/trained/           a small Llama trained at 256 tokens on a passkey task

Both are committed (about 13 MB; tests/fixtures/README.md says what produced them), so a fresh clone
runs every test with nothing beside it. Every path returned here is inside the repository.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime import mesa

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
OFFICIAL = FIXTURES / "official"
TRAINED = FIXTURES / "trained"


class FixtureMissing(FileNotFoundError):
    """A fixture the checkout should have is absent (a partial clone, or a file deleted by hand)."""


def official_cases() -> list[str]:
    """The names of the published-logit cases, sorted."""
    return sorted(p.name for p in OFFICIAL.iterdir() if (p / "inputs.json").is_file())


def official(name: str) -> Path:
    """The folder of one published-logit case."""
    return _existing(OFFICIAL / name)


def trained(name: str = "") -> Path:
    """The trained passkey fixture (`model`, `task.json`, or the folder itself)."""
    return _existing(TRAINED / name if name else TRAINED)


def _existing(path: Path) -> Path:
    if not path.exists():
        raise FixtureMissing(f"fixture {path.relative_to(ROOT)} is missing from this checkout")
    return path


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
    d = official(name)
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

"""Where the repository's test fixtures live: the one place tests and scripts resolve them.

    tests/fixtures/official/<case>/   logits the published Mesa code produced on small random models
    tests/fixtures/trained/           a small Llama trained at 256 tokens on a passkey task

Both are committed (about 13 MB; tests/fixtures/README.md says what produced them), so a fresh clone
runs every test with nothing beside it. Every path returned here is inside the repository.
"""

from __future__ import annotations

from pathlib import Path

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

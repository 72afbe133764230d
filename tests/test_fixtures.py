"""The fixtures live in the checkout: a fresh clone runs every test with nothing beside it."""

from __future__ import annotations

import re

import pytest

from scripts import fixtures

ROOT = fixtures.ROOT
# ways a file could reach outside the repository root (the old layout beside the checkout among them)
OUTSIDE = re.compile(r"parents\[[2-9]\]|\.\.[/]shared|[/]shared[/]fixtures|ROOT\.parent|REPO\.parent")


def test_every_fixture_path_is_inside_the_repository():
    paths = [fixtures.FIXTURES, fixtures.OFFICIAL, fixtures.TRAINED, fixtures.trained(), fixtures.trained("model"),
             fixtures.trained("task.json")] + [fixtures.official(name) for name in fixtures.official_cases()]
    for path in paths:
        assert path.resolve().is_relative_to(ROOT), path
        assert not path.is_symlink(), f"{path} is a link: it could point outside the checkout"


def test_the_published_cases_and_the_trained_model_are_all_there():
    assert fixtures.official_cases() == ["a_L1000_gqa", "a_L100_gqa", "a_L300_gqa", "a_L5_gqa", "c_L517_mha",
                                         "d_L720_gqa_T256"]
    for name in fixtures.official_cases():
        case = fixtures.official(name)
        for part in ("inputs.json", "chunks.json", "prefill_logits.npy", "decode_logits.npy", "decode_tokens.json",
                     "model/config.json", "model/model.safetensors"):
            assert (case / part).is_file(), f"{name}/{part}"
    for part in ("model/config.json", "model/model.safetensors", "task.json", "README.md"):
        assert fixtures.trained(part).is_file(), part


def test_a_missing_fixture_says_which():
    with pytest.raises(fixtures.FixtureMissing, match="tests/fixtures/official/no_such_case"):
        fixtures.official("no_such_case")


def test_no_code_reads_outside_the_repository():
    offenders = []
    for folder in ("tests", "scripts", "runtime", "export", "graph_ops", "calibration", ".ci"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".sh") or path.name == "run":
                for n, line in enumerate(path.read_text().splitlines(), 1):
                    if OUTSIDE.search(line) and path.name != "test_fixtures.py":
                        offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)

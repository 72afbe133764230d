"""The latency-regression gate (scripts/regression.py): working tree against a reference tree, same run.

The reference here is this checkout itself (so the expected ratio is 1); `.ci/run` runs the gate against
the commit in scripts/perf_reference, which exercises the git side."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess

import pytest

from scripts import regression

ROOT = regression.ROOT
FAST = ["--rounds", "7"]


def run(*flags) -> tuple[int, str, str]:
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        code = regression.main(list(flags))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """The workers' engines, exported once by the first gate run and reused by the others."""
    d = tmp_path_factory.mktemp("gate-engines")
    code, out, err = run("--reference-tree", str(ROOT), "--engines", str(d), *FAST)
    assert code == 0, out + err
    assert (d / "current" / "engine" / "mesa.json").is_file() and (d / "reference" / "engine" / "mesa.json").is_file()
    return d


def test_unchanged_code_stays_green(engines):
    code, out, err = run("--reference-tree", str(ROOT), "--engines", str(engines), *FAST)
    assert code == 0, out + err
    assert "latency gate passed" in out and "gate: 3 passed, 0 failed" in out


def test_injected_slowdown_trips_the_gate(engines):
    code, out, err = run("--reference-tree", str(ROOT), "--engines", str(engines), "--inject-slowdown", "0.6", *FAST)
    assert code == 1, out + err
    assert out.count("REGRESSION") == 3 and "--set-reference" in out


def test_verdict_uses_the_median_ratio():
    ok, rows = regression.verdict({"prefill": [1.0, 1.3, 1.1], "decode_short": [1.0] * 3, "decode_long": [0.9] * 3},
                                  0.25)
    assert ok and rows[0]["ratio"] == pytest.approx(1.1) and rows[0]["spread"] == (1.0, 1.3)
    ok, rows = regression.verdict({"prefill": [1.0] * 3, "decode_short": [1.3, 1.26, 1.0], "decode_long": [1.0] * 3},
                                  0.25)
    assert not ok and [r["ok"] for r in rows] == [True, False, True]


def test_a_reference_that_cannot_export_is_an_error_not_a_pass(engines, tmp_path):
    broken = tmp_path / "broken"
    for part in ("export", "graph_ops", "runtime", "calibration", "scripts"):
        shutil.copytree(ROOT / part, broken / part, ignore=shutil.ignore_patterns("__pycache__", "results"))
    api = broken / "export" / "api.py"
    line = "        check_options(method, target, precision, max_len, decode_kernel, prefill_kernel, int4_block_size)\n"
    assert line in api.read_text()
    api.write_text(api.read_text().replace(line, "        raise OSError('this reference cannot export')\n", 1))
    shutil.copytree(engines / "current", tmp_path / "e" / "current")  # only the reference has to export
    code, out, err = run("--reference-tree", str(broken), "--engines", str(tmp_path / "e"), *FAST)
    assert code == 2 and "gate: " not in out
    assert err.count("\n") == 1 and "reference tree" in err and "does not export" in err


def test_a_tree_without_the_gate_is_refused(tmp_path):
    code, _, err = run("--reference-tree", str(tmp_path))
    assert code == 2 and "has no scripts/regression.py" in err


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout (the gate's reference is a commit)")
def test_an_unreachable_reference_commit_is_one_line_and_exit_2():
    code, out, err = run("--reference", "0123456789abcdef0123456789abcdef01234567")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "is not in this repository" in err


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout (the gate's reference is a commit)")
def test_the_committed_reference_is_an_ancestor_of_HEAD():
    """Not HEAD~1: a fixed commit moved on purpose, so slow creep cannot pass commit by commit."""
    ref = regression.REFERENCE_FILE.read_text().split()[0]
    assert len(ref) == 40
    done = subprocess.run(["git", "-C", str(ROOT), "merge-base", "--is-ancestor", ref, "HEAD"])
    assert done.returncode == 0, f"scripts/perf_reference {ref} is not an ancestor of HEAD"

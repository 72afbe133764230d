"""The latency-regression gate (scripts/regression.py): it trips on an injected slowdown and stays green
on an unchanged build across repeated runs, against a baseline measured here."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from scripts import regression


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    """(engine dir, baseline path): the gate's tiny engine exported once, its baseline measured once."""
    tmp = tmp_path_factory.mktemp("gate")
    engine = regression.export_tiny(tmp)
    baseline = tmp / "baseline.json"
    assert run(engine, baseline, "--update-baseline")[0] == 0
    return engine, baseline


def run(engine, baseline, *flags) -> tuple[int, str]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = regression.main(["--engine", str(engine), "--baseline", str(baseline), *flags])
    return code, out.getvalue()


def test_baseline_file(gate):
    _, baseline = gate
    data = json.loads(baseline.read_text())
    assert set(data["figures"]) == set(regression.FIGURES)
    assert all(v > 0 for v in data["figures"].values())
    assert data["threshold"] == regression.THRESHOLD and data["settings"] == regression.settings()


def test_unchanged_build_stays_green(gate):
    for _ in range(3):
        code, out = run(*gate)
        assert code == 0, out
        assert "latency gate passed" in out


def test_injected_slowdown_trips_the_gate(gate):
    code, out = run(*gate, "--inject-slowdown", "0.6")
    assert code == 1, out
    assert "REGRESSION" in out and "--update-baseline" in out


def test_compare_threshold():
    base = {"prefill": 2.0, "decode": 4.0}
    ok, rows = regression.compare({"prefill": 2.4, "decode": 4.0}, base, 0.25)
    assert ok and rows[0]["ratio"] == pytest.approx(1.2)
    ok, rows = regression.compare({"prefill": 2.0, "decode": 5.2}, base, 0.25)
    assert not ok and [r["ok"] for r in rows] == [True, False]


def test_baseline_of_other_settings_is_refused(gate, tmp_path):
    engine, baseline = gate
    data = json.loads(baseline.read_text())
    data["settings"]["prefill_tokens"] = 1
    (tmp_path / "b.json").write_text(json.dumps(data))
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert run(engine, tmp_path / "b.json")[0] == 2
    assert "--update-baseline" in err.getvalue()

"""The C++ runner (runtime/cpp) against the Python runtime and the published fixture.

scripts/build_cpp.sh builds build/cpp/mesa_generate (fetching its dependencies from Debian's packages, cached
under build/); the test skips only when that script says the build tools cannot be had (exit 3). Everything the
binary prints is compared with what runtime.engine.MesaEngine computes for the same engine, or with the logits
the published Mesa code produced."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from runtime import mesa
from runtime.engine import MesaEngine, RequestError
from scripts.fixtures import ROOT
from tests.conftest import MESA_T64, MESA_T64_FLAGS, export_engine, load_official, tiny_checkpoint

TOL = 1e-4
T = MESA_T64["train_length"]
MAX_LEN = 480
FLAGS = MESA_T64_FLAGS
PARAMS = mesa.MesaParams(**MESA_T64)
@pytest.fixture(scope="module")
def binary(cpp_build) -> Path:
    path = cpp_build / "mesa_generate"
    assert path == ROOT / "build" / "cpp" / "mesa_generate" and path.is_file()
    return path


def quiet_export(ckpt: Path, out: Path, max_len: int, flags: list[str]) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):
        return export_engine(ckpt, out, max_len, [*flags, "--no-verify"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(engine directory, MesaEngine) of a tiny Llama with T = 64: prompts past T run middle chunks and stairs."""
    d = tmp_path_factory.mktemp("cpp")
    engine_dir = quiet_export(tiny_checkpoint(d / "ckpt", max_position_embeddings=T), d / "engine", MAX_LEN, FLAGS)
    e = MesaEngine.load(engine_dir, backend="ort-cpu")
    yield engine_dir, e
    e.close()


def cpp(binary: Path, engine_dir, ids, *flags: str, tmp: Path, check: bool = True):
    """Run mesa_generate on `ids` (a list, or a list of lists); (rows of tokens, completed process)."""
    ids_file = tmp / "ids.json"
    ids_file.write_text(ids if isinstance(ids, str) else json.dumps(ids))
    run = subprocess.run([str(binary), str(engine_dir), "--input-ids-file", str(ids_file), "--threads", "1", *flags],
                         capture_output=True, text=True, timeout=120)
    if check:
        assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()] if run.returncode == 0 else None
    return rows, run


def prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 96, n).tolist()


def test_published_fixture_logits(binary, tmp_path):
    """a_L300_gqa (T = 128: first, middle and last chunks, stairs in every decode step): prefill logits at every
    position and 16 decode steps within 1e-4 of the published code's, and its greedy tokens."""
    case = load_official("a_L300_gqa")
    engine_dir = quiet_export(case.model_dir, tmp_path / "engine", case.max_len, case.export_args())
    rows, _ = cpp(binary, engine_dir, case.input_ids.tolist(), "--max-new-tokens", "17", "--save-logits",
                  str(tmp_path / "out"), tmp=tmp_path)
    prefill, decode = np.load(tmp_path / "out.prefill.npy"), np.load(tmp_path / "out.decode.npy")
    assert prefill.shape == case.prefill_logits.shape and decode.shape == case.decode_logits.shape == (16, 512)
    assert np.abs(prefill - case.prefill_logits).max() <= TOL
    assert np.abs(decode - case.decode_logits).max() <= TOL
    assert rows == [case.fed_tokens + case.argmax_tokens[-1:]]


@pytest.mark.parametrize("kernels", [["--decode-kernel", "grouped"], ["--prefill-kernel", "tiled"]])
def test_mesa_kernel_engines(binary, tmp_path, kernels):
    """An engine exported with --decode-kernel grouped or --prefill-kernel tiled: the runner loads libmesa_ops.so
    from beside itself and reproduces the published logits; pointed at no library, it refuses in one line saying
    how to build it."""
    case = load_official("a_L300_gqa")
    engine_dir = quiet_export(case.model_dir, tmp_path / "engine", case.max_len, [*case.export_args(), *kernels])
    rows, _ = cpp(binary, engine_dir, case.input_ids.tolist(), "--max-new-tokens", "17", "--save-logits",
                  str(tmp_path / "out"), tmp=tmp_path)
    assert np.abs(np.load(tmp_path / "out.prefill.npy") - case.prefill_logits).max() <= TOL
    assert np.abs(np.load(tmp_path / "out.decode.npy") - case.decode_logits).max() <= TOL
    assert rows == [case.fed_tokens + case.argmax_tokens[-1:]]
    ids_file = tmp_path / "ids.json"
    run = subprocess.run([str(binary), str(engine_dir), "--input-ids-file", str(ids_file)], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "MESA_OPS_LIBRARY": str(tmp_path / "none.so")})
    assert run.returncode != 0 and "scripts/build_cpp.sh" in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_greedy_matches_python_across_anchor_jumps(binary, tiny, tmp_path):
    """Prompts below F, below T, and with middle chunks, each decoding 200 tokens: S passes T and the stair anchor
    moves every W steps, so cached keys are re-rotated several times. Tokens equal MesaEngine.generate's; the
    logits of the longest run equal Python's (prefill at every position, every decode step)."""
    engine_dir, engine = tiny
    steps = 200
    for L in (3, 40, 150):
        W = mesa.dynamic_split(L, PARAMS)
        assert sum(S > T and (S - 1) % W == 0 for S in range(L + 2, L + steps + 1)) >= 2  # anchor jumps
        ids = prompt(L, L)
        want = engine.generate(ids, steps, stop_tokens=(), return_logits=L == 150)
        rows, _ = cpp(binary, engine_dir, ids, "--max-new-tokens", str(steps), "--ignore-eos",
                      *(["--save-logits", str(tmp_path / "l150")] if L == 150 else []), tmp=tmp_path)
        assert rows == [want.tokens], f"L={L}"
    assert len(mesa.prefill_steps(150, PARAMS)) >= 4  # first, middle chunks, last
    assert np.abs(np.load(tmp_path / "l150.prefill.npy") - want.prefill_logits).max() <= TOL
    assert np.abs(np.load(tmp_path / "l150.decode.npy") - want.decode_logits).max() <= TOL


def test_batch_rows_equal_each_row_alone(binary, tiny, tmp_path):
    """A batch decodes its rows in one call per step, each at its own position and anchor: every row's tokens are
    those it gets alone (and Python's), also with fewer slots than rows (rows wait and take a freed slot) and
    with the default stop tokens (the model's EOS) ending some rows early. --stream reports the same tokens."""
    engine_dir, engine = tiny
    batch = [prompt(n, 100 + n) for n in (7, 90, 33, 150)]
    alone = [cpp(binary, engine_dir, ids, "--max-new-tokens", "60", "--ignore-eos", tmp=tmp_path)[0][0]
             for ids in batch]
    assert alone == [g.tokens for g in engine.generate(batch, 60, stop_tokens=())]
    rows, run = cpp(binary, engine_dir, batch, "--max-new-tokens", "60", "--ignore-eos", "--stream", tmp=tmp_path)
    assert rows == alone
    streamed = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    assert [[s["token"] for s in streamed if s["row"] == r] for r in range(len(batch))] == alone
    rows, _ = cpp(binary, engine_dir, batch, "--max-new-tokens", "60", "--ignore-eos", "--slots", "2", tmp=tmp_path)
    assert rows == alone
    stop = alone[1][5]  # a stop token ends each row at its first occurrence; the others run on
    rows, _ = cpp(binary, engine_dir, batch, "--max-new-tokens", "60", "--stop-token", str(stop), tmp=tmp_path)
    assert rows == [r[:r.index(stop) + 1] if stop in r else r for r in alone]
    assert rows == [g.tokens for g in engine.generate(batch, 60, stop_tokens=[stop])]
    rows, _ = cpp(binary, engine_dir, batch, "--max-new-tokens", "60", tmp=tmp_path)  # default: the model's EOS ids
    assert rows == [g.tokens for g in engine.generate(batch, 60)]


def test_sampling(binary, tiny, tmp_path):
    """Seeded sampling repeats; top_k = 1 and a tiny top_p are greedy; settings out of range are refused with the
    Python runtime's message. (The C++ generator is not numpy's: seeded draws differ from Python's.)"""
    engine_dir, engine = tiny
    ids = prompt(70, 7)
    greedy = engine.generate(ids, 30, stop_tokens=()).tokens

    def run(*flags: str) -> list[int]:
        return cpp(binary, engine_dir, ids, "--max-new-tokens", "30", "--ignore-eos", *flags, tmp=tmp_path)[0][0]

    a, b = run("--temperature", "1.5", "--seed", "3"), run("--temperature", "1.5", "--seed", "3")
    assert a == b and a != greedy and all(0 <= t < 96 for t in a)
    assert run("--temperature", "1.5", "--seed", "4") != a
    assert run("--top-k", "1", "--seed", "0") == greedy
    assert run("--top-p", "1e-9", "--temperature", "2", "--seed", "0") == greedy
    for flags, kwargs in ((["--temperature", "-1"], dict(temperature=-1.0)), (["--top-p", "1.5"], dict(top_p=1.5)),
                          (["--top-k", "-2"], dict(top_k=-2))):
        _, out = cpp(binary, engine_dir, ids, *flags, tmp=tmp_path, check=False)
        with pytest.raises(RequestError) as e:
            engine.generate(ids, 4, **kwargs)
        assert (out.returncode, out.stderr.strip()) == (2, f"error: {e.value}")


def test_bad_input_one_error_line(binary, tiny, tmp_path):
    """Missing or incomplete directory, prompt too long, empty prompt, token outside the vocabulary, bad JSON,
    conflicting flags: one `error: ...` line (the Python runtime's message where it has one), exit code 2."""
    engine_dir, engine = tiny

    def error(engine_arg, ids, *flags) -> str:
        _, run = cpp(binary, engine_arg, ids, *flags, tmp=tmp_path, check=False)
        assert run.returncode == 2 and run.stdout == "", run
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
        return lines[0][len("error: "):]

    def python_error(ids, n):
        with pytest.raises(RequestError) as e:
            engine.generate(ids, n)
        return str(e.value)

    missing, ids_file = tmp_path / "nowhere", tmp_path / "ids.json"
    assert error(missing, [1, 2]) == f"engine directory {missing} does not exist"
    (tmp_path / "half").mkdir()
    assert error(tmp_path / "half", [1]) == (f"{tmp_path / 'half'} has no mesa.json: not an engine directory, or an "
                                             "export that did not finish")
    too_long = prompt(470, 1)
    assert error(engine_dir, too_long, "--max-new-tokens", "20") == python_error(too_long, 20)
    assert "exceeds max_len 480" in python_error(too_long, 20)
    assert error(engine_dir, []) == python_error([], 4)
    assert error(engine_dir, [[1, 2], []]) == python_error([[1, 2], []], 4)
    assert error(engine_dir, [5, 96]) == python_error([5, 96], 4)
    assert error(engine_dir, "[1, 2,").startswith(f"{ids_file} is not JSON: ")
    assert error(engine_dir, '{"ids": [1]}') == f"{ids_file} must hold a JSON list of token ids (or a list of lists)"
    assert error(engine_dir, "[1, 2.5]") == f"{ids_file}: token ids must be integers, got 2.5"
    assert error(engine_dir, [1, 2], "--max-new-tokens", "0") == python_error([1, 2], 0)
    assert error(engine_dir, [1, 2], "--greedy", "--seed", "1") == "--greedy cannot be combined with --seed"
    assert error(engine_dir, [[1, 2], [3]], "--save-logits", str(tmp_path / "x")) == ("--save-logits takes one prompt, "
                                                                                     "not a batch")
    assert error(engine_dir, [1], "--bogus") == "unrecognized arguments: --bogus"


def test_engines_of_other_methods_are_refused_in_one_line(binary, tmp_path):
    """The C++ runner plans Mesa and origin requests only: an engine of another method (runtime/methods.py)
    is one error line, never a wrong answer."""
    engine_dir = quiet_export(tiny_checkpoint(tmp_path / "ckpt", max_position_embeddings=T), tmp_path / "rerope",
                              MAX_LEN, ["--method", "rerope"])
    _, run = cpp(binary, engine_dir, [1, 2, 3], tmp=tmp_path, check=False)
    assert run.returncode == 2 and run.stdout == "", run
    assert run.stderr.strip() == (f"error: {engine_dir / 'mesa.json'} is unreadable: field method: 'rerope' is not "
                                  "served by the C++ runner (it runs 'mesa' and 'origin' engines; serve the other "
                                  "methods with the Python runtime)"), run.stderr

"""Latency-regression gate: the working tree against a reference commit, measured side by side in one run.

    python scripts/regression.py                         # working tree vs the commit in scripts/perf_reference
    python scripts/regression.py --reference COMMIT      # against another commit
    python scripts/regression.py --set-reference HEAD    # accept the current speed: move the reference

How it works. The reference commit (a full id kept in scripts/perf_reference, moved only on purpose) is
extracted with `git archive` into a temporary folder. Two worker processes start, one per tree, each
running that tree's own code with this virtualenv: each exports the gate's tiny random Llama (hidden 256,
4 layers, T = 256, max_len 2176) with its tree's exporter and default target, then waits. The gate then
runs rounds, alternating which tree goes first, and each round times in both trees:

- prefill: a 512-token prompt by its Mesa plan (first, middle and last chunks), best of 3;
- decode_short: 32 greedy decode steps after that prompt (context ~512);
- decode_long: 32 decode steps after a 2048-token prompt (context >= 2k keys, stair positions).

A figure is the median over rounds of (working-tree seconds / reference seconds) of the same round, so
load and CPU speed affect both alike and no absolute number is stored. The gate fails (exit 1) when a
figure exceeds 1 + --threshold (default 0.25); a figure over the limit is measured again (--retries)
and its best kept, so a noisy moment does not fail CI while a real regression fails every attempt.
Everything runs on one ORT thread. `--inject-slowdown F` (testing only) makes every engine step of the
working tree (1 + F) times slower.

Exit codes: 0 passed, 1 a regression, 2 the gate could not run (unreachable reference, no git history,
a tree whose engine cannot export, a worker that died) — never a silent pass.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import select
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

REFERENCE_FILE = ROOT / "scripts" / "perf_reference"
THRESHOLD = 0.25
MODEL = dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
PREFILL_TOKENS = 512
LONG_TOKENS = 2048
DECODE_TOKENS = 32
MAX_LEN = LONG_TOKENS + 128
PREFILL_REPEATS = 3  # a prefill is short (~50 ms): its best of 3 per round is far steadier than one
FIGURES = ("prefill", "decode_short", "decode_long")
WORKER_TIMEOUT = 300  # seconds for a worker to export and warm up, or to answer one round


class GateError(Exception):
    """The gate cannot measure: one line for the user, exit 2."""


# ------------------------------------------------------------------------------ worker (one per tree)

def export_tiny(directory: Path) -> Path:
    """The gate's engine, exported by this tree's exporter with the default target (what users get)."""
    import torch
    import transformers

    from export import api

    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODEL)).save_pretrained(directory / "ckpt")
        try:
            api.export_engine(directory / "ckpt", directory / "engine", max_len=MAX_LEN, verify=False, progress=False)
        except api.errors() as e:
            raise GateError(f"the gate's tiny model does not export ({e})") from None
    return directory / "engine"


class Workloads:
    """The three timed workloads over one engine (runtime.engine.MesaEngine, what users run), each from
    a fresh sequence so every round does the same work."""

    def __init__(self, engine_dir: Path, threads: int, slowdown: float):
        from runtime.engine import MesaEngine

        self.engine = MesaEngine.load(engine_dir, backend="ort-cpu", slots=2,
                                      session_options={"intra_op_num_threads": threads, "inter_op_num_threads": 1})
        self.engine._step.session = _Slowed(self.engine._step.session, slowdown) if slowdown > 0 else \
            self.engine._step.session
        rng = np.random.default_rng(0)
        vocab = self.engine.manifest.vocab_size
        self.short_ids = rng.integers(0, vocab, PREFILL_TOKENS)
        self.long_ids = rng.integers(0, vocab, LONG_TOKENS)
        plan = self.engine._plans([self.short_ids], DECODE_TOKENS)[0]
        if not any(s.kind == "middle" for s in plan):
            raise GateError("the gate's prefill prompt has no middle chunk: its settings no longer test Mesa's plan")

    def _decode(self, seq, logits) -> float:
        t = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            seq.append([int(np.argmax(logits))])
            logits = seq.step()
        return time.perf_counter() - t

    def round(self) -> dict[str, float]:
        times = {"prefill": float("inf")}
        for i in range(PREFILL_REPEATS):
            seq = self.engine.sequence(self.short_ids)
            t = time.perf_counter()
            logits = seq.step()
            times["prefill"] = min(times["prefill"], time.perf_counter() - t)
            if i == 0:
                times["decode_short"] = self._decode(seq, logits)
            seq.cancel()
        with self.engine.sequence(self.long_ids) as seq:
            times["decode_long"] = self._decode(seq, seq.step())
        return times


class _Slowed:
    """An ORT session whose runs take (1 + factor) times as long (for testing the gate)."""

    def __init__(self, session, factor: float):
        self._session, self._factor = session, factor

    def __getattr__(self, name):
        return getattr(self._session, name)

    def _slow(self, run, *args):
        t = time.perf_counter()
        out = run(*args)
        time.sleep(self._factor * (time.perf_counter() - t))
        return out

    def run(self, *args):
        return self._slow(self._session.run, *args)

    def run_with_iobinding(self, *args):
        return self._slow(self._session.run_with_iobinding, *args)


def worker(args) -> int:
    """Speak the gate's protocol on stdin/stdout: one JSON line when ready, one per "round" request."""
    import runtime

    engine_dir = Path(args.engine_dir)
    try:
        if not (engine_dir / "engine" / "mesa.json").is_file():
            export_tiny(engine_dir)
        work = Workloads(engine_dir / "engine", args.threads, args.inject_slowdown)
        work.round()  # warm-up: allocations, ORT's first-run work
    except GateError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return 2
    print(json.dumps({"ready": True, "runtime": str(Path(runtime.__file__).resolve())}), flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        print(json.dumps(work.round()), flush=True)
    return 0


# ------------------------------------------------------------------------------ the gate

class Tree:
    """A worker process running the code of one tree (this checkout, or the extracted reference)."""

    def __init__(self, name: str, root: Path, work: Path, threads: int, slowdown: float = 0.0):
        self.name, self.root = name, root
        self.log = open(work / f"{name}.log", "w+")
        env = {**os.environ, "PYTHONPATH": str(root)}  # the tree's packages before the editable install
        cmd = [sys.executable, str(root / "scripts" / "regression.py"), "worker", "--engine-dir",
               str(work / name), "--threads", str(threads), "--inject-slowdown", str(slowdown)]
        (work / name).mkdir(exist_ok=True)
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)

    def read(self) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], WORKER_TIMEOUT)
        if not ready:
            self.proc.kill()
            raise GateError(f"the {self.name} tree's worker did not answer within {WORKER_TIMEOUT} s")
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            tail = self.log.read().strip().splitlines()[-3:]
            raise GateError(f"the {self.name} tree's worker died: {' | '.join(tail) or 'no output'}")
        return json.loads(line)

    def ready(self) -> None:
        msg = self.read()
        if "error" in msg:
            raise GateError(f"{self.name} tree: {msg['error']}")
        if not Path(msg["runtime"]).is_relative_to(self.root.resolve()):
            raise GateError(f"the {self.name} worker imported {msg['runtime']}, not its own tree's code")

    def round(self) -> dict:
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise GateError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def resolve_reference(spec: str | None) -> str:
    """The full commit id to compare against: --reference, else the one in scripts/perf_reference."""
    if spec is None:
        if not REFERENCE_FILE.is_file():
            raise GateError(f"{REFERENCE_FILE.relative_to(ROOT)} is missing: set one with --set-reference COMMIT")
        spec = REFERENCE_FILE.read_text().split()[0] if REFERENCE_FILE.read_text().split() else ""
    if not (ROOT / ".git").exists():
        raise GateError(f"{ROOT} is not a git checkout, so the reference commit cannot be checked out; "
                        "clone the repository, or pass --reference-tree DIR")
    try:
        return git("rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}")
    except GateError:
        shallow = git("rev-parse", "--is-shallow-repository") == "true"
        hint = " (this clone is shallow: `git fetch --unshallow`)" if shallow else ""
        raise GateError(f"reference commit {spec!r} is not in this repository{hint}") from None


def extract(commit: str, into: Path) -> Path:
    """The reference tree: `git archive` of the commit (a clean copy, nothing registered in .git)."""
    into.mkdir()
    data = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit], capture_output=True)
    if data.returncode != 0:
        raise GateError(f"git archive {commit} failed: {data.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(data.stdout)) as tar:
        tar.extractall(into, filter="data")
    if not (into / "scripts" / "regression.py").is_file():
        raise GateError(f"reference {commit[:12]} has no scripts/regression.py: choose a commit that has this gate")
    return into


def measure(current: Tree, reference: Tree, rounds: int) -> dict[str, list[float]]:
    """Per figure, the ratio current/reference of each round; the order alternates round by round."""
    ratios = {k: [] for k in FIGURES}
    for r in range(rounds):
        first, second = (current, reference) if r % 2 else (reference, current)
        got = {first.name: first.round(), second.name: second.round()}
        for k in FIGURES:
            ratios[k].append(got["current"][k] / got["reference"][k])
    return ratios


def verdict(ratios: dict[str, list[float]], threshold: float) -> tuple[bool, list[dict]]:
    """(passed, rows): a row per figure with its median ratio; fails above 1 + threshold."""
    rows = [{"figure": k, "ratio": statistics.median(ratios[k]), "spread": (min(ratios[k]), max(ratios[k]))}
            for k in FIGURES]
    for row in rows:
        row["ok"] = row["ratio"] <= 1 + threshold
    return all(r["ok"] for r in rows), rows


def table(rows: list[dict], threshold: float, reference: str) -> str:
    lines = [f"| figure | working tree / reference {reference} (median) | range over rounds | limit {1 + threshold:.2f} |",
             "|---|---:|---:|:---:|"]
    for r in rows:
        lo, hi = r["spread"]
        lines.append(f"| {r['figure']} | {r['ratio']:.3f} | {lo:.2f}-{hi:.2f} | {'ok' if r['ok'] else 'REGRESSION'} |")
    return "\n".join(lines)


def run_gate(args) -> int:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mesa-regression-") as tmp:
        work = Path(args.engines) if args.engines else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.reference_tree:
            ref_root, label = Path(args.reference_tree).resolve(), f"tree {args.reference_tree}"
            if not (ref_root / "scripts" / "regression.py").is_file():
                raise GateError(f"--reference-tree {ref_root} has no scripts/regression.py")
        else:
            commit = resolve_reference(args.reference)
            ref_root, label = extract(commit, Path(tmp) / "reference-tree"), commit[:12]
        trees = []
        try:
            trees.append(Tree("reference", ref_root, work, args.threads))
            trees.append(Tree("current", ROOT, work, args.threads, args.inject_slowdown))
            for t in trees:  # both export and warm up at once; rounds start when both are ready
                t.ready()
            reference, current = trees
            ratios = measure(current, reference, args.rounds)
            passed, rows = verdict(ratios, args.threshold)
            for attempt in range(args.retries):  # a real regression fails every attempt; a noisy moment does not
                if passed:
                    break
                print(f"over the limit; measuring again ({attempt + 1}/{args.retries}), keeping each figure's best")
                again = measure(current, reference, args.rounds)
                ratios = {k: min(ratios[k], again[k], key=statistics.median) for k in FIGURES}
                passed, rows = verdict(ratios, args.threshold)
        finally:
            for t in trees:
                t.close()
    print(table(rows, args.threshold, label))
    if args.json:
        Path(args.json).write_text(json.dumps({"reference": label, "threshold": args.threshold, "rows": rows,
                                               "ratios": ratios}, indent=1))
    took = time.perf_counter() - started
    if passed:
        print(f"latency gate passed against {label} ({took:.0f} s)")
    else:
        print(f"latency gate FAILED: a figure is more than {args.threshold:.0%} slower than reference {label} "
              f"({took:.0f} s). If the slowdown is intended, move the reference "
              "(`python scripts/regression.py --set-reference HEAD`) and say why in the commit.")
    print(f"gate: {sum(r['ok'] for r in rows)} passed, {sum(not r['ok'] for r in rows)} failed")
    return 0 if passed else 1


def set_reference(spec: str) -> int:
    commit = resolve_reference(spec)
    REFERENCE_FILE.write_text(commit + "\n")
    print(f"wrote {REFERENCE_FILE.relative_to(ROOT)}: {commit} ({git('log', '-1', '--format=%s', commit)}); "
          "commit it and say in the message why the reference moves (a slowdown accepted, or a speed-up to protect)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/regression.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", default=None, metavar="COMMIT",
                   help="commit to compare against (default: the id in scripts/perf_reference)")
    p.add_argument("--reference-tree", default=None, metavar="DIR",
                   help="compare against the code in DIR instead of a commit (e.g. another checkout)")
    p.add_argument("--set-reference", default=None, metavar="COMMIT",
                   help="write COMMIT's full id to scripts/perf_reference and exit (accepting its speed)")
    p.add_argument("--threshold", type=float, default=THRESHOLD, help="allowed slowdown as a fraction (default 0.25)")
    p.add_argument("--rounds", type=int, default=15, help="measurement rounds per attempt (median)")
    p.add_argument("--retries", type=int, default=1,
                   help="when over the limit, measure again this many times and keep each figure's best")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads of each worker")
    p.add_argument("--engines", default=None, metavar="DIR",
                   help="keep the workers' engines in DIR/current and DIR/reference and reuse them on later runs")
    p.add_argument("--inject-slowdown", type=float, default=0.0, metavar="F",
                   help="testing only: make every engine step of the working tree (1 + F) times slower")
    p.add_argument("--json", default=None, help="also write the ratios to this file")
    return p


def worker_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/regression.py worker", description="internal: one tree's measurements")
    p.add_argument("--engine-dir", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--inject-slowdown", type=float, default=0.0)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker(worker_parser().parse_args(argv[1:]))
    args = parser().parse_args(argv)
    try:
        if args.set_reference:
            return set_reference(args.set_reference)
        if args.rounds < 1 or args.threshold <= 0:
            raise GateError("--rounds must be >= 1 and --threshold above 0")
        return run_gate(args)
    except GateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

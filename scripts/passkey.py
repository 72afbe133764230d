"""Token-space passkey retrieval (tests/fixtures/trained/task.json) through any exported engine.

    python -m scripts.passkey ENGINE [ENGINE ...] --task task.json --lengths 256 1024 2048 --n 100

A prompt of exactly L tokens is `BOS filler[:p] KEY d1..d5 KEY filler[p:] QUERY ANS`; the answer is the
five digit tokens, greedily decoded after the prompt. Prints exact-match accuracy per engine, filler
mode and length, with a 95% Wilson interval; `--json` writes every cell.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

MODES = ("repeat", "random")


@dataclass(frozen=True)
class Task:
    bos: int
    key: int
    query: int
    ans: int
    digits: tuple[int, ...]  # token id of digit 0..9
    filler_range: tuple[int, int]  # inclusive
    sentence: tuple[int, ...]
    n_digits: int

    @classmethod
    def load(cls, path: str | Path) -> "Task":
        t = json.loads(Path(path).read_text())
        s = t["special_ids"]
        return cls(bos=s["BOS"], key=s["KEY"], query=s["QUERY"], ans=s["ANS"],
                   digits=tuple(t["digit_ids"][str(i)] for i in range(10)),
                   filler_range=tuple(t["filler_id_range"]), sentence=tuple(t["sentence"]),
                   n_digits=t["n_answer_digits"])

    @property
    def overhead(self) -> int:  # BOS, KEY, digits, KEY, QUERY, ANS
        return self.n_digits + 5


def make_prompt(task: Task, length: int, mode: str, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """One prompt of exactly `length` tokens and its answer (task.json "format" and "modes")."""
    n_filler = length - task.overhead
    if n_filler < 0:
        raise ValueError(f"a prompt needs at least {task.overhead} tokens, got {length}")
    if mode == "repeat":
        reps = n_filler // len(task.sentence) + 1
        filler = (list(task.sentence) * reps)[:n_filler]
        p = len(task.sentence) * int(rng.integers(0, n_filler // len(task.sentence) + 1))
    elif mode == "random":
        lo, hi = task.filler_range
        filler = rng.integers(lo, hi + 1, n_filler).tolist()
        p = int(rng.integers(0, n_filler + 1))
    else:
        raise ValueError(f"unknown filler mode {mode!r}; choose from {MODES}")
    answer = [task.digits[d] for d in rng.choice(10, task.n_digits, replace=False)]
    prompt = [task.bos, *filler[:p], task.key, *answer, task.key, *filler[p:], task.query, task.ans]
    assert len(prompt) == length
    return prompt, answer


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Cell:
    engine: str
    mode: str
    length: int
    n: int
    hits: int

    @property
    def accuracy(self) -> float:
        return self.hits / self.n

    def row(self) -> dict:
        lo, hi = wilson_interval(self.hits, self.n)
        return {**asdict(self), "accuracy": self.accuracy, "ci95": [round(lo, 3), round(hi, 3)]}


def evaluate(engine, task: Task, length: int, mode: str, n: int, seed: int = 0, batch: int = 1) -> int:
    """Exact-match hits of `engine` on n prompts; prompts depend only on (seed, length, mode)."""
    rng = np.random.default_rng([seed, length, MODES.index(mode)])
    cases = [make_prompt(task, length, mode, rng) for _ in range(n)]
    hits = 0
    for i in range(0, n, batch):
        chunk = cases[i:i + batch]
        outputs = engine.generate([p for p, _ in chunk], max_new_tokens=task.n_digits, stop_tokens=())
        hits += sum(out.tokens == answer for out, (_, answer) in zip(outputs, chunk))
    return hits


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.passkey", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engines", nargs="+", help="exported engine directories (any method)")
    p.add_argument("--task", required=True, help="task description, e.g. tests/fixtures/trained/task.json")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 768, 1024, 2048], help="prompt lengths L")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="filler modes")
    p.add_argument("--n", type=int, default=100, help="prompts per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every cell to this JSON file")
    return p


def run(engines: dict[str, object], task: Task, lengths, modes, n: int, seed: int, progress=True) -> list[Cell]:
    from tqdm import tqdm

    cells = []
    grid = [(name, mode, L) for name in engines for mode in modes for L in lengths]
    for name, mode, L in tqdm(grid, desc="passkey", unit="cell", disable=not progress, file=sys.stderr):
        cells.append(Cell(name, mode, L, n, evaluate(engines[name], task, L, mode, n, seed)))
    return cells


def table(cells: list[Cell]) -> str:
    lengths = sorted({c.length for c in cells})
    rows = ["| filler, engine | " + " | ".join(map(str, lengths)) + " |", "|---" * (len(lengths) + 1) + "|"]
    for key in dict.fromkeys((c.mode, c.engine) for c in cells):
        by_len = {c.length: c for c in cells if (c.mode, c.engine) == key}
        rows.append(f"| {key[0]}, {key[1]} | " + " | ".join(
            f"{by_len[L].accuracy:.2f}" if L in by_len else "" for L in lengths) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from runtime.engine import MesaEngine
    from runtime.errors import EngineError

    try:
        task = Task.load(args.task)
        engines = {Path(d).name: MesaEngine.load(d) for d in args.engines}
    except (OSError, KeyError, json.JSONDecodeError, EngineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cells = run(engines, task, args.lengths, args.modes, args.n, args.seed)
    print(table(cells))
    if args.json:
        Path(args.json).write_text(json.dumps([c.row() for c in cells], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

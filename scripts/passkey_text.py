"""Passkey retrieval in text, as in the Mesa-Extrapolation paper (after Mohtashami & Jaggi's landmark task).

    python scripts/passkey_text.py ENGINE [ENGINE ...] --lengths 4096 8192 12288 --depths 0 0.25 0.5 0.75 1 \
        --trials 5 --out passkey_out/

The prompt is an instruction, filler sentences repeated, the key line at a chosen depth of the filler,
more filler, and the question; the model's greedy continuation is parsed for the first number:

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will
    quiz you about the important information there. The grass is green. The sky is blue. ... The pass key
    is 68217. Remember it. 68217 is the pass key. The grass is green. ... What is the pass key? The pass key is

Each prompt is as many whole filler sentences as fit in --lengths tokens (counted with the engine's own
tokenizer, BOS included), so lengths are upper bounds met to within one filler block. Engines need the
tokenizer files of their checkpoint (export from a folder that has tokenizer.json); any method works.
Random-weight models score 0: the numbers mean something only for real checkpoints.
Writes passkey_text.json, passkey_text.md (accuracy per engine, depth and length) and passkey_text.png.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
PROMPT_WORDS = sorted(set(re.findall(r"[a-z]+|[^\w\s]", " ".join((INTRO, FILLER, KEY_LINE, QUESTION)).lower())))

Encode = Callable[[str], list[int]]


@dataclass
class PasskeyPrompt:
    ids: list[int]
    passkey: int
    filler_before: int  # filler blocks before the key line
    filler_after: int

    @property
    def depth(self) -> float:
        """Where the key line sits in the filler: 0 = right after the instruction, 1 = right before the question."""
        n = self.filler_before + self.filler_after
        return self.filler_before / n if n else 0.0


def prompt_text(passkey: int, before: int, after: int) -> str:
    parts = [INTRO, *[FILLER] * before, KEY_LINE.format(key=passkey), *[FILLER] * after, QUESTION]
    return " ".join(parts)


def split_filler(blocks: int, depth: float) -> tuple[int, int]:
    """(before, after) whole filler blocks for a key line at `depth` in [0, 1]."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within [0, 1], got {depth}")
    before = int(round(depth * blocks))
    return before, blocks - before


def build_prompt(encode: Encode, length: int, depth: float, passkey: int) -> PasskeyPrompt:
    """The longest prompt of whole filler blocks whose token count (as `encode` counts it) is <= length."""
    def size(blocks: int) -> int:
        return len(encode(prompt_text(passkey, *split_filler(blocks, depth))))

    base = size(0)
    if base > length:
        raise ValueError(f"a passkey prompt needs at least {base} tokens, asked for {length}")
    per_block = max(1, size(1) - base)
    blocks = max(0, (length - base) // per_block)
    while blocks > 0 and size(blocks) > length:  # tokenizers may merge across block boundaries
        blocks -= 1
    while size(blocks + 1) <= length:
        blocks += 1
    before, after = split_filler(blocks, depth)
    return PasskeyPrompt(encode(prompt_text(passkey, before, after)), passkey, before, after)


_NUMBER = re.compile(r"\d(?:[ \t]?\d)*")


def parse_answer(text: str) -> int | None:
    """The first number in the model's continuation (digits may be split by single spaces, as a word-level
    tokenizer decodes them), or None when there is none."""
    m = _NUMBER.search(text)
    return int(re.sub(r"\s", "", m.group())) if m else None


def passkeys(seed: int, n: int) -> list[int]:
    """n five-digit passkeys, reproducible from `seed`."""
    return [int(x) for x in np.random.default_rng(seed).integers(10_000, 100_000, n)]


# --------------------------------------------------------------------------------------- running

@dataclass
class Cell:
    engine: str
    method: str
    length: int  # requested
    depth: float  # requested
    trials: int
    correct: int
    prompt_tokens: list[int]  # actual token counts
    answers: list[str]  # decoded continuations
    seconds: float
    skipped: str = ""

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials if self.trials else float("nan")


def evaluate(engine, tokenizer, name: str, length: int, depth: float, trials: int, seed: int,
             max_new_tokens: int) -> Cell:
    method = engine.method
    cell = Cell(name, method, length, depth, 0, 0, [], [], 0.0)
    if length + max_new_tokens > engine.manifest.max_len:
        cell.skipped = f"length + {max_new_tokens} new tokens exceeds max_len {engine.manifest.max_len}"
        return cell
    stop = tuple(engine.manifest.eos_token_ids)
    t = time.perf_counter()
    for i, key in enumerate(passkeys(seed * 1_000_003 + length * 101 + int(depth * 1000), trials)):
        prompt = build_prompt(tokenizer.encode, length, depth, key)
        run = engine.run(prompt.ids, max_new_tokens, stop_ids=stop)
        text = tokenizer.decode(run.tokens)
        cell.trials += 1
        cell.correct += int(parse_answer(text) == key)
        cell.prompt_tokens.append(len(prompt.ids))
        cell.answers.append(text)
    cell.seconds = time.perf_counter() - t
    return cell


def markdown(cells: list[Cell]) -> str:
    out = ["Passkey retrieval accuracy (text prompt, greedy). Random-weight models score 0 by construction; "
           "the numbers mean something only for real checkpoints.", ""]
    for name in dict.fromkeys(c.engine for c in cells):
        mine = [c for c in cells if c.engine == name]
        lengths = sorted({c.length for c in mine})
        depths = sorted({c.depth for c in mine})
        out += [f"**{name}** (method {mine[0].method})", "",
                "| depth \\ length | " + " | ".join(map(str, lengths)) + " |", "|---|" + "---:|" * len(lengths)]
        by = {(c.depth, c.length): c for c in mine}
        for d in depths:
            row = []
            for L in lengths:
                c = by.get((d, L))
                row.append("—" if c is None or c.skipped else f"{c.correct}/{c.trials}")
            out.append(f"| {d:g} | " + " | ".join(row) + " |")
        mean = [np.mean([by[(d, L)].accuracy for d in depths if (d, L) in by and not by[(d, L)].skipped] or [np.nan])
                for L in lengths]
        out += ["| mean | " + " | ".join("—" if np.isnan(a) else f"{a:.0%}" for a in mean) + " |", ""]
    skipped = [f"- {c.engine} L={c.length} depth={c.depth:g}: {c.skipped}" for c in cells if c.skipped]
    return "\n".join(out + (["Skipped:", *skipped] if skipped else [])) + "\n"


def plot(cells: list[Cell], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(c.engine for c in cells))
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        mine = [c for c in cells if c.engine == name]
        lengths, depths = sorted({c.length for c in mine}), sorted({c.depth for c in mine})
        grid = np.full((len(depths), len(lengths)), np.nan)
        for c in mine:
            if not c.skipped:
                grid[depths.index(c.depth), lengths.index(c.length)] = c.accuracy
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("key depth")
        ax.set_title(f"{name} ({mine[0].method})", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/passkey_text.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engines", nargs="+", metavar="ENGINE", help="engine directories (with tokenizer files)")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 12288], help="prompt tokens (upper bounds)")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="where the key line sits in the filler, 0..1")
    p.add_argument("--trials", type=int, default=5, help="prompts (different passkeys) per cell")
    p.add_argument("--max-new-tokens", type=int, default=12, help="tokens generated per answer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="passkey_out", help="folder for passkey_text.{json,md,png}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from scripts.harness import Engine, TextTokenizer

    cells: list[Cell] = []
    for directory in args.engines:
        try:
            tokenizer = TextTokenizer(directory)
            engine = Engine(directory)
        except (FileNotFoundError, OSError, ValueError) as e:
            print(f"error: {directory}: {e}", file=sys.stderr)
            return 2
        name = Path(directory).name
        for length in args.lengths:
            for depth in args.depths:
                try:
                    cell = evaluate(engine, tokenizer, name, length, depth, args.trials, args.seed, args.max_new_tokens)
                except ValueError as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 2
                cells.append(cell)
                print(f"{name} L={length} depth={depth:g}: " + (cell.skipped or f"{cell.correct}/{cell.trials}"),
                      file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "passkey_text.json").write_text(json.dumps(
        [{**asdict(c), "accuracy": c.accuracy} for c in cells], indent=1))
    md = markdown(cells)
    (out / "passkey_text.md").write_text(md)
    plot(cells, out / "passkey_text.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Perplexity of a text file under exported engines, window by window, each window run by its Mesa plan.

    python scripts/perplexity.py ENGINE [ENGINE ...] --text-file book.txt --lengths 4096 8192 12288 \
        [--stride N] [--max-tokens N] --out ppl_out/

For each window length L the token stream is cut into windows of at most L tokens that start every
`stride` tokens (default L: disjoint windows). Each window is one prompt, prefilled by the engine's
own plan (first, middle and last chunks for --method mesa; full-attention calls for origin) with the logits
of every position kept. A token is scored once, in the first window that reaches it, from the logits
of the position before it, in the same window. With stride < L every window after the first scores only
its last `stride` tokens, each with at least L - stride tokens of context, and every token but the text's
first is scored; with disjoint windows (the default) each window's first token has no context in its
window and is not scored. Perplexity = exp(mean NLL) over the scored tokens.

Random-weight models give perplexities near the vocabulary size: meaningless. The script is for real
checkpoints; writes perplexity.json, perplexity.md and perplexity.png (perplexity against L).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runtime.score import token_nll  # noqa: E402  (the project's one NLL)

@dataclass(frozen=True)
class Span:
    begin: int  # the window is tokens [begin, end)
    end: int
    score_from: int  # tokens [score_from, end) are scored in this window

    @property
    def scored(self) -> int:
        return self.end - self.score_from


def window_spans(n_tokens: int, window: int, stride: int | None = None) -> list[Span]:
    """Windows of at most `window` tokens starting every `stride` tokens (default: disjoint windows).

    A token is scored at most once, in the first window that holds it after that window's first token
    (whose prediction would need context from outside the window). With stride < window every token but
    the text's first is scored exactly once; with disjoint windows each window's first token is not scored.
    """
    stride = window if stride is None else stride
    if window < 2:
        raise ValueError(f"a window needs at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be within [1, window={window}], got {stride}")
    spans, scored_to, begin = [], 1, 0
    while begin < n_tokens - 1 and scored_to < n_tokens:
        end = min(begin + window, n_tokens)
        first = max(scored_to, begin + 1)
        if end > first:
            spans.append(Span(begin, end, first))
            scored_to = end
        begin += stride
    return spans


@dataclass
class Result:
    engine: str
    method: str
    length: int
    stride: int
    windows: int
    tokens_scored: int
    nll: float  # mean
    perplexity: float
    seconds: float
    skipped: str = ""


def evaluate(engine, ids: np.ndarray, name: str, length: int, stride: int | None) -> Result:
    stride = stride or length
    res = Result(name, engine.method, length, stride, 0, 0, float("nan"), float("nan"), 0.0)
    if length > engine.manifest.max_len:
        res.skipped = f"window {length} exceeds the engine's max_len {engine.manifest.max_len}"
        return res
    total, t = 0.0, time.perf_counter()
    for span in window_spans(len(ids), length, stride):
        window = ids[span.begin:span.end]
        nll = token_nll(engine.score(window), window)  # nll[j] scores token begin + j + 1
        total += float(nll[span.score_from - span.begin - 1:].sum())
        res.windows += 1
        res.tokens_scored += span.scored
    res.seconds = time.perf_counter() - t
    if res.tokens_scored:
        res.nll = total / res.tokens_scored
        res.perplexity = math.exp(res.nll)
    return res


def markdown(results: list[Result], n_tokens: int, source: str) -> str:
    out = [f"Perplexity of {source} ({n_tokens} tokens). Random-weight models give about the vocabulary size: "
           "meaningful only for real checkpoints.", "",
           "| engine | method | window | stride | windows | tokens scored | perplexity |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        ppl = r.skipped or f"{r.perplexity:.3f}"
        out.append(f"| {r.engine} | {r.method} | {r.length} | {r.stride} | {r.windows} | {r.tokens_scored} | {ppl} |")
    return "\n".join(out) + "\n"


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r.engine for r in results):
        pts = sorted((r for r in results if r.engine == name and not r.skipped), key=lambda r: r.length)
        if pts:
            ax.plot([r.length for r in pts], [r.perplexity for r in pts], "o-", label=f"{name} ({pts[0].method})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("window tokens")
    ax.set_ylabel("perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/perplexity.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engines", nargs="+", metavar="ENGINE", help="engine directories (with tokenizer files)")
    p.add_argument("--text-file", required=True, help="UTF-8 text to score")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 12288], help="window lengths, tokens")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: the window)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    p.add_argument("--out", default="ppl_out", help="folder for perplexity.{json,md,png}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from scripts.harness import Engine, TextTokenizer

    try:
        text = Path(args.text_file).read_text(encoding="utf-8")
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results: list[Result] = []
    n_tokens = 0
    for directory in args.engines:
        try:
            ids = np.asarray(TextTokenizer(directory).encode(text), dtype=np.int64)[: args.max_tokens]
            engine = Engine(directory)
        except (FileNotFoundError, OSError, ValueError) as e:
            print(f"error: {directory}: {e}", file=sys.stderr)
            return 2
        n_tokens = len(ids)
        if n_tokens < 2:
            print(f"error: {args.text_file} has {n_tokens} token(s); perplexity needs at least 2", file=sys.stderr)
            return 2
        for length in args.lengths:
            try:
                r = evaluate(engine, ids, Path(directory).name, length, args.stride)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            results.append(r)
            print(f"{r.engine} window {length}: " + (r.skipped or f"ppl {r.perplexity:.3f} over {r.tokens_scored} "
                                                     f"tokens in {r.windows} windows"), file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perplexity.json").write_text(json.dumps({"text_file": str(args.text_file), "tokens": n_tokens,
                                                     "results": [asdict(r) for r in results]}, indent=1))
    md = markdown(results, n_tokens, args.text_file)
    (out / "perplexity.md").write_text(md)
    plot(results, out / "perplexity.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m runtime.score DIR --text-file F`: perplexity of a text under an exported Mesa engine.

The whole text is one prompt, prefilled by its Mesa plan; row i of the logits predicts token i + 1.
Like runtime.generate, it imports only the standard library at the top (Ctrl-C during the imports is
one line and exit code 130).
"""

from __future__ import annotations

import argparse
import json
import sys

from runtime.generate import PrefillBar, fail, interruptible, read_ids, read_text


def token_nll(logits, ids):
    """Negative log-likelihood of ids[1:], row i of logits [>= len(ids) - 1, vocab] predicting ids[i + 1]
    (float64): the one NLL of the project (scripts/perplexity.py windows it)."""
    import numpy as np

    ids = np.asarray(ids)
    x = logits[: len(ids) - 1].astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(x - top).sum(axis=1))
    return log_z - x[np.arange(len(x)), ids[1:]]


def perplexity(logits, ids) -> float:
    """exp of the mean negative log-likelihood of tokens 1..L-1, each scored by the row before it."""
    import numpy as np

    return float(np.exp(np.mean(token_nll(logits, ids))))


def parser() -> argparse.ArgumentParser:
    from runtime.backends import BACKENDS

    p = argparse.ArgumentParser(prog="python -m runtime.score",
                                description="Perplexity of a text under a Mesa-Extrapolation ONNX engine.")
    p.add_argument("engine", metavar="DIR", help="engine directory (model.onnx + mesa.json)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file", metavar="F", help="text to score (the engine needs tokenizer.json)")
    src.add_argument("--input-ids-file", metavar="F.json", help="JSON list of token ids to score")
    p.add_argument("--backend", default="auto", choices=("auto", *BACKENDS))
    p.add_argument("--json", action="store_true", help="print {perplexity, tokens, backend} as JSON")
    return p


@interruptible
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from runtime.engine import EngineError, MesaEngine, RequestError

    source = args.input_ids_file if args.text_file is None else args.text_file
    try:
        text_or_ids = read_text(source) if args.text_file is not None else read_ids(source)
        engine = MesaEngine.load(args.engine, backend=args.backend)
        print(f"backend: {engine.backend}", file=sys.stderr)
    except (EngineError, ValueError, OSError) as e:
        return fail(str(e))
    try:  # from here on, what is wrong is the text or the ids in `source`
        ids = engine.encode(text_or_ids) if args.text_file is not None else text_or_ids
        if any(isinstance(t, list) for t in ids) or len(ids) < 2:
            return fail(f"{source}: perplexity needs a flat list of at least 2 tokens")
        logits = engine.score(ids, progress=PrefillBar())
    except RequestError as e:
        return fail(f"{source}: {e}")
    ppl = perplexity(logits, ids)
    if args.json:
        print(json.dumps({"perplexity": ppl, "tokens": len(ids), "backend": engine.backend}))
    else:
        print(f"perplexity {ppl:.4f} over {len(ids) - 1} predicted tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())

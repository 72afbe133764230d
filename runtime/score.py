"""`python -m runtime.score DIR --text-file F`: perplexity of a text under an exported Mesa engine.

The whole text is one prompt, prefilled by its Mesa plan; row i of the logits predicts token i + 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from runtime.generate import PrefillBar, fail


def perplexity(logits: np.ndarray, ids) -> float:
    """exp of the mean negative log-likelihood of tokens 1..L-1, each scored by the row before it."""
    ids = np.asarray(ids)
    x = logits[:-1].astype(np.float64)
    top = x.max(axis=1)
    log_z = top + np.log(np.exp(x - top[:, None]).sum(axis=1))
    return float(np.exp(np.mean(log_z - x[np.arange(len(x)), ids[1:]])))


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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from runtime.engine import EngineError, MesaEngine

    try:
        if args.text_file is not None:
            text = Path(args.text_file).read_text()
        else:
            ids = json.loads(Path(args.input_ids_file).read_text())
        engine = MesaEngine.load(args.engine, backend=args.backend)
        print(f"backend: {engine.backend}", file=sys.stderr)
        if args.text_file is not None:
            ids = engine.encode(text)
        if not isinstance(ids, list) or len(ids) < 2:
            return fail("perplexity needs a flat list of at least 2 tokens")
        logits = engine.score(ids, progress=PrefillBar())
    except json.JSONDecodeError as e:
        return fail(f"{args.input_ids_file} is not JSON: {e}")
    except (EngineError, OSError) as e:
        return fail(str(e))
    ppl = perplexity(logits, ids)
    if args.json:
        print(json.dumps({"perplexity": ppl, "tokens": len(ids), "backend": engine.backend}))
    else:
        print(f"perplexity {ppl:.4f} over {len(ids) - 1} predicted tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())

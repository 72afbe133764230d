"""`python -m runtime.generate DIR`: generate from an exported Mesa engine (no torch needed).

    python -m runtime.generate engines/llama2-7b-12k --prompt-file long.txt --max-new-tokens 64
    python -m runtime.generate ENGINE --input-ids-file ids.json --greedy --max-new-tokens 17 --save-logits out.npz

One prompt streams its tokens (text when the engine has a tokenizer, else ids) to stdout as they
come; a batch (a list of lists in --input-ids-file) prints one line per row. The backend, prefill
progress and timings go to stderr. Bad input: one line on stderr and exit code 2; Ctrl-C: one line
and exit code 130, also while the heavy modules (numpy, onnxruntime) are still being imported, which
is why this module imports only the standard library at the top.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
PROGRESS_MIN_TOKENS = 1024  # prompts at least this long show a prefill bar (tokens/s)


def parser() -> argparse.ArgumentParser:
    from runtime.backends import BACKENDS
    from runtime.engine import DEFAULT_NEW_TOKENS

    p = argparse.ArgumentParser(prog="python -m runtime.generate",
                                description="Generate with a Mesa-Extrapolation ONNX engine written by export.py.")
    p.add_argument("engine", metavar="DIR", help="engine directory (model.onnx + mesa.json)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="prompt text (the engine needs tokenizer.json)")
    src.add_argument("--prompt-file", metavar="F", help="a text file holding the prompt")
    src.add_argument("--input-ids-file", metavar="F.json",
                     help="JSON list of token ids, or a list of lists for a batch")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_NEW_TOKENS, metavar="K",
                   help=f"tokens to generate per prompt (default {DEFAULT_NEW_TOKENS})")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default without sampling flags)")
    p.add_argument("--temperature", type=float, metavar="X", help="sample at this temperature (default 1 when "
                   "any sampling flag is given)")
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens")
    p.add_argument("--top-p", type=float, metavar="P", help="sample from the smallest set reaching probability P")
    p.add_argument("--seed", type=int, metavar="S", help="seed of the sampler (repeatable runs)")
    p.add_argument("--stop-token", type=int, action="append", metavar="ID",
                   help="stop a row after it generates ID (repeatable; default: the model's EOS ids)")
    p.add_argument("--ignore-eos", action="store_true", help="never stop early: generate exactly K tokens")
    p.add_argument("--backend", default="auto", choices=("auto", *BACKENDS),
                   help="auto (default) takes the best backend the engine's export target runs on (tensorrt, "
                        "else ort-cuda, else ort-cpu) that starts; others are refused")
    p.add_argument("--save-logits", metavar="OUT.npz",
                   help="write prefill_logits [L, vocab], decode_logits [steps, vocab] and tokens (one prompt)")
    p.add_argument("--json", action="store_true", help="print one JSON object with tokens, text and timings")
    return p


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def interruptible(main):
    """main(argv) -> exit code, with Ctrl-C anywhere in it (imports included) one line and EXIT_INTERRUPTED."""
    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
    return run


def read_text(path: str) -> str:
    """A UTF-8 text file; ValueError naming the file when it is not UTF-8 (OSError when unreadable)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None


def read_ids(path: str) -> list:
    """A JSON list of token ids, or a list of such lists (a batch); ValueError naming the file otherwise."""
    try:
        ids = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    rows = ids if isinstance(ids, list) and ids and all(isinstance(r, list) for r in ids) else [ids]
    if not all(isinstance(r, list) for r in rows):
        raise ValueError(f"{path} must hold a JSON list of token ids (or a list of lists)")
    bad = [t for r in rows for t in r if isinstance(t, bool) or not isinstance(t, int)]
    if bad:  # strings would otherwise read as a batch of texts, floats as ids
        raise ValueError(f"{path}: token ids must be integers, got {json.dumps(bad[0])}")
    return ids


class PrefillBar:
    """A progress callback for MesaEngine: a tokens/s bar on stderr for prompts worth watching."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc="prefill", unit="tok", file=sys.stderr, leave=False,
                            disable=total < PROGRESS_MIN_TOKENS)
        self.bar.update(done - self.bar.n)
        if done == total:
            self.bar.close()
            self.bar = None


def read_prompt(args):
    """Text, a list of ids, or a list of lists (a batch); ValueError/OSError say what is wrong."""
    if args.prompt is not None:
        try:  # undecodable bytes in argv arrive as lone surrogates (PEP 383)
            args.prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"--prompt is not valid UTF-8 text (an undecodable byte at character {e.start})") from None
        return args.prompt
    if args.prompt_file is not None:
        return read_text(args.prompt_file)
    return read_ids(args.input_ids_file)


def sampling_args(args) -> dict:
    chosen = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "seed") if getattr(args, k) is not None}
    if args.greedy and chosen:
        raise ValueError(f"--greedy cannot be combined with --{', --'.join(k.replace('_', '-') for k in chosen)}")
    if chosen:
        chosen.setdefault("temperature", 1.0)
    stop = [] if args.ignore_eos else args.stop_token
    return {**chosen, "stop_tokens": stop, "max_new_tokens": args.max_new_tokens, "progress": PrefillBar()}


class TextStream:
    """The text of a growing list of generated tokens, one piece per token ("" while a multi-byte character
    is incomplete), special tokens skipped. tokenizers' DecodeStream decodes each token once; where this
    tokenizers has none (before 0.21), or should it fail, the whole list is decoded again for every token."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.shown = tokenizer, [], ""
        try:
            from tokenizers.decoders import DecodeStream
        except ImportError:
            self.decoder = None
        else:
            self.decoder = DecodeStream(skip_special_tokens=True)

    def step(self, token: int) -> str:
        self.tokens.append(token)  # kept for the fallback, which needs them all
        if self.decoder is not None:
            try:
                piece = self.decoder.step(self.tokenizer, token) or ""
            except Exception:  # tokenizers raises a bare Exception ("Invalid prefix encountered")
                self.decoder = None
            else:
                self.shown += piece
                return piece
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece


def stream_one(engine, prompt, settings: dict) -> list[int]:
    """Print tokens as they come (text pieces with a tokenizer, else ids); report timings to stderr."""
    ids = engine.encode(prompt) if isinstance(prompt, str) else prompt
    tokens = []
    text = TextStream(engine.tokenizer) if engine.tokenizer is not None else None
    start = first = time.perf_counter()
    for token in engine.stream(ids, **settings):
        if not tokens:
            first = time.perf_counter()
        tokens.append(token)
        if text is None:
            print(token, end=" ", flush=True)
        else:
            print(text.step(token), end="", flush=True)
    print()
    report(len(ids), first - start, len(tokens) - 1, time.perf_counter() - first)
    return tokens


def report(prompt_tokens: int, prefill_s: float, decode_steps: int, decode_s: float) -> None:
    line = f"prefill {prompt_tokens} tokens in {prefill_s:.3f} s ({prompt_tokens / max(prefill_s, 1e-9):.0f} tok/s)"
    if decode_steps:
        line += f"; decode {decode_steps} steps, {1e3 * decode_s / decode_steps:.2f} ms/token"
    print(line, file=sys.stderr)


def result_json(g) -> dict:
    return {"tokens": g.tokens, "text": g.text, "finish_reason": g.finish_reason, "prompt_tokens": g.prompt_tokens,
            "prefill_seconds": g.prefill_seconds, "decode_seconds": g.decode_seconds}


@interruptible
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import numpy as np

    from runtime.engine import EngineError, MesaEngine

    try:
        prompt = read_prompt(args)
        settings = sampling_args(args)
        engine = MesaEngine.load(args.engine, backend=args.backend)
        chosen = " (chosen by --backend auto)" if args.backend == "auto" else ""
        print(f"backend: {engine.backend}{chosen}", file=sys.stderr)
        batched = isinstance(prompt, list) and any(isinstance(p, list) for p in prompt)
        if args.save_logits and batched:
            raise ValueError("--save-logits takes one prompt, not a batch")
        if not (args.json or args.save_logits or batched):
            stream_one(engine, prompt, settings)
            return 0
        results = engine.generate(prompt, return_logits=bool(args.save_logits), **settings)
        results = results if batched else [results]
        for g in results:
            report(g.prompt_tokens, g.prefill_seconds, len(g.tokens) - 1, g.decode_seconds)
        if args.save_logits:
            g = results[0]
            np.savez(args.save_logits, prefill_logits=g.prefill_logits, decode_logits=g.decode_logits,
                     tokens=np.asarray(g.tokens, dtype=np.int64))
        if args.json:
            print(json.dumps({"backend": engine.backend, "results": [result_json(g) for g in results]}))
        else:
            for g in results:
                print(g.text if g.text is not None else " ".join(map(str, g.tokens)))
    except (EngineError, ValueError, OSError) as e:
        return fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())

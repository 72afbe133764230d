"""Sequences over the batcher: a stepwise handle (like onnxruntime-genai's Generator) and token streams.

    seq = engine.sequence(prompt_ids)   # queued; prefilled by its Mesa plan in the batcher
    logits = seq.step()                 # [vocab]: the prompt's last position
    seq.append([token]); logits = seq.step()   # one decode step per appended token
    seq.cancel()                        # frees its KV slot now

`TokenStream` is what `MesaEngine.generate`/`stream` use: the batcher samples each row's next token
itself (no round trip to the caller between steps, so every running sequence is in every batch) and
the caller reads tokens from a queue.
"""

from __future__ import annotations

import queue
from typing import Iterable

import numpy as np

from runtime.batcher import STOP, Batcher, Work
from runtime.errors import EngineError, RequestError
from runtime.sampling import Sampling, pick

_END = object()


def _raise(error: BaseException):
    if isinstance(error, EngineError):
        raise error
    raise EngineError(f"the step failed: {error}") from error


class Sequence:
    """One sequence the caller steps by hand. Not thread-safe: one caller drives it."""

    def __init__(self, batcher: Batcher, work_args: dict, vocab_size: int):
        self._batcher, self._vocab = batcher, vocab_size
        self._results: queue.Queue = queue.Queue()
        self._todo: list[int] = []
        self._started = False
        self._work = Work(**work_args, on_logits=self._on_logits, on_done=self._on_done)
        batcher.submit(self._work)

    def _on_logits(self, logits: np.ndarray):
        self._results.put(logits)
        return None  # pause until the caller appends the next token

    def _on_done(self, error: BaseException | None) -> None:
        self._results.put(error if error is not None else _END)

    # ------------------------------------------------------------------------------ public

    @property
    def length(self) -> int:
        """Tokens in the cache."""
        return self._work.length

    @property
    def prefill_seconds(self) -> float:
        return self._work.prefill_seconds

    @property
    def step_seconds(self) -> list[float]:
        """Seconds of each decode call this sequence was in (shared with the rows batched with it)."""
        return list(self._work.decode_seconds)

    @property
    def prompt_logits(self) -> np.ndarray | None:
        """[L, vocab] when the sequence was opened with all_logits=True, after the first step()."""
        return self._work.prefill_logits[0] if self._work.prefill_logits else None

    def append(self, tokens: Iterable[int]) -> None:
        """Tokens to consume, one decode step each, at the next step()."""
        try:
            ids = [t for t in tokens]
        except TypeError:
            raise RequestError(f"append() takes a sequence of token ids, got {tokens!r}") from None
        bad = [t for t in ids if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or not 0 <= t < self._vocab]
        if bad:
            raise RequestError(f"append(): {bad[0]!r} is not a token id in the vocabulary [0, {self._vocab})")
        self._todo.extend(int(t) for t in ids)

    def step(self) -> np.ndarray:
        """Run what is pending (the prompt, or the appended tokens) and return the last logits [vocab]."""
        if not self._started:
            self._started = True
            return self._next()
        if not self._todo:
            raise RequestError("step(): nothing to run; append() a token first")
        if self._work.length + len(self._todo) > self._batcher.decoder.cache_max_len:
            raise RequestError(f"step(): {self._work.length} cached + {len(self._todo)} appended tokens exceed "
                               f"max_len {self._batcher.decoder.cache_max_len}")
        logits = None
        while self._todo:
            self._batcher.resume(self._work, self._todo.pop(0))
            logits = self._next()
        return logits

    def feed(self, tokens: Iterable[int]) -> np.ndarray:
        """Consume `tokens` one decode step each (teacher forcing); the logits of every step [n, vocab]."""
        out = []
        for t in tokens:
            self.append([t])
            out.append(self.step())
        return np.stack(out) if out else np.zeros((0, 0), np.float32)

    def _next(self) -> np.ndarray:
        got = self._results.get()
        if got is _END:
            raise RequestError("the sequence is finished or cancelled")
        if isinstance(got, BaseException):
            _raise(got)
        return got

    def cancel(self) -> None:
        self._batcher.cancel(self._work)

    def __enter__(self) -> "Sequence":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()


class TokenStream:
    """The tokens of one request, sampled in the batcher; iterate to read them as they come."""

    def __init__(self, batcher: Batcher, work_args: dict, sampling: Sampling, max_new_tokens: int,
                 stop: frozenset[int], keep_logits: bool):
        self.sampling, self.max_new_tokens, self.stop = sampling, max_new_tokens, stop
        self.rng = np.random.default_rng(sampling.seed)
        self.tokens: list[int] = []
        self.decode_logits: list[np.ndarray] = []
        self.finish_reason = "length"
        self.keep_logits = keep_logits
        self._batcher = batcher
        self._queue: queue.Queue = queue.Queue()
        self._first = True
        self._closed = False
        self.work = Work(**work_args, on_logits=self._on_logits, on_done=self._on_done)
        batcher.submit(self.work)

    def _on_logits(self, logits: np.ndarray):
        if self.keep_logits and not self._first:
            self.decode_logits.append(logits)
        self._first = False
        token = pick(logits, self.sampling, self.rng)
        self.tokens.append(token)
        self._queue.put(token)
        if token in self.stop:
            self.finish_reason = "stop"
            return STOP
        return STOP if len(self.tokens) == self.max_new_tokens else token

    def _on_done(self, error: BaseException | None) -> None:
        self._queue.put(error if error is not None else _END)

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> int:
        if self._closed:
            raise StopIteration
        got = self._queue.get()
        if got is _END:
            self._queue.put(got)  # later calls end the same way
            raise StopIteration
        if isinstance(got, BaseException):
            self._queue.put(_END)
            _raise(got)
        return got

    def cancel(self) -> None:
        """Stop generating and free the KV slot now; from any thread, also before the first token.
        Iteration then ends after the tokens already generated."""
        self._batcher.cancel(self.work)

    def close(self) -> None:
        """The caller stops reading (as with a generator): cancel, and end the iteration now."""
        self._closed = True
        self.cancel()

    def __del__(self):
        batcher = getattr(self, "_batcher", None)
        if batcher is not None and not self.work.done:
            batcher.cancel(self.work)


def replay(step_fn, decoder, ids: np.ndarray, plan, tokens: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """(prompt logits [L, vocab], decode logits [len(tokens), vocab]) of a prompt and then the given
    tokens, through a batcher of its own: what a served request computes, for checks and tests."""
    batcher = Batcher(step_fn, decoder)
    try:
        with Sequence(batcher, dict(ids=ids, plan=plan, all_logits=True), vocab_size=2**62) as seq:
            seq.step()
            decode = seq.feed(tokens)
            vocab = seq.prompt_logits.shape[-1]
            return seq.prompt_logits, decode if len(decode) else np.zeros((0, vocab), np.float32)
    finally:
        batcher.close()

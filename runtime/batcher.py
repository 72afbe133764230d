"""Continuous batching: one thread steps every running sequence together and feeds prefills in between.

Each iteration (vLLM's scheduler, reduced to what a Mesa engine needs):

1. decode: every sequence that has a token to consume steps in ONE batched call (engines with in-place
   decode; see runtime/decode_cache.py), each row at its own position, anchor and log-n factor;
2. prefill: queued prompts advance by their Mesa plans, up to `token_budget` tokens per iteration, so a
   long prompt arriving does not freeze the others' decode for its whole prefill. A middle chunk
   [s, s + W) splits exactly into sub-steps (sink F, window [s, done), plain positions since F + W < T);
   a first chunk (<= F tokens) and a last chunk (its stair positions depend on the call's whole length)
   run whole. Among the queued prompts, the one with the fewest prefill tokens left goes first (a short
   prompt does not wait behind a long one's whole prefill), aged so that a prompt which has waited
   t seconds counts AGING_TOKENS_PER_S * t tokens shorter (a long prompt is not starved).

A finished or cancelled sequence frees its KV slot at once. Everything that touches the ONNX Runtime
session runs on the batcher's thread; callers wait on their sequence (runtime.sequence.Sequence).
A step that fails fails the sequences in it, not the batcher: the next iteration runs as usual.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from runtime import mesa, scheduler

DEFAULT_TOKEN_BUDGET = 512
AGING_TOKENS_PER_S = 64.0  # an 8k prompt outranks a fresh 1k one after ~2 min: short ones first, no starvation


def split_step(step: mesa.Step, budget: int) -> list[mesa.Step]:
    """A prefill step as sub-steps of at most `budget` new tokens, each exactly the same computation.

    Only middle chunks split: sub-step [s + i, s + j) sees the sink cache[0:F], the part of its chunk
    already done cache[s:s + i] and itself, i.e. what the whole chunk's queries i..j-1 see."""
    if step.kind != "middle" or step.q <= budget:
        return [step]
    return [mesa.Step(start, min(start + budget, step.stop), step.sink_len, step.window_start, step.chunk_width,
                      "middle") for start in range(step.start, step.stop, budget)]


STOP = object()  # what on_logits returns when its sequence is finished


@dataclass(eq=False)
class Work:
    """One sequence as the batcher sees it. `on_logits(logits)` (called on the batcher's thread, under
    its lock) returns the next token to consume, None to pause until `Batcher.resume`, or STOP."""

    ids: np.ndarray
    plan: list[mesa.Step]
    on_logits: Callable[[np.ndarray], object]
    on_done: Callable[[BaseException | None], None]
    all_logits: bool = False  # keep the prefill logits of every position (scoring, return_logits)
    decode: bool = True  # False: a prefill only (scoring): no decode slot
    on_progress: Callable[[int, int], None] | None = None
    slot: int | None = None
    length: int = 0  # tokens in the cache
    chunk_width: int = 0
    pending: int | None = None  # the token the next decode step consumes
    steps: deque = field(default_factory=deque)
    prefill_logits: list = field(default_factory=list)
    busy: bool = False  # in a step right now: a cancel takes effect after it
    cancelled: bool = False
    done: bool = False
    prefill_seconds: float = 0.0
    decode_seconds: list = field(default_factory=list)
    submitted: float = field(default_factory=time.monotonic)

    def prefill_priority(self, now: float) -> float:
        """Lower goes first: prefill tokens left, less AGING_TOKENS_PER_S per second waited."""
        return sum(s.q for s in self.steps) - AGING_TOKENS_PER_S * (now - self.submitted)


class Batcher:
    """`submit(work)`; `resume(work, token)` for stepwise callers; `cancel(work)`; `close()`.

    `decoder` owns the caches (runtime/batch_decoder.py): `slots`, `prefill_needs_slot`, can_prefill(work),
    prefill_cache(work), finish_prefill(work), decode(works) -> logits [B, vocab], free(work), drop(work).
    """

    def __init__(self, step_fn, decoder, token_budget: int = DEFAULT_TOKEN_BUDGET):
        if token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {token_budget}")
        self.step_fn, self.decoder, self.token_budget = step_fn, decoder, token_budget
        self.cond = threading.Condition()
        self.waiting: deque[Work] = deque()  # prompts still prefilling, in arrival order
        self.running: list[Work] = []  # prefilled, holding a slot
        self.free_slots = list(range(decoder.slots))
        self.closed = False
        self.iterations = 0
        self.decode_calls: deque[tuple[int, float]] = deque(maxlen=4096)  # (rows stepped, seconds), newest last
        self.thread = threading.Thread(target=self._loop, name="mesa-batcher", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------------ callers

    def submit(self, work: Work) -> None:
        work.steps.extend(s for step in work.plan for s in split_step(step, self.token_budget))
        with self.cond:
            if self.closed:
                raise RuntimeError("the engine is closed")
            self.waiting.append(work)
            self.cond.notify_all()

    def resume(self, work: Work, token: int) -> None:
        with self.cond:
            if not work.done:
                work.pending = token
                self.cond.notify_all()

    def cancel(self, work: Work) -> None:
        """Stop the sequence; its slot is free when this returns (a sequence in a step right now is
        retired as soon as that step ends, which this waits for, except on the batcher's own thread)."""
        with self.cond:
            work.cancelled = True
            if not work.busy:
                self._retire(work)
            elif threading.current_thread() is not self.thread:
                self.cond.wait_for(lambda: work.done)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(timeout=60)

    def stats(self) -> dict[str, int]:
        with self.cond:
            return {"waiting": len(self.waiting), "running": len(self.running), "free_slots": len(self.free_slots),
                    "slots": self.decoder.slots, "iterations": self.iterations}

    # ------------------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.closed or self._has_work())
                if self.closed:
                    for w in list(self.waiting) + list(self.running):
                        self._retire(w, RuntimeError("the engine was closed"))
                    return
                batch = [w for w in self.running if w.pending is not None]
                for w in batch:
                    w.busy = True
            if batch:
                self._decode(batch)
            self._prefill()
            self.iterations += 1

    def _has_work(self) -> bool:
        return any(w.pending is not None for w in self.running) or self._next_prefill() is not None

    def _next_prefill(self) -> Work | None:
        """The queued prompt to advance now (under the lock): the lowest prefill_priority among those that
        have, or can get, a slot (when they will decode) and a prefill buffer."""
        ready = [w for w in self.waiting if (w.slot is not None or not self._needs_slot(w) or self.free_slots)
                 and self.decoder.can_prefill(w)]
        now = time.monotonic()
        return min(ready, key=lambda w: w.prefill_priority(now)) if ready else None

    def _needs_slot(self, w: Work) -> bool:
        return w.decode or self.decoder.prefill_needs_slot

    def _decode(self, batch: list[Work]) -> None:
        t = time.perf_counter()
        try:
            logits, error = self.decoder.decode(batch), None
        except Exception as e:  # noqa: BLE001 - ORT's errors share no base class: the batch fails, not the engine
            logits, error = None, e
        took = time.perf_counter() - t
        self.decode_calls.append((len(batch), took))
        with self.cond:
            for i, w in enumerate(batch):
                w.busy = False
                if error is not None or w.cancelled:
                    self._retire(w, error)
                    continue
                w.length += 1
                w.decode_seconds.append(took)
                self._deliver(w, logits[i])

    def _prefill(self) -> None:
        """Advance queued prompts by up to token_budget tokens (several prompts if they are short)."""
        budget = self.token_budget
        while budget > 0:
            with self.cond:
                w = self._next_prefill()
                if w is None:
                    return
                if w.slot is None and self._needs_slot(w):
                    w.slot = self.free_slots.pop(0)  # lowest first: decoding rows stay in a short range
                step = w.steps.popleft()
                w.busy = True
            budget -= step.q
            try:
                self._prefill_step(w, step)
                error = None
            except Exception as e:  # noqa: BLE001
                error = e
            with self.cond:
                w.busy = False
                if error is not None or w.cancelled:
                    self._retire(w, error)
                elif not w.steps:
                    self.waiting.remove(w)
                    logits = np.concatenate(w.prefill_logits)
                    w.prefill_logits = [logits] if w.all_logits else []
                    if w.decode:
                        self.decoder.finish_prefill(w)
                        self.running.append(w)
                    else:  # scored only: its buffer is free again
                        self.decoder.drop(w)
                    self._deliver(w, logits[-1])

    def _prefill_step(self, w: Work, step: mesa.Step) -> None:
        t = time.perf_counter()
        cache = self.decoder.prefill_cache(w)
        logits = scheduler.prefill_step(self.step_fn, w.ids[None], step, step.q if w.all_logits else 1, cache)
        if w.all_logits or not w.steps:
            w.prefill_logits.append(logits)
        w.length, w.chunk_width = step.stop, step.chunk_width
        w.prefill_seconds += time.perf_counter() - t
        if w.on_progress is not None:
            w.on_progress(step.stop, len(w.ids))

    # ------------------------------------------------------------------------------ bookkeeping

    def _deliver(self, w: Work, logits: np.ndarray) -> None:
        """Hand logits to the sequence's owner (under the lock); it says what to consume next."""
        try:
            nxt = w.on_logits(logits)
        except Exception as e:  # noqa: BLE001 - a failing callback ends its own sequence only
            self._retire(w, e)
            return
        if w.cancelled or nxt is STOP or not w.decode:
            self._retire(w)
        else:
            w.pending = nxt

    def _retire(self, w: Work, error: BaseException | None = None) -> None:
        if w in self.running:
            self.running.remove(w)
        if w in self.waiting:
            self.waiting.remove(w)
            self.decoder.drop(w)
        if w.slot is not None:
            self.decoder.free(w)
            self.free_slots.append(w.slot)
            self.free_slots.sort()
            w.slot = None
        if not w.done:
            w.done, w.pending = True, None
            w.on_done(error)
        self.cond.notify_all()

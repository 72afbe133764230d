"""MesaEngine: serve an exported engine directory (model.onnx + mesa.json) without torch.

    engine = MesaEngine.load("engines/llama2-7b-12k")           # backend="auto"
    engine.generate("Once upon a time", max_new_tokens=32).text  # greedy; text needs tokenizer.json
    engine.generate([ids_a, ids_b], temperature=0.8, top_p=0.95, seed=0)   # a batch: one result per row
    for token in engine.stream(ids, max_new_tokens=32): ...
    logits = engine.score(ids)                                    # [L, vocab], for perplexity

Each prompt runs by its own Mesa plan (runtime.mesa.check_request: first, middle and last chunks,
then one decode step per generated token, MESA_SPEC sections 3, 8 and 11) over a KV-cache slot that
was allocated at load and is reused by every request. Nothing of one request survives into the
next: a step reads only cache slots its own request wrote.

Batches: the step graph takes one set of step scalars per call, and rows of different lengths have
different plans, so a batch runs its rows one after another in one slot; row r is exactly what the
same prompt gives alone. Threads: an engine may be shared. `slots` (default 1) caches are allocated
at load; each request borrows one for its duration (a stream until it is exhausted or closed) and
waits while all are busy, so up to `slots` requests run at once on one ONNX Runtime session (whose
run() is thread-safe). Each slot holds 2 x layers x kv_heads x max_len x head_dim values.
"""

from __future__ import annotations

import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from runtime import backends, mesa, scheduler
from runtime.artifact import (MANIFEST, MODEL_FILE, STEP_INPUTS, STEP_OUTPUTS, ArtifactError, Manifest, load_manifest,
                              metadata_mismatch)
from runtime.errors import BackendError, EngineError, LoadError, RequestError
from runtime.kv_cache import CacheShape
from runtime.sampling import Sampling, pick

__all__ = ["BackendError", "EngineError", "Generation", "LoadError", "MesaEngine", "RequestError"]

DEFAULT_NEW_TOKENS = 64
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
             "tensor(int64)": "int64"}
Progress = Callable[[int, int], None]  # (prompt tokens done, prompt tokens in all), after each prefill step


@dataclass
class Generation:
    """One row's result. decode_logits[t] are the logits of the step that consumed tokens[t]."""

    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop": the last token is a stop token
    prompt_tokens: int = 0
    text: str | None = None  # when the engine has a tokenizer
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prefill_logits: np.ndarray | None = None  # [L, vocab], with return_logits=True
    decode_logits: np.ndarray | None = None  # [len(tokens) - 1, vocab], with return_logits=True


@dataclass(frozen=True)
class _Request:
    rows: list[np.ndarray]
    plans: list[list[mesa.Step]]
    max_new_tokens: int
    sampling: Sampling
    stop: frozenset[int]


class MesaEngine:
    def __init__(self, directory: Path, manifest: Manifest, backend: str, step_fn, slots: int, tokenizer):
        self.directory, self.manifest, self.backend, self.tokenizer = directory, manifest, backend, tokenizer
        self.params = manifest.mesa_params
        self._step = step_fn
        shape, dtype = cache_shape(manifest), backends.CACHE_DTYPES[manifest.dtype]
        need = slots * 2 * math.prod(shape.full()) * np.dtype(dtype).itemsize
        if backend == "ort-cpu" and need > _host_memory():  # refuse now rather than allocate until the OOM killer
            raise RequestError(f"slots={slots}: {slots} KV-cache slots need {need / 2**30:.1f} GiB, more than this "
                               f"machine's {_host_memory() / 2**30:.1f} GiB")
        try:
            self._free = [step_fn.new_cache(shape, dtype) for _ in range(slots)]
        except MemoryError:
            raise RequestError(f"slots={slots}: not enough memory for {slots} KV-cache slots of "
                               f"{need / slots / 2**30:.2f} GiB") from None
        self._slots = threading.Condition()
        self._holders: list[int] = []  # thread id of each borrowed slot

    @classmethod
    def load(cls, directory: str | Path, backend: str = "auto", slots: int = 1) -> "MesaEngine":
        """Open an engine directory on `backend` (auto | ort-cpu | ort-cuda | tensorrt)."""
        if not isinstance(directory, (str, os.PathLike)):
            raise RequestError(f"directory must be a path (str or os.PathLike), got {directory!r}")
        directory = Path(directory)
        if not _is_int(slots) or slots < 1:
            raise RequestError(f"slots must be an integer >= 1, got {slots!r}")
        try:
            manifest = load_manifest(directory)
        except ArtifactError as e:
            raise LoadError(str(e)) from None
        name, step_fn = backends.open_backend(backend, directory, directory / MODEL_FILE, cache_shape(manifest),
                                              manifest.max_len, manifest.dtype)
        check_graph(step_fn.session, manifest, directory)
        return cls(directory, manifest, name, step_fn, int(slots), load_tokenizer(directory))

    @property
    def max_len(self) -> int:
        return self.manifest.max_len

    # ------------------------------------------------------------------------------ requests

    def generate(self, prompt, max_new_tokens: int = DEFAULT_NEW_TOKENS, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop_tokens: Sequence[int] | None = None, return_logits: bool = False,
                 progress: Progress | None = None) -> Generation | list[Generation]:
        """Generate for one prompt (text or token ids) or a batch (a list of prompts, or a 2-D array).

        temperature 0 is greedy. Stop tokens default to the model's EOS ids; pass () to never stop early.
        Each row samples from its own generator seeded with `seed`, so a row's output does not depend
        on the batch it is in.
        """
        rows, batched = self._prompts(prompt)
        req = self._request(rows, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, progress)
        results = []
        with self._slot() as cache:
            for ids, plan in zip(req.rows, req.plans):
                out = Generation()
                for _ in self._run(ids, plan, req, cache, out, return_logits, progress):
                    pass
                out.text = self.decode(out.tokens) if self.tokenizer else None
                results.append(out)
        return results if batched else results[0]

    def stream(self, prompt, max_new_tokens: int = DEFAULT_NEW_TOKENS, *, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               stop_tokens: Sequence[int] | None = None, progress: Progress | None = None) -> Iterator[int]:
        """The tokens of one prompt as they are generated (the same tokens `generate` returns).

        The request is checked now; the slot is held from the first token until the iterator is
        exhausted or closed.
        """
        rows, batched = self._prompts(prompt)
        if batched:
            raise RequestError("stream() takes one prompt; generate() takes a batch")
        req = self._request(rows, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, progress)

        def tokens():
            with self._slot() as cache:
                yield from self._run(req.rows[0], req.plans[0], req, cache, Generation(), False, progress)
        return tokens()

    def score(self, prompt, progress: Progress | None = None) -> np.ndarray:
        """The logits of every prompt position [L, vocab] (row i predicts token i + 1)."""
        rows, batched = self._prompts(prompt)
        if batched:
            raise RequestError("score() takes one prompt")
        _check_progress(progress)
        (plan,) = self._plans(rows, 0)
        with self._slot() as cache:
            logits, _ = scheduler.prefill(self._step, rows[0], plan, cache, all_logits=True,
                                          on_step=_reporter(progress, len(rows[0])))
        return logits

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise RequestError(f"encode() takes text (a str), got {type(text).__name__}")
        if self.tokenizer is None:
            raise RequestError(f"{self.directory} has no tokenizer.json: pass token ids instead of text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: undecodable bytes smuggled in by surrogateescape
            raise RequestError(f"the text is not valid Unicode: {text[e.start]!r} at character {e.start}") from None
        return self.tokenizer.encode(text).ids

    def decode(self, tokens: Sequence[int]) -> str:
        ids = self._token_ids("decode() tokens", tokens)
        if self.tokenizer is None:
            raise RequestError(f"{self.directory} has no tokenizer.json: token ids cannot be turned into text")
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------------------ internals

    def _run(self, ids: np.ndarray, plan: list[mesa.Step], req: _Request, cache, out: Generation,
             keep_logits: bool, progress: Progress | None) -> Iterator[int]:
        """Prefill by the plan, then sample and decode one token at a time, filling `out` as it goes."""
        rng = np.random.default_rng(req.sampling.seed)
        out.prompt_tokens = len(ids)
        start = time.perf_counter()
        logits, seq = scheduler.prefill(self._step, ids, plan, cache, all_logits=keep_logits,
                                        on_step=_reporter(progress, len(ids)))
        out.prefill_seconds = time.perf_counter() - start
        row, decoded = logits[-1], []
        while True:
            token = pick(row, req.sampling, rng)
            out.tokens.append(token)
            yield token
            if token in req.stop:
                out.finish_reason = "stop"
                break
            if len(out.tokens) == req.max_new_tokens:
                break
            start = time.perf_counter()
            row = scheduler.decode(self._step, token, seq, cache)
            out.decode_seconds += time.perf_counter() - start
            decoded.append(row)
        if keep_logits:
            out.prefill_logits = logits
            out.decode_logits = np.stack(decoded) if decoded else np.zeros((0, logits.shape[1]), logits.dtype)

    @contextmanager
    def _slot(self):
        """Borrow one KV-cache slot; waits while every slot serves another request."""
        me = threading.get_ident()
        with self._slots:
            if not self._free and self._holders.count(me) == len(self._holders):
                # waiting would never end: only this thread (an unfinished stream of its own) can free one
                raise RequestError("every KV-cache slot is held by an unfinished stream of this thread: "
                                   "exhaust or close() it first, or load the engine with more slots")
            self._slots.wait_for(lambda: self._free)
            cache = self._free.pop()
            self._holders.append(me)
        try:
            yield cache
        finally:
            with self._slots:
                self._holders.remove(me)
                self._free.append(cache)
                self._slots.notify()

    def _prompts(self, prompt) -> tuple[list[np.ndarray], bool]:
        """(rows, batched): one prompt is text or a 1-D sequence of ids; a batch is a list of those
        or a 2-D array."""
        if isinstance(prompt, np.ndarray) and prompt.ndim == 2:
            if not len(prompt):
                raise RequestError("empty batch: give at least one prompt")
            return [self._ids(row) for row in prompt], True
        if (isinstance(prompt, (list, tuple)) and prompt
                and all(isinstance(p, (str, list, tuple, np.ndarray)) for p in prompt)):
            return [self._ids(p) for p in prompt], True
        return [self._ids(prompt)], False

    def _ids(self, prompt) -> np.ndarray:
        if isinstance(prompt, str):
            ids = np.asarray(self.encode(prompt), dtype=np.int64)
        else:
            try:
                ids = np.asarray(prompt)
            except (ValueError, TypeError, OverflowError):  # ragged, or objects numpy cannot hold
                raise RequestError("a batch is a list of prompts; a prompt is a flat list of token ids") from None
            if ids.ndim != 1:
                raise RequestError(f"a prompt is a 1-D sequence of token ids, got an array of shape {ids.shape}")
            if ids.size and ids.dtype.kind not in "iu":
                raise RequestError(f"token ids must be integers, got {ids.dtype}")
        if ids.size == 0:
            raise RequestError("empty prompt: give at least one token")
        vocab = self.manifest.vocab_size
        outside = ids[(ids < 0) | (ids >= vocab)]
        if outside.size:
            raise RequestError(f"token id {outside[0]} is outside the vocabulary [0, {vocab})")
        return ids.astype(np.int64)

    def _plans(self, rows: list[np.ndarray], max_new_tokens: int) -> list[list[mesa.Step]]:
        try:
            return [mesa.check_request(len(ids), max_new_tokens, self.max_len, self.params, self.manifest.method)
                    for ids in rows]
        except mesa.MesaParamError as e:
            raise RequestError(str(e)) from None

    def _token_ids(self, what: str, tokens) -> list[int]:
        """A sequence of ids inside the vocabulary, as ints; RequestError naming `what` otherwise."""
        try:
            ids = None if isinstance(tokens, (str, bytes)) else list(tokens)
        except TypeError:  # not iterable (a number, a 0-d array)
            ids = None
        if ids is None:
            raise RequestError(f"{what} must be a sequence of token ids, got {tokens!r}")
        vocab = self.manifest.vocab_size
        bad = [t for t in ids if not _is_int(t) or not 0 <= t < vocab]
        if bad:
            raise RequestError(f"{what}: {bad[0]!r} is not a token id in [0, {vocab})")
        return [int(t) for t in ids]

    def _request(self, rows, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, progress) -> _Request:
        if not _is_int(max_new_tokens) or max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        _check_progress(progress)
        try:
            sampling = Sampling(temperature, top_k, top_p, seed)
        except ValueError as e:
            raise RequestError(f"bad generation settings: {e}") from None
        stop = (self.manifest.eos_token_ids if stop_tokens is None
                else self._token_ids("stop_tokens", stop_tokens))
        return _Request(rows, self._plans(rows, int(max_new_tokens)), int(max_new_tokens), sampling, frozenset(stop))


def _host_memory() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX: let the allocation say
        return math.inf


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_progress(progress) -> None:
    if progress is not None and not callable(progress):
        raise RequestError(f"progress must be a callable(done, total) or None, got {progress!r}")


def cache_shape(m: Manifest) -> CacheShape:
    return CacheShape(m.num_hidden_layers, m.num_key_value_heads, m.max_len, m.head_dim)


def _reporter(progress: Progress | None, total: int):
    return None if progress is None else (lambda step: progress(step.stop, total))


def _same_dims(a: list, b: list) -> bool:
    """Shapes agree where both name a fixed size (symbolic dims match anything)."""
    return len(a) == len(b) and all(x == y for x, y in zip(a, b) if isinstance(x, int) and isinstance(y, int))


def check_graph(session, m: Manifest, directory: Path) -> None:
    """The manifest must describe the graph beside it: same I/O, dtypes, cache layout and vocabulary, and
    the method, parameters and contract hash the exporter wrote into the graph's metadata."""
    def mismatch(detail: str) -> LoadError:
        return LoadError(f"{directory}: {MANIFEST} does not describe {MODEL_FILE} ({detail}); re-export the engine")

    graph = {a.name: a for a in session.get_inputs() + session.get_outputs()}
    specs = {t.name: t for t in m.inputs + m.outputs}
    expected = set(STEP_INPUTS + STEP_OUTPUTS)
    if set(graph) != expected or set(specs) != expected:
        raise mismatch(f"graph I/O {sorted(graph)}, manifest I/O {sorted(specs)}, runtime expects {sorted(expected)}")
    cache = [m.num_hidden_layers, "batch", m.num_key_value_heads, m.max_len, m.head_dim]
    rows = [m.num_hidden_layers, "batch", m.num_key_value_heads, "q", m.head_dim]
    from_fields = {"k_cache": cache, "v_cache": cache, "new_keys": rows, "new_values": rows,
                   "logits": ["batch", "logits_to_keep", m.vocab_size]}
    cache_dtype = np.dtype(backends.CACHE_DTYPES.get(m.dtype, np.float32)).name
    for name, arg in graph.items():
        dtype = ORT_TYPES.get(arg.type, arg.type)
        if dtype != specs[name].dtype:
            raise mismatch(f"{name} is {dtype} in the graph, {specs[name].dtype} in the manifest")
        if name in ("k_cache", "v_cache", "new_keys", "new_values") and dtype != cache_dtype:
            raise mismatch(f"{name} is {dtype} in the graph but the manifest says dtype {m.dtype}")
        for want in (specs[name].shape, from_fields.get(name, specs[name].shape)):
            if not _same_dims(list(arg.shape), want):
                raise mismatch(f"{name} has shape {list(arg.shape)} in the graph, {want} in the manifest")
    detail = metadata_mismatch(session.get_modelmeta().custom_metadata_map, m)
    if detail:  # what I/O shapes cannot show: the method, the Mesa parameters, the rest of the contract
        raise mismatch(detail)


def load_tokenizer(directory: Path):
    """The `tokenizers` Tokenizer from DIR/tokenizer.json, or None (then requests take token ids)."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises a bare Exception for a malformed file
        raise LoadError(f"{path} cannot be read: {e}") from None

"""MesaEngine: serve an exported engine directory (model.onnx + mesa.json) without torch.

    engine = MesaEngine.load("engines/llama2-7b-12k")           # backend="auto"
    engine.generate("Once upon a time", max_new_tokens=32).text  # greedy; text needs tokenizer.json
    engine.generate([ids_a, ids_b], temperature=0.8, top_p=0.95, seed=0)   # a batch: one result per row
    for token in engine.stream(ids, max_new_tokens=32): ...
    logits = engine.score(ids)                                    # [L, vocab], for perplexity

    with engine.sequence(ids) as seq:                             # stepwise, like onnxruntime-genai's Generator
        logits = seq.step(); seq.append([token]); logits = seq.step()

Each prompt runs by its own Mesa plan (runtime.mesa.check_request: first, middle and last chunks,
then one decode step per generated token, MESA_SPEC sections 3, 8 and 11). Every request goes through
one continuous batcher (runtime/batcher.py) on its own thread: each iteration decodes every running
sequence in one call and prefills queued prompts in between, `token_budget` tokens at a time. `slots`
sequences run at once, each holding one KV-cache slot allocated at load (cache memory: stats()); more
wait in the queue. Engines exported for ort-cpu decode over a rotated cache in place, all rows in one
call (runtime/decode_cache.py); others step their rows one by one. A row of a batch, or a request
among others, gives what it gives alone (sampling uses the request's own seeded generator).
Threads: an engine may be shared; close() stops the batcher.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from runtime import backends, mesa, methods
from runtime.artifact import (DECODE_INPUTS, MANIFEST, MODEL_FILE, ROPE_FILE, STEP_INPUTS, STEP_OUTPUTS, ArtifactError,
                              Manifest, decode_io, load_manifest, metadata_mismatch)
from runtime.batch_decoder import InplaceDecoder, make_decoder
from runtime.batcher import DEFAULT_TOKEN_BUDGET, Batcher
from runtime.errors import BackendError, EngineError, LoadError, RequestError
from runtime.sampling import Sampling
from runtime.sequence import Sequence as StepSequence
from runtime.sequence import TokenStream

__all__ = ["BackendError", "EngineError", "Generation", "LoadError", "MesaEngine", "RequestError"]

DEFAULT_NEW_TOKENS = 64
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}
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
    def __init__(self, directory: Path, manifest: Manifest, backend: str, step_fn, slots: int, tokenizer,
                 token_budget: int = DEFAULT_TOKEN_BUDGET, decode_fn=None):
        self.directory, self.manifest, self.backend, self.tokenizer = directory, manifest, backend, tokenizer
        self.params = manifest.mesa_params
        self.method = manifest.method_object  # None for mesa and origin
        self._step = step_fn
        shape, dtype = manifest.cache_shape, backends.CACHE_DTYPES[manifest.dtype]
        inplace = getattr(step_fn, "inplace", False)
        # slots decode rows + one prompt being prefilled (prefill buffers cost only the tokens written into them)
        need = (slots + inplace) * 2 * math.prod(shape.full()) * np.dtype(dtype).itemsize
        if backend == "ort-cpu" and need > _host_memory():  # refuse now rather than allocate until the OOM killer
            raise RequestError(f"slots={slots}: {slots} KV-cache slots need {need / 2**30:.1f} GiB, more than this "
                               f"machine's {_host_memory() / 2**30:.1f} GiB")
        try:
            steps_params = mesa.graph_params(self.params, manifest.method, manifest.max_len)
            self._decoder = make_decoder(step_fn, shape, slots, directory, steps_params, dtype, decode_fn, self.method)
        except MemoryError:
            raise RequestError(f"slots={slots}: not enough memory for {slots} KV-cache slots of "
                               f"{need / slots / 2**30:.2f} GiB") from None
        self._batcher = Batcher(step_fn, self._decoder, token_budget)

    @classmethod
    def load(cls, directory: str | Path, backend: str = "auto", slots: int = 1,
             token_budget: int = DEFAULT_TOKEN_BUDGET, session_options: dict | None = None) -> "MesaEngine":
        """Open an engine directory on `backend` (auto | ort-cpu | ort-cuda | tensorrt).

        slots: sequences served at once (each holds a KV-cache slot of max_len); token_budget: prompt
        tokens prefilled per batcher iteration between decode steps; session_options: ONNX Runtime
        settings, e.g. {"intra_op_num_threads": 2, "disable_prepacking": True,
        "graph_optimization_level": "basic"} (runtime.backends.session_options)."""
        if not isinstance(directory, (str, os.PathLike)):
            raise RequestError(f"directory must be a path (str or os.PathLike), got {directory!r}")
        directory = Path(directory)
        for name, value in (("slots", slots), ("token_budget", token_budget)):
            if not _is_int(value) or value < 1:
                raise RequestError(f"{name} must be an integer >= 1, got {value!r}")
        try:
            manifest = load_manifest(directory)
        except ArtifactError as e:
            raise LoadError(str(e)) from None
        options = backends.session_options(session_options)
        name, step_fn = backends.open_backend(backend, directory, directory / MODEL_FILE, manifest.cache_shape,
                                              manifest.max_len, manifest.dtype, options, manifest.target)
        check_graph(step_fn.session, manifest, directory)
        decode_fn = None
        if manifest.decode_model is not None:  # int8-int4: decode steps run a graph of their own
            _, decode_fn = backends.open_backend(name, directory, directory / manifest.decode_model,
                                                 manifest.cache_shape, manifest.max_len, manifest.dtype, options,
                                                 manifest.target)
            check_graph(decode_fn.session, manifest, directory, manifest.decode_model)
        if getattr(step_fn, "inplace", False) and not (directory / ROPE_FILE).is_file():
            raise LoadError(f"{directory} is incomplete: {ROPE_FILE} is missing; re-export the engine")
        return cls(directory, manifest, name, step_fn, int(slots), load_tokenizer(directory), int(token_budget),
                   decode_fn)

    def close(self) -> None:
        """Stop the batcher; requests still running end with an EngineError."""
        self._batcher.close()

    def __del__(self):  # an engine dropped without close(): stop its batcher thread (no join here)
        batcher = getattr(self, "_batcher", None)
        if batcher is not None:
            with batcher.cond:
                batcher.closed = True
                batcher.cond.notify_all()

    def __enter__(self) -> "MesaEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        """Sequences waiting / running, free slots, iterations so far, cache bytes, decode contract."""
        return {**self._batcher.stats(), "cache_bytes": self._decoder.nbytes,
                "inplace_decode": isinstance(self._decoder, InplaceDecoder),
                "rotations": getattr(self._decoder, "rotations", 0)}

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
        streams = [self._stream(ids, plan, req, return_logits, progress) for ids, plan in zip(req.rows, req.plans)]
        results = []
        for ids, stream in zip(req.rows, streams):  # every row is in the batcher already: they decode together
            for _ in stream:
                pass
            results.append(self._generation(ids, stream, return_logits))
        return results if batched else results[0]

    def stream(self, prompt, max_new_tokens: int = DEFAULT_NEW_TOKENS, *, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               stop_tokens: Sequence[int] | None = None, progress: Progress | None = None) -> TokenStream:
        """The tokens of one prompt as they are generated (the same tokens `generate` returns).

        The request is checked and queued now; it holds a KV-cache slot until it finishes, or until the
        iterator's close() or cancel() (from any thread, also before the first token) frees it at once.
        """
        rows, batched = self._prompts(prompt)
        if batched:
            raise RequestError("stream() takes one prompt; generate() takes a batch")
        req = self._request(rows, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, progress)
        return self._stream(req.rows[0], req.plans[0], req, False, progress)

    def sequence(self, prompt, all_logits: bool = False) -> StepSequence:
        """A sequence to step by hand (runtime.sequence.Sequence): step() runs the prompt by its Mesa plan
        and returns the last logits; append([token]) then step() runs one decode step per token."""
        rows, batched = self._prompts(prompt)
        if batched:
            raise RequestError("sequence() takes one prompt")
        (plan,) = self._plans(rows, 0)
        return StepSequence(self._batcher, dict(ids=rows[0], plan=plan, all_logits=bool(all_logits)),
                            self.manifest.vocab_size)

    def score(self, prompt, progress: Progress | None = None) -> np.ndarray:
        """The logits of every prompt position [L, vocab] (row i predicts token i + 1)."""
        rows, batched = self._prompts(prompt)
        if batched:
            raise RequestError("score() takes one prompt")
        _check_progress(progress)
        (plan,) = self._plans(rows, 0)
        seq = StepSequence(self._batcher, dict(ids=rows[0], plan=plan, all_logits=True, decode=False,
                                               on_progress=progress), self.manifest.vocab_size)
        seq.step()
        return seq.prompt_logits

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

    def _stream(self, ids: np.ndarray, plan: list[mesa.Step], req: _Request, keep_logits: bool,
                progress: Progress | None) -> TokenStream:
        work = dict(ids=ids, plan=plan, all_logits=keep_logits, on_progress=progress)
        return TokenStream(self._batcher, work, req.sampling, req.max_new_tokens, req.stop, keep_logits)

    def _generation(self, ids: np.ndarray, stream: TokenStream, keep_logits: bool) -> Generation:
        work = stream.work
        out = Generation(tokens=stream.tokens, finish_reason=stream.finish_reason, prompt_tokens=len(ids),
                         prefill_seconds=work.prefill_seconds, decode_seconds=sum(work.decode_seconds))
        out.text = self.decode(out.tokens) if self.tokenizer else None
        if keep_logits:
            out.prefill_logits = work.prefill_logits[0]
            vocab = self.manifest.vocab_size
            out.decode_logits = np.stack(stream.decode_logits) if stream.decode_logits else np.zeros((0, vocab),
                                                                                                      np.float32)
        return out

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
            return [methods.check_request(len(ids), max_new_tokens, self.max_len, self.params, self.manifest.method,
                                          self.method) for ids in rows]
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


def _same_dims(a: list, b: list) -> bool:
    """Shapes agree where both name a fixed size (symbolic dims match anything)."""
    return len(a) == len(b) and all(x == y for x, y in zip(a, b) if isinstance(x, int) and isinstance(y, int))


def check_graph(session, m: Manifest, directory: Path, graph_file: str = MODEL_FILE) -> None:
    """The manifest must describe the graph beside it: same I/O, dtypes, cache layout and vocabulary, and
    the method, parameters and contract hash the exporter wrote into the graph's metadata."""
    def mismatch(detail: str) -> LoadError:
        return LoadError(f"{directory}: {MANIFEST} does not describe {graph_file} ({detail}); re-export the engine")

    graph = {a.name: a for a in session.get_inputs() + session.get_outputs()}
    specs = {t.name: t for t in m.inputs + m.outputs}
    expected = set(STEP_INPUTS + STEP_OUTPUTS)
    inplace_io = set(sum(decode_io(m.num_hidden_layers), ()))
    if DECODE_INPUTS[0] in graph:  # exported with in-place decode (the ort-cpu target)
        expected |= inplace_io
    if set(graph) != expected or set(specs) != expected:
        raise mismatch(f"graph I/O {sorted(graph)}, manifest I/O {sorted(specs)}, runtime expects {sorted(expected)}")
    cache = [m.num_hidden_layers, "batch", m.num_key_value_heads, m.max_len, m.head_dim]
    rows = [m.num_hidden_layers, "batch", m.num_key_value_heads, "q", m.head_dim]
    from_fields = {"k_cache": cache, "v_cache": cache, "new_keys": rows, "new_values": rows,
                   "logits": ["batch", "logits_to_keep", m.vocab_size]}
    from_fields.update({n: cache[1:] for n in inplace_io if n not in DECODE_INPUTS})
    cache_dtype = np.dtype(backends.CACHE_DTYPES.get(m.dtype, np.float32)).name
    for name, arg in graph.items():
        dtype = ORT_TYPES.get(arg.type, arg.type)
        if dtype != specs[name].dtype:
            raise mismatch(f"{name} is {dtype} in the graph, {specs[name].dtype} in the manifest")
        if (name in ("k_cache", "v_cache", "new_keys", "new_values")
                or name.startswith(("past_", "present_"))) and dtype != cache_dtype:
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

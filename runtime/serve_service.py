"""The service runtime/serve.py's handlers call (one call each): admission, prompts, jobs on the engine, metrics.

    service = Service(engine, max_queue=64)
    answer = await service.completion(CompletionRequest(prompt="Once upon a time", max_tokens=16))
    await answer.result()            # the response dict, or: async for event in answer.sse(): ...

A request is admitted (at most max_queue admitted and not finished: 429 beyond), its prompt built (text or
token ids; chat messages through the checkpoint's chat template) and handed to `engine.stream`, which queues
it in the engine's continuous batcher: nothing here serializes requests. The engine's token iterator
blocks, so each request is read by a thread of its own (a pool would cap the number of live streams below
what the engine batches), which turns tokens into text, matches stop strings and feeds the event loop
through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import anyio

from runtime.engine import MesaEngine
from runtime.errors import RequestError
from runtime.openai_api import Answer, ApiError, ChatRequest, CompletionRequest, BaseRequest
from runtime.serve_text import ChatTemplate, TextStream

DEFAULT_MAX_QUEUE = 64
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of max_len
DETOKENIZE_CONTEXT = 4  # prompt tokens decoded before a completion, so its first word keeps its leading space


@dataclass
class Plan:
    """A request the engine can take: prompt ids and generation settings."""

    ids: list[int]
    max_tokens: int
    sampling: dict
    stop_tokens: list[int]  # every token id that ends the sequence (EOS unless ignore_eos, and the request's)
    stop_strings: list[str]
    context: list[int] = field(default_factory=list)  # ids decoded before the first generated one
    progress: bool = False


class Job:
    """One admitted request on the engine, read by its own thread; events reach the event loop as
    ("progress", done, total), ("text", text, ids) and finally ("end", error)."""

    def __init__(self, service: "Service", loop: asyncio.AbstractEventLoop):
        self.service, self._loop = service, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.tokens: list[int] = []
        self.finish_reason: str | None = None  # "stop" | "length"; None while running or when cancelled
        self.plan: Plan | None = None
        self.done = threading.Event()  # the sequence ended (its slot is free)
        self.admitted = self._last = time.perf_counter()

    def open(self, plan: Plan) -> None:
        """Queue the plan in the engine (blocking: called in a worker thread) and start reading it."""
        self.plan = plan
        engine = self.service.engine
        self._text = TextStream(engine.decode, plan.stop_strings, plan.context) if engine.tokenizer else None
        try:
            self._it = engine.stream(plan.ids, plan.max_tokens, **plan.sampling, stop_tokens=plan.stop_tokens,
                                     progress=self._progress if plan.progress else None)
        except RequestError as e:
            raise ApiError(400, str(e)) from None
        self._cancel = self._it.cancel  # any thread, also before the first token
        self.service.metrics.prompt_tokens.inc(len(plan.ids))
        threading.Thread(target=self._run, name="mesa-serve-job", daemon=True).start()

    async def cancel(self) -> None:
        """Stop the sequence and free its KV slot (waits for a step in flight, so off the event loop)."""
        if getattr(self, "_cancel", None) is not None and not self.done.is_set():
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._cancel)

    def _put(self, *event) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shut down): nobody is listening
            pass

    def _progress(self, done: int, total: int) -> None:
        self._put("progress", done, total)

    def _run(self) -> None:
        error, ids = None, []
        stop = set(self.plan.stop_tokens)
        try:
            for token in self._it:
                self._count(token)
                ids.append(token)
                text = self._text.add(token) if self._text and token not in stop else ""
                if text or not self._text:
                    self._put("text", text, ids)
                    ids = []
                if self._text and self._text.stopped:
                    break
        except Exception as e:  # noqa: BLE001 - an EngineError, or the step failed: this request only
            error = e
        finally:
            self._it.close()  # after a stop string: cancels the sequence, frees the slot now
        if self._text and error is None:
            text = self._text.flush()
            if text or ids:
                self._put("text", text, ids)
        self.finish_reason = self._finish(error)
        self.done.set()
        self.service.release(self, error)
        self._put("end", error)

    def _count(self, token: int) -> None:
        now, metrics = time.perf_counter(), self.service.metrics
        (metrics.ttft if not self.tokens else metrics.tpot).observe(now - self._last)
        metrics.generated_tokens.inc()
        self._last = now
        self.tokens.append(token)

    def _finish(self, error) -> str | None:
        if error is not None:
            return None
        if (self._text and self._text.stopped) or (self.tokens and self.tokens[-1] in self.plan.stop_tokens):
            return "stop"
        return "length" if len(self.tokens) == self.plan.max_tokens else None


# ---------------------------------------------------------------------------------------------- the service

class Metrics:
    """Prometheus metrics of one service, in a registry of its own (several apps may share a process)."""

    def __init__(self, service: "Service"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        engine = service.engine
        self.requests = Counter("mesa_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.cancelled = Counter("mesa_requests_cancelled", "Requests stopped before they finished (client gone, "
                                 "shutdown)", registry=r)
        self.failed = Counter("mesa_requests_failed", "Requests the engine failed", registry=r)
        self.prompt_tokens = Counter("mesa_prompt_tokens", "Prompt tokens admitted to the engine", registry=r)
        self.generated_tokens = Counter("mesa_generation_tokens", "Tokens generated", registry=r)
        latency = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 25, 60)
        self.ttft = Histogram("mesa_time_to_first_token_seconds", "Admission to first token (queue + prefill)",
                              buckets=latency, registry=r)
        self.tpot = Histogram("mesa_time_per_output_token_seconds", "Time between two generated tokens",
                              buckets=latency, registry=r)
        for name, doc, key in (("mesa_queue_depth", "Sequences waiting for a KV slot or their prefill", "waiting"),
                               ("mesa_running_sequences", "Sequences holding a KV slot", "running"),
                               ("mesa_free_slots", "Free KV-cache slots", "free_slots")):
            Gauge(name, doc, registry=r).set_function(lambda key=key: engine.stats()[key])
        Gauge("mesa_requests_in_flight", "Requests admitted and not finished (limit: --max-queue)",
              registry=r).set_function(lambda: service.in_flight)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def sampling_defaults(generation: dict) -> dict:
    """What a request that leaves temperature / top_p / top_k out gets: the checkpoint's own settings
    when its generation_config.json samples (as vLLM does), else OpenAI's defaults (temperature 1, no
    top-p or top-k cut)."""
    if generation["do_sample"]:
        return {k: generation[k] for k in ("temperature", "top_p", "top_k")}
    return {"temperature": 1.0, "top_p": 1.0, "top_k": 0}


class Service:
    """Everything the web layer needs from one engine."""

    def __init__(self, engine: MesaEngine, max_queue: int = DEFAULT_MAX_QUEUE, model_name: str | None = None):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.engine, self.max_queue = engine, max_queue
        self.name = model_name or Path(engine.directory).resolve().name
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.template = ChatTemplate.load(Path(engine.directory))
        self.sampling_defaults = sampling_defaults(engine.manifest.generation)
        self.in_flight = 0
        self._lock = threading.Lock()
        self.metrics = Metrics(self)

    # ------------------------------------------------------------------------------ the endpoints

    async def completion(self, req: CompletionRequest) -> Answer:
        return await self._answer(req, lambda: self._completion_plan(req), chat=False)

    async def chat(self, req: ChatRequest) -> Answer:
        return await self._answer(req, lambda: self._chat_plan(req), chat=True)

    def models(self) -> dict:
        m = self.engine.manifest
        return {"object": "list", "data": [{
            "id": self.name, "object": "model", "created": 0, "owned_by": "mesa-engine", "max_model_len": m.max_len,
            "mesa": {"method": m.method, "params": dataclasses.asdict(self.engine.params),
                     "method_params": m.method_params, "max_len": m.max_len,
                     "vocab_size": m.vocab_size, "backend": self.engine.backend, "slots": self.engine.stats()["slots"],
                     "chat_template": self.template is not None, "tokenizer": self.engine.tokenizer is not None,
                     "sampling_defaults": self.sampling_defaults}}]}

    def health(self) -> dict:
        return {"status": "ok", "replica": self.replica, "in_flight": self.in_flight, "max_queue": self.max_queue,
                **self.engine.stats()}

    # ------------------------------------------------------------------------------ internals

    async def _answer(self, req: BaseRequest, make_plan: Callable[[], Plan], chat: bool) -> Answer:
        error = req.unsupported()
        if error is not None:
            raise error
        if req.model is not None and req.model != self.name:
            raise ApiError(404, f"model {req.model!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")
        self._admit()
        job = Job(self, asyncio.get_running_loop())
        try:  # tokenizing a long prompt and queueing it block: a worker thread, not the event loop
            await anyio.to_thread.run_sync(lambda: job.open(make_plan()))
        except BaseException:
            self.release(None, None)
            raise
        return Answer(self, job, req, chat)

    def _admit(self) -> None:
        with self._lock:
            if self.in_flight >= self.max_queue:
                raise ApiError(429, f"the server is busy: {self.in_flight} requests are running or waiting "
                               f"(--max-queue {self.max_queue}); retry later", type="requests",
                               code="rate_limit_exceeded", headers={"Retry-After": "1"})
            self.in_flight += 1

    def release(self, job: Job | None, error: BaseException | None) -> None:
        """The request is finished (or failed, or was cancelled): it no longer counts against max_queue."""
        with self._lock:
            self.in_flight -= 1
        if job is not None and error is not None:
            self.metrics.failed.inc()
        elif job is not None and job.finish_reason is None:
            self.metrics.cancelled.inc()

    def _completion_plan(self, req: CompletionRequest) -> Plan:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, f"prompt holds {len(prompt)} prompts; this server takes one per request",
                               param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self._encode(prompt, special=True)
        else:
            ids = list(prompt)
        return self._plan(req, ids, req.max_tokens or COMPLETION_MAX_TOKENS, context=ids[-DETOKENIZE_CONTEXT:])

    def _chat_plan(self, req: ChatRequest) -> Plan:
        if self.template is None:
            raise ApiError(400, f"{self.name} has no chat template (tokenizer_config.json has no chat_template): "
                           "use /v1/completions", param="messages", code="no_chat_template")
        text = self.template.render([m.for_template() for m in req.messages])
        ids = self._encode(text, special=False)  # the template wrote BOS itself, as transformers assumes
        limit = req.max_completion_tokens or req.max_tokens
        return self._plan(req, ids, limit or max(1, self.engine.max_len - len(ids)))

    def _encode(self, text: str, special: bool) -> list[int]:
        if self.engine.tokenizer is None:
            raise ApiError(400, f"{self.name} has no tokenizer.json: send the prompt as token ids", param="prompt")
        try:
            return self.engine.encode(text) if special else self.engine.tokenizer.encode(text,
                                                                                       add_special_tokens=False).ids
        except RequestError as e:
            raise ApiError(400, str(e), param="prompt") from None

    def _plan(self, req: BaseRequest, ids: list[int], max_tokens: int, context: list[int] = ()) -> Plan:
        max_len = self.engine.max_len
        if len(ids) + max_tokens > max_len:
            raise ApiError(400, f"This model's maximum context length is {max_len} tokens; the prompt has {len(ids)} "
                           f"tokens and max_tokens is {max_tokens} ({len(ids) + max_tokens} in all). Shorten the "
                           "prompt or lower max_tokens.", param="max_tokens", code="context_length_exceeded")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        strings = [s for s in stops if isinstance(s, str)]
        if "" in strings:
            raise ApiError(400, "stop strings must not be empty", param="stop")
        if strings and self.engine.tokenizer is None:
            raise ApiError(400, f"stop strings need a tokenizer ({self.name} has no tokenizer.json): "
                           "give stop token ids", param="stop")
        tokens = [s for s in stops if not isinstance(s, str)] + list(req.stop_token_ids or [])
        vocab = self.engine.manifest.vocab_size
        if any(t >= vocab for t in tokens):
            raise ApiError(400, f"stop token ids must be in [0, {vocab})", param="stop")
        eos = [] if req.ignore_eos else list(self.engine.manifest.eos_token_ids)
        sampling = dict(self.sampling_defaults)
        sampling.update({k: v for k, v in (("temperature", req.temperature), ("top_p", req.top_p),
                                           ("top_k", req.top_k)) if v is not None}, seed=req.seed)
        return Plan(ids, max_tokens, sampling, sorted(set(eos + tokens)), strings, list(context),
                    req.progress and req.stream)

"""OpenAI's wire format for runtime.serve: request models (pydantic), the error shape, and Answer, which
turns a running request into a response body or server-sent events.

Requests follow OpenAI's /v1/completions and /v1/chat/completions, plus a few extensions vLLM also has
(top_k, ignore_eos, stop_token_ids, return_token_ids) and `progress` (prefill progress events, for the
playground). Unknown fields are ignored; known ones this server cannot honour (n > 1, logprobs, echo,
penalties, tools...) are a 400 naming the field.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Annotated, Any, AsyncIterator, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictStr

if TYPE_CHECKING:
    from runtime.serve_service import Job, Service

MAX_STOPS = 16

TokenId = Annotated[int, Field(strict=True, ge=0)]
Number = Annotated[float, Field(strict=True)]


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}} with its status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def server_error(error: BaseException) -> ApiError:
    """What an engine failure (or a bug here) is worth to the client: a 500 saying what failed."""
    return ApiError(500, f"the server failed: {error}", type="server_error", code="server_error")


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, strict=True)


class BaseRequest(BaseModel):
    """The fields both endpoints share. Unknown fields are ignored (clients send `user`, `metadata`...);
    known ones this server cannot honour are refused in unsupported()."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    max_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None  # None: OpenAI's default, 1
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(strict=True, ge=0)] | None = None  # vLLM's extension
    seed: Annotated[int, Field(strict=True, ge=0, lt=2**63)] | None = None
    stop: StrictStr | Annotated[list[Union[StrictStr, TokenId]], Field(max_length=MAX_STOPS)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOPS)] | None = None  # vLLM's extension
    ignore_eos: bool = Field(False, strict=True)  # vLLM's extension: generate exactly max_tokens
    n: Annotated[int, Field(strict=True)] | None = None
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Any] | None = None
    user: StrictStr | None = None
    return_token_ids: bool = Field(False, strict=True)  # vLLM's extension: choices carry "token_ids"
    progress: bool = Field(False, strict=True)  # stream "event: progress" lines while the prompt prefills

    def unsupported(self) -> ApiError | None:
        for name, ok in self._checks():
            if not ok:
                return ApiError(400, f"{name}={getattr(self, name)!r} is not supported by this server", param=name,
                                code="unsupported_parameter")
        return None

    def _checks(self):
        yield "n", self.n in (None, 1)
        yield "presence_penalty", not self.presence_penalty
        yield "frequency_penalty", not self.frequency_penalty
        yield "logit_bias", not self.logit_bias


class CompletionRequest(BaseRequest):
    prompt: StrictStr | list[TokenId] | list[StrictStr] | list[list[TokenId]]
    echo: bool = Field(False, strict=True)
    logprobs: Annotated[int, Field(strict=True)] | None = None
    best_of: Annotated[int, Field(strict=True)] | None = None
    suffix: StrictStr | None = None

    def _checks(self):
        yield from super()._checks()
        yield "echo", not self.echo
        yield "logprobs", self.logprobs is None
        yield "best_of", self.best_of in (None, 1)
        yield "suffix", self.suffix is None


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool_calls, reasoning...: the template may read them
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def for_template(self) -> dict:
        """A plain dict, content flattened to one string (text templates expect one)."""
        out = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            out["content"] = "\n".join(part.text for part in self.content)
        return out


class ChatRequest(BaseRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None  # OpenAI's newer name
    logprobs: bool | None = Field(None, strict=True)
    top_logprobs: Annotated[int, Field(strict=True)] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def _checks(self):
        yield from super()._checks()
        yield "logprobs", not self.logprobs
        yield "top_logprobs", self.top_logprobs is None
        yield "tools", not self.tools
        yield "tool_choice", self.tool_choice in (None, "none", "auto")
        yield "functions", not self.functions
        yield "response_format", self.response_format in (None, {"type": "text"})


# ---------------------------------------------------------------------------------------------- answers

class Answer:
    """A running request as the web layer sees it: await result() for the response body, or iterate sse()
    for server-sent events; close() cancels the sequence (a client gone, a shutdown)."""

    def __init__(self, service: Service, job: Job, request: BaseRequest, chat: bool):
        self.service, self.job, self.request, self.chat = service, job, request, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    async def close(self) -> None:
        await self.job.cancel()

    async def result(self) -> dict:
        texts, ids = [], []
        try:
            while (event := await self.job.events.get())[0] != "end":
                if event[0] == "text":
                    texts.append(event[1])
                    ids.extend(event[2])
        finally:
            await self.close()
        if event[1] is not None:
            raise server_error(event[1])
        text = "".join(texts)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice["finish_reason"] = self.job.finish_reason
        if self.request.return_token_ids:
            choice["token_ids"] = ids
        return {**self._head(""), "choices": [choice], "usage": self._usage()}

    async def sse(self) -> AsyncIterator[str]:
        """`data: {chunk}` lines, `event: progress` lines when asked for, and `data: [DONE]`."""
        try:
            if self.chat:
                yield self._chunk({"role": "assistant", "content": ""})
            while (event := await self.job.events.get())[0] != "end":
                if event[0] == "progress" and self.request.progress:
                    yield f"event: progress\ndata: {json.dumps({'done': event[1], 'total': event[2]})}\n\n"
                elif event[0] == "text":
                    yield self._chunk({"content": event[1]} if self.chat else event[1], ids=event[2])
            if event[1] is not None:
                yield _data(server_error(event[1]).body())
            else:
                yield self._chunk({} if self.chat else "", finish=self.job.finish_reason)
                options = self.request.stream_options
                if options is not None and options.include_usage:
                    yield _data({**self._head(".chunk"), "choices": [], "usage": self._usage()})
            yield "data: [DONE]\n\n"
        finally:
            await self.close()

    def _head(self, suffix: str) -> dict:
        kind = f"chat.completion{suffix}" if self.chat else "text_completion"  # OpenAI's names, chunks too
        return {"id": self.id, "object": kind, "created": self.created, "model": self.service.name}

    def _chunk(self, delta, finish: str | None = None, ids: list[int] | None = None) -> str:
        choice = {"index": 0, "delta" if self.chat else "text": delta, "logprobs": None, "finish_reason": finish}
        if self.request.return_token_ids:
            choice["token_ids"] = ids or []
        return _data({**self._head(".chunk"), "choices": [choice]})

    def _usage(self) -> dict:
        prompt, done = len(self.job.plan.ids), len(self.job.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"

"""`python -m runtime.serve DIR`: an OpenAI-compatible HTTP server over a Mesa engine (FastAPI on uvicorn).

    python -m runtime.serve engines/llama2-7b-12k --slots 4 --max-queue 64 [--host 127.0.0.1] [--port 8000]
    python -m runtime.serve engines/llama2-7b-12k --ray --replicas 2      # Ray Serve, one engine per replica

POST /v1/completions and /v1/chat/completions (OpenAI's shapes, `stream` as server-sent events), GET /v1/models,
/health, /metrics (Prometheus) and / (a playground page). Handlers only parse (pydantic models in
runtime/openai_api.py) and make one call into runtime/serve_service.py's Service; every error is OpenAI's
error JSON with its status.
SIGTERM stops accepting, lets running streams finish for --grace seconds, cancels the rest and exits 0.
Needs the `serve` extra (fastapi, uvicorn, prometheus_client, jinja2); `serve-ray` for --ray.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from importlib import resources

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError as e:  # the plain runtime does not need these
    raise ImportError(f"runtime.serve needs the `serve` extra (pip install -e '.[serve]'): {e}") from e

from runtime.openai_api import Answer, ApiError, ChatRequest, CompletionRequest, server_error
from runtime.serve_service import DEFAULT_MAX_QUEUE, Service

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="mesa-engine", summary="OpenAI-compatible completions over a Mesa-Extrapolation engine")
    app.state.service = service
    app.add_middleware(_Count, service=service)
    for kind, as_api_error in ((ApiError, lambda e: e), (RequestValidationError, _invalid),
                               (HTTPException, lambda e: ApiError(e.status_code, str(e.detail), headers=e.headers)),
                               (Exception, server_error)):  # a bug: still OpenAI's shape
        app.add_exception_handler(kind, _handler(as_api_error))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _respond(request, await service.completion(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await _respond(request, await service.chat(body))

    @app.get("/v1/models")
    async def models():
        return service.models()

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/metrics")
    async def metrics():
        body, kind = service.metrics.exposition()
        return Response(body, media_type=kind)

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return resources.files("runtime").joinpath("playground.html").read_text()

    return app


# ---------------------------------------------------------------------------------------------- plumbing

def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _handler(as_api_error):
    async def handle(request, exc):  # async: Starlette runs a plain function in its thread pool
        return _error(as_api_error(exc))

    return handle


def _invalid(e: RequestValidationError) -> ApiError:
    """A validation error as OpenAI words it: 400, the first problem, and the field in `param`."""
    first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request", "type": None}
    if first["type"] == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                        code="json_invalid")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]  # a union adds its member's type to loc
    message = f"{'.'.join(loc)}: {first['msg']}" if loc else str(first["msg"])
    return ApiError(400, message, param=loc[0] if loc else None, code=first["type"])


async def _respond(request: Request, answer: Answer):
    if answer.request.stream:
        return _Events(answer)

    async def watch():  # a client that leaves before its answer cancels the sequence
        while (await request.receive())["type"] != "http.disconnect":
            pass
        await answer.close()

    watcher = asyncio.ensure_future(watch())
    try:
        return JSONResponse(await answer.result())
    finally:
        watcher.cancel()


class _Events(StreamingResponse):
    """Server-sent events that cancel their sequence however the response ends (done, client gone, shutdown)."""

    def __init__(self, answer: Answer):
        super().__init__(answer.sse(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.answer = answer

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.answer.close()


class _Count:
    """Pure ASGI middleware: counts answers by endpoint and status (streams too) and names the replica."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ROUTES else "other"  # fuzzed paths must not grow the label set

        async def counted(message):
            if message["type"] == "http.response.start":
                self.service.metrics.requests.labels(endpoint, str(message["status"])).inc()
                message["headers"] = [*message.get("headers", []), (b"x-mesa-replica", self.service.replica.encode())]
            await send(message)

        await self.app(scope, receive, counted)


# ---------------------------------------------------------------------------------------------- command line

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.serve", description="Serve a Mesa engine over "
                                "OpenAI's completions API.")
    p.add_argument("engine", metavar="DIR", help="engine directory (model.onnx + mesa.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", default="auto", help="auto | ort-cpu | ort-cuda | tensorrt")
    p.add_argument("--slots", type=int, default=1, help="sequences decoded at once: KV-cache slots (default 1)")
    p.add_argument("--token-budget", type=int, default=512, help="prompt tokens prefilled per batcher iteration")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads per engine (default: ORT's choice, all cores; "
                   "with --ray: --replica-cpus)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"requests admitted and not finished (running or waiting); more get 429 "
                   f"(default {DEFAULT_MAX_QUEUE})")
    p.add_argument("--model-name", help="the model id clients send (default: the directory's name)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds running requests get on SIGTERM")
    ray = p.add_argument_group("Ray Serve (extra serve-ray)")
    ray.add_argument("--ray", action="store_true", help="deploy on Ray Serve, one engine per replica")
    ray.add_argument("--ray-address", help="Ray cluster to join (default: one started by `ray start`, else local)")
    ray.add_argument("--replicas", type=int, default=1, help="fixed number of replicas (default 1)")
    ray.add_argument("--min-replicas", type=int, help="autoscale from this many replicas...")
    ray.add_argument("--max-replicas", type=int, help="...to this many")
    ray.add_argument("--target-ongoing-requests", type=float, default=None,
                     help="autoscaling target of requests per replica (default: --slots)")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica")
    ray.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs Ray reserves per replica")
    return p


def engine_options(args, threads: int | None = None) -> dict:
    """MesaEngine.load's keywords from the command line."""
    threads = args.threads if args.threads is not None else threads
    return {"backend": args.backend, "slots": args.slots, "token_budget": args.token_budget,
            "session_options": None if threads is None else {"intra_op_num_threads": threads}}


def load_service(args) -> Service:
    from runtime.engine import MesaEngine

    return Service(MesaEngine.load(args.engine, **engine_options(args)), max_queue=args.max_queue,
                   model_name=args.model_name)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from runtime.errors import EngineError

    try:
        if args.ray:
            from runtime.serve_ray import run

            return run(args)
        service = load_service(args)
    except (EngineError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    # uvicorn takes SIGTERM/SIGINT while it runs, then re-raises them: a no-op handler makes that re-raise
    # harmless, so a graceful shutdown exits 0 instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    config = uvicorn.Config(create_app(service), host=args.host, port=args.port, timeout_graceful_shutdown=args.grace,
                            log_level="info")
    try:
        uvicorn.Server(config).run()
    finally:
        service.engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

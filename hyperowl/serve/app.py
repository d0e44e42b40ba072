"""The FastAPI application: routes, API key check, body size limit, OpenAI-style errors, metrics, web page."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hyperowl.errors import HyperowlError, MediaError, PromptError, ResourceLimitError
from hyperowl.processing.processor import Owl3Processor
from hyperowl.serve.completions import chunk, completion_body, prepare_job, sse, usage
from hyperowl.serve.errors import ApiError, limit_error, overloaded
from hyperowl.serve.media import DecodeGate
from hyperowl.serve.media_cache import MediaCache
from hyperowl.serve.metrics import ServerMetrics
from hyperowl.serve.retrieval import add_citations, apply_retrieval
from hyperowl.serve.scheduler import Event, Failed, Finished, Job, Prefilled, Scheduler, TextDelta
from hyperowl.serve.schema import ChatCompletionRequest
from hyperowl.serve.settings import ServerSettings

if TYPE_CHECKING:
    from hyperowl.model.owl3 import Owl3Model
    from hyperowl.rag.index import RagIndex

log = logging.getLogger("hyperowl.serve")

STATIC_DIR = Path(__file__).parent / "static"

#: Paths counted under their own label in `hyperowl_requests_total`; anything else is "other".
KNOWN_PATHS = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions"}

#: Exit status of a server whose scheduler thread died (EX_SOFTWARE).
SCHEDULER_DIED_EXIT = 70

#: How often (seconds) a waiting request checks whether its client is still connected.
DISCONNECT_POLL_S = 0.25


def error_response(error: ApiError) -> Response:
    """`error` as JSON; ASCII-escaped, so a message quoting any request text (even a lone surrogate) encodes."""
    return Response(json.dumps(error.body()), status_code=error.status, headers=error.headers, media_type="application/json")


def internal_error(exc: BaseException) -> ApiError:
    return ApiError(500, f"internal error: {type(exc).__name__}", type="server_error", code="internal_error")


class GuardMiddleware:
    """Refuses bodies over `max_body_bytes` (413) before the app reads them and bodies that do not arrive
    within `body_timeout_s` (408), counts every answer, and answers an exception that escaped the app with
    a 500 itself, so the connection stays usable (uvicorn closes a connection whose app raised)."""

    def __init__(self, app: ASGIApp, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        started = complete = False

        async def counting_send(message: Message) -> None:
            nonlocal status, started, complete
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if isinstance(body, ApiError):
                await error_response(body)(scope, receive, counting_send)
                return
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            try:
                await self.app(scope, replay, counting_send)
            except Exception as exc:
                if complete:  # the error handler already answered (Starlette re-raises after it)
                    return
                if started:
                    raise  # half an answer went out: only closing the connection ends it
                log.exception("unexpected error", exc_info=exc)
                await error_response(internal_error(exc))(scope, receive, counting_send)
        finally:
            path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
            self.metrics.requests.labels(path, str(status)).inc()
            if status >= 400:
                self.metrics.errors.labels(str(status)).inc()

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | ApiError:
        limit = self.settings.max_body_bytes
        too_big = limit_error(f"request body is larger than {limit} bytes", "max_body_bytes", status=413)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return too_big
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        break
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > limit:
                        return too_big
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            return ApiError(
                408,
                f"the request body did not arrive within {self.settings.body_timeout_s:g} s (limit body_timeout_s)",
                type="timeout",
                code="body_timeout_s",
                headers={"Connection": "close"},
            )
        return b"".join(chunks)


def parse_request(raw: bytes) -> ChatCompletionRequest:
    """The request body: 400 when it is not JSON, 422 when it does not fit the schema."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError as exc:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from exc
    try:
        return ChatCompletionRequest.model_validate(data)
    except RecursionError as exc:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_request") from exc
    except ValidationError as exc:
        errors = exc.errors()
        where = lambda e: ".".join(str(p) for p in e["loc"]) or "body"
        message = "; ".join(f"{where(e)}: {e['msg']}" for e in errors[:5])
        raise ApiError(422, f"invalid request: {message}", param=where(errors[0]), code="invalid_request") from exc


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI-style JSON; none stops the server."""

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, exc: ApiError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return error_response(ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(HyperowlError)
    async def on_hyperowl_error(_: Request, exc: HyperowlError) -> Response:
        if isinstance(exc, MediaError):
            return error_response(ApiError(400, str(exc), param="messages", code="invalid_media"))
        if isinstance(exc, PromptError):
            return error_response(ApiError(400, str(exc), param="messages", code="invalid_prompt"))
        if isinstance(exc, ResourceLimitError):
            return error_response(ApiError(400, str(exc), code="resource_limit"))
        log.exception("unexpected hyperowl error", exc_info=exc)
        return error_response(ApiError(500, str(exc), type="server_error", code="internal_error"))

    @app.exception_handler(Exception)
    async def on_unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unexpected error", exc_info=exc)
        return error_response(internal_error(exc))


def exit_process(exc: BaseException) -> None:
    """End the whole server when its scheduler thread died, so a supervisor restarts it (exit status 70)."""
    log.critical("the scheduler thread died (%s: %s); the server exits", type(exc).__name__, exc)
    logging.shutdown()
    os._exit(SCHEDULER_DIED_EXIT)


def create_app(
    model: Owl3Model, processor: Owl3Processor, settings: ServerSettings, rag_indexes: Mapping[str, RagIndex] | None = None
) -> FastAPI:
    """The server for `model`; its scheduler thread runs while the app's lifespan does. `rag_indexes`: the
    indexes a request's `retrieval` may name (hyperowl.serve.retrieval)."""
    metrics = ServerMetrics()
    media_cache = MediaCache(settings.media_cache_bytes) if settings.media_cache_bytes else None
    if media_cache is not None:
        metrics.watch_media_cache(media_cache)
    scheduler = Scheduler(
        model,
        decode=lambda ids: processor.decode(ids, skip_special_tokens=True),
        stop_ids=processor.stop_token_ids,
        metrics=metrics,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        vision_chunk_size=settings.vision_chunk_size,
        on_death=exit_process,
        media_cache=media_cache,
    )
    decode_gate = DecodeGate(settings.max_concurrent_decodes, settings.max_pixels_in_flight)
    metrics.queue_depth.set_function(lambda: scheduler.queued)
    metrics.batch_size.set_function(lambda: scheduler.active)
    max_context = model.config.max_position_embeddings
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(
        title="hyperowl",
        description="OpenAI-compatible mPLUG-Owl3 server",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_middleware(GuardMiddleware, settings=settings, metrics=metrics)
    install_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    async def check_api_key(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")

    authorized = [Depends(check_api_key)]

    async def watch(job: Job, request: Request) -> AsyncIterator[Event]:
        """The job's events up to its last one; stops (and cancels the job) when the client goes away."""
        getter: asyncio.Future[Event] | None = None
        last_check = time.monotonic()
        try:
            while True:
                if getter is None:
                    getter = asyncio.ensure_future(job.events.get())
                done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
                if getter in done:
                    event, getter = getter.result(), None
                    yield event
                    if not isinstance(event, Prefilled | TextDelta):
                        return
                if time.monotonic() - last_check >= DISCONNECT_POLL_S:
                    last_check = time.monotonic()
                    if await request.is_disconnected():
                        return
                    if not scheduler.alive:
                        raise overloaded("the scheduler has stopped", "scheduler_stopped")
        finally:
            if getter is not None:
                getter.cancel()
            job.cancel()

    async def stream(events: AsyncIterator[Event], ident: str, model_name: str, include_usage: bool) -> AsyncIterator[str]:
        now = int(time.time())
        yield chunk(ident, now, model_name, {"role": "assistant", "content": ""})
        try:
            async with aclosing(events):
                async for event in events:
                    if isinstance(event, TextDelta):
                        yield chunk(ident, now, model_name, {"content": event.text}, logprobs=event.logprobs)
                    elif isinstance(event, Finished):
                        yield chunk(ident, now, model_name, {}, event.finish_reason, usage(event), event.logprobs)
                        if include_usage:
                            yield chunk(ident, now, model_name, None, usage_=usage(event))
                    elif isinstance(event, Failed):
                        yield sse(event.error.body())
        except ApiError as exc:
            yield sse(exc.body())
        yield sse("[DONE]")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/health")
    async def health() -> JSONResponse:
        body: dict[str, Any] = {
            "status": "ok" if scheduler.alive else "stopped",
            "model": settings.model_name,
            "queued": scheduler.queued,
            "active": scheduler.active,
        }
        return JSONResponse(body, status_code=200 if scheduler.alive else 503)

    @app.get("/metrics", dependencies=authorized)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=authorized)
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": settings.model_name, "object": "model", "created": created, "owned_by": "hyperowl"}],
        }

    @app.post("/v1/chat/completions", dependencies=authorized, response_model=None)
    async def chat_completions(request: Request) -> Response:
        body = parse_request(await request.body())
        if body.model is not None and body.model != settings.model_name:
            raise ApiError(
                404,
                f"the model {body.model!r} does not exist; this server has {settings.model_name!r}",
                param="model",
                code="model_not_found",
            )
        scheduler.check_room()  # before any media is fetched or decoded
        retrieved = None
        if body.retrieval is not None:
            body, retrieved = await apply_retrieval(body, rag_indexes or {}, settings)
        # retrieval prompts show every picture as one global view, as `hyperowl rag ask` does
        cut = None if retrieved is None else False
        job = await prepare_job(body, processor, settings, max_context, model.generation_config, decode_gate, media_cache, cut)
        scheduler.submit(job)
        metrics.prompt_tokens.inc(job.prompt_tokens)
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            # The answer starts once the prompt is in the model, so media that fail to decode get their 4xx.
            events = watch(job, request)
            started = await anext(events, None)
            if not isinstance(started, Prefilled):
                await events.aclose()
                if isinstance(started, Failed):
                    raise started.error
                return Response(status_code=499)  # the client went away; nobody reads this
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                stream(events, ident, settings.model_name, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        pieces, logprobs = [], None if job.top_logprobs is None else []
        async with aclosing(watch(job, request)) as events:
            async for event in events:
                if isinstance(event, TextDelta | Finished) and logprobs is not None:
                    logprobs += event.logprobs or []
                if isinstance(event, TextDelta):
                    pieces.append(event.text)
                elif isinstance(event, Finished):
                    body = completion_body(ident, int(time.time()), settings.model_name, "".join(pieces), event, logprobs)
                    return JSONResponse(body if retrieved is None else add_citations(body, retrieved))
                elif isinstance(event, Failed):
                    raise event.error
        return Response(status_code=499)  # the client went away; nobody reads this

    return app

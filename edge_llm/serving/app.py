"""The Starlette app: OpenAI's routes over the engine.

Each request is checked (``schema``), tokenized off the event loop, submitted to the engine and answered
from the events its job emits: as one JSON object, or as server-sent events ending in ``data: [DONE]``.
A client that goes away (the connection closes) cancels its job at the engine's next step. Every error a
request can cause is OpenAI's error object with a 4xx status; anything else is a 500 and the server keeps
serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import EdgeLLMError
from ..generation.sampling_defaults import SamplingSettings
from .engine import Engine
from .errors import RequestError, error_body
from .job import Failed, Finished, Job, Piece
from .openai_format import Reply, model_list, sse
from .schema import Request, parse_chat, parse_completion

log = logging.getLogger(__name__)

MAX_BODY = 4 << 20  # bytes; a chat that fills a 128k context is ~0.5 MB of text
GONE = object()  # the client closed its connection


@dataclass(frozen=True)
class ServedModel:
    id: str  # the name /v1/models lists and requests use
    aliases: frozenset[str]  # other names a request may use for it (the reference given to `serve`)
    settings: SamplingSettings  # the model's sampling defaults, as `run` uses them
    context: int  # tokens one conversation may hold
    default_max_tokens: int  # when a request names none


class Api:
    def __init__(self, engine: Engine, tokenizer, served: ServedModel, api_key: str | None, max_body: int) -> None:
        self.engine, self.tokenizer, self.served = engine, tokenizer, served
        self.api_key, self.max_body = api_key, max_body
        self.started = int(time.time())

    # -- routes --------------------------------------------------------------------------------
    async def health(self, request: HttpRequest) -> Response:
        broken = self.engine.broken
        return JSONResponse({"status": "error" if broken else "ok", "model": self.served.id,
                             **({"error": broken} if broken else {}), **self.engine.snapshot()},
                            status_code=503 if broken else 200)

    async def models(self, request: HttpRequest) -> Response:
        self._authorize(request)
        return JSONResponse(model_list(self.served.id, self.started))

    async def model(self, request: HttpRequest) -> Response:
        self._authorize(request)
        name = request.path_params["name"]
        if name != self.served.id and name not in self.served.aliases:
            raise self._unknown_model(name)
        return JSONResponse(model_list(self.served.id, self.started)["data"][0])

    def _unknown_model(self, name: str) -> RequestError:
        return RequestError(f"The model '{name}' does not exist; this server serves '{self.served.id}'.",
                            status=404, param="model", code="model_not_found")

    async def chat(self, request: HttpRequest) -> Response:
        self._authorize(request)
        req = parse_chat(await self._json(request))
        prompt = await self._tokens(self.tokenizer.encode_chat, req.messages)
        return await self._answer(request, req, prompt, "chat")

    async def completions(self, request: HttpRequest) -> Response:
        self._authorize(request)
        req = parse_completion(await self._json(request), self.tokenizer.id_limit)
        prompt = req.prompt if isinstance(req.prompt, list) else await self._tokens(self.tokenizer.encode, req.prompt)
        return await self._answer(request, req, prompt, "text")

    # -- checks --------------------------------------------------------------------------------
    def _authorize(self, request: HttpRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise RequestError("Incorrect or missing API key: send 'Authorization: Bearer KEY' with the key the "
                               "server was started with.", status=401, code="invalid_api_key")

    async def _json(self, request: HttpRequest) -> dict:
        length = request.headers.get("content-length", "")
        too_large = RequestError(f"the request body is over {self.max_body:,} bytes", status=413,
                                 code="request_too_large")
        if length.isdigit() and int(length) > self.max_body:
            raise too_large
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.max_body:
                raise too_large
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise RequestError("the request body must be a JSON object", code="invalid_json")
        return data

    async def _tokens(self, encode, value) -> list[int]:
        try:
            return await run_in_threadpool(encode, value)
        except EdgeLLMError as e:  # a chat template refusing the conversation
            raise RequestError(str(e), param="messages", code="invalid_value") from None

    def _job(self, req: Request, prompt: list[int], emit) -> Job:
        served = self.served
        if req.model is not None and req.model != served.id and req.model not in served.aliases:
            raise self._unknown_model(req.model)
        if not prompt:
            raise RequestError("the prompt is empty", param="prompt", code="invalid_value")
        if len(prompt) >= served.context:
            raise RequestError(f"This model's context holds {served.context} tokens, but the prompt is "
                               f"{len(prompt)} tokens; shorten it (or start the server with a larger --context).",
                               param="messages" if req.messages is not None else "prompt",
                               code="context_length_exceeded")
        try:
            params = served.settings.override("request", **req.sampling).params(req.seed)
        except ValueError as e:
            raise RequestError(str(e), code="invalid_value") from None
        max_tokens = min(req.max_tokens or served.default_max_tokens, served.context - len(prompt))
        return Job(prompt, params, max_tokens, emit, stops=req.stops, top_logprobs=req.top_logprobs,
                   ignore_eos=req.ignore_eos)

    # -- answering -----------------------------------------------------------------------------
    async def _answer(self, request: HttpRequest, req: Request, prompt: list[int], kind: str) -> Response:
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event) -> None:  # on the engine's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed: the server is gone
                pass

        job = self._job(req, prompt, emit)
        self.engine.submit(job)
        watcher = asyncio.create_task(self._watch(request, job, events))
        reply = Reply(kind, self.served.id)
        if req.stream:
            return StreamingResponse(self._stream(job, events, reply, req, watcher), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await self._collect(events, reply, req)
        finally:
            watcher.cancel()
            self.engine.cancel(job)

    async def _watch(self, request: HttpRequest, job: Job, events: asyncio.Queue) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.engine.cancel(job)
        events.put_nowait(GONE)

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    async def _collect(self, events: asyncio.Queue, reply: Reply, req: Request) -> Response:
        text, logprobs = [], []
        while True:
            event = await events.get()
            if event is GONE:
                return Response(status_code=499)  # nobody is listening any more
            if isinstance(event, Piece):
                text.append(event.text)
                if event.logprob is not None:
                    logprobs.append(event.logprob)
            elif isinstance(event, Failed):
                return JSONResponse(error_body(event.message, "server_error"), status_code=500)
            elif isinstance(event, Finished):
                wanted = logprobs if req.top_logprobs is not None else None
                return JSONResponse(reply.whole("".join(text), event, wanted, self._token_text))

    async def _stream(self, job: Job, events: asyncio.Queue, reply: Reply, req: Request, watcher: asyncio.Task):
        usage = req.include_usage
        try:
            if reply.kind == "chat":
                yield sse(reply.chunk("", None, self._token_text, first=True, include_usage=usage))
            while True:
                event = await events.get()
                if event is GONE:
                    return
                if isinstance(event, Piece):
                    logprobs = [event.logprob] if event.logprob is not None else None
                    if event.text or logprobs:
                        yield sse(reply.chunk(event.text, logprobs, self._token_text, include_usage=usage))
                elif isinstance(event, Failed):
                    yield sse(error_body(event.message, "server_error"))
                    break
                elif isinstance(event, Finished):
                    yield sse(reply.chunk(None, None, self._token_text, event.finish_reason, include_usage=usage))
                    if usage:
                        yield sse(reply.usage_chunk(event))
                    break
            yield sse("[DONE]")
        finally:
            watcher.cancel()
            self.engine.cancel(job)


async def _request_error(request: HttpRequest, exc: RequestError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: HttpRequest, exc: HTTPException) -> Response:
    detail = "no such route" if exc.status_code == 404 else str(exc.detail)
    return JSONResponse(error_body(f"{request.method} {request.url.path}: {detail}", "invalid_request_error"),
                        status_code=exc.status_code)


async def _server_error(request: HttpRequest, exc: Exception) -> Response:
    log.error("%s %s failed: %r", request.method, request.url.path, exc)
    return JSONResponse(error_body("the server failed to answer this request", "server_error"), status_code=500)


def build_app(engine: Engine, tokenizer, served: ServedModel, *, api_key: str | None = None,
              max_body: int = MAX_BODY) -> Starlette:
    api = Api(engine, tokenizer, served, api_key, max_body)
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{name:path}", api.model, methods=["GET"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
    ]
    handlers = {RequestError: _request_error, HTTPException: _http_error, Exception: _server_error}
    return Starlette(routes=routes, exception_handlers=handlers)

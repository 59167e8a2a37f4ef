"""The FastAPI app: OpenAI's `/v1/completions`, `/v1/chat/completions`, `/v1/models`, and `/health`, `/metrics`.

Requests go to the Scheduler through a `Worker` thread; each request's events reach its handler on the event
loop through `loop.call_soon_threadsafe`, so no handler ever blocks the loop. A client that goes away
(streaming or not) cancels its request, which frees its slot and pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from delta_jax import scheduler as scheduling
from delta_jax.config import ConfigError
from delta_jax.server import protocol
from delta_jax.server.protocol import APIError
from delta_jax.server.worker import Worker, log


class _Events:
    """A request's `events` (the scheduler calls `put` from its thread), handed to an asyncio queue on `loop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, item) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class _Stream(StreamingResponse):
    """Server-sent events that call `on_close` however the response ends (finished, or the client left)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
            await self.body_iterator.aclose()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _failure(kind: str, detail: str) -> APIError:
    """The error of a request that ended without finishing: refused by the scheduler (it cannot run here: 400)
    or failed with the scheduler (500)."""
    if kind == "refused":
        return APIError(400, detail, param="prompt")
    return APIError(500, detail, kind="server_error")


def prometheus(m: dict) -> str:
    """Scheduler.metrics() in Prometheus' text format."""
    rows = [("waiting_requests", "gauge", "requests queued for a slot and pages", m["waiting"]),
            ("running_requests", "gauge", "requests holding a decode slot", m["running"]),
            ("slots", "gauge", "decode slots", m["slots"]),
            ("kv_pages_in_use", "gauge", "KV cache pages held by requests", m["pages_in_use"]),
            ("kv_pages_total", "gauge", "KV cache pages that requests can hold", m["pages_total"]),
            ("kv_pages_peak", "gauge", "most KV cache pages held at once", m["peak_pages_in_use"]),
            ("kv_page_size", "gauge", "tokens per KV cache page", m["page_size"]),
            ("tokens_per_second", "gauge", "tokens generated per second over the last 10 s",
             m["tokens_per_second"]),
            ("requests_total", "counter", "requests accepted", m["requests"]),
            ("requests_finished_total", "counter", "requests finished", m["finished"]),
            ("generated_tokens_total", "counter", "tokens generated", m["generated_tokens"]),
            ("prompt_tokens_total", "counter", "prompt tokens prefilled", m["prefill_tokens"])]
    out = []
    for name, kind, text, value in rows:
        out += [f"# HELP delta_jax_{name} {text}", f"# TYPE delta_jax_{name} {kind}", f"delta_jax_{name} {value}"]
    out += ["# HELP delta_jax_time_to_first_token_seconds time to first token (recent requests)",
            "# TYPE delta_jax_time_to_first_token_seconds gauge"]
    for q, v in ((0.5, m["ttft_p50_seconds"]), (0.99, m["ttft_p99_seconds"])):
        out.append(f'delta_jax_time_to_first_token_seconds{{quantile="{q}"}} {math.nan if v is None else v}')
    return "\n".join(out) + "\n"


def create_app(engine, scheduler: scheduling.Scheduler, *, model_name: str, warmup: bool = True) -> FastAPI:
    """An OpenAI-compatible app serving `engine` through `scheduler` under the name `model_name`.

    Its lifespan compiles the first shapes (`warmup`), then starts the worker thread (and stops it at shutdown).
    """
    worker = Worker(scheduler)
    spec = scheduler.spec
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if warmup:
            seconds = await asyncio.to_thread(worker.warmup)
            log(f"warm-up: prefill and a {scheduler.chunk}-step decode loop for {spec.slots} slots ready "
                 f"in {seconds:.1f}s")
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="delta-jax", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return JSONResponse(APIError(500, f"{type(e).__name__}: {e}".splitlines()[0], kind="server_error").body(),
                            status_code=500)

    def refused(e: ConfigError, chat: bool, param: Optional[str] = None) -> APIError:
        """The 400 for a request the engine refuses; `param` (else the error's own) names the field, a chat's
        prompt being its `messages`."""
        param = param or e.param
        return APIError(400, str(e), param="messages" if chat and param == "prompt" else param)

    def encode(params: protocol.Params, chat: bool) -> list[int]:
        """Token ids of a completion prompt, or of the messages through the chat template."""
        tok = engine.tokenizer
        try:
            if not chat:
                return engine.encode(params.prompt)
            if tok is None:
                raise ConfigError("this model has no tokenizer: use /v1/completions with token ids")
            try:
                text = tok.apply_chat_template(params.prompt, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # noqa: BLE001 - the template's own refusal (jinja raises it)
                raise ConfigError(f"the chat template rejects these messages: {e}".splitlines()[0])
            return engine.encode(tok(text, add_special_tokens=False)["input_ids"])
        except ConfigError as e:
            raise refused(e, chat, "prompt")

    async def generate(request: Request, chat: bool):
        body = protocol.parse_body(await request.body())
        params = protocol.chat_params(body) if chat else protocol.completion_params(body)
        if params.model is not None and params.model != model_name:
            raise APIError(404, f"model {params.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        ids = await asyncio.to_thread(encode, params, chat)
        events = _Events(asyncio.get_running_loop())
        req = scheduling.Request(
            prompt=ids, max_tokens=worker.room(len(ids)) if params.max_tokens is None else params.max_tokens,
            temperature=params.temperature, top_p=params.top_p, seed=params.seed, stop=params.stop, events=events)
        try:
            worker.submit(req)
        except ConfigError as e:
            raise refused(e, chat)
        except RuntimeError as e:
            raise APIError(503, str(e), kind="server_error")
        reply = protocol.Reply(chat, req.id, model_name)
        if params.stream:
            return _Stream(stream(reply, events.queue, req, params.include_usage), on_close=lambda: cancel(req))
        return await complete(request, reply, events.queue, req)

    def cancel(req: scheduling.Request) -> None:
        if not req.done:
            worker.cancel(req.id)

    async def stream(reply: protocol.Reply, events: asyncio.Queue, req: scheduling.Request, include_usage: bool):
        if reply.chat:
            yield reply.chunk(role=True, include_usage=include_usage)
        while True:
            kind, *rest = await events.get()
            if kind == "token":
                yield reply.chunk(rest[1], include_usage=include_usage)
                continue
            if kind == "done":
                yield reply.chunk(None, rest[0], include_usage=include_usage)
                if include_usage:
                    yield reply.chunk(usage=protocol.usage(len(req.prompt), len(req.tokens)), include_usage=True)
            else:
                yield f"data: {json.dumps(_failure(kind, rest[0]).body())}\n\n"
            yield protocol.DONE
            return

    async def complete(request: Request, reply: protocol.Reply, events: asyncio.Queue, req: scheduling.Request):
        async def outcome():
            while True:
                event = await events.get()
                if event[0] != "token":
                    return event

        done = asyncio.ensure_future(outcome())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            finished, _ = await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not done.done():
                done.cancel()
                cancel(req)
        if done not in finished:
            return JSONResponse(APIError(499, "the client closed the connection").body(), status_code=499)
        kind, detail = done.result()
        if kind != "done":
            raise _failure(kind, detail)
        return JSONResponse(reply.full(req.text, detail, len(req.prompt), len(req.tokens)))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "delta-jax", "max_model_len": spec.max_tokens}]}

    @app.get("/health")
    async def health():
        if worker.error is not None:
            raise APIError(503, f"the scheduler stopped after an error: {worker.error}", kind="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus(scheduler.metrics()), media_type="text/plain; version=0.0.4")

    return app

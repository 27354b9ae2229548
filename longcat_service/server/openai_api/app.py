"""The FastAPI application: routes, auth, body limit, OpenAI error objects."""

from __future__ import annotations

from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from longcat_service import __version__
from longcat_service.server.auth import ApiKeyInterceptor
from longcat_service.server.metrics import OUTCOMES
from longcat_service.server.openai_api.chat import create_chat_completion
from longcat_service.server.openai_api.completions import create_completion
from longcat_service.server.openai_api.errors import (
    ApiError,
    api_error_handler,
    error_body,
    http_error_handler,
    invalid,
    validation_error_handler,
)
from longcat_service.server.openai_api.generation import HttpContext
from longcat_service.server.openai_api.prompts import render_chat
from longcat_service.server.openai_api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)

MAX_BODY_BYTES = 16 * 1024 * 1024  # the gRPC server's max_receive_message_length


class BodyLimit:
    """413 as an OpenAI error object for a body over max_bytes: at once from Content-Length, or while a chunked body
    is read (the endpoint's body parsing passes the HTTPException to the error handler). Starlette's own limiter
    answers in plain text."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse(error_body(413, f"request body of {int(length)} bytes is over the limit of "
                                                    f"{self.max_bytes}").model_dump(), status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise StarletteHTTPException(413)
            return message

        await self.app(scope, limited_receive, send)


def _playground_html() -> str:
    return resources.files("longcat_service.server.openai_api").joinpath("static/playground.html").read_text("utf-8")


def create_app(ctx: HttpContext, api_keys: list[str] | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    checker = ApiKeyInterceptor(api_keys) if api_keys else None

    def authorize(request: Request) -> None:
        if checker is None:
            return
        scheme, _, token = (request.headers.get("authorization") or "").strip().partition(" ")
        # the scheme is case-insensitive (RFC 9110); the key comparison is the gRPC interceptor's, constant time
        if scheme.lower() != "bearer" or not checker.is_authorized([("authorization", f"Bearer {token.strip()}")]):
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)", outcome="unauthenticated",
                           headers={"WWW-Authenticate": "Bearer"}, code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != ctx.options.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {ctx.options.model_name!r}",
                           "model", code="model_not_found")

    def ready() -> None:
        if not ctx.state.ready:
            raise ApiError(503, "server is loading")

    app = FastAPI(title="longcat-service", version=__version__, docs_url="/docs", redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    auth = [Depends(authorize)]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        return HTMLResponse(_playground_html())

    @app.get("/health")
    async def health():
        if ctx.state.accepting and ctx.state.engine_healthy():
            return {"status": "ok"}
        status = "draining" if ctx.state.draining else "loading" if not ctx.state.ready else "unhealthy"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> ModelList:
        ready()
        return ModelList(data=[ModelCard(id=ctx.options.model_name, max_model_len=ctx.engine.max_model_len)])

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def model(model_id: str) -> ModelCard:
        ready()
        check_model(model_id)
        return ModelCard(id=ctx.options.model_name, max_model_len=ctx.engine.max_model_len)

    async def generate(create, body, request: Request):
        try:
            ctx.check_serving()
            check_model(body.model)
            return await create(ctx, body, request.receive)
        except ApiError as e:
            if not e.recorded and e.outcome in OUTCOMES:  # the same counter as the gRPC calls
                ctx.metrics.requests.labels(e.outcome).inc()
            raise

    @app.post("/v1/chat/completions", dependencies=auth, response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await generate(create_chat_completion, body, request)

    @app.post("/v1/completions", dependencies=auth, response_model=None)
    async def completions(body: CompletionRequest, request: Request):
        return await generate(create_completion, body, request)

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeRequest):
        ready()
        check_model(body.model)
        tok = ctx.engine.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise invalid("prompt", "set one of prompt or messages")
        if tok is None:
            raise invalid("prompt" if body.messages is None else "messages", "this model has no tokenizer")
        if body.messages is not None:
            rendered = render_chat(ChatCompletionRequest(model=ctx.options.model_name, messages=body.messages),
                                   tok, ctx.engine.max_model_len)
            ids = rendered.token_ids
        else:
            ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": ctx.engine.max_model_len}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeRequest):
        ready()
        check_model(body.model)
        tok = ctx.engine.tokenizer
        if tok is None:
            raise invalid("tokens", "this model has no tokenizer")
        vocab = ctx.vocab_size()
        bad = next((i for i, t in enumerate(body.tokens) if not 0 <= t < vocab), None)
        if bad is not None:
            raise invalid(f"tokens[{bad}]", f"{body.tokens[bad]} is outside the vocabulary [0, {vocab})")
        return {"prompt": tok.decode(body.tokens, skip_special_tokens=False)}

    return app

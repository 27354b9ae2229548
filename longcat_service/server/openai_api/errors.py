"""Errors as OpenAI error objects: `{"error": {"message", "type", "param", "code"}}` with the matching status."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from longcat_service.server.openai_api.protocol import ErrorBody, ErrorResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "internal_server_error", 503: "service_unavailable_error",
          504: "timeout_error"}


class ApiError(Exception):
    """Ends a request with an OpenAI error object; `outcome` labels it in longcat_requests_total."""

    def __init__(self, status: int, message: str, param: str | None = None, *, outcome: str = "error",
                 headers: dict[str, str] | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.outcome = status, message, param, outcome
        self.headers, self.code = headers or {}, code
        self.recorded = False  # counted in longcat_requests_total already (by the Generation that raised it)

    def body(self) -> ErrorResponse:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorBody(message=message, type=_TYPES.get(status, "api_error"), param=param,
                                         code=code if code is not None else status))


def invalid(param: str, message: str) -> ApiError:
    """400 naming the parameter, its message in the gRPC style `param: reason`."""
    return ApiError(400, f"{param}: {message}", param, outcome="invalid")


def _param_of(loc: tuple) -> str:
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not _is_union_tag(p):
            out += f".{p}" if out else str(p)
    return out or "body"


def _is_union_tag(p: str) -> bool:
    # pydantic names the union member it tried (`str`, `list[int]`, `NamedToolChoice`, `function-after[...]`)
    return p[:1].isupper() or "[" in p or p in {"str", "int", "float", "bool", "list", "dict", "none"}


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    # a union field (`content: str | list[TextPart]`) reports one error per member; the member whose type the value
    # has fails for the real reason, the others only for their type: name the real reason
    reasons = [e for e in errors if not (str(e.get("type", "")).endswith("_type")
                                         and any(isinstance(p, str) and _is_union_tag(p) for p in e.get("loc", ())))]
    first = (reasons or errors or [{"loc": (), "msg": "invalid request"}])[0]
    if first.get("type") == "json_invalid":
        return invalid("body", f"not valid JSON ({first.get('msg')})").response()
    param = _param_of(tuple(first.get("loc", ())))
    if param == "body" and first.get("type") == "missing":
        return invalid("body", "a JSON object body is required").response()
    return invalid(param, str(first.get("msg", "invalid value"))).response()


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = {404: f"no route {request.method} {request.url.path}", 405: f"method {request.method} not allowed",
               413: "request body too large"}.get(exc.status_code, str(exc.detail))
    return JSONResponse(error_body(exc.status_code, message).model_dump(), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()

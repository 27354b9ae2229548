"""API-key check as a grpc.aio server interceptor: `authorization: Bearer <key>` metadata (the scheme in any
case, as RFC 6750 allows).

Health checks stay open (load balancers and kubelets probe without credentials)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

import grpc

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def _digest(key: str) -> bytes:
    # Compare fixed-length digests so that neither the timing nor the length of a key leaks.
    return hashlib.sha256(key.encode()).digest()


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_keys: Iterable[str]):
        keys = list(api_keys)
        if not keys or any(not k for k in keys):
            raise ValueError("ApiKeyInterceptor needs at least one API key, and no empty ones")
        self._digests = [_digest(k) for k in keys]

    def is_authorized(self, metadata) -> bool:
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        if not isinstance(header, str):
            return False
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            return False
        presented = _digest(credentials.strip())
        matched = False
        for digest in self._digests:  # no early exit: constant time in which key matched
            matched |= hmac.compare_digest(presented, digest)
        return matched

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        if self.is_authorized(handler_call_details.invocation_metadata):
            return handler
        return _deny(handler)


async def _unauthenticated(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key (authorization: Bearer <key>)")


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that rejects the call."""
    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_unauthenticated, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_unauthenticated, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_unauthenticated, **kwargs)
    return grpc.stream_stream_rpc_method_handler(_unauthenticated, **kwargs)

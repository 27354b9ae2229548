"""Typed exceptions, one per gRPC status code the service uses."""

from __future__ import annotations

import grpc


class LongCatError(Exception):
    """Base class: `code` is the grpc.StatusCode, `details` the server's message."""

    code: grpc.StatusCode | None = None

    def __init__(self, details: str, code: grpc.StatusCode | None = None, partial=None):
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code
        self.partial = partial  # GenerationResult streamed before the failure (streaming calls only)


class InvalidArgumentError(LongCatError):
    """The request is invalid; `field` names the offending request field (e.g. `sampling.top_p`)."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, details: str, code=None, partial=None):
        super().__init__(details, code, partial)
        head, sep, _ = details.partition(": ")
        self.field = head if sep and " " not in head else None


class ResourceExhaustedError(LongCatError):
    """The server is overloaded; `retry_after_s` is its hint (None when it gave none)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, details: str, code=None, partial=None, retry_after_s: float | None = None):
        super().__init__(details, code, partial)
        self.retry_after_s = retry_after_s


class DeadlineExceededError(LongCatError):
    """The deadline passed; `partial` holds the output produced before it."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnauthenticatedError(LongCatError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(LongCatError):
    code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(LongCatError):
    """Retryable: the server is starting, draining, or aborted a stream whose reader stalled."""

    code = grpc.StatusCode.UNAVAILABLE


class CancelledError(LongCatError):
    code = grpc.StatusCode.CANCELLED


class AlreadyExistsError(LongCatError):
    code = grpc.StatusCode.ALREADY_EXISTS


class NotFoundError(LongCatError):
    code = grpc.StatusCode.NOT_FOUND


class UnimplementedError(LongCatError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(LongCatError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE = {cls.code: cls for cls in (
    InvalidArgumentError, ResourceExhaustedError, DeadlineExceededError, UnauthenticatedError,
    PermissionDeniedError, UnavailableError, CancelledError, AlreadyExistsError, NotFoundError,
    UnimplementedError, InternalError,
)}


def _metadata_value(metadata, key: str) -> str | None:
    for item in metadata or ():
        k, v = (item.key, item.value) if hasattr(item, "key") else item
        if k == key:
            return v.decode() if isinstance(v, bytes) else v
    return None


def retry_after_s(trailing_metadata) -> float | None:
    """The server's `retry-after-ms` hint in seconds, or None."""
    retry_ms = _metadata_value(trailing_metadata, "retry-after-ms")
    return float(retry_ms) / 1000.0 if retry_ms and retry_ms.isdigit() else None


def from_rpc_error(code: grpc.StatusCode, details: str | None, trailing_metadata=None, partial=None) -> LongCatError:
    """Map a failed call (code, details, trailing metadata) to its typed exception."""
    details = details or code.name
    cls = _BY_CODE.get(code, LongCatError)
    if cls is ResourceExhaustedError:
        return ResourceExhaustedError(details, code, partial, retry_after_s=retry_after_s(trailing_metadata))
    return cls(details, code, partial)

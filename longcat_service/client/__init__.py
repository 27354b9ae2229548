"""Python SDK for the longcat-service gRPC API (imports grpc and the generated code only, no torch)."""

from longcat_service.client.async_client import AsyncGenerationStream, AsyncLongCatClient
from longcat_service.client.errors import (
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    LongCatError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from longcat_service.client.retry import NO_RETRY, RetryPolicy
from longcat_service.client.sync_client import GenerationStream, LongCatClient
from longcat_service.client.types import (
    Completion,
    GenerationChunk,
    GenerationResult,
    Timings,
    TokenLogprob,
    Usage,
)

__all__ = [
    "AlreadyExistsError", "AsyncGenerationStream", "AsyncLongCatClient", "CancelledError", "Completion",
    "DeadlineExceededError", "GenerationChunk", "GenerationResult", "GenerationStream", "InternalError",
    "InvalidArgumentError", "LongCatClient", "LongCatError", "NO_RETRY", "NotFoundError", "PermissionDeniedError",
    "ResourceExhaustedError", "RetryPolicy", "Timings", "TokenLogprob", "UnauthenticatedError", "UnavailableError",
    "UnimplementedError", "Usage",
]

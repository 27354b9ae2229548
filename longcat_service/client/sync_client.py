"""Blocking client: LongCatClient."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from longcat_service.client.channel import ChannelConfig
from longcat_service.client.errors import from_rpc_error
from longcat_service.client.request import generate_request, tokenize_request
from longcat_service.client.retry import RetryPolicy, retry_pause
from longcat_service.client.types import GenerationChunk, GenerationResult, ResultBuilder, chunk_from_proto
from longcat_service.server.generated import longcat_pb2 as pb
from longcat_service.server.generated import longcat_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT_S = 600.0
_UNSET = object()


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


class _StreamState:
    """State shared by GenerationStream and AsyncGenerationStream; subclasses define `_iterate`."""

    def __init__(self, stub, request: pb.GenerateRequest, metadata, timeout_s: float | None, retry: RetryPolicy):
        self._stub, self._request, self._metadata, self._retry = stub, request, metadata, retry
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._builder = ResultBuilder()
        self._call = None
        self._closed = False
        self._iterator = self._iterate()

    @property
    def result(self) -> GenerationResult:
        return self._builder.result


class GenerationStream(_StreamState):
    """Iterator of GenerationChunk and a context manager: leaving the `with` block (or close())
    cancels the call, which aborts the request on the server. `result` is everything received."""

    def __iter__(self):
        return self

    def __next__(self) -> GenerationChunk:
        return next(self._iterator)

    def _iterate(self):
        attempt = 0
        while True:
            self._call = self._stub.Generate(self._request, timeout=_remaining(self._deadline),
                                             metadata=self._metadata)
            try:
                for msg in self._call:
                    chunk = chunk_from_proto(msg)
                    self._builder.add(chunk)
                    yield chunk
                return
            except grpc.RpcError as e:
                if self._closed:
                    return
                pause = retry_pause(self._retry, e, attempt, self._builder.num_chunks > 0, _remaining(self._deadline))
                if pause is not None:
                    (self._retry.sleep or time.sleep)(pause)
                    attempt += 1
                    continue
                raise from_rpc_error(e.code(), e.details(), e.trailing_metadata(), self._builder.result) from None

    def close(self) -> None:
        """Cancel the call (no-op once it has finished)."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()

    cancel = close

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ClientBase:
    """The connection settings and stubs that LongCatClient and AsyncLongCatClient share; each opens its kind of
    channel (`_open_channel`)."""

    def __init__(self, address: str = "127.0.0.1:50051", *, api_key: str | None = None, tls: bool | None = None,
                 root_certificates: bytes | str | None = None, client_certificate: bytes | str | None = None,
                 client_key: bytes | str | None = None, timeout: float | None = DEFAULT_TIMEOUT_S,
                 retry: RetryPolicy | None = None, channel_options: Sequence = ()):
        self._config = ChannelConfig(address, tls, root_certificates, client_certificate, client_key, api_key,
                                     tuple(channel_options))
        self.timeout = timeout
        self.retry = retry if retry is not None else RetryPolicy()
        self._channel = self._open_channel(self._config)
        self._stub = pb_grpc.LongCatStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @staticmethod
    def _open_channel(config: ChannelConfig):
        raise NotImplementedError

    def _timeout(self, timeout) -> float | None:
        return self.timeout if timeout is _UNSET else timeout


class LongCatClient(_ClientBase):
    """`LongCatClient("127.0.0.1:50051")`; see ChannelConfig for TLS and API keys.

    `timeout` (seconds, None = none) is the default deadline per call; `retry` applies to UNAVAILABLE and to
    RESOURCE_EXHAUSTED with the server's retry-after-ms hint (waiting at least the hint), for streams only
    before the first chunk."""

    @staticmethod
    def _open_channel(config: ChannelConfig) -> grpc.Channel:
        return config.sync_channel()

    # ---- generation --------------------------------------------------------------------------------
    def generate_stream(self, prompt: str | Sequence[int] | None = None, *, messages: Sequence[Mapping] | None = None,
                        request_id: str | None = None, timeout=_UNSET, timeout_ms: int | None = None,
                        **sampling) -> GenerationStream:
        """Stream a completion of `prompt` (text or token ids) or a chat reply to `messages`.
        Sampling options are the proto SamplingParams fields (max_tokens=, temperature=, stop=, ...)."""
        request = generate_request(prompt, messages=messages, request_id=request_id, timeout_ms=timeout_ms,
                                   **sampling)
        return GenerationStream(self._stub, request, self._config.metadata(), self._timeout(timeout), self.retry)

    def generate(self, prompt=None, **kwargs) -> GenerationResult:
        with self.generate_stream(prompt, **kwargs) as stream:
            for _ in stream:
                pass
            return stream.result

    def chat_stream(self, messages: Sequence[Mapping], **kwargs) -> GenerationStream:
        return self.generate_stream(messages=messages, **kwargs)

    def chat(self, messages: Sequence[Mapping], **kwargs) -> GenerationResult:
        return self.generate(messages=messages, **kwargs)

    # ---- unary calls -------------------------------------------------------------------------------
    def abort(self, *request_ids: str, timeout=_UNSET) -> list[str]:
        response = self._unary(self._stub.Abort, pb.AbortRequest(request_ids=request_ids), timeout)
        return list(response.aborted_request_ids)

    def model_info(self, timeout=_UNSET) -> pb.ModelInfo:
        return self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)

    def tokenize(self, text: str | None = None, *, messages: Sequence[Mapping] | None = None,
                 timeout=_UNSET) -> list[int]:
        return list(self._unary(self._stub.Tokenize, tokenize_request(text, messages), timeout).token_ids)

    def health(self, service: str = "", timeout=_UNSET) -> str:
        """"SERVING", "NOT_SERVING", ... for the whole server ("") or "longcat.v1.LongCat"."""
        response = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def _unary(self, method, request, timeout):
        timeout_s = self._timeout(timeout)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        attempt = 0
        while True:
            try:
                return method(request, timeout=_remaining(deadline), metadata=self._config.metadata())
            except grpc.RpcError as e:
                pause = retry_pause(self.retry, e, attempt, False, _remaining(deadline))
                if pause is not None:
                    (self.retry.sleep or time.sleep)(pause)
                    attempt += 1
                    continue
                raise from_rpc_error(e.code(), e.details(), e.trailing_metadata()) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LongCatClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""asyncio client: AsyncLongCatClient (same surface as LongCatClient, awaitable)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2

from longcat_service.client.channel import ChannelConfig
from longcat_service.client.errors import from_rpc_error
from longcat_service.client.request import generate_request, tokenize_request
from longcat_service.client.retry import retry_pause
from longcat_service.client.sync_client import _UNSET, _ClientBase, _remaining, _StreamState
from longcat_service.client.types import GenerationChunk, GenerationResult, chunk_from_proto
from longcat_service.server.generated import longcat_pb2 as pb


class AsyncGenerationStream(_StreamState):
    """Async iterator of GenerationChunk and an async context manager; leaving it early (or
    `await close()`) cancels the call. `result` is everything received so far."""

    def __aiter__(self):
        return self

    async def __anext__(self) -> GenerationChunk:
        return await self._iterator.__anext__()

    async def _iterate(self):
        attempt = 0
        while True:
            self._call = self._stub.Generate(self._request, timeout=_remaining(self._deadline),
                                             metadata=self._metadata)
            try:
                async for msg in self._call:
                    chunk = chunk_from_proto(msg)
                    self._builder.add(chunk)
                    yield chunk
                return
            except grpc.RpcError as e:
                if self._closed:
                    return
                pause = retry_pause(self._retry, e, attempt, self._builder.num_chunks > 0, _remaining(self._deadline))
                if pause is not None:
                    await (self._retry.sleep or asyncio.sleep)(pause)
                    attempt += 1
                    continue
                raise from_rpc_error(e.code(), e.details(), e.trailing_metadata(), self._builder.result) from None

    async def close(self) -> None:
        self._closed = True
        if self._call is not None:
            self._call.cancel()
        await self._iterator.aclose()

    cancel = close

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class AsyncLongCatClient(_ClientBase):
    """Create inside a running event loop; `async with AsyncLongCatClient(addr) as client: ...` (the arguments of
    LongCatClient)."""

    @staticmethod
    def _open_channel(config: ChannelConfig) -> grpc.aio.Channel:
        return config.aio_channel()

    def generate_stream(self, prompt: str | Sequence[int] | None = None, *, messages: Sequence[Mapping] | None = None,
                        request_id: str | None = None, timeout=_UNSET, timeout_ms: int | None = None,
                        **sampling) -> AsyncGenerationStream:
        request = generate_request(prompt, messages=messages, request_id=request_id, timeout_ms=timeout_ms,
                                   **sampling)
        return AsyncGenerationStream(self._stub, request, self._config.metadata(), self._timeout(timeout),
                                     self.retry)

    async def generate(self, prompt=None, **kwargs) -> GenerationResult:
        async with self.generate_stream(prompt, **kwargs) as stream:
            async for _ in stream:
                pass
            return stream.result

    def chat_stream(self, messages: Sequence[Mapping], **kwargs) -> AsyncGenerationStream:
        return self.generate_stream(messages=messages, **kwargs)

    async def chat(self, messages: Sequence[Mapping], **kwargs) -> GenerationResult:
        return await self.generate(messages=messages, **kwargs)

    async def abort(self, *request_ids: str, timeout=_UNSET) -> list[str]:
        response = await self._unary(self._stub.Abort, pb.AbortRequest(request_ids=request_ids), timeout)
        return list(response.aborted_request_ids)

    async def model_info(self, timeout=_UNSET) -> pb.ModelInfo:
        return await self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)

    async def tokenize(self, text: str | None = None, *, messages: Sequence[Mapping] | None = None,
                       timeout=_UNSET) -> list[int]:
        return list((await self._unary(self._stub.Tokenize, tokenize_request(text, messages), timeout)).token_ids)

    async def health(self, service: str = "", timeout=_UNSET) -> str:
        response = await self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def _unary(self, method, request, timeout):
        timeout_s = self._timeout(timeout)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        attempt = 0
        while True:
            try:
                return await method(request, timeout=_remaining(deadline), metadata=self._config.metadata())
            except grpc.RpcError as e:
                pause = retry_pause(self.retry, e, attempt, False, _remaining(deadline))
                if pause is not None:
                    await (self.retry.sleep or asyncio.sleep)(pause)
                    attempt += 1
                    continue
                raise from_rpc_error(e.code(), e.details(), e.trailing_metadata()) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncLongCatClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

"""Assemble the gRPC server: LongCat service, health, reflection, auth, TLS, metrics; start and drain."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from longcat_service.server.admission import AdmissionController
from longcat_service.server.auth import ApiKeyInterceptor
from longcat_service.server.generated import longcat_pb2 as pb
from longcat_service.server.generated import longcat_pb2_grpc as pb_grpc
from longcat_service.server.health import SERVICE_NAME, ServingState
from longcat_service.server.malformed import MalformedBodyInterceptor
from longcat_service.server.metrics import ServerMetrics
from longcat_service.server.servicer import LongCatServicer, ServerOptions

logger = logging.getLogger(__name__)

_CHANNEL_OPTIONS = [
    # Long generations can send no DATA for a while (a queued request); allow client keepalive pings.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]

# After the drain grace: the statuses of streams cut off reach their clients (SHUTDOWN_FLUSH_S), then the
# transport closes and the engine stops. The process exits within grace + DRAIN_EPSILON_S (documented bound).
SHUTDOWN_FLUSH_S = 0.5
DRAIN_EPSILON_S = 1.0
# How long the cut-off handlers get to send their UNAVAILABLE status (they return as soon as they have; on a
# loaded 2-core machine 0.5 s was not always enough, and gRPC's stop then cancelled them first).
CUTOFF_SEND_S = 0.8
# Calls that finished inside the grace may still be sending their last messages to a slow client: they get what is
# left of the grace for that, up to this.
MAX_TRANSPORT_GRACE_S = 5.0

_GENERATE = f"/{pb.DESCRIPTOR.services_by_name['LongCat'].full_name}/Generate"


@dataclass
class TlsConfig:
    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None  # set: require client certificates signed by it (mTLS)

    @classmethod
    def from_files(cls, cert: str, key: str, client_ca: str | None = None) -> TlsConfig:
        def read(path: str) -> bytes:
            with open(path, "rb") as f:
                return f.read()

        return cls(read(cert), read(key), read(client_ca) if client_ca else None)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    options: ServerOptions = field(default_factory=ServerOptions)
    api_keys: list[str] = field(default_factory=list)
    tls: TlsConfig | None = None
    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port
    # OpenAI-compatible HTTP API (server/openai_api/) on the same loop and engine; None: off, 0: any free port
    http_port: int | None = None
    http_host: str | None = None  # None: the gRPC host
    reasoning_parser: str | None = None  # "longcat": <longcat_think> output -> reasoning_content


class LongCatServer:
    """Listens first (health NOT_SERVING), then starts the engine, then reports SERVING."""

    def __init__(self, engine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.state = ServingState()
        self.admission = AdmissionController(config.options.max_queued_requests, config.options.max_queued_tokens)
        self.metrics = ServerMetrics(engine, self.admission)
        self.servicer = LongCatServicer(engine, self.state, self.admission, self.metrics, config.options)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http = None  # openai_api.server.HttpServer when config.http_port is set
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        cfg = self.config
        # the first interceptor runs first: authentication before the body is looked at
        interceptors = [ApiKeyInterceptor(cfg.api_keys)] if cfg.api_keys else []
        interceptors.append(MalformedBodyInterceptor(on_malformed=self._count_malformed))
        server = grpc.aio.server(interceptors=interceptors, options=_CHANNEL_OPTIONS)
        pb_grpc.add_LongCatServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.state.health, server)
        reflection.enable_server_reflection(
            (pb.DESCRIPTOR.services_by_name["LongCat"].full_name, health_pb2.DESCRIPTOR.services_by_name["Health"]
             .full_name, reflection.SERVICE_NAME), server)
        address = f"{cfg.host}:{cfg.port}"
        self.port = (server.add_secure_port(address, cfg.tls.credentials()) if cfg.tls
                     else server.add_insecure_port(address))
        if self.port == 0:
            raise RuntimeError(f"could not bind {address}")
        await self.state.publish()  # NOT_SERVING while loading
        await server.start()
        self._server = server
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve(cfg.metrics_port, cfg.host)
        if cfg.http_port is not None:
            from longcat_service.server.openai_api.server import http_server_for

            self.http = http_server_for(self)
            await self.http.start()
        logger.info("listening on %s:%d (%s), loading the model", cfg.host, self.port, "TLS" if cfg.tls else "plaintext")
        await self.engine.start()
        await self.state.set_ready(self.engine)
        logger.info("ready: %s serving on port %d", SERVICE_NAME, self.port)
        return self.port

    def _count_malformed(self, method: str) -> None:
        if method == _GENERATE:
            self.metrics.requests.labels("invalid").inc()

    async def stop_while_starting(self, starting: asyncio.Task) -> None:
        """A signal during start() (the model is still loading; health is NOT_SERVING): stop the engine, which
        abandons the load (at once in process mode; a thread-mode load is waited for), wait for start() to give
        up, then stop whatever it had started."""
        await self.engine.shutdown()
        try:
            await starting
        except Exception as e:  # EngineStartCancelled, or the load failed meanwhile: either way we are stopping
            logger.info("start abandoned: %s", e)
        await self.stop()

    async def drain_and_stop(self, grace_s: float) -> bool:
        """Health NOT_SERVING and new calls UNAVAILABLE; wait for in-flight calls up to grace_s; end the streams
        still running with UNAVAILABLE; stop, all within grace_s + DRAIN_EPSILON_S.
        Returns True when every in-flight call finished in time."""
        ends_at = time.monotonic() + grace_s
        finished = await self.state.drain(grace_s)
        flush = SHUTDOWN_FLUSH_S
        if not finished:
            self.servicer.end_running_calls()
            # the cut-off handlers send their UNAVAILABLE status before the transport closes: else gRPC's own stop
            # cancels them first ("Cancelling all calls"), as it did on a loaded machine with the HTTP front running
            t0 = time.monotonic()
            await self.servicer.wait_running_calls(CUTOFF_SEND_S)
            flush = max(SHUTDOWN_FLUSH_S - (time.monotonic() - t0), 0.1)
        left = min(max(ends_at - time.monotonic(), 0.0), MAX_TRANSPORT_GRACE_S)
        await self.stop(transport_grace_s=left + flush)
        return finished

    async def stop(self, transport_grace_s: float = 1.0) -> None:
        await self.state.stop()
        if self._server is not None:
            await self._server.stop(grace=transport_grace_s)
            self._server = None
        if self.http is not None:
            await self.http.stop()
        self.metrics.stop()
        await self.engine.shutdown()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

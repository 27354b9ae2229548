"""uvicorn serving the FastAPI app on the gRPC server's event loop (one process, one loop, one engine), with the
gRPC server's TLS (and mTLS) settings."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import tempfile
from pathlib import Path

import uvicorn

logger = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    # longcat-serve owns SIGTERM/SIGINT (drain both protocols); uvicorn must not take them over
    def capture_signals(self):
        import contextlib

        return contextlib.nullcontext()


class HttpServer:
    def __init__(self, app, host: str, port: int, log_level: str = "warning", tls=None):
        self.app, self.host, self.requested_port = app, host, port
        self.tls = tls  # app.TlsConfig: the gRPC server's certificate (and client CA for mTLS), or None
        self.port: int | None = None
        self._log_level = log_level
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        """Bind (port 0: any free port), start serving, return the bound port."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError as e:
            sock.close()
            raise RuntimeError(f"could not bind HTTP {self.host}:{self.requested_port}: {e}") from e
        sock.listen(2048)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        with tempfile.TemporaryDirectory(prefix="longcat-tls-") as tls_dir:  # uvicorn reads PEM files, once
            config = uvicorn.Config(self.app, lifespan="off", log_level=self._log_level, access_log=False,
                                    timeout_graceful_shutdown=5, server_header=False,
                                    **self._tls_options(Path(tls_dir)))
            config.load()
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="longcat-http")
        while not self._server.started:  # startup is quick: the socket is already bound
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        return self.port

    def _tls_options(self, directory: Path) -> dict:
        if self.tls is None:
            return {}

        def write(name: str, data: bytes) -> str:
            path = directory / name
            path.touch(mode=0o600)
            path.write_bytes(data)
            return str(path)

        options = {"ssl_certfile": write("cert.pem", self.tls.cert_chain), "ssl_keyfile": write("key.pem",
                                                                                                self.tls.private_key)}
        if self.tls.client_ca is not None:
            options.update(ssl_ca_certs=write("ca.pem", self.tls.client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        return options

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 10.0)
        except TimeoutError:
            self._server.force_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
        self._server = None


def http_server_for(server) -> HttpServer:
    """The HTTP server of a LongCatServer, over its engine, serving state, admission, metrics and options."""
    from longcat_service.server.openai_api.app import create_app
    from longcat_service.server.openai_api.generation import HttpContext

    cfg = server.config
    ctx = HttpContext(server.engine, server.state, server.admission, server.metrics, cfg.options,
                      reasoning_parser=cfg.reasoning_parser)
    host = cfg.http_host if cfg.http_host is not None else cfg.host
    return HttpServer(create_app(ctx, cfg.api_keys), host, cfg.http_port, tls=cfg.tls)

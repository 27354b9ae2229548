"""Run a LongCatServer on its own event-loop thread (tests, benchmarks, notebooks).

    with BackgroundServer(lambda: AsyncEngine(EngineArgs()), ServerConfig(port=0)) as server:
        client = LongCatClient(server.address)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from longcat_service.server.app import LongCatServer, ServerConfig


class BackgroundServer:
    def __init__(self, engine_factory: Callable[[], Any], config: ServerConfig | None = None):
        self._engine_factory = engine_factory
        self.config = config if config is not None else ServerConfig(port=0)
        self.server: LongCatServer | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="longcat-server", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.server.port}"

    @property
    def engine(self):
        return self.server.engine

    def start(self, timeout_s: float = 300.0) -> BackgroundServer:
        self._thread.start()

        async def boot():
            self.server = LongCatServer(self._engine_factory(), self.config)
            await self.server.start()

        self.run(boot(), timeout_s)
        return self

    def run(self, coro: Coroutine, timeout_s: float | None = 60.0):
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def submit(self, coro: Coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def stop(self, grace_s: float = 5.0) -> None:
        if self.server is not None:
            try:
                self.run(self.server.drain_and_stop(grace_s), grace_s + 30.0)
            finally:
                self.server = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10.0)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

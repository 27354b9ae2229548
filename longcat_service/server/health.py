"""Serving state: grpc.health.v1 status, in-flight tracking and graceful drain.

"" (overall) and "longcat.v1.LongCat" are NOT_SERVING while the model loads, once draining starts,
and whenever the engine reports itself unhealthy (step loop dead or stuck)."""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health, health_pb2

SERVICE_NAME = "longcat.v1.LongCat"
_SERVICES = ("", SERVICE_NAME)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

logger = logging.getLogger(__name__)


class ServingState:
    def __init__(self):
        self.health = health.aio.HealthServicer()
        self.ready = False
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._engine = None
        self._watch_task: asyncio.Task | None = None

    async def set_ready(self, engine, watch_interval_s: float = 1.0) -> None:
        self._engine = engine
        self.ready = True
        await self.publish()
        self._watch_task = asyncio.create_task(self._watch(watch_interval_s))

    @property
    def accepting(self) -> bool:
        return self.ready and not self.draining

    def request_started(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def request_finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def drain(self, grace_s: float) -> bool:
        """Stop accepting, then wait up to grace_s for in-flight requests; True when all finished."""
        self.draining = True
        await self.publish()
        logger.info("draining: %d request(s) in flight, grace %.1fs", self.in_flight, grace_s)
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
            return True
        except TimeoutError:
            logger.warning("drain grace period over with %d request(s) still in flight", self.in_flight)
            return False

    async def stop(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        await self.health.enter_graceful_shutdown()

    def engine_healthy(self) -> bool:
        return self._engine is not None and self._engine.is_healthy()

    async def publish(self) -> None:
        status = _SERVING if self.accepting and self.engine_healthy() else _NOT_SERVING
        for service in _SERVICES:
            await self.health.set(service, status)

    async def _watch(self, interval_s: float) -> None:
        # Re-publish periodically so a stuck or dead engine turns the probes NOT_SERVING.
        while True:
            await asyncio.sleep(interval_s)
            await self.publish()

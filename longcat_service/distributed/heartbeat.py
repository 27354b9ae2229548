"""Liveness between ranks through the rendezvous TCPStore, independent of the collectives.

Every rank bumps its own counter every `period_s`; each watched rank's counter must move within `timeout_s`
(local clock, so node clocks need not agree). A collective with a dead peer can hang (NCCL) or fail late, and
an idle worker legitimately waits in a broadcast for hours, so neither can tell "dead" from "quiet".
Rank 0 watches every worker; a worker watches rank 0. A store that stops answering (its host died) counts as lost.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import torch.distributed as dist

from longcat_service import envs

logger = logging.getLogger(__name__)

DEFAULT_PERIOD_S = 0.5
DEFAULT_TIMEOUT_S = envs.LONGCAT_TP_HEARTBEAT_TIMEOUT_S  # read at import: the default of Heartbeat(timeout_s)
STARTUP_TIMEOUT_S = 600.0  # before a rank's first beat (spawn + imports can take a while on a busy host)


def job_key(name: str) -> str:
    """A store key private to this attempt (torchrun's agent store outlives restarted workers)."""
    return f"longcat/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{name}"


class Heartbeat:
    def __init__(
        self,
        store: dist.Store,
        rank: int,
        watch: list[int],
        on_lost: Callable[[str], None],
        period_s: float = DEFAULT_PERIOD_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ):
        if not 0 < period_s < timeout_s:
            raise ValueError(f"heartbeat: need 0 < period_s < timeout_s, got {period_s}, {timeout_s}")
        self.store, self.rank, self.watch = store, rank, list(watch)
        self.on_lost = on_lost
        self.period_s, self.timeout_s, self.startup_timeout_s = period_s, timeout_s, startup_timeout_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"longcat-heartbeat-{rank}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=2 * self.period_s + 1)

    def _run(self) -> None:
        last_value = dict.fromkeys(self.watch, 0)
        last_change = dict.fromkeys(self.watch, time.monotonic())
        while not self._stop.is_set():
            try:
                self.store.add(job_key(f"heartbeat/{self.rank}"), 1)
                now = time.monotonic()
                for r in self.watch:
                    value = self.store.add(job_key(f"heartbeat/{r}"), 0)  # add 0: read without a blocking get
                    limit = self.timeout_s if value > 0 else self.startup_timeout_s
                    if value != last_value[r]:
                        last_value[r], last_change[r] = value, now
                    elif now - last_change[r] > limit:
                        return self._lost(f"rank {r} sent no heartbeat for {limit:g}s")
            except Exception as e:  # the store's host is gone (or unreachable)
                return self._lost(f"the rendezvous store stopped answering ({type(e).__name__}: {e})")
            self._stop.wait(self.period_s)

    def _lost(self, reason: str) -> None:
        if not self._stop.is_set():
            self.on_lost(reason)

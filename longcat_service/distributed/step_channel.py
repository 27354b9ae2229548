"""Rank 0 -> all ranks: one pickled message per engine step over the gloo control group.

A message travels in a fixed-size uint8 frame (8-byte length, then the payload), so a typical step is ONE
broadcast; a payload larger than the frame sends its remainder in a second broadcast whose size both sides
know from the length. Pickle is used between the job's own processes only (the control group is not exposed).
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
import torch.distributed as dist

FRAME_BYTES = 64 * 1024  # holds a decode step of a few hundred sequences
_LEN_BYTES = 8


class StepChannel:
    def __init__(self, group: dist.ProcessGroup, src: int = 0, frame_bytes: int = FRAME_BYTES):
        if frame_bytes <= _LEN_BYTES:
            raise ValueError(f"frame_bytes must exceed {_LEN_BYTES}, got {frame_bytes}")
        self.group, self.src, self.frame_bytes = group, src, frame_bytes
        self._frame = torch.zeros(frame_bytes, dtype=torch.uint8)
        self.broadcasts = 0  # counted for tests and metrics

    def send(self, message: Any) -> int:
        """Broadcast message from src (call on src only); returns the payload size in bytes."""
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        size = len(payload)
        head = self.frame_bytes - _LEN_BYTES
        frame = self._frame
        frame[:_LEN_BYTES] = torch.frombuffer(bytearray(size.to_bytes(_LEN_BYTES, "little")), dtype=torch.uint8)
        first = payload[:head]
        if first:
            frame[_LEN_BYTES : _LEN_BYTES + len(first)] = torch.frombuffer(bytearray(first), dtype=torch.uint8)
        self._broadcast(frame)
        if size > head:
            self._broadcast(torch.frombuffer(bytearray(payload[head:]), dtype=torch.uint8))
        return size

    def recv(self) -> Any:
        """Receive the next message (call on every rank but src; blocks until src sends)."""
        frame = self._frame
        self._broadcast(frame)
        size = int.from_bytes(frame[:_LEN_BYTES].numpy().tobytes(), "little")
        head = self.frame_bytes - _LEN_BYTES
        payload = frame[_LEN_BYTES : _LEN_BYTES + min(size, head)].numpy().tobytes()
        if size > head:
            rest = torch.empty(size - head, dtype=torch.uint8)
            self._broadcast(rest)
            payload += rest.numpy().tobytes()
        return pickle.loads(payload)

    def _broadcast(self, tensor: torch.Tensor) -> None:
        dist.broadcast(tensor, src=self.src, group=self.group)
        self.broadcasts += 1

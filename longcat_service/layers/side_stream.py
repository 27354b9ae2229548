"""The shortcut MoE on a side stream (ScMoE's point: its input is known one dense MLP and one attention early, so
its kernels can run beside them). The branch is forked from the current stream and joined before its output is
added; the same ops run in the same order on each stream, so results are bit-identical to running it inline.

Only in CUDA-graph decode steps of <= LONGCAT_MOE_OVERLAP_MAX_TOKENS tokens (default 8; measured on the H200,
benchmarks/RESULTS.md): the many small, latency-bound kernels of either path fill the other's gaps (batch 1: 1.48
vs 1.58 ms per step inline); at batch 64 the expert GEMV already streams at the copy rate and the overlap cost
~1 ms, hence the limit. Not in eager steps (prefill): there it lost (a 4096-token prefill 49.5 vs 45.1 ms inline:
the grouped and the dense GEMMs each fill the GPU) and stalled serving.
Never under tensor parallelism: the MoE's all-reduce would race the main stream's collectives on one communicator.
"""

from __future__ import annotations

import torch

from longcat_service import envs
from longcat_service.distributed.parallel_state import get_tp_size

_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def moe_on_side_stream(x: torch.Tensor) -> bool:
    if not x.is_cuda or get_tp_size() > 1 or not torch.cuda.is_current_stream_capturing():
        return False
    return x.shape[0] <= envs.LONGCAT_MOE_OVERLAP_MAX_TOKENS


class ShortcutMoEStream:
    """with ShortcutMoEStream(x) as branch: out = branch.output(moe(x)); ...dense path...; branch.join()
    extra: further inputs the branch reads (None entries ignored), kept alive for it like x."""

    def __init__(self, x: torch.Tensor, *extra: torch.Tensor | None):
        self.x = x
        self.inputs = [x, *(t for t in extra if t is not None)]
        self.on_side = moe_on_side_stream(x)
        self.main = self.side = self._ctx = self._out = None
        if self.on_side:
            self.main = torch.cuda.current_stream(x.device)
            self.side = _SIDE_STREAMS.get(x.device)
            if self.side is None:
                self.side = _SIDE_STREAMS[x.device] = torch.cuda.Stream(x.device)

    def __enter__(self):
        if self.on_side:
            self.side.wait_stream(self.main)
            for t in self.inputs:  # the main stream must not reuse the inputs' memory while the MoE reads them
                t.record_stream(self.side)
            self._ctx = torch.cuda.stream(self.side)
            self._ctx.__enter__()
        return self

    def output(self, out: torch.Tensor) -> torch.Tensor:
        self._out = out
        return out

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        return False

    def join(self) -> None:
        if self.on_side:
            self.main.wait_stream(self.side)
            if self._out is not None:
                self._out.record_stream(self.main)  # freed after the main stream's add, not before

"""The stream CUDA graphs are captured on.

A decode step runs the shortcut MoE on a side stream beside the dense path (layers/side_stream.py). The dense path
(attention, dense MLP, attention, dense MLP) is the step's critical path; without priorities the MoE's expert GEMV,
launched first and filling every SM, holds the dense path's next kernel back until its last wave is dispatched.
torch instantiates graphs with cudaGraphInstantiateFlagUseNodePriority, so each captured kernel keeps the priority
of the stream it was captured on: capturing on a high-priority stream (the MoE side stream keeps the default, the
lowest) lets the block scheduler start the dense path's kernels first and fill the rest of the GPU with the MoE.
"""

from __future__ import annotations

import torch

_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
HIGH_PRIORITY = -1  # torch.cuda.Stream priorities: lower is higher, 0 (the default) the lowest


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream to pass to torch.cuda.graph(..., stream=...)."""
    device = torch.device(device)
    stream = _CAPTURE_STREAMS.get(device)
    if stream is None:
        stream = _CAPTURE_STREAMS[device] = torch.cuda.Stream(device, priority=HIGH_PRIORITY)
    return stream

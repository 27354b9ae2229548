"""Op layer: the model calls these; the C++/CUDA extension replaces the reference op by op.

(Placeholder until the extension loader lands: everything runs on the pure-PyTorch reference.)
"""

from longcat_service.ops.reference import combine, expert_ffn, moe_align, moe_forward, router_topk

ACTIVE_BACKEND = "reference"

__all__ = ["ACTIVE_BACKEND", "combine", "expert_ffn", "moe_align", "moe_forward", "router_topk"]

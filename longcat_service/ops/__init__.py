"""Op layer: the model calls these; the compiled extension (longcat_service._C) replaces the
pure-PyTorch reference when it is built. Signatures and return conventions are reference.py's.

ACTIVE_BACKEND: "extension cpu", "extension cpu+cuda" or "reference (<reason>)".
LONGCAT_FORCE_REFERENCE=1 forces the reference.
"""

from __future__ import annotations

import logging

from longcat_service import envs

logger = logging.getLogger(__name__)


def _load_extension() -> tuple[bool, str]:
    if envs.LONGCAT_FORCE_REFERENCE:
        return False, "reference (LONGCAT_FORCE_REFERENCE is set)"
    try:
        import torch  # noqa: F401  (the extension links libtorch, loaded by importing torch)

        from longcat_service import _C
    except ImportError as exc:
        return False, f"reference (extension not built: {exc})"
    from longcat_service.ops._fake import register_fake_kernels

    register_fake_kernels()
    return True, "extension cpu+cuda" if _C.built_with_cuda() else "extension cpu"


_USE_EXTENSION, ACTIVE_BACKEND = _load_extension()

if _USE_EXTENSION:
    from longcat_service.ops.extension import combine, dense_gemv, expert_ffn, moe_align, moe_forward, router_topk
else:
    from longcat_service.ops.reference import combine, dense_gemv, expert_ffn, moe_align, moe_forward, router_topk

logger.info("longcat ops backend: %s", ACTIVE_BACKEND)

__all__ = ["ACTIVE_BACKEND", "combine", "dense_gemv", "expert_ffn", "moe_align", "moe_forward", "router_topk"]

"""Tensor-parallel-aware building blocks of LongCat-Flash (pure PyTorch; MoE through longcat_service.ops)."""

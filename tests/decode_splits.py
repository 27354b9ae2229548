"""Fewer MLA decode splits for the tests that run whole models through the interpreted Triton decode kernels.

The production split count fills one wave of an H200's 132 SMs: 32 splits per row at the tiny models' batches, each
split one interpreted stage-1 program (~10-60 ms on a CPU). Every split is one step long (BLOCK_N tokens: 32, or 64
in the MQA kernels' 16-bit tile) while a row is at most BLOCK_N * num_splits tokens, so at 4 splits rows of up to 128
tokens (all these tests use) keep the same active splits holding the same tokens: bit-identical outputs, with splits
past a row's end (the early exit) still launched, and 8x fewer programs. The split choice itself is tested in
tests/test_mla_decode_splits.py and tests/test_kernels.py, which keep the production count.
"""

from __future__ import annotations

FEW_SPLITS = 4


def cap_mla_decode_splits(setattr_=setattr) -> None:
    """Cap both MLA decode kernels' split count at FEW_SPLITS in this process when their Triton runs interpreted
    (a GPU keeps the production count). setattr_: monkeypatch.setattr in a test (undone after it); the default
    patches for good (a spawned rank, which exits after its test)."""
    from longcat_service.kernels import _mla_decode_triton, interpreter_mode, mla_decode

    if not interpreter_mode():
        return
    for module in (_mla_decode_triton, mla_decode):
        assert module.MAX_SPLITS >= FEW_SPLITS
        setattr_(module, "MAX_SPLITS", FEW_SPLITS)

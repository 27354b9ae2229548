"""Tensor-parallel state and collectives (no-ops at tp_size 1)."""

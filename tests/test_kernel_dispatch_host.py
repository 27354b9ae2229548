"""Host-side dispatch helpers of the kernel wrappers (kernels/__init__.py): what they answer, and that the
device capability is asked of torch once per device."""

from __future__ import annotations

import torch

from longcat_service import kernels


def test_device_capability_is_looked_up_once_per_device(monkeypatch):
    asked = []

    def fake(index):
        asked.append(index)
        return (9, 0) if index == 0 else (8, 9)

    monkeypatch.setattr(torch.cuda, "get_device_capability", fake)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    kernels._capability.cache_clear()
    try:
        assert kernels.device_capability(torch.device("cuda", 0)) == (9, 0)
        assert kernels.device_capability(torch.device("cuda", 0)) == (9, 0)
        assert kernels.device_capability(torch.device("cuda", 1)) == (8, 9)
        assert kernels.device_capability(torch.device("cuda")) == (8, 9)  # no index: the current device
        assert asked == [0, 1]
        assert kernels.device_capability(torch.device("cuda", 0)) < (9, 1)  # a tuple, comparable as torch's
    finally:
        kernels._capability.cache_clear()


def test_fast_path_is_for_cuda_tensors_unless_disabled(monkeypatch):
    class FakeCuda:
        is_cuda = True

    monkeypatch.delenv("LONGCAT_DISABLE_TRITON", raising=False)
    assert not kernels.fast_path_enabled(torch.zeros(2))
    assert kernels.fast_path_enabled(FakeCuda()) == kernels.triton_available()
    monkeypatch.setenv("LONGCAT_DISABLE_TRITON", "1")
    assert not kernels.fast_path_enabled(FakeCuda())

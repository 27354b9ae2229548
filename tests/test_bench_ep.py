"""benchmarks/bench_ep.py's model arithmetic, recomputed by hand for the LongCat-Flash shapes."""

from __future__ import annotations

import pytest

from benchmarks import bench_ep


def test_collective_model_is_latency_plus_bytes_over_nvlink():
    assert bench_ep.collective_us(0) == bench_ep.ALPHA_US
    # 450 GB/s = 450e3 bytes per us: 4.5 MB take 10 us
    assert bench_ep.collective_us(4.5e6) == pytest.approx(bench_ep.ALPHA_US + 10.0)


def test_common_layer_bytes_per_tp8_rank():
    h = 6144
    attention = h * 1536 + h * 576 + 1536 * 64 * 192 / 8 + 512 * 64 * 256 / 8 + 64 * 128 * h / 8
    dense = 3 * h * 12288 / 8
    assert bench_ep.common_layer_bytes_per_rank(2) == pytest.approx(2 * (2 * attention + 2 * dense))
    assert bench_ep.common_layer_bytes_per_rank(1) == pytest.approx(bench_ep.common_layer_bytes_per_rank(2) / 2)


def test_fixed_capacity_all_to_all_bytes():
    h, k = 6144, 12
    # B=64 over 8 ranks: shares of 8 tokens; default capacity 8 x 12 = 96 rows to each of the 7 other ranks
    assert bench_ep.fixed_a2a_bytes_per_rank(64, None) == 7 * 96 * h * 2
    # factor 2: twice a uniform routing's 96 / 8 = 12 rows per peer
    assert bench_ep.fixed_a2a_bytes_per_rank(64, 2.0) == 7 * 24 * h * 2
    assert bench_ep.fixed_a2a_bytes_per_rank(1, None) == 7 * k * h * 2

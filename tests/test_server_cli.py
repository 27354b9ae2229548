"""longcat-serve's flags reach EngineArgs unchanged, and unset flags leave the engine defaults alone."""

from __future__ import annotations

import dataclasses

from longcat_service.engine.engine_args import EngineArgs
from longcat_service.server.cli import build_parser, engine_args_from


def _engine_args(*argv: str) -> EngineArgs:
    return engine_args_from(build_parser().parse_args(list(argv)))


def test_unset_flags_keep_engine_defaults():
    got, default = _engine_args(), EngineArgs()
    for f in dataclasses.fields(EngineArgs):
        assert getattr(got, f.name) == getattr(default, f.name), f.name


def test_engine_flags_are_passed_through():
    args = _engine_args(
        "--block-size", "32", "--max-num-batched-tokens", "4096", "--no-prefix-caching", "--seed", "7",
        "--step-timeout-s", "9.5", "--no-overlap", "--gpu-memory-utilization", "0.8",
        "--kv-cache-memory-bytes", "1048576", "--max-num-seqs", "12", "--engine-mode", "thread",
        "--hf-overrides", '{"num_layers": 1}', "--quantization", "fp8",
    )
    assert (args.block_size, args.max_num_batched_tokens, args.enable_prefix_caching, args.seed) == (32, 4096, False, 7)
    assert (args.step_timeout_s, args.overlap_steps, args.gpu_memory_utilization) == (9.5, False, 0.8)
    assert (args.kv_cache_memory_bytes, args.max_num_seqs, args.engine_mode) == (1048576, 12, "thread")
    assert args.hf_overrides == {"num_layers": 1}
    assert args.quantization == "fp8"


def test_bad_engine_flag_is_a_usage_error_naming_the_flag():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "longcat_service.server.cli", "--block-size", "0", "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--block-size" in proc.stderr and "positive integer" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unsupported_quantization_flag_is_a_usage_error_naming_the_flag():
    import pytest

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--quantization", "awq"])

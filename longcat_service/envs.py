"""Every LONGCAT_* environment switch, in one table: name, type, default, one line of doc.

Read lazily (as vLLM's envs.py): `envs.LONGCAT_ENFORCE_EAGER` reads the environment at each access, so a test's
monkeypatch.setenv takes effect at once; a malformed value raises ValueError naming the variable. Nothing else in
longcat_service/ or benchmarks/ reads os.environ for a LONGCAT_* name (tests/test_envs.py checks it). The README's
switch table is generated from SWITCHES: `python -m longcat_service.envs --markdown` prints it, `--update-readme`
rewrites it in README.md.

Kinds: "choice" (what a user picks between), "tuning" (a knob with a measured reason; H200 numbers are in
benchmarks/RESULTS.md), "diagnostics", "testing" (forces a variant that `auto` picks), "build" (setup.py only,
read there at build time), "deploy" (the container's health check), "benchmarks" (the benchmark scripts only).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1 or 0")


def _nonneg_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("expected an integer >= 0")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("expected a number > 0")
    return value


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


def _text(raw: str) -> str:
    return raw.strip()


@dataclass(frozen=True)
class Switch:
    name: str
    type: str  # as the README shows it
    default: Any
    kind: str
    doc: str
    parse: Callable[[str], Any] = _text


SWITCHES: tuple[Switch, ...] = (
    # --- what users choose between -------------------------------------------------------------------------------
    Switch("LONGCAT_FORCE_REFERENCE", "bool", False, "choice",
           "pure-PyTorch MoE ops (ops/reference.py) instead of the compiled extension; read once, at import of "
           "longcat_service.ops", _flag),
    Switch("LONGCAT_ENFORCE_EAGER", "bool", False, "choice",
           "no CUDA graphs for decode steps", _flag),
    Switch("LONGCAT_DISABLE_TRITON", "bool", False, "choice",
           "no Triton kernels: MLA decode and prep, RMSNorm, SwiGLU, MoE row gather and grouped GEMM, flash prefill "
           "attention (then the eager PyTorch attention, the CPU path, and torch._grouped_mm run on CUDA too)", _flag),
    Switch("LONGCAT_DEMO_MODEL", "trained|random", "trained", "choice",
           "the built-in model served without --model: the packaged trained checkpoint, or the random-weight tiny "
           "one (the engine tests, whose conftest sets it)", _one_of("trained", "random")),
    Switch("LONGCAT_TP_CUDA_GRAPHS", "bool", False, "choice",
           "decode CUDA graphs under tensor parallelism (NCCL collectives captured); with MTP the spec-step graphs "
           "(verify, mtp, draft; host-verified, not under expert parallelism) on every rank; opt-in until it has run "
           "on several GPUs (benchmarks/tp_session.sh), else TP decodes eagerly", _flag),
    # --- tuning knobs, each with its measured reason ---------------------------------------------------------------
    Switch("LONGCAT_DENSE_GEMV_ROWS", "int", 2, "tuning",
           "decode batches of up to this many rows (bf16/fp16, CUDA, at most 8) multiply with our weight-streaming "
           "GEMV (csrc/cuda/dense_gemv.cu) instead of cuBLAS; 0: never (H200: faster than cuBLAS on every LongCat "
           "projection at 1-2 rows, e.g. fused q_a+kv_a 8.4 vs 12.1 us, slower from 4 rows)", _nonneg_int),
    Switch("LONGCAT_ROUTER_BF16X3_MIN_TOKENS", "int", 512, "tuning",
           "router GEMMs of at least this many tokens on CUDA run as one bf16 tensor-core GEMM against an exact "
           "3-way bf16 split of the fp32 weight; 0: never (H200: 962 -> 268 us at 4096 tokens, 233 -> 201 us at "
           "512, slower below)", _nonneg_int),
    Switch("LONGCAT_MOE_OVERLAP_MAX_TOKENS", "int", 8, "tuning",
           "CUDA-graph decode steps of up to this many tokens run the shortcut MoE on a side stream; 0: never "
           "(H200: batch 1 1.48 vs 1.58 ms inline; at every batch size it cost ~1 ms at batch 64)", _nonneg_int),
    Switch("LONGCAT_FP8_SPLITK_MAX_ROWS", "int", 128, "tuning",
           "dense linears with block-FP8 weights of more rows than the CUDA GEMV takes (ops/fp8.DECODE_ROWS) up to "
           "this many (larger values act as 128) run the Triton split-K w8a8 GEMM (kernels/fp8_splitk.py) instead of "
           "cuBLAS's blockwise scaled-mm, on the shapes where it measured faster (its SHAPE_CONFIGS); 0: never "
           "(H200, the 20 linears of a 2L decode step: 484 vs 584 us at 16 rows, 502 vs 623 at 32, 596 vs 629 at "
           "64)", _nonneg_int),
    Switch("LONGCAT_MLA_ABSORB_PREP_MAX_ROWS", "int", 2, "tuning",
           "decode batches of up to this many rows (CUDA, Triton) fold the W_UK absorb (q_nope @ W_UK) into the MLA "
           "prep kernel (one launch instead of prep + cuBLAS bmm; each program reads its W_UK slice once for all "
           "rows); 0: never. H200, 64 heads, context 1024, the MLA chain between q_b_proj and o_proj, us, bmm / "
           "absorbed: batch 1 22.25 / 20.23, 2 31.76 / 30.47, 4 46.91 / 50.07, 8 55.08 / 65.11 "
           "(benchmarks/bench_mla_decode.py --batches 1,2,4,8 --contexts 1024)", _nonneg_int),
    Switch("LONGCAT_GROUPED_GEMM_CONFIG", "str", "128,64,128,3,8,tma,split", "tuning",
           "tiles of the Triton grouped GEMM of the prefill experts, 'bn,bk,bm,stages,warps[,tma][,split]' "
           "(H200: the default streamed the weights at 88-92% of the copy rate, torch._grouped_mm 75-79%; "
           "benchmarks/bench_grouped_gemm.py times the others)"),
    # --- diagnostics -----------------------------------------------------------------------------------------------
    Switch("LONGCAT_STEP_TRACE", "path", "", "diagnostics",
           "one JSON line per engine step (phase times, batch) appended to this file; "
           "`benchmarks/bench_serve.py --step-trace-dir` summarises it"),
    Switch("LONGCAT_CACHE_DIR", "path", "", "diagnostics",
           "where the random-weight tiny demo model is built (unset: ~/.cache/longcat_service)"),
    Switch("LONGCAT_TP_HEARTBEAT_TIMEOUT_S", "float", 10.0, "diagnostics",
           "seconds without a rank's heartbeat before the tensor-parallel group is declared dead", _positive_float),
    # --- testing ---------------------------------------------------------------------------------------------------
    Switch("LONGCAT_FFN_DECODE_KERNEL", "auto|v1|v2|v3", "auto", "testing",
           "expert decode GEMV of the extension (read by csrc/cuda/expert_ffn.cu at each call); auto = v2 for "
           "narrow experts (I <= 512: TP shards), for wide ones v3 (tensor cores) from 32 tokens and v1 below (each "
           "the fastest there on the H200); forcing one is for tests and benchmarks",
           _one_of("auto", "v1", "v2", "v3")),
    Switch("LONGCAT_FP8_EXPERT_KERNEL", "auto|triton|cuda", "auto", "testing",
           "decode routed experts with block-FP8 weights through the Triton w8a16 kernel (kernels/fp8_expert_decode.py) "
           "or the CUDA expert_ffn_fp8; auto = ops/extension.py's rule (Triton from 16 tokens for wide experts, from 8 "
           "for narrow ones: the fastest on the H200); forcing one is for tests and benchmarks",
           _one_of("auto", "triton", "cuda")),
    Switch("LONGCAT_FP8_GEMV_SPLITK", "0|1|2|3|4|6|8", "1", "testing",
           "CUDA dense_gemv_fp8's FMA kernels (block-FP8 decode GEMV, read by csrc/cuda/dense_gemv_fp8.cu at each "
           "call): 1 = split K over the warps of a block where the kernel's rule picks it (N too small to fill the "
           "SMs: q_a + kv_a, H200 6.1 vs 6.9 us at 1 row); 0 = one warp per column group over the whole K; 2..8 = "
           "split K that many ways on every shape; forcing one is for tests and benchmarks",
           _one_of("0", "1", "2", "3", "4", "6", "8")),
    Switch("LONGCAT_FP8_GEMV_MMA", "auto|0|1", "auto", "testing",
           "CUDA dense_gemv_fp8 on tensor cores (mma.sync on the weights dequantized in registers, 16 columns x all "
           "rows per warp; its time does not grow with the rows): auto = from 3 rows and for K <= 2048 (q_b), the "
           "FMA kernels below (the fastest on the H200 at each row count and shape); 0 / 1 = never / always, for "
           "tests and benchmarks", _one_of("auto", "0", "1")),
    Switch("LONGCAT_MLA_DECODE_KERNEL", "auto|old|new", "auto", "testing",
           "MLA decode attention kernels (read at each call): new = up to 64 heads per program sharing each cache "
           "tile (kernels/_mla_decode_mqa_triton.py), old = 16-head programs (kernels/_mla_decode_triton.py); auto = "
           "kernels/mla_decode.py's rule (new from 16 rows, the faster there on the H200); forcing one is for tests "
           "and benchmarks",
           _one_of("auto", "old", "new")),
    Switch("LONGCAT_REQUIRE_EXTENSION", "bool", False, "testing",
           "tests: a missing compiled extension fails the extension tests instead of skipping them (.ci/run sets it)",
           _flag),
    # --- build (setup.py reads these itself: the package is not importable before it is built) --------------------
    Switch("LONGCAT_BUILD_CUDA", "bool", None, "build",
           "build the CUDA kernels (unset: when a CUDA toolkit and a CUDA build of torch are present)", _flag),
    Switch("LONGCAT_CUDA_ARCHS", "str", "90a", "build", "CUDA architectures to build for, e.g. '90a;80'"),
    Switch("LONGCAT_VERBOSE_BUILD", "bool", False, "build", "verbose CMake build output", _flag),
    Switch("LONGCAT_BUILD_EXT", "bool", True, "build",
           "0: install pure Python on purpose (no C++/CUDA extension; the reference ops run)", _flag),
    # --- deployment (deploy/grpc_health_check.py reads it itself: the image runs it as a standalone script) ---------
    Switch("LONGCAT_GRPC_PORT", "int", 50051, "deploy",
           "the port `longcat-healthcheck` probes (deploy/Dockerfile sets it)", _nonneg_int),
    # --- benchmarks ------------------------------------------------------------------------------------------------
    Switch("LONGCAT_COMMIT", "str", "", "benchmarks",
           "commit recorded in benchmark results (unset: `git rev-parse --short HEAD`; the device copy of the tree "
           "may carry a stale .git)"),
)

_BY_NAME = {s.name: s for s in SWITCHES}


def default(name: str) -> Any:
    return _BY_NAME[name].default


def read(name: str) -> Any:
    """The switch's current value: its default when unset or empty, else the parsed value."""
    switch = _BY_NAME[name]
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return switch.default
    try:
        return switch.parse(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r}: {exc}") from None


def __getattr__(name: str) -> Any:
    if name in _BY_NAME:
        return read(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_BY_NAME))


def _default_text(switch: Switch) -> str:
    if switch.default is None or switch.default == "":
        return "unset"
    if isinstance(switch.default, bool):
        return "1" if switch.default else "0"
    return str(switch.default)


def markdown_table() -> str:
    """The README's switch table (tests/test_envs.py keeps the README equal to it)."""
    rows = ["| switch | type | default | kind | effect |", "| --- | --- | --- | --- | --- |"]
    for s in SWITCHES:
        kind = s.type.replace("|", "\\|")
        rows.append(f"| `{s.name}` | {kind} | `{_default_text(s)}` | {s.kind} | {s.doc} |")
    return "\n".join(rows) + "\n"


README_BEGIN, README_END = "<!-- envs table: generated, do not edit -->\n", "<!-- end of envs table -->"


def update_readme(path: str) -> None:
    """Rewrite the table between README_BEGIN and README_END of the file at path."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + README_BEGIN + markdown_table() + README_END + tail)


def main(argv: list[str]) -> int:
    """--markdown: print the table; --update-readme [README.md]: rewrite it there; else the current values."""
    if argv == ["--markdown"]:
        sys.stdout.write(markdown_table())
    elif argv[:1] == ["--update-readme"]:
        update_readme(argv[1] if len(argv) > 1 else "README.md")
    else:
        for s in SWITCHES:
            print(f"{s.name}={os.environ.get(s.name, '')!s:<12} ({s.kind}; default {_default_text(s)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

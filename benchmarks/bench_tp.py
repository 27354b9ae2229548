"""Tensor-parallel correctness, decode scaling and served TP (issue 8). Driven by benchmarks/tp_session.sh.

    python benchmarks/bench_tp.py check --model tiny --tp-sizes 1,2,4,8 --out tp_tiny.json   # logits + greedy
    python benchmarks/bench_tp.py check --model 2l --tp-sizes 1,2,4,8 --batches 1,64 --out tp_2l.json
    LONGCAT_TP_CUDA_GRAPHS=1 python benchmarks/bench_tp.py check --model tiny --speculative-k 2 --out tp_mtp.json
    python benchmarks/bench_tp.py speed --tp-sizes 1,2,4,8 --batches 1,64 --out tp_speed.json
    python benchmarks/bench_tp.py serve --tp 8 --out tp_serve.json      # torchrun server, stream, bench_serve
    python benchmarks/bench_tp.py table tp_2l.json tp_speed.json        # the scaling table (markdown)
    ... --device cpu --dtype float32   (gloo; the CPU dry run of the same code)

Identical weights at every TP size: load_format="dummy" (longcat_service/model/dummy_weights.py) generates every
checkpoint key's FULL tensor from a generator seeded by (seed, key) and hands it to the parameter's own
weight_loader, which keeps this rank's slice, exactly as from a safetensors file. Importing this module sets the
router correction bias to 0 in that init (spawned TP ranks import this script as __mp_main__, so they get it too). The
tiny model is additionally written as a real safetensors checkpoint and loaded through load_format="auto"
(`check` on CPU cross-checks both paths).

All-reduce time per decode step = a timed loop (CUDA events, median of reps) that replays, back to back on the
TP group, the collectives (op, shape, dtype) one forward of B tokens issued, recorded by wrapping
torch.distributed.all_reduce/all_gather during that forward. It is the communication cost without compute
overlap or rank skew; not a torch.profiler measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when imported as a package
import harness  # noqa: E402, F401  (puts the repo root on sys.path)
from tp_check import cmd_check, llm_child  # noqa: E402
from tp_common import MODELS  # noqa: E402  (also sets the router bias 0 in the dummy init, here and in spawned ranks)
from tp_serve import cmd_serve  # noqa: E402
from tp_speed import cmd_speed, engine_child  # noqa: E402
from tp_table import cmd_table  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("check", "speed", "serve"):
        s = sub.add_parser(name)
        s.add_argument("--model", choices=sorted(MODELS), default="tiny" if name == "check" else "2l")
        s.add_argument("--device", default="cuda")
        s.add_argument("--dtype", default=None)
        s.add_argument("--out", default=None, help="write the JSON result here")
        s.add_argument("--rank-timeout", type=float, default=900.0)
        if name != "serve":
            s.add_argument("--tp-sizes", default="1,2,4,8")
            s.add_argument("--batches", default="1,64")
    c = sub.choices["check"]
    c.add_argument("--prompt-len", type=int, default=24)
    c.add_argument("--max-tokens", type=int, default=16)
    c.add_argument("--no-llm", dest="llm", action="store_false", help="skip greedy generation through LLM")
    c.add_argument("--crosscheck-dummy", action="store_true", help="tiny: virtual dummy init == its checkpoint")
    c.add_argument("--expert-parallel", action="store_true",
                   help="ranks > 1 hold whole experts (--enable-expert-parallel); compared with TP=1 as usual")
    c.add_argument("--ep-capacity-factor", type=float, default=None,
                   help="with --expert-parallel: EngineArgs.ep_capacity_factor of the LLM runs (CUDA-graph decode)")
    c.add_argument("--speculative-k", type=int, default=0,
                   help="tiny: greedy generation with MTP speculative decoding (k drafts; the checkpoint gets MTP weights)")
    s = sub.choices["speed"]
    s.add_argument("--prompt-len", type=int, default=512)
    s.add_argument("--new-tokens", type=int, default=64)
    v = sub.choices["serve"]
    v.add_argument("--tp", type=int, default=2)
    v.add_argument("--concurrency", type=int, default=64)
    v.add_argument("--num-requests", type=int, default=128)
    v.add_argument("--prompt-len", type=int, default=512)
    v.add_argument("--max-tokens", type=int, default=128)
    v.add_argument("--num-kv-blocks", type=int, default=8192)
    v.add_argument("--start-timeout", type=float, default=300.0)
    v.add_argument("--bench-timeout", type=float, default=300.0)
    v.add_argument("--server-log", default=None)
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+")
    for name in ("_llm", "_engine"):  # child modes
        h = sub.add_parser(name)
        h.add_argument("--model-dir", required=True)
        h.add_argument("--load-format", default="dummy")
        h.add_argument("--tp", type=int, default=1)
        h.add_argument("--device", default="cuda")
        h.add_argument("--dtype", default="bfloat16")
        h.add_argument("--overrides", default="{}")
        h.add_argument("--max-tokens", type=int, default=16)
        h.add_argument("--batches", default="1,64")
        h.add_argument("--prompt-len", type=int, default=512)
        h.add_argument("--new-tokens", type=int, default=64)
        h.add_argument("--expert-parallel", action="store_true")
        h.add_argument("--ep-capacity-factor", type=float, default=None)
        h.add_argument("--speculative-k", type=int, default=0)
    a = p.parse_args(argv)
    if a.cmd == "table":
        print(cmd_table(a.files))
        return 0
    if a.cmd in ("_llm", "_engine"):
        print("RESULT " + json.dumps((llm_child if a.cmd == "_llm" else engine_child)(a)), flush=True)
        return 0
    res = {"check": cmd_check, "speed": cmd_speed, "serve": cmd_serve}[a.cmd](a)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    print(f"{a.cmd} done" + (f": {a.out}" if a.out else ": " + json.dumps(res, default=str)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A static expert placement from measured per-expert load (EPLB-style, without replicas).

Input: the counts that `longcat-serve --collect-expert-load` exports as longcat_expert_routed_tokens_total{expert}
(a /metrics scrape, or a JSON list / {expert: count} map). Output: the {expert: rank} JSON that
`--enable-expert-parallel --expert-placement FILE` reads. Every rank gets the same number of experts (so the
weights per GPU stay equal, give or take one when E % N != 0); within that, the heaviest experts go first, each to
the least-loaded rank that still has room (greedy longest-processing-time).

    curl -s localhost:9090/metrics > metrics.txt
    python -m longcat_service.distributed.eplb --metrics metrics.txt --ranks 8 > placement.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys

_METRIC = re.compile(r'^longcat_expert_routed_tokens_total\{expert="(\d+)"\}\s+([0-9.eE+-]+)', re.M)


def balanced_placement(counts: list[float], world_size: int) -> dict[int, int]:
    num_experts = len(counts)
    if not 1 <= world_size <= num_experts:
        raise ValueError(f"need 1 <= ranks <= experts ({num_experts}), got {world_size}")
    base, extra = divmod(num_experts, world_size)
    room = [base + (1 if r < extra else 0) for r in range(world_size)]
    load = [0.0] * world_size
    placement: dict[int, int] = {}
    for expert in sorted(range(num_experts), key=lambda e: (-counts[e], e)):
        rank = min((r for r in range(world_size) if room[r] > 0), key=lambda r: (load[r], r))
        placement[expert] = rank
        room[rank] -= 1
        load[rank] += counts[expert]
    return placement


def rank_loads(counts: list[float], placement: dict[int, int], world_size: int) -> list[float]:
    loads = [0.0] * world_size
    for expert, rank in placement.items():
        loads[rank] += counts[expert]
    return loads


def counts_from_metrics(text: str) -> list[float]:
    found = {int(e): float(v) for e, v in _METRIC.findall(text)}
    if not found:
        raise ValueError("no longcat_expert_routed_tokens_total samples (was the server started with "
                         "--collect-expert-load?)")
    return [found.get(e, 0.0) for e in range(max(found) + 1)]


def counts_from_json(data) -> list[float]:
    if isinstance(data, dict):
        mapping = {int(k): float(v) for k, v in data.items()}
        return [mapping.get(e, 0.0) for e in range(max(mapping) + 1)]
    return [float(v) for v in data]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--metrics", help="a saved /metrics scrape")
    src.add_argument("--counts", help="a JSON list of counts, or a {expert: count} map")
    p.add_argument("--ranks", type=int, required=True, help="expert-parallel size (= --tensor-parallel-size)")
    args = p.parse_args(argv)
    with open(args.metrics or args.counts) as f:
        text = f.read()
    counts = counts_from_metrics(text) if args.metrics else counts_from_json(json.loads(text))
    placement = balanced_placement(counts, args.ranks)
    loads = rank_loads(counts, placement, args.ranks)
    json.dump({str(e): r for e, r in sorted(placement.items())}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    mean = sum(loads) / len(loads) if loads else 0.0
    print(f"max/mean rank load: {max(loads) / mean if mean else 1.0:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""bench_tp.py table: the TP scaling table (markdown) from the JSON results of `check` and `speed`."""

from __future__ import annotations

import json
from pathlib import Path

from harness import fmt


def cmd_table(paths: list[str]) -> str:
    docs = [json.loads(Path(p).read_text()) for p in paths if Path(p).exists()]
    speed = next((d for d in docs if "new_tokens" in d), None)
    check = next((d for d in docs if "tp_sizes" in d and d.get("model") == (speed or {}).get("model")), None)
    if not speed:
        return "(no speed results)"
    by = speed["by_tp"]
    batches = sorted({int(b) for r in by.values() for b in r.get("decode_ms", {})})
    name = {"2l": "LongCat-Flash-2L", "tiny": "tiny model"}.get(speed["model"], speed["model"])
    comm = "NCCL, CUDA events" if speed.get("device") == "cuda" else "gloo, wall clock"
    lines = [
        f"Decode ms/step, {name} ({speed['dtype']}, {speed['device']}, dummy TP-invariant weights, prompt "
        f"{speed['prompt_len']}, LLMEngine.step median); TP>1 runs eager (no CUDA graphs, no chained decode); "
        f"all-reduce ms = timed replay of the step's collectives on the TP group ({comm}).",
        "",
        "| TP | batch | engine ms/step | vs TP=1 eager | collectives/step | MB/step | all-reduce ms/step | "
        "all-reduce share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    eager1 = {int(b): v for b, v in by.get("1", {}).get("eager_ms", {}).items()}
    for tp in sorted(by, key=int):
        r = by[tp]
        if "error" in r:
            lines.append(f"| {tp} | - | error: {r['error'][:80]} | | | | | |")
            continue
        for b in batches:
            ms = r["decode_ms"].get(str(b))
            comm = ((check or {}).get("by_tp", {}).get(str(tp), {}).get("comm", {}) or {}).get(str(b), {})
            ar = comm.get("ms")
            e1 = eager1.get(b)
            lines.append(
                f"| {tp} | {b} | {fmt(ms)}{' (graphs)' if tp == '1' and r.get('graphs') else ''} | "
                f"{fmt(e1 / ms if e1 and ms else None, '{:.2f}x')} | {comm.get('calls', '-')} | "
                f"{fmt(comm['bytes'] / 1e6 if 'bytes' in comm else None, '{:.3f}')} | {fmt(ar, '{:.3f}')} | "
                f"{fmt(100 * ar / ms if ar and ms else None, '{:.0f}%')} |"
            )
        if tp == "1" and eager1:
            for b in batches:
                lines.append(f"| 1 eager | {b} | {fmt(eager1.get(b))} | 1.00x | 0 | 0 | - | - |")
    return "\n".join(lines)



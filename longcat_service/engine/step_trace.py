"""Optional per-step trace of the engine loop: one JSON line per LLMEngine.step() call.

Enabled by LONGCAT_STEP_TRACE=<path> (inherited by the engine-core process, which then writes the file);
benchmarks read it to show where a step's wall time goes (waiting for the device, scheduling, launching,
output work) and how many steps were pure decode vs carried prefill tokens. Off by default: no cost.
The engine hands its trace to the model runner (LLMEngine.trace), which marks the phases inside "launch"
(prepare: host inputs and their copies; forward: the model's kernels enqueued; sample: logits and sampling
enqueued) and inside "collect" (wait: for the device; readback: host lists of the results); a phase's time is
from the previous mark, so those sub-phases and the engine's own phases add up to the step's wall time.
`StepTrace(keep=True)` keeps the records in memory (`records`) instead of writing a file (benchmarks).
"""

from __future__ import annotations

import json
import time

from longcat_service import envs


class StepTrace:
    def __init__(self, path: str | None = None, keep: bool = False):
        path = None if keep else path if path is not None else envs.LONGCAT_STEP_TRACE
        self._file = open(path, "a", buffering=1 << 16) if path else None  # noqa: SIM115 (lives with the engine)
        self.records: list[dict] | None = [] if keep else None
        self.enabled = self._file is not None or keep
        self._marks: list[tuple[str, float]] = []

    def start(self) -> None:
        if self.enabled:
            self._marks = [("start", time.perf_counter())]

    def mark(self, phase: str) -> None:
        """End of `phase` (its time is from the previous mark); ignored outside start() .. end()."""
        if self.enabled and self._marks:
            self._marks.append((phase, time.perf_counter()))

    def end(self, **fields) -> None:
        if not self.enabled or not self._marks:
            return
        t0 = self._marks[0][1]
        # the step ends at its last mark, so the phases partition wall_ms exactly (a GC pause or a preempted
        # thread between the last mark and end() would otherwise show up in no phase)
        t_end = self._marks[-1][1] if len(self._marks) > 1 else time.perf_counter()
        record = {"t": t0, "wall_ms": (t_end - t0) * 1e3}
        for (_, prev), (phase, t) in zip(self._marks, self._marks[1:], strict=False):
            record[f"{phase}_ms"] = record.get(f"{phase}_ms", 0.0) + (t - prev) * 1e3
        record.update(fields)
        if self.records is not None:
            self.records.append(record)
        else:
            self._file.write(json.dumps(record) + "\n")
        self._marks = []

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self.enabled = self.records is not None


def summarize(path: str) -> dict:
    """Totals of a trace file: steps, how many carried prefill tokens, mean phase times, and the gap between
    consecutive steps (time the loop spent outside step(): sending outputs, applying commands, idling)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r.get("num_seqs", 0) > 0]
    if not rows:
        return {"steps": 0}
    phases = sorted({k for r in rows for k in r if k.endswith("_ms")})
    decode = [r for r in rows if r.get("prefill_tokens", 0) == 0]
    mixed = [r for r in rows if r.get("prefill_tokens", 0) > 0]
    gaps = [(b["t"] - a["t"]) * 1e3 - a["wall_ms"] for a, b in zip(rows, rows[1:], strict=False)]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    out = {"steps": len(rows), "decode_steps": len(decode), "steps_with_prefill": len(mixed),
           "mean_seqs_decode_steps": mean([r["num_seqs"] for r in decode]),
           "span_s": (rows[-1]["t"] - rows[0]["t"]) + rows[-1]["wall_ms"] / 1e3,
           "mean_gap_ms": mean(gaps)}
    for name, group in (("decode", decode), ("prefill", mixed)):
        for ph in phases:
            out[f"{name}_{ph}"] = mean([r.get(ph, 0.0) for r in group])
        out[f"{name}_total_s"] = sum(r["wall_ms"] for r in group) / 1e3
    return out

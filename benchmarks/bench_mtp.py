"""MTP speculative decoding on the GPU (issue 17): spec-step cost, acceptance and per-user speed.

    python benchmarks/bench_mtp.py                                   # H200: 2L dummy weights + the demo model
    python benchmarks/bench_mtp.py --model <ckpt with model.mtp.*>   # part 2 on another checkpoint ('none': skip)
    python benchmarks/bench_mtp.py --device cpu --tiny               # CPU smoke test of the same code

Part 1 (benchmarks/configs/longcat-flash-2l, dummy weights, MTP weights dummy too): one engine per setting,
built one after the other; B greedy requests are prefilled through the engine, then one step is timed on the
model runner (median of CUDA-event times, no scheduler cost): a plain decode step (its production path: CUDA
graph replay where available, and eager), and a spec step for k = 1..3 (target verify of k+1 tokens per
sequence + MTP drafting for the next step): the production path for these greedy requests (the device-side greedy
step, one CUDA graph per bucket: engine/spec_greedy.py; "spec_ms" in the JSON), the spec-step graphs verified on the
host ("spec_host_ms", what non-greedy batches run) and eager ("spec_eager_ms"). Beside them the byte floor ratio
(spec_floor_ratio): the bytes a spec step must read over those of a plain step, with the experts that uniformly
random routing hits in expectation (dummy weights route about so). Dummy MTP drafts are nearly never accepted; the
projected per-user speed-up for an acceptance rate a is E[tokens per step] / (spec step / plain step),
E[tokens per step] = sum_{i=0..k} a^i (independent acceptances).
Part 2 (--model, default the packaged trained demo model): the same prompts with MTP off and on (k = 1..3), batch 1 and batch --batch, greedy
at the defaults (async scheduling on: device-side greedy spec steps chained, each launched before the last one is
read back, engine/spec_chain.py; "chained steps" counts them), "greedy_unchained" (async, not chained)
and "greedy_sync" (async scheduling off),
temperature 1 seeded and unseeded, and temperature 0.7 with top-k 50 / top-p 0.9 (all three: the device-side
sampled step; seeded rows with hashed uniforms, engine/seeded_draws.py): acceptance rate, mean accepted length and output tokens/s per user (wall time of engine steps).
Part 0 (a micro-timing): the seeded uniforms of one sampled step (StepUniforms, 4k + 2 per sequence), the torch int64
hash (engine/seeded_draws.py, ~30 elementwise kernels: the CPU path) against the one-launch Triton kernel
(kernels/counter_hash.py) on CUDA, both replayed from CUDA graphs as inside the sampled-step graph (us per call,
median; CPU: the torch hash eagerly); seconds: --skip-part1 --model none runs little else.
Results: JSON under $OUT (or benchmarks/out) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared benchmark harness

from decode_driver import decode_floor_bytes, param_bytes  # noqa: E402
from harness import ints, median_time  # noqa: E402

from longcat_service.engine.engine_args import EngineArgs  # noqa: E402
from longcat_service.engine.llm_engine import LLMEngine  # noqa: E402
from longcat_service.engine.scheduler import ScheduledSeq  # noqa: E402
from longcat_service.sampling_params import SamplingParams  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="benchmarks/configs/longcat-flash-tiny (CPU smoke test)")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--ks", default="1,2,3")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--model", default="demo", help="part 2's checkpoint with MTP weights: 'demo' (default) is the "
                   "packaged trained demo model, 'none' skips part 2")
    p.add_argument("--batch", type=int, default=16, help="part 2: the larger batch")
    p.add_argument("--new-tokens", type=int, default=128, help="part 2: output tokens per request")
    p.add_argument("--loop", action="store_true", help="part 3: the engine loop on the part-1 config (dummy weights), "
                   "MTP off vs k=1 at the defaults, chained and synchronous, batches --batches")
    p.add_argument("--skip-part1", action="store_true")
    p.add_argument("--out-dir", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "out")))
    return p.parse_args(argv)


def expected_experts_hit(raw: dict, tokens: int) -> float:
    """Distinct real experts one MoE layer reads for `tokens` tokens under uniformly random routing: each token
    takes moe_topk distinct slots of the n_routed_experts + zero_expert_num, so a given real expert is missed by
    all of them with probability (1 - topk / slots) ** tokens."""
    slots = raw["n_routed_experts"] + raw.get("zero_expert_num", 0)
    return raw["n_routed_experts"] * (1.0 - (1.0 - raw["moe_topk"] / slots) ** tokens)


def floor_parts(raw: dict) -> dict[str, int]:
    """Weight bytes (bf16, from the model built on the meta device from the config): decode_driver.param_bytes'
    dense (lm_head included) and per_expert, the MTP block (eh_proj, its layer and norms) and the lm_head."""
    from longcat_service.config import ModelConfig
    from longcat_service.model.longcat_flash import LongcatFlashForCausalLM

    cfg = ModelConfig.from_dict(dict(raw, model_type="longcat_flash"))
    with torch.device("meta"):
        model = LongcatFlashForCausalLM(cfg, torch.bfloat16)
        parts = param_bytes(model)
        model.enable_mtp()
    parts["mtp"] = sum(p.numel() * p.element_size() for p in model.mtp.parameters())
    parts["lm_head"] = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return parts


def spec_floor_ratio(raw: dict, batch: int, k: int, kv_tokens: int, parts: dict | None = None) -> float:
    """Bytes of a spec step over bytes of a plain decode step, batch sequences with kv_tokens cached each. Plain:
    decode_floor_bytes with the experts b tokens hit. Spec: the verify forward of b*(k+1) tokens (the same
    weights, the experts b*(k+1) tokens hit, each sequence's cache read once) plus k draft passes, each the MTP block,
    the lm_head and the MTP cache (one bf16 MLA entry per cached token)."""
    parts = parts or floor_parts(raw)
    layers = raw["num_layers"]
    entry = (raw["kv_lora_rank"] + raw["qk_rope_head_dim"]) * 2
    plain = decode_floor_bytes(parts, layers * expected_experts_hit(raw, batch), batch * kv_tokens, raw)
    verify = decode_floor_bytes(parts, layers * expected_experts_hit(raw, batch * (k + 1)), batch * kv_tokens, raw)
    draft = parts["mtp"] + parts["lm_head"] + batch * kv_tokens * entry
    return (verify + k * draft) / plain


def median_ms(fn, device: torch.device, reps: int) -> float:
    return median_time(fn, device, reps) * 1e3


def make_engine(args, config_dir: Path, k: int | None, max_seqs: int) -> LLMEngine:
    spec = {"method": "mtp", "num_speculative_tokens": k} if k else None
    max_len = args.prompt_len + 64
    blocks = max_seqs * (-(-max_len // 16) + 1) + 8
    return LLMEngine(EngineArgs(model=str(config_dir), load_format="dummy", device=args.device,
                                dtype="bfloat16" if args.device != "cpu" else "float32", num_kv_blocks=blocks,
                                max_num_seqs=max_seqs, max_model_len=max_len, max_num_batched_tokens=8192,
                                enable_prefix_caching=False, speculative_config=spec))


def prefilled(engine: LLMEngine, batch: int, prompt_len: int, vocab: int) -> list:
    """`batch` greedy requests whose prompts are computed and first token sampled (drafts ready with MTP)."""
    gen = torch.Generator().manual_seed(0)
    for i in range(batch):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=gen).tolist()
        engine.add_request(f"b{i}", prompt, SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))
    seqs = [g.seqs[0] for g in engine.scheduler.groups.values()]
    while any(s.num_output_tokens == 0 for s in seqs):
        engine.step()
    return seqs


def step_batch(engine: LLMEngine, seqs: list) -> list[ScheduledSeq]:
    sched = engine.scheduler
    out = []
    for seq in seqs:
        drafts = list(seq.draft_token_ids)
        s = ScheduledSeq(seq, 1 + len(drafts), seq.num_tokens - 1, draft_token_ids=drafts)
        if sched.num_speculative_tokens:
            s.token_limit = sched.token_limit(seq)
            engine.block_manager.allocate(seq, sched._tokens_to_allocate(seq, s.end_pos))
        out.append(s)
    return out


HASH_REPEAT = 20  # part 0: calls per captured graph (a replay's own cost spread over them)


def part0(args, device: torch.device) -> dict:
    """us per call of a step's seeded uniforms, per variant, k and batch (see the module doc)."""
    from longcat_service.engine.seeded_draws import hashed_uniforms_at, hashed_uniforms_at_reference, seed_columns
    from longcat_service.engine.spec_sampled import _step_counters

    variants = {"torch": hashed_uniforms_at_reference}
    if device.type == "cuda":
        variants["kernel"] = hashed_uniforms_at
    res: dict = {name: {} for name in variants}
    for k in ints(args.ks):
        offsets = _step_counters(k, device)
        for b in ints(args.batches):
            keys = torch.tensor(seed_columns([1000 + i for i in range(b)]), device=device)[1:]
            start = torch.randint(0, 1 << 20, (b,), device=device)
            for name, fn in variants.items():
                def calls(f=fn, kk=keys, st=start, off=offsets):
                    for _ in range(HASH_REPEAT):
                        f(kk, st, off)

                calls()  # compiles the kernel outside the capture
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        calls()
                    timed = graph.replay
                else:
                    timed = calls
                res[name].setdefault(k, {})[b] = median_ms(timed, device, args.reps) * 1e3 / HASH_REPEAT
    return res


def part1(args, device: torch.device) -> dict:
    config_dir = ROOT / "benchmarks" / "configs" / ("longcat-flash-tiny" if args.tiny else "longcat-flash-2l")
    batches, ks = ints(args.batches), ints(args.ks)
    res: dict = {"config": config_dir.name, "plain_graph_ms": {}, "plain_eager_ms": {}, "spec_ms": {},
                 "spec_host_ms": {}, "spec_eager_ms": {}, "floor_ratio": {}}
    raw = json.loads((config_dir / "config.json").read_text())
    parts = floor_parts(raw)
    for k in [None, *ks]:
        engine = make_engine(args, config_dir, k, max(batches))
        runner = engine.runner
        for b in batches:
            seqs = prefilled(engine, b, args.prompt_len, engine.vocab_size)
            batch = step_batch(engine, seqs)

            def one_step(r=runner, bt=batch):
                r.execute(bt)

            if k is None:
                if runner.graph_runner is not None:
                    res["plain_graph_ms"][b] = median_ms(one_step, device, args.reps)
                graphs, runner.graph_runner = runner.graph_runner, None
                res["plain_eager_ms"][b] = median_ms(one_step, device, args.reps)
                runner.graph_runner = graphs
            else:
                assert all(len(s.draft_token_ids) == k for s in batch), "drafts missing"
                dec = runner.spec_decoder
                res["floor_ratio"].setdefault(k, {})[b] = spec_floor_ratio(raw, b, k, args.prompt_len, parts)
                res["spec_ms"].setdefault(k, {})[b] = median_ms(one_step, device, args.reps)
                if dec.graphs is not None:  # the production step above replayed graphs: the host-verified and eager
                    dec.fuse_greedy = False
                    res["spec_host_ms"].setdefault(k, {})[b] = median_ms(one_step, device, args.reps)
                    dec.fuse_greedy = True
                    graphs, dec.graphs = dec.graphs, None
                    res["spec_eager_ms"].setdefault(k, {})[b] = median_ms(one_step, device, args.reps)
                    dec.graphs = graphs
            for g in list(engine.scheduler.groups):
                engine.abort_request(g)
            engine.step()
        # every name holding the runner (the closure's default argument too) must go, or the next engine's KV
        # cache finds the GPU full (the H200 run of b313f95 ran out of memory here)
        seqs = batch = one_step = graphs = dec = None  # noqa: F841
        del engine
        runner = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def run_requests(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    final = {}
    chain = engine.spec_chain
    chained0 = chain.num_chained if chain is not None else 0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in final.values())
    drafts = sum(o.metrics.num_draft_tokens for o in final.values())
    accepted = sum(o.metrics.num_accepted_tokens for o in final.values())
    steps = sum(o.metrics.num_spec_steps for o in final.values())
    return {"tokens_per_s_per_user": tokens / wall / len(prompts), "wall_s": wall,
            # spec steps launched before the previous one was read back (async scheduling: engine/spec_chain.py)
            "chained_steps": (chain.num_chained - chained0) if chain is not None else 0,
            "acceptance_rate": accepted / drafts if drafts else None,
            "mean_accepted_length": (accepted + steps) / steps if steps else None}


REPS = 5  # part 2: timed runs per setting (the median is reported)


def part2(args, device: torch.device) -> dict:
    from longcat_service.tokenizer import has_tokenizer, load_tokenizer

    # ignore_eos: every request decodes new_tokens (the demo model may end a reply after a word)
    texts = ["And God said", "Hello, how are you?", "The king of Israel", "What is your name?"]
    res: dict = {}
    for k in (None, *ints(args.ks)):
        spec = {"method": "mtp", "num_speculative_tokens": k} if k else None
        engine = LLMEngine(EngineArgs(model=args.model, device=args.device, max_num_seqs=max(args.batch, 1),
                                      speculative_config=spec))
        tok = load_tokenizer(args.model) if has_tokenizer(args.model) else None
        base = [tok.encode(t, add_special_tokens=True) if tok else [5 + i, 17, 31, 9] for i, t in enumerate(texts)]
        greedy = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
        # "greedy": the defaults (greedy spec steps chained: engine/spec_chain.py); "greedy_unchained": not;
        # "greedy_sync": async scheduling off, each step scheduled after the last read-back
        for label, params in (("greedy", greedy), ("greedy_unchained", greedy), ("greedy_sync", greedy),
                              ("t1", SamplingParams(temperature=1.0, max_tokens=args.new_tokens, seed=0,
                                                    ignore_eos=True)),
                              # the device-side sampled spec step (engine/spec_sampled.py), seeded ("t1": hashed
                              # uniforms, engine/seeded_draws.py) or not
                              ("t1_unseeded", SamplingParams(temperature=1.0, max_tokens=args.new_tokens,
                                                             ignore_eos=True)),
                              ("t0.7_topk50_topp0.9", SamplingParams(temperature=0.7, top_k=50, top_p=0.9,
                                                                     max_tokens=args.new_tokens, ignore_eos=True))):
            engine.args.async_scheduling = label != "greedy_sync"
            if engine.spec_chain is not None:
                engine.spec_chain.enabled = label != "greedy_unchained"
            for b in (1, args.batch):
                prompts = [base[i % len(base)] for i in range(b)]
                # warm-up: the same requests once (a path's first steps load its CUDA kernels: tens of ms), then
                # the median of REPS runs (one run of the demo is tens of ms: host noise)
                run_requests(engine, prompts, params)
                runs = sorted((run_requests(engine, prompts, params) for _ in range(REPS)),
                              key=lambda r: r["tokens_per_s_per_user"])
                res.setdefault(label, {}).setdefault(b, {})[k or 0] = runs[len(runs) // 2]
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def part3(args, device: torch.device) -> dict:
    """The engine loop (LLMEngine.step wall time) on the part-1 config with dummy weights: what decides chaining on
    a GPU-bound model. Dummy MTP drafts are almost never accepted, so MTP on runs one spec step per token: the rows
    compare the loop's host/GPU overlap (async, chained, synchronous), not MTP's speed-up."""
    config_dir = ROOT / "benchmarks" / "configs" / ("longcat-flash-tiny" if args.tiny else "longcat-flash-2l")
    new_tokens = min(args.new_tokens, 60)  # make_engine's max_model_len is prompt_len + 64
    res: dict = {}
    for k in (None, 1):
        engine = make_engine(args, config_dir, k, max(ints(args.batches)))
        greedy = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        gen = torch.Generator().manual_seed(0)
        for label in ("async", "async_unchained", "sync"):  # "async": the defaults (spec steps chained)
            if label == "async_unchained" and engine.spec_chain is None:
                continue
            engine.args.async_scheduling = label != "sync"
            if engine.spec_chain is not None:
                engine.spec_chain.enabled = label != "async_unchained"
            for b in ints(args.batches):
                prompts = [torch.randint(3, engine.vocab_size, (args.prompt_len,), generator=gen).tolist()
                           for _ in range(b)]
                run_requests(engine, prompts, greedy)
                runs = sorted((run_requests(engine, prompts, greedy) for _ in range(3)),
                              key=lambda r: r["tokens_per_s_per_user"])
                res.setdefault(label, {}).setdefault(b, {})[k or 0] = runs[1]
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def report_loop(p3: dict, config: str) -> str:
    lines = ["", f"### Engine loop ({config}, dummy weights): output tok/s per user, median of 3", "",
             "| loop | batch | MTP off | MTP k=1 | chained steps |", "|---|---|---|---|---|"]
    for label, by_batch in p3.items():
        for b, by_k in by_batch.items():
            off, on = by_k.get(0), by_k.get(1)
            lines.append(f"| {label} | {b} | {off['tokens_per_s_per_user']:.1f} | " if off else f"| {label} | {b} | - | ")
            lines[-1] += (f"{on['tokens_per_s_per_user']:.1f} | {on.get('chained_steps', 0)} |" if on else "- | - |")
    return "\n".join(lines)


def report_part0(p0: dict) -> list[str]:
    names = list(p0)
    lines = ["### Seeded uniforms of one sampled step (us per call; CUDA: graph replay)", "",
             "| k | batch | " + " | ".join(names) + " |", "|---" * (2 + len(names)) + "|"]
    for k, by_b in p0[names[0]].items():
        for b in by_b:
            lines.append(f"| {k} | {b} | " + " | ".join(f"{p0[n][k][b]:.1f}" for n in names) + " |")
    return lines + [""]


def report(p1: dict, p2: dict | None, p0: dict | None = None) -> str:
    lines = report_part0(p0) if p0 else []
    lines += [f"### MTP spec step vs plain decode ({p1['config']}, dummy weights)", "",
              "| batch | plain graph ms | plain eager ms | "
              + " | ".join(f"spec k={k} ms (x plain)" for k in p1["spec_ms"]) + " |",
              "|---" * (3 + len(p1["spec_ms"])) + "|"]
    for b in p1["plain_eager_ms"]:
        plain = p1["plain_graph_ms"].get(b, p1["plain_eager_ms"][b])
        cells = [f"{p1['spec_ms'][k][b]:.2f} ({p1['spec_ms'][k][b] / plain:.2f}x)" for k in p1["spec_ms"]]
        graph = f"{p1['plain_graph_ms'][b]:.2f}" if b in p1["plain_graph_ms"] else "-"
        lines.append(f"| {b} | {graph} | {p1['plain_eager_ms'][b]:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Per k: the production spec step (the device-side greedy graph where graphs run) vs the host-verified "
              "graphs and eager, and the byte floor ratio (spec step bytes / plain step bytes, uniformly random routing)",
              "",
              "| k | batch | spec ms (x plain) | host-verified graphs ms (x plain) | eager ms | floor ratio |",
              "|---|---|---|---|---|---|"]
    for k in p1["spec_ms"]:
        for b in p1["spec_ms"][k]:
            plain = p1["plain_graph_ms"].get(b, p1["plain_eager_ms"][b])

            def cell(key, kk=k, bb=b, pl=plain):
                ms = p1[key].get(kk, {}).get(bb)
                return f"{ms:.2f} ({ms / pl:.2f}x)" if ms is not None else "-"

            eager = p1["spec_eager_ms"].get(k, {}).get(b)
            lines.append(f"| {k} | {b} | {cell('spec_ms')} | {cell('spec_host_ms')} | "
                         f"{f'{eager:.2f}' if eager is not None else '-'} | {p1['floor_ratio'][k][b]:.2f}x |")
    if p2:
        lines += ["", "### Demo model: MTP off vs on", "", "| sampling | batch | k | tok/s per user | acceptance | "
                  "mean accepted length | chained steps | projected 2L speed-up |", "|---|---|---|---|---|---|---|---|"]
        for label, by_batch in p2.items():
            for b, by_k in by_batch.items():
                for k, r in by_k.items():
                    proj = "-"
                    a = r["acceptance_rate"]
                    plain = p1["plain_graph_ms"].get(b, p1["plain_eager_ms"].get(b))
                    if k and a is not None and plain and b in p1["spec_ms"].get(k, {}):
                        proj = f"{sum(a**i for i in range(k + 1)) / (p1['spec_ms'][k][b] / plain):.2f}x"
                    acc = f"{a:.3f}" if a is not None else "-"
                    mal = f"{r['mean_accepted_length']:.2f}" if r["mean_accepted_length"] else "-"
                    lines.append(f"| {label} | {b} | {k} | {r['tokens_per_s_per_user']:.1f} | {acc} | {mal} | "
                                 f"{r.get('chained_steps', 0)} | {proj} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    p0 = part0(args, device)
    p1 = {"config": "-", "plain_graph_ms": {}, "plain_eager_ms": {}, "spec_ms": {}} if args.skip_part1 \
        else part1(args, device)
    if args.model == "demo":
        from longcat_service.demo import DEMO_CHECKPOINT_DIR

        args.model = str(DEMO_CHECKPOINT_DIR)
    p2 = part2(args, device) if args.model and args.model != "none" else None
    p3 = part3(args, device) if args.loop else None
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"part0": p0, "part1": p1, "part2": p2, "part3": p3}
    (out / "bench_mtp.json").write_text(json.dumps(results, indent=1, default=str))
    print(report(p1, p2, p0))
    if p3:
        print(report_loop(p3, "longcat-flash-tiny" if args.tiny else "longcat-flash-2l"))


if __name__ == "__main__":
    main()

"""Owns every device tensor: the model, the paged latent KV caches, step inputs, logits and sampling."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from longcat_service.distributed.parallel_state import get_tp_size
from longcat_service.engine.cuda_graph_runner import create_graph_runner, decode_logits_with_graph
from longcat_service.engine.engine_args import EngineArgs
from longcat_service.engine.errors import EngineArgsError
from longcat_service.engine.sampler import NONFINITE_TOKEN, SampledBatch, Sampler, SamplingRow
from longcat_service.engine.scheduler import ScheduledSeq
from longcat_service.engine.step_trace import StepTrace
from longcat_service.layers.attention_metadata import AttentionMetadata
from longcat_service.layers.host_to_device import to_device
from longcat_service.outputs import Logprob

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_CACHE_BYTES = 128 * 2**20
PROMPT_LOGPROB_ROWS_PER_CHUNK = 256  # bounds the [rows, vocab] fp32 logits held at once
# warm-up prompt: 512 tokens x top-12 slots reach the grouped-GEMM MoE path for 512 experts (>= 8 rows each)
WARMUP_PROMPT_TOKENS = 512
WARMUP_LONG_TOKENS = 1100
# prompt steps between the long step's two sizes at which kernels take other configs (the FP8 prefill experts:
# kernels/fp8_gemm.prefill_expert_configs switches at 2048 and 8192 tokens; the H200 log of a 4096-token prompt
# after a warm-up of 512, 1100 and 16383-token steps showed its gate_up config compiled inside the request)
WARMUP_MID_STEP_TOKENS = (4096,)


@dataclass
class SeqStepResult:
    token_id: int | None = None  # sampled when the chunk reached the sequence's last token
    logprob: Logprob | None = None
    prompt_logprobs: list[Logprob] | None = None  # for prompt positions start_pos+1 ..
    error: str | None = None  # the sequence cannot go on (its logits were not finite): the engine fails its request
    # speculative steps: every token the step emits (accepted drafts, then the target's own), their logprobs,
    # and the drafts for the next step; token_id / logprob are then the first of them
    spec_token_ids: list[int] | None = None
    spec_logprobs: list[Logprob | None] | None = None
    draft_token_ids: list[int] = field(default_factory=list)
    num_draft_tokens: int = 0  # drafts verified in this step
    num_accepted_tokens: int = 0


@dataclass
class _PromptLogprobChunk:
    targets: list[int]  # the prompt tokens these rows predict
    chosen: torch.Tensor  # [rows] their raw logprobs (device)
    top_ids: torch.Tensor | None = None  # [rows, n]
    top_vals: torch.Tensor | None = None


@dataclass
class StepHandle:
    """A launched step: device tensors until ModelRunner.collect reads them back."""

    batch_size: int
    sample_idx: list[int]  # batch rows that sample a token, in the sampler's row order
    sampled: SampledBatch | None = None
    prompt_logprobs: dict[int, list[_PromptLogprobChunk]] = field(default_factory=dict)  # batch row -> chunks
    results: list[SeqStepResult] | None = None  # a step that ran to completion in launch (TP speculative steps)
    spec: object | None = None  # a speculative step's launch (spec_decode.SpecLaunch), finished by collect


class ModelRunner:
    supports_chained_decode = True  # launch(batch, input_ids=<device tensor>) works (not under TP: ranks get host ids)
    uses_cuda_graphs = True  # TP runners: only with LONGCAT_TP_CUDA_GRAPHS=1 (tp_worker.py)
    samples_tokens = True  # False on TP ranks > 0: they compute logits but rank 0 samples (tp_worker.py)
    trace: StepTrace | None = None  # the engine's step trace when enabled: launch / collect mark their phases

    def __init__(self, args: EngineArgs, model_path):
        from longcat_service.model.loader import load_model  # the model package is heavy; import on use

        self.args = args
        self.device = args.torch_device
        self.spec_config = args.speculative_config  # SpeculativeConfig or None
        self.model = load_model(model_path, dtype=args.torch_dtype, device=self.device, load_format=args.load_format,
                                hf_overrides=args.hf_overrides, quantization=args.quantization,
                                mtp=self.spec_config is not None)
        self.model.eval()
        self.expert_load = None
        if args.collect_expert_load:
            from longcat_service.engine.expert_load import ExpertLoadCounter

            self.expert_load = ExpertLoadCounter(self.model)
        from longcat_service.layers.moe import capacity_overflowed

        # expert parallelism: did the last graph-replayed decode step overflow a fixed-capacity all-to-all buffer?
        self._ep_overflowed = capacity_overflowed(self.model)
        self.ep_capacity_overflows = None if self._ep_overflowed is None else 0  # steps re-run eagerly for it
        self.config = self.model.config
        self.dtype = self.model.dtype  # the activation / KV-cache dtype (FP8 weights are not it)
        self.block_size = args.block_size
        # scratch blocks after the engine's blocks: a chained decode step writes a token that starts a new block
        # there until the engine knows the sequence goes on (LLMEngine._launch_chained); never in the engine's pool
        self.num_scratch_blocks = args.max_num_seqs if (self.supports_chained_decode and args.async_scheduling
                                                        and args.overlap_steps and self.spec_config is None) else 0
        if self.spec_config is not None:  # one block past the pool: where a recomputed shared token's entry goes
            self.num_scratch_blocks = 1
        self.num_mtp_cache_layers = 0 if self.spec_config is None else 1
        self.num_blocks = self._decide_num_blocks()
        from longcat_service.model.kv_cache import allocate_kv_caches

        caches = allocate_kv_caches(self.config, self.num_blocks + self.num_scratch_blocks, self.block_size,
                                    self.dtype, self.device, self.num_mtp_cache_layers)
        # the target's caches; with MTP one more (same blocks, same slots) for the MTP block, last
        self.kv_caches = caches[: self.config.num_attention_sublayers]
        self.mtp_kv_cache = caches[-1] if self.num_mtp_cache_layers else None
        self.vocab_size = int(self.config.vocab_size)
        self.sampler = Sampler(self.vocab_size, self._eos_token_id(), self.device, args.seed)
        self.generators: dict[int, torch.Generator] = {}  # seq_id -> per-request generator
        # None on CPU / without triton / LONGCAT_ENFORCE_EAGER=1 / under TP without LONGCAT_TP_CUDA_GRAPHS=1; with MTP
        # every step is a spec step (engine/spec_decode.py), whose decode steps replay the spec graphs
        # (engine/spec_graph_runner.py) instead
        self.graph_runner = create_graph_runner(self) if self.uses_cuda_graphs and self.spec_config is None else None
        self.spec_decoder = None
        graphs = self.graph_runner
        if self.spec_config is not None:
            from longcat_service.engine.spec_decode import SpecDecoder
            from longcat_service.engine.spec_graph_runner import create_spec_graph_runner

            k = self.spec_config.num_speculative_tokens
            self.spec_decoder = SpecDecoder(self, k)
            if self.uses_cuda_graphs:
                graphs = self.spec_decoder.graphs = create_spec_graph_runner(self, k)
        if graphs is not None and args.capture_graphs_at_startup:
            from longcat_service.kernels.compile_watch import warming_up, watch_compiles_after_warm_up

            with warming_up():  # not reported, also when an earlier engine of this process installed the watch
                t0 = time.perf_counter()
                graphs.capture_all()
                logger.info("captured %d %s CUDA graphs in %.1f s", len(graphs.graphs),
                            "decode" if graphs is self.graph_runner else "spec-step", time.perf_counter() - t0)
                t0 = time.perf_counter()
                # one GPU only: under TP rank 0's steps are also broadcast to the workers, which would replay them
                if get_tp_size() == 1 and self.warm_up_prefill():
                    logger.info("warmed up the prefill kernels in %.1f s", time.perf_counter() - t0)
            watch_compiles_after_warm_up()  # from now on, a new Triton specialization is logged (cold-start stalls)

    @torch.inference_mode()
    def warm_up_prefill(self) -> bool:
        """Run the prefill shapes once before serving, so that Triton compiles (and cuBLAS, the side stream and
        the caching allocator set up) the prefill path now rather than inside the first requests' time to first
        token: flash attention on a whole prompt and on a chunk after cached context, lengths that are and are
        not multiples of 16, several prompts in one step, a MoE with enough slots for the grouped-GEMM path, a step
        over 1024 tokens (where the opt-in side-stream MoE starts), a step of the whole token budget and one of each
        WARMUP_MID_STEP_TOKENS below it, and decode rows mixed with a prefill. Uses the first KV blocks while the
        engine holds none (their contents never matter: a block is written before any request reads it).
        False when the cache or the model's context is too small for it."""
        from longcat_service.engine.sequence import Sequence, SequenceGroup
        from longcat_service.sampling_params import SamplingParams

        chunk, shorts = 19, (17, 32)
        k = self.spec_config.num_speculative_tokens if self.spec_config is not None else 0
        margin = 2 * k + 2 if k else 0  # spec steps: drafts verified, then MTP cache writes k positions further
        max_pos = int(self.config.max_position_embeddings)
        first_len = min(WARMUP_PROMPT_TOKENS, max_pos - chunk - 1 - margin)
        # the long prompt plus a decode row make the largest step the scheduler builds (the token budget), so
        # that its kernels, workspace sizes and allocator blocks exist before the first request of that size;
        # at least WARMUP_LONG_TOKENS; when the cache is too small for the budget, WARMUP_LONG_TOKENS only
        for long_len in (max(WARMUP_LONG_TOKENS, self.args.max_num_batched_tokens - 1), WARMUP_LONG_TOKENS):
            long_len = min(long_len, max_pos)
            lengths = (first_len + chunk + 1, long_len, *shorts)
            need = [-(-(n + margin) // self.block_size) for n in lengths]
            if sum(need) <= self.num_blocks:
                break
        if first_len < max(shorts) or sum(need) > self.num_blocks:
            logger.warning("prefill warm-up skipped: the KV cache (%d blocks) or the context (%d tokens) is too "
                           "small for it; the first requests may compile Triton kernels", self.num_blocks, max_pos)
            return False
        gen = torch.Generator().manual_seed(0)
        seqs, first = [], 0
        for i, (n, blocks) in enumerate(zip(lengths, need, strict=True)):
            prompt = torch.randint(3, self.vocab_size, (n,), generator=gen).tolist()
            params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
            seq = Sequence(SequenceGroup(f"__warmup_{i}", prompt, params, time.monotonic()), 0)
            seq.block_table = list(range(first, first + blocks))
            first += blocks
            seqs.append(seq)
        a, b = seqs[0], seqs[1]
        batches = [[ScheduledSeq(a, first_len, 0)],  # a whole prompt
                   [ScheduledSeq(a, chunk, first_len)],  # a chunk after cached context
                   [ScheduledSeq(a, 1, first_len + chunk), ScheduledSeq(b, long_len, 0)],  # a decode row + a long prompt
                   [ScheduledSeq(s, s.num_tokens, 0) for s in seqs[2:]]]  # two short prompts
        for n in WARMUP_MID_STEP_TOKENS:
            if WARMUP_LONG_TOKENS < n < long_len:  # the long prompt's blocks hold it
                prompt = torch.randint(3, self.vocab_size, (n,), generator=gen).tolist()
                params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
                mid = Sequence(SequenceGroup(f"__warmup_mid_{n}", prompt, params, time.monotonic()), 0)
                mid.block_table = b.block_table[: -(-n // self.block_size)]
                seqs.append(mid)
                batches.append([ScheduledSeq(mid, n, 0)])
        if k:  # an eager verify of k drafts (a multi-token query) beside a prompt
            batches.append([ScheduledSeq(a, 1 + k, first_len + chunk, draft_token_ids=[3] * k),
                            ScheduledSeq(seqs[2], seqs[2].num_tokens, 0)])
        for batch in batches:
            self.execute(batch)
        for seq in seqs:
            self.release(seq.seq_id)
        return True

    def _eos_token_id(self) -> int | None:
        eos = getattr(self.config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        return eos

    def kv_bytes_per_block(self) -> int:
        from longcat_service.model.kv_cache import allocate_kv_caches

        probe = allocate_kv_caches(self.config, 1, self.block_size, self.dtype, torch.device("meta"),
                                   self.num_mtp_cache_layers)
        return sum(t.numel() * t.element_size() for t in probe)

    def _decide_num_blocks(self) -> int:
        args = self.args
        if args.num_kv_blocks is not None:
            return args.num_kv_blocks
        per_block = self.kv_bytes_per_block()
        budget = args.kv_cache_memory_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * args.gpu_memory_utilization)
            else:
                budget = CPU_DEFAULT_KV_CACHE_BYTES
        num_blocks = budget // per_block - self.num_scratch_blocks
        if num_blocks < 1:
            raise EngineArgsError("kv_cache_memory_bytes", f"{budget} bytes hold no KV block ({per_block} bytes each)")
        return int(num_blocks)

    def share_decision(self, value):
        """A speculative step's host-side decision that later forwards depend on (engine/spec_decode.py): rank 0's
        value on every rank. One GPU: the value itself; TP runners broadcast it (tp_worker.py)."""
        return value

    def release(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)
        if self.spec_decoder is not None:
            self.spec_decoder.release(seq_id)

    # ---- one step ------------------------------------------------------------------------------
    def execute(self, batch: list[ScheduledSeq]) -> list[SeqStepResult]:
        """Run one step to completion (launch, then wait for its results)."""
        return self.collect(self.launch(batch))

    @torch.inference_mode()
    def launch(self, batch: list[ScheduledSeq], input_ids: torch.Tensor | None = None) -> StepHandle:
        """Build the step's inputs and enqueue forward, logits, prompt logprobs and sampling on the device.
        Nothing is read back here (no .item()/.tolist()/branch on device values), so on CUDA the host returns
        while the GPU works; `collect` waits. Host-to-device copies that follow the forward go through
        pinned memory (host_to_device.to_device), since a blocking copy would wait for the forward.
        `input_ids` (a decode batch's tokens as a device tensor, e.g. the previous step's samples) replaces the
        host token ids, which the caller may not know yet."""
        if self.spec_decoder is not None:  # speculative: the target forward now; verification and drafts in collect
            if get_tp_size() > 1:  # TP: the whole step here (the workers follow rank 0's decisions mid-step)
                return StepHandle(len(batch), [], results=self.spec_decoder.execute(batch))
            return StepHandle(len(batch), [], spec=self.spec_decoder.launch(batch))
        if input_ids is not None and any(s.num_new_tokens != 1 for s in batch):
            raise ValueError("launch: device input_ids are for decode batches (one new token per sequence)")
        if self.graph_runner is not None:  # pure decode batches replay a captured CUDA graph
            # an EP replay that overflows runs again eagerly: its expert-load counting is taken back first
            counted = (self.expert_load.save() if self.expert_load is not None and self._ep_overflowed is not None
                       else None)
            try:
                logits = decode_logits_with_graph(self.graph_runner, batch, input_ids)
            except Exception:  # e.g. a capture-unsafe op (host sync) in the decode path: serve eagerly instead
                if get_tp_size() > 1:  # the other ranks replay (collectives inside): this one cannot go eager alone
                    raise
                logger.exception("CUDA-graph decode failed; running eagerly from now on")
                self.graph_runner = None
                logits = None
            if logits is not None and self._ep_overflowed is not None and self._ep_overflowed():
                # some expert's rank got more rows than the buffers hold: the replay dropped slots and its logits
                # are wrong; the same step runs again eagerly (variable splits; it rewrites the same cache slots).
                # Every rank reads the same flag (all-reduced in the graph), so all ranks re-run it together.
                self.ep_capacity_overflows += 1
                if counted is not None:
                    self.expert_load.restore(counted)
                logits = None
            if logits is not None:
                trace = self.trace
                if trace is not None:
                    trace.mark("graph_replay")
                rows = [self._sampling_row(s.seq, pending=input_ids is not None) for s in batch]
                handle = StepHandle(len(batch), list(range(len(batch))), self.sampler.launch(logits, rows, input_ids))
                if trace is not None:
                    trace.mark("sample")
                return handle
        starts = [0]
        for s in batch:
            starts.append(starts[-1] + s.num_new_tokens)
        sample_idx = [i for i, s in enumerate(batch) if s.needs_sample]
        # every host list the step needs goes to the device before the forward is queued
        metadata = AttentionMetadata.build(
            query_lens=[s.num_new_tokens for s in batch],
            seq_lens=[s.end_pos for s in batch],
            block_tables=[s.block_table for s in batch],
            block_size=self.block_size,
            device=self.device,
        )
        # token ids (unless on the device already), positions and sample rows: one int64 host buffer, one pinned
        # copy, then views
        n = starts[-1]
        off = 0 if input_ids is not None else n
        packed = np.empty(off + n + len(sample_idx), dtype=np.int64)
        if input_ids is None:
            host_ids: list[int] = []
            for s in batch:
                host_ids += s.seq.token_ids[s.start_pos : s.end_pos]
            packed[:n] = np.fromiter(host_ids, dtype=np.int64, count=n)  # ~1.6x faster than from the list
        if any(s.num_new_tokens >= 64 for s in batch):  # long prompts: one arange each, not a list per token
            for s, first in zip(batch, starts, strict=False):
                packed[off + first : off + first + s.num_new_tokens] = np.arange(s.start_pos, s.end_pos)
        else:
            packed[off : off + n] = [p for s in batch for p in range(s.start_pos, s.end_pos)]
        packed[off + n :] = [starts[i + 1] - 1 for i in sample_idx]
        packed_t = to_device(torch.from_numpy(packed), torch.long, self.device)
        ids_t = input_ids.to(torch.long) if input_ids is not None else packed_t[:n]
        pos_t, sample_rows_t = packed_t[off : off + n], packed_t[off + n :]
        trace = self.trace
        if trace is not None:
            trace.mark("prepare")
        hidden = self.model(ids_t, pos_t, metadata, self.kv_caches)
        if trace is not None:
            trace.mark("forward")

        handle = StepHandle(len(batch), sample_idx)
        self._launch_prompt_logprobs(batch, hidden, starts, handle)
        if sample_idx:
            sample_rows = packed[off + n :]
            if len(sample_rows) == 1:  # one sampled row (a prompt's last token): a view, no gather kernel
                sampled_hidden = hidden[int(sample_rows[0]) : int(sample_rows[0]) + 1]
            elif len(sample_rows) == n:  # every row samples (decode)
                sampled_hidden = hidden
            else:
                sampled_hidden = hidden[sample_rows_t]
            logits = self.model.compute_logits(sampled_hidden)
            rows = [self._sampling_row(batch[i].seq, pending=input_ids is not None) for i in sample_idx]
            pending = input_ids[sample_rows_t] if input_ids is not None else None
            handle.sampled = self.sampler.launch(logits, rows, pending)
        if trace is not None:
            trace.mark("sample")
        return handle

    def sampled_tokens(self, handle: StepHandle, rows: list[int]) -> torch.Tensor:
        """The tokens a launched, not yet collected step samples for its batch `rows` (a device tensor): the
        input of a chained decode step."""
        pos = {row: i for i, row in enumerate(handle.sample_idx)}
        idx = [pos[r] for r in rows]
        tokens = handle.sampled.tokens
        if idx == list(range(tokens.shape[0])):
            return tokens
        return tokens.index_select(0, to_device(idx, torch.long, tokens.device))

    def can_chain_spec(self, handle: StepHandle) -> bool:
        """A speculative step can be launched after this launched one before it is read back (one GPU, a device-side
        greedy step: spec_decode.SpecDecoder.can_chain)."""
        return (self.spec_decoder is not None and handle.spec is not None and get_tp_size() == 1
                and self.spec_decoder.can_chain(handle.spec))

    def launch_chained_spec(self, batch: list[ScheduledSeq], handle: StepHandle) -> StepHandle | None:
        """Enqueue the spec step after `handle` (can_chain_spec) for the same sequences, its inputs from the device.
        None: it cannot be (nothing enqueued)."""
        spec = self.spec_decoder.launch_chained(batch, handle.spec)
        return StepHandle(len(batch), [], spec=spec) if spec is not None else None

    @torch.inference_mode()
    def copy_kv_slots(self, dst_slots: list[int], src_slots: list[int]) -> None:
        """Enqueue cache-entry copies (slot = block * block_size + offset) in every attention sublayer."""
        if not dst_slots:
            return
        dst = to_device(dst_slots, torch.long, self.device)
        src = to_device(src_slots, torch.long, self.device)
        for cache in self.kv_caches:
            flat = cache.view(-1, cache.shape[-1])
            flat.index_copy_(0, dst, flat.index_select(0, src))

    def collect(self, handle: StepHandle) -> list[SeqStepResult]:
        """Wait for a launched step: its sampled tokens (and logprobs) to the host. The step's one sync."""
        if handle.results is not None:
            return handle.results
        if handle.spec is not None:
            return self.spec_decoder.finish(handle.spec)
        trace = self.trace
        if trace is not None:  # the device's remaining work apart from the host's read-back
            if handle.sampled is not None:
                handle.sampled.wait()
            trace.mark("wait")
        results = [SeqStepResult() for _ in range(handle.batch_size)]
        if handle.sampled is not None:
            tokens, logprobs = self.sampler.collect(handle.sampled)
            for i, tok, lp in zip(handle.sample_idx, tokens, logprobs, strict=True):
                if tok == NONFINITE_TOKEN:
                    results[i].error = ("the model's logits for this request were not finite (NaN or inf, or every "
                                        "token masked); no token was sampled")
                    continue
                results[i].token_id = tok
                results[i].logprob = lp
        for i, chunks in handle.prompt_logprobs.items():
            out: list[Logprob] = []
            for c in chunks:
                chosen = c.chosen.tolist()
                top_ids = c.top_ids.tolist() if c.top_ids is not None else None
                top_vals = c.top_vals.tolist() if c.top_vals is not None else None
                for k, tok in enumerate(c.targets):
                    top_map = dict(zip(top_ids[k], top_vals[k], strict=True)) if top_ids is not None else {}
                    top_map[tok] = chosen[k]
                    out.append(Logprob(tok, chosen[k], top_map))
            results[i].prompt_logprobs = out
        if trace is not None:
            trace.mark("readback")
        return results

    def _sampling_row(self, seq, pending: bool = False) -> SamplingRow:
        """pending: the sequence's last token is the step's device input (a chained step), not yet on the host."""
        gen = None
        if seq.params.seed is not None:
            gen = self.generators.get(seq.seq_id)
            if gen is None:
                gen = self.generators[seq.seq_id] = self.sampler.make_generator(seq.params.seed + seq.index)
        # the prompt is only read by the repetition penalty: skip copying it (every step, every row) otherwise
        prompt = seq.token_ids[: seq.num_prompt_tokens] if seq.params.repetition_penalty != 1.0 else []
        return SamplingRow(seq.params, prompt, seq.output_token_ids, gen, num_pending=int(pending))

    @staticmethod
    def empty_results(n: int) -> list[SeqStepResult]:
        return [SeqStepResult() for _ in range(n)]

    def results_with_prompt_logprobs(self, batch, hidden, starts) -> list[SeqStepResult]:
        """A step's results holding only its prompt logprobs (speculative steps add their tokens)."""
        handle = StepHandle(len(batch), [])
        self._launch_prompt_logprobs(batch, hidden, starts, handle)
        return self.collect(handle)

    def _launch_prompt_logprobs(self, batch, hidden, starts, handle: StepHandle) -> None:
        """Raw logprob of each prompt token given its prefix, for requests that asked (enqueued, read in collect)."""
        for i, s in enumerate(batch):
            seq = s.seq
            n = seq.params.prompt_logprobs
            if n is None or seq.index != 0:
                continue
            last = min(s.end_pos, seq.num_prompt_tokens - 1)  # rows start_pos..last-1 predict prompt tokens
            if last <= s.start_pos:
                continue
            chunks = handle.prompt_logprobs[i] = []
            for c0 in range(s.start_pos, last, PROMPT_LOGPROB_ROWS_PER_CHUNK):
                c1 = min(last, c0 + PROMPT_LOGPROB_ROWS_PER_CHUNK)
                rows = hidden[starts[i] + c0 - s.start_pos : starts[i] + c1 - s.start_pos]
                logprobs = torch.log_softmax(self.model.compute_logits(rows).float(), dim=-1)
                targets = list(seq.token_ids[c0 + 1 : c1 + 1])
                chosen = logprobs.gather(1, to_device(targets, torch.long, logprobs.device)[:, None])[:, 0]
                chunk = _PromptLogprobChunk(targets, chosen)
                if n > 0:
                    chunk.top_vals, chunk.top_ids = logprobs.topk(n, dim=-1)
                chunks.append(chunk)

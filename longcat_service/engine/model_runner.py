"""Owns every device tensor: the model, the paged latent KV caches, step inputs, logits and sampling."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from longcat_service.engine.engine_args import EngineArgs
from longcat_service.engine.errors import EngineArgsError
from longcat_service.engine.sampler import Sampler, SamplingRow
from longcat_service.engine.scheduler import ScheduledSeq
from longcat_service.model.attention_metadata import AttentionMetadata
from longcat_service.outputs import Logprob

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_CACHE_BYTES = 128 * 2**20
PROMPT_LOGPROB_ROWS_PER_CHUNK = 256  # bounds the [rows, vocab] fp32 logits held at once


@dataclass
class SeqStepResult:
    token_id: int | None = None  # sampled when the chunk reached the sequence's last token
    logprob: Logprob | None = None
    prompt_logprobs: list[Logprob] | None = None  # for prompt positions start_pos+1 ..


class ModelRunner:
    def __init__(self, args: EngineArgs, model_path):
        from longcat_service.model.loader import load_model  # the model package is heavy; import on use

        self.args = args
        self.device = args.torch_device
        self.model = load_model(model_path, dtype=args.torch_dtype, device=self.device, load_format=args.load_format,
                                hf_overrides=args.hf_overrides)
        self.model.eval()
        self.config = self.model.config
        self.dtype = next(self.model.parameters()).dtype
        self.block_size = args.block_size
        self.num_blocks = self._decide_num_blocks()
        from longcat_service.model.kv_cache import allocate_kv_caches

        self.kv_caches = allocate_kv_caches(self.config, self.num_blocks, self.block_size, self.dtype, self.device)
        self.vocab_size = int(self.config.vocab_size)
        self.sampler = Sampler(self.vocab_size, self._eos_token_id(), self.device, args.seed)
        self.generators: dict[int, torch.Generator] = {}  # seq_id -> per-request generator
        from longcat_service.engine.cuda_graph_runner import create_graph_runner

        self.graph_runner = create_graph_runner(self)  # None on CPU / without triton / LONGCAT_ENFORCE_EAGER=1

    def _eos_token_id(self) -> int | None:
        eos = getattr(self.config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        return eos

    def kv_bytes_per_block(self) -> int:
        from longcat_service.model.kv_cache import allocate_kv_caches

        probe = allocate_kv_caches(self.config, 1, self.block_size, self.dtype, torch.device("meta"))
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
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise EngineArgsError("kv_cache_memory_bytes", f"{budget} bytes hold no KV block ({per_block} bytes each)")
        return int(num_blocks)

    def release(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)

    # ---- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> list[SeqStepResult]:
        if self.graph_runner is not None:  # pure decode batches replay a captured CUDA graph
            from longcat_service.engine.cuda_graph_runner import execute_decode_with_graph

            try:
                results = execute_decode_with_graph(self.graph_runner, self, batch)
            except Exception:  # e.g. a capture-unsafe op (host sync) in the decode path: serve eagerly instead
                logger.exception("CUDA-graph decode failed; running eagerly from now on")
                self.graph_runner = None
                results = None
            if results is not None:
                return results
        input_ids: list[int] = []
        positions: list[int] = []
        for s in batch:
            input_ids.extend(s.seq.token_ids[s.start_pos : s.end_pos])
            positions.extend(range(s.start_pos, s.end_pos))
        metadata = AttentionMetadata.build(
            query_lens=[s.num_new_tokens for s in batch],
            seq_lens=[s.end_pos for s in batch],
            block_tables=[s.seq.block_table for s in batch],
            block_size=self.block_size,
            device=self.device,
        )
        ids_t = torch.tensor(input_ids, dtype=torch.long).to(self.device, non_blocking=True)
        pos_t = torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True)
        hidden = self.model(ids_t, pos_t, metadata, self.kv_caches)

        results = [SeqStepResult() for _ in batch]
        starts = [0]
        for s in batch:
            starts.append(starts[-1] + s.num_new_tokens)
        self._prompt_logprobs(batch, hidden, starts, results)
        sample_idx = [i for i, s in enumerate(batch) if s.needs_sample]
        if sample_idx:
            rows = torch.tensor([starts[i + 1] - 1 for i in sample_idx], device=self.device)
            logits = self.model.compute_logits(hidden[rows])
            tokens, logprobs = self.sampler(logits, [self._sampling_row(batch[i].seq) for i in sample_idx])
            for i, tok, lp in zip(sample_idx, tokens, logprobs, strict=True):
                results[i].token_id = tok
                results[i].logprob = lp
        return results

    def _sampling_row(self, seq) -> SamplingRow:
        gen = None
        if seq.params.seed is not None:
            gen = self.generators.get(seq.seq_id)
            if gen is None:
                gen = self.generators[seq.seq_id] = self.sampler.make_generator(seq.params.seed + seq.index)
        return SamplingRow(seq.params, seq.token_ids[: seq.num_prompt_tokens], seq.output_token_ids, gen)

    def _prompt_logprobs(self, batch, hidden, starts, results) -> None:
        """Raw logprob of each prompt token given its prefix, for requests that asked."""
        for i, s in enumerate(batch):
            seq = s.seq
            n = seq.params.prompt_logprobs
            if n is None or seq.index != 0:
                continue
            last = min(s.end_pos, seq.num_prompt_tokens - 1)  # rows start_pos..last-1 predict prompt tokens
            if last <= s.start_pos:
                continue
            out: list[Logprob] = []
            for c0 in range(s.start_pos, last, PROMPT_LOGPROB_ROWS_PER_CHUNK):
                c1 = min(last, c0 + PROMPT_LOGPROB_ROWS_PER_CHUNK)
                rows = hidden[starts[i] + c0 - s.start_pos : starts[i] + c1 - s.start_pos]
                logprobs = torch.log_softmax(self.model.compute_logits(rows).float(), dim=-1)
                targets = torch.tensor(seq.token_ids[c0 + 1 : c1 + 1], device=logprobs.device)
                chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
                top_ids = top_vals = None
                if n > 0:
                    top = logprobs.topk(n, dim=-1)
                    top_ids, top_vals = top.indices.tolist(), top.values.tolist()
                for k, tok in enumerate(seq.token_ids[c0 + 1 : c1 + 1]):
                    top_map = dict(zip(top_ids[k], top_vals[k], strict=True)) if n else {}
                    top_map[tok] = chosen[k]
                    out.append(Logprob(tok, chosen[k], top_map))
            results[i].prompt_logprobs = out

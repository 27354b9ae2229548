"""Speculative decoding with the checkpoint's MTP block: one eager spec step per engine step.

A step for each scheduled sequence:
1. Target forward over its new tokens: a prompt chunk, or (decoding) its last token plus the d <= k drafts of
   the previous step, as one multi-token query per sequence through the extend-attention path.
2. Verification (rejection sampling, Leviathan et al. 2023), on the distributions the plain sampler draws from
   (Sampler.probabilities: after logit_bias, min_tokens, penalties counting the drafts before each position,
   temperature, top-k/p, min-p; greedy rows are point masses). Draft j is accepted with probability
   min(1, p_j(d) / q_j(d)); at the first rejection the token is drawn from normalize(max(p_j - q_j, 0)); when all
   are accepted a bonus token is drawn from the target. So every emitted token has exactly the target's
   distribution, and greedy rows emit exactly the target's argmax. Logprobs are the raw target logprobs, as
   the plain sampler reports them.
3. MTP forward over the positions whose tokens are now known (writes the MTP cache; mtp.py), then up to k
   drafts for the next step: the first from the MTP output at the last known position, the others by running
   the MTP block again on its own draft token and output hidden state.

A prefix-cache hit or an n > 1 fork recomputes the last shared token (the MTP block needs its hidden state); its
target cache entry is written to a scratch slot, so a block other sequences share is never rewritten.

Randomness: a request with a seed takes every uniform from a hash of (its seed + sequence index, the token position
it decides, the kind of draw) (engine/seeded_draws.py), on the host path and in the device-side step alike, so its
output depends on its seed and logits only: not on the batch, nor on which path ran a step. It differs from MTP off
with the same seed (that draws from a torch.Generator). Unseeded rows draw from the engine's generator (host path)
or torch's default one (device step). Rejected drafts need no cache
rollback: their target and MTP cache slots lie past the sequence's computed tokens and are overwritten before
they are read; the scheduler keeps the blocks (they hold the next step's tokens) and frees them with the
sequence. Two device syncs per step (verified tokens, drafts). `launch` enqueues step 1 and `finish` does the rest,
so the engine overlaps the previous step's host work with the target forward (overlap_steps). Decode batches that
fit a bucket run steps 1 and 3 as CUDA-graph replays (engine/spec_graph_runner.py); the rest runs eagerly.

Plain-greedy decode batches (every row Sampler.plain_greedy: argmax of the raw logits, nothing else asked) that fit
a bucket take a faster path: the whole step is one graph replay (engine/spec_greedy.py: argmax acceptance, MTP
pass, drafts, all on the device) enqueued by `launch`, and `finish` reads one small tensor: one host read per step.
Batches mixing plain-greedy and plain-sampled rows (Sampler.plain_sampled: temperature / top-k / top-p / min-p only,
seeded or not) take the same kind of step with rejection sampling on the device (engine/spec_sampled.py; unseeded
randomness from torch's default generator, not the engine's); the distributions their drafts were drawn from stay on the
device (draft_probs holds views of the step's output). A batch with any other row is verified on the host.
With async scheduling the device-side greedy step of the same sequences can be launched before the previous one is
read back, its inputs taken from that step's result on the device (launch_chained; engine/spec_chain.py).
A sequence aborted while such a step is in flight gets nothing from it; the step's cache writes for it (already
enqueued) land in slots past its computed tokens, before any later step's, as its verify writes always did.

Tensor parallelism: every rank runs the same forwards and logits (the collectives line up); only rank 0
samples. Its decisions that later forwards depend on (the emitted tokens, failed rows and draft counts after
verification; each draft token that feeds another MTP pass) reach the other ranks through runner.share_decision
(a broadcast on the TP control group, engine/tp_worker.py; the identity at TP=1). With LONGCAT_TP_CUDA_GRAPHS=1
every rank replays the host-verified spec graphs (verify, mtp, draft; engine/spec_graph_runner.py) in lockstep: each
graph/eager choice here (can_verify, the bucket, fits for the recursive drafts) reads only the step's wire rows and
the shared decision, which every rank has alike; the device-side greedy / sampled steps stay off (rank 0 decides).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from longcat_service.engine.sampler import SamplingRow
from longcat_service.engine.scheduler import ScheduledSeq
from longcat_service.engine.seeded_draws import ACCEPT, DRAFT, TARGET, RowSeeds, row_seed, seed_columns
from longcat_service.engine.spec_greedy import GreedyLayout, GreedyReadback, draft_room
from longcat_service.engine.spec_sampled import option_rows
from longcat_service.layers.attention_metadata import AttentionMetadata
from longcat_service.layers.host_to_device import to_device
from longcat_service.model.mtp import build_mtp_plan
from longcat_service.outputs import Logprob

logger = logging.getLogger(__name__)

NONFINITE_ERROR = ("the model's logits for this request were not finite (NaN or inf, or every token masked); no "
                   "token was sampled")


@dataclass
class SpecLaunch:
    """A spec step whose target forward is enqueued: what SpecDecoder.finish needs."""

    batch: list[ScheduledSeq]
    hidden: torch.Tensor  # the target's final hidden states (eager: in batch order; graphs: the flat rows)
    starts: list[int] | None  # eager: each sequence's first row
    bucket: int | None = None  # graphs: the bucket replayed
    graph_logits: torch.Tensor | None = None  # graphs: fp32 logits of the flat rows
    greedy: GreedyReadback | None = None  # a device-side step: its whole result, on its way to the host
    draft_dists: torch.Tensor | None = None  # a device-side sampled step: its new drafts' distributions [b, k, V]


class SpecDecoder:
    def __init__(self, runner, num_speculative_tokens: int):
        self.runner = runner
        self.k = num_speculative_tokens
        self.decides = getattr(runner, "samples_tokens", True)  # False on TP ranks > 0: they follow rank 0
        self.graphs = None  # a SpecGraphRunner (CUDA; set by the ModelRunner): decode spec steps replay graphs
        self.fuse_greedy = True  # plain-greedy batches: the whole step on the device (off: benchmarks compare)
        self.fuse_sampled = True  # the same for batches of plain-greedy and plain-sampled rows
        # the sampled step's output distributions of the last step and its sequences (the next step loads them in one
        # copy when its batch is the same sequences in the same order)
        self._last_dists: tuple[list[int], torch.Tensor] | None = None
        # no draft past the model's context: on CUDA, rotary cos/sin come from a table of max_position_embeddings
        # rows, and an MTP pass past it is an out-of-range gather (a device-side assert)
        self.context = int(getattr(runner.config, "max_position_embeddings", 0) or 0) or None
        # seq_id -> [drafts, vocab] the distributions its pending drafts were drawn from (sampled requests only)
        self.draft_probs: dict[int, torch.Tensor] = {}

    def release(self, seq_id: int) -> None:
        self.draft_probs.pop(seq_id, None)

    def execute(self, batch: list[ScheduledSeq]):
        return self.finish(self.launch(batch))

    @torch.inference_mode()
    def launch(self, batch: list[ScheduledSeq]) -> SpecLaunch:
        """Enqueue the target forward (a graph replay for decode batches that fit) without reading anything back:
        with overlap_steps the engine does the previous step's host work while the device computes it."""
        if self.graphs is not None and self.graphs.can_verify(batch):
            if getattr(self.graphs, "greedy_ok", True) and self._plain_greedy(batch):
                try:
                    rooms = [draft_room(s.seq.num_tokens, s.token_limit, self.context) for s in batch]
                    bucket, packed = self.graphs.greedy_step(batch, rooms)
                    return SpecLaunch(batch, None, None, bucket, greedy=GreedyReadback(packed, len(batch)))
                except Exception:  # e.g. a capture-unsafe op: the step-by-step path below instead
                    logger.exception("device-side greedy spec step failed; verifying on the host from now on")
                    self.fuse_greedy = False
            elif getattr(self.graphs, "sampled_ok", True) and self._plain_sampled(batch):
                try:
                    return self._launch_sampled(batch)
                except Exception:  # e.g. a capture-unsafe op: the step-by-step path below instead
                    logger.exception("device-side sampled spec step failed; verifying on the host from now on")
                    self.fuse_sampled = False
            try:
                bucket, hidden, graph_logits = self.graphs.verify(batch)
                return SpecLaunch(batch, hidden, None, bucket, graph_logits)
            except Exception:  # e.g. a capture-unsafe op in the decode path: serve eagerly instead
                if getattr(self.graphs, "lockstep", False):  # TP: the other ranks replay; this one cannot leave
                    raise
                logger.exception("CUDA-graph spec step failed; running eagerly from now on")
                self.graphs = None
        hidden, starts = self._target_forward(batch)
        return SpecLaunch(batch, hidden, starts)

    def can_chain(self, step: SpecLaunch) -> bool:
        """A step can be chained to this launched one (async scheduling, spec_chain.py): it is a device-side greedy
        step (not sampled) and the greedy step is still in use."""
        return (step.greedy is not None and step.draft_dists is None and self.graphs is not None and self.fuse_greedy
                and self.decides and getattr(self.graphs, "greedy_ok", True))

    @torch.inference_mode()
    def launch_chained(self, batch: list[ScheduledSeq], prev: SpecLaunch) -> SpecLaunch | None:
        """Enqueue the greedy step after `prev` (can_chain) for the same sequences in the same order, before `prev` is
        read back: its inputs come from prev's result on the device (spec_chain_rows.py). The batch's host fields
        (start_pos, drafts) are provisional until the engine commits prev's result (spec_chain.py); its block
        tables cover every draft of prev accepted. A failure raises (no host-verified fallback: the inputs are not
        on the host yet). None: the reserved tables do not fit the graphs' table buffers (nothing enqueued)."""
        if not self.graphs.fits([s.block_table for s in batch]):
            return None
        starts = [s.start_pos for s in prev.batch]
        rooms = [draft_room(s.seq.num_tokens, s.token_limit, self.context) for s in prev.batch]
        bucket, packed = self.graphs.chained_greedy_step(batch, prev.greedy.device_packed, starts, rooms)
        return SpecLaunch(batch, None, None, bucket, greedy=GreedyReadback(packed, len(batch)))

    @torch.inference_mode()
    def finish(self, step: SpecLaunch):
        """Verification, then the MTP pass and the next drafts -> the step's results. A sequence finished since the
        launch (an abort between engine calls; its blocks are free) gets nothing: no tokens, cache writes or drafts."""
        r = self.runner
        batch, hidden, starts = step.batch, step.hidden, step.starts
        gone = {i for i, s in enumerate(batch) if getattr(s.seq, "is_finished", False)}
        if step.greedy is not None:
            return self._greedy_results(batch, step.greedy.rows(), gone, step.draft_dists)
        if step.bucket is None:
            results = r.results_with_prompt_logprobs(batch, hidden, starts)
            row_base = [starts[i] + s.num_new_tokens - 1 - len(s.draft_token_ids) for i, s in enumerate(batch)]

            def logits_of(rows: torch.Tensor) -> torch.Tensor:
                return r.model.compute_logits(hidden[rows]).float()
        else:  # flat rows: sequence i's verify token j is row i*(k+1) + j (spec_graph_runner.py)
            results = r.empty_results(len(batch))  # decode rows past the prompt: no prompt logprobs
            row_base = [i * (self.k + 1) for i in range(len(batch))]

            def logits_of(rows: torch.Tensor) -> torch.Tensor:
                return step.graph_logits.index_select(0, rows)
        emitted = self._verify(batch, row_base, logits_of, results, gone)
        failed = [i for i, res in enumerate(results) if res.error is not None or i in gone]
        counts = self._draft_counts(batch, emitted) if self.decides else None
        emitted, failed, counts = r.share_decision((emitted, failed, counts))
        if step.bucket is None:
            self._draft(batch, hidden, starts, emitted, set(failed), counts, results)
        else:
            self._draft_with_graphs(batch, step.bucket, emitted, set(failed), counts, results)
        return results

    def _plain_greedy(self, batch: list[ScheduledSeq]) -> bool:
        """The device-side greedy step applies: enabled, rank 0 of one GPU, every row plain greedy."""
        sampler = self.runner.sampler
        return self.fuse_greedy and self.decides and all(
            sampler.plain_greedy(s.seq.params, s.seq.num_output_tokens) for s in batch)

    def _plain_sampled(self, batch: list[ScheduledSeq]) -> bool:
        """The device-side sampled step applies: enabled, rank 0 of one GPU, every row plain greedy or plain sampled
        (Sampler.plain_sampled: no penalties, logit_bias, logprobs; min_tokens reached), and some row sampled
        (an all-greedy batch takes the cheaper greedy step, or the host path where that is off)."""
        sampler = self.runner.sampler
        return self.fuse_sampled and self.decides and not all(s.seq.params.greedy for s in batch) and all(
            sampler.plain_greedy(s.seq.params, s.seq.num_output_tokens)
            or sampler.plain_sampled(s.seq.params, s.seq.num_output_tokens) for s in batch)

    def _launch_sampled(self, batch: list[ScheduledSeq]) -> SpecLaunch:
        """Enqueue the device-side step of a batch of plain-greedy and plain-sampled rows (spec_sampled.py)."""
        rooms = [draft_room(s.seq.num_tokens, s.token_limit, self.context) for s in batch]
        ids = [s.seq.seq_id for s in batch]
        stored = [self.draft_probs.get(i) for i in ids]
        dists = stored
        last = self._last_dists
        if last is not None and last[0] == ids and all(
                d is None or (d.data_ptr() == last[1][j].data_ptr()) for j, d in enumerate(stored)):
            dists = last[1]  # the same sequences in the same order: one copy of the last step's output
        options = option_rows([s.seq.params for s in batch])
        seeds = [row_seed(s.seq.params.seed, s.seq.index) for s in batch]
        seed_cols = seed_columns(seeds) if any(x is not None for x in seeds) else None
        bucket, packed, new_dists = self.graphs.sampled_step(batch, rooms, options, dists, seed_cols)
        # the graph's output is overwritten by the bucket's next replay: keep a copy (stream-ordered, no host sync)
        new_dists = new_dists[: len(batch)].clone()
        self._last_dists = (ids, new_dists)
        return SpecLaunch(batch, None, None, bucket, greedy=GreedyReadback(packed, len(batch)),
                          draft_dists=new_dists)

    def _greedy_results(self, batch, packed_rows: list[list[int]], gone: set[int],
                        draft_dists: torch.Tensor | None = None):
        """The host side of a device-side greedy step: its packed rows -> the step's results."""
        layout = GreedyLayout(self.k)
        results = self.runner.empty_results(len(batch))
        for i, (s, row) in enumerate(zip(batch, packed_rows, strict=True)):
            self.draft_probs.pop(s.seq.seq_id, None)  # greedy drafts are point masses: nothing stored
            if i in gone:
                continue
            toks, drafts = layout.unpack(row)
            res = results[i]
            if not toks:  # the stopping row's logits were not finite: as the sampler, this request fails
                res.error = NONFINITE_ERROR
                continue
            res.token_id = toks[0]
            res.spec_token_ids, res.spec_logprobs = toks, [None] * len(toks)
            res.num_draft_tokens, res.num_accepted_tokens = len(s.draft_token_ids), len(toks) - 1
            res.draft_token_ids = drafts
            if drafts and draft_dists is not None and not s.seq.params.greedy:
                self.draft_probs[s.seq.seq_id] = draft_dists[i]  # [k, V]; the first len(drafts) rows are real
        return results

    def _target_forward(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, list[int]]:
        """The eager target forward over every sequence's new tokens -> final hidden states, row starts."""
        r = self.runner
        ids: list[int] = []
        positions: list[int] = []
        starts = [0]
        for s in batch:
            known_end = s.end_pos - len(s.draft_token_ids)
            ids.extend(s.seq.token_ids[s.start_pos : known_end])
            ids.extend(s.draft_token_ids)
            positions.extend(range(s.start_pos, s.end_pos))
            starts.append(starts[-1] + s.num_new_tokens)
        metadata = AttentionMetadata.build([s.num_new_tokens for s in batch], [s.end_pos for s in batch],
                                           [s.block_table for s in batch], r.block_size, r.device)
        shared = [starts[i] for i, s in enumerate(batch) if s.seq.shared_recompute_pos == s.start_pos]
        if shared:  # the recomputed last token of a prefix-cache hit / fork: its (equal) entry stays as cached
            metadata.slot_mapping[torch.tensor(shared, device=r.device)] = r.num_blocks * r.block_size
        ids_t = torch.tensor(ids, dtype=torch.long, device=r.device)
        hidden = r.model(ids_t, torch.tensor(positions, dtype=torch.long, device=r.device), metadata, r.kv_caches)
        return hidden, starts

    # ---- verification --------------------------------------------------------------------------
    def _verify(self, batch, row_base: list[int], logits_of, results, gone: set[int]) -> dict[int, list[int]]:
        """Accept/reject every sampling sequence's drafts; fills results; -> batch row -> emitted tokens.
        row_base[i]: the row of sequence i's first verify token (its last known one); logits_of(rows) -> fp32.
        gone: rows not to verify (finished since the launch)."""
        r = self.runner
        sampling = [i for i, s in enumerate(batch) if s.needs_sample and i not in gone]
        if not sampling:
            return {}
        rows_idx: list[int] = []
        srows: list[SamplingRow] = []
        drafts: list[int] = []  # per row: the draft it verifies, 0 for the bonus row
        positions: list[int] = []  # per row: the token position it decides
        seeds: list[int | None] = []
        first_row: dict[int, int] = {}
        for i in sampling:
            s = batch[i]
            d = s.draft_token_ids
            base = r._sampling_row(s.seq) if self.decides else None
            first_row[i] = len(rows_idx)
            for j in range(len(d) + 1):
                rows_idx.append(row_base[i] + j)
                positions.append(s.end_pos - len(d) + j)
                seeds.append(row_seed(s.seq.params.seed, s.seq.index))
                if base is not None:
                    srows.append(SamplingRow(base.params, base.prompt_token_ids, base.output_token_ids + d[:j],
                                             base.generator))
                drafts.append(d[j] if j < len(d) else 0)
        dev = r.device
        logits = logits_of(torch.tensor(rows_idx, dtype=torch.long, device=dev))
        if not self.decides:  # a TP follower: the logits' all-gather is its part; rank 0 shares the outcome
            return {}
        p = r.sampler.probabilities(logits, srows)
        q = torch.zeros_like(p)  # the draft distributions; zero on bonus rows, so max(p - q, 0) = p there
        draft_t = torch.tensor(drafts, dtype=torch.long, device=dev)
        has_draft = torch.zeros(len(rows_idx), dtype=torch.bool)
        for i in sampling:
            nd = len(batch[i].draft_token_ids)
            if not nd:
                continue
            f = first_row[i]
            has_draft[f : f + nd] = True
            stored = self.draft_probs.get(batch[i].seq.seq_id)
            if batch[i].seq.params.greedy or stored is None or stored.shape[0] < nd:
                q[f : f + nd].scatter_(1, draft_t[f : f + nd, None], 1.0)  # a point mass (greedy drafts)
            else:
                q[f : f + nd] = stored[:nd]
        has_draft = has_draft.to(dev)
        pd = p.gather(1, draft_t[:, None])[:, 0]
        qd = q.gather(1, draft_t[:, None])[:, 0]
        greedy = [row.params.greedy for row in srows]
        if all(greedy):
            accept = has_draft & (pd >= 1.0)
            token = torch.where(accept, draft_t, p.argmax(dim=-1))
        else:
            uniform, noise = self._randomness(len(srows), p.shape[1], dev)
            row_seeds = RowSeeds.build(seeds, dev)
            if row_seeds is not None:  # hashed: the acceptance and residual / bonus uniforms of each row's position
                pos_t = to_device(positions, torch.long, dev)
                hashed = row_seeds.uniforms_at(pos_t, to_device([ACCEPT, TARGET], torch.long, dev))
                uniform = torch.where(row_seeds.seeded, hashed[:, 0], uniform.to(torch.float64))
            accept = has_draft & (uniform * qd < pd)
            residual = (p - q).clamp(min=0.0)
            mass = residual.sum(dim=-1, keepdim=True)
            residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p)
            drawn = (residual / noise).argmax(dim=-1)
            if row_seeds is not None:
                drawn = row_seeds.draw(residual, hashed[:, 1], drawn)
            greedy_t = torch.tensor(greedy, dtype=torch.bool, device=dev)
            drawn = torch.where(greedy_t, p.argmax(dim=-1), drawn)
            token = torch.where(accept, draft_t, drawn)
        ns = [row.params.logprobs for row in srows]
        chosen = top_vals = top_ids = None
        if any(n is not None for n in ns):
            raw = torch.log_softmax(logits, dim=-1)
            chosen = raw.gather(1, token[:, None])[:, 0].tolist()
            max_n = max(n or 0 for n in ns)
            if max_n:
                tv, ti = raw.topk(max_n, dim=-1)
                top_vals, top_ids = tv.tolist(), ti.tolist()
        accept_l, token_l = accept.tolist(), token.tolist()
        bad_l = torch.isnan(p[:, 0]).tolist()
        emitted: dict[int, list[int]] = {}
        for i in sampling:
            nd = len(batch[i].draft_token_ids)
            toks, lps = [], []
            bad = False
            for j in range(nd + 1):
                row = first_row[i] + j
                if bad_l[row]:
                    bad = True
                    break
                toks.append(token_l[row])
                n = ns[row]
                if n is None:
                    lps.append(None)
                else:
                    top = dict(zip(top_ids[row][:n], top_vals[row][:n], strict=True)) if n else {}
                    top[token_l[row]] = chosen[row]
                    lps.append(Logprob(token_l[row], chosen[row], top))
                if not (j < nd and accept_l[row]):
                    break
            res = results[i]
            if bad:  # as the plain sampler: this request fails, the batch goes on
                res.error = NONFINITE_ERROR
                continue
            res.token_id, res.logprob = toks[0], lps[0]
            res.spec_token_ids, res.spec_logprobs = toks, lps
            res.num_draft_tokens, res.num_accepted_tokens = nd, len(toks) - 1
            emitted[i] = toks
        return emitted

    def _randomness(self, rows: int, vocab: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row a uniform in [0, 1) and an Exp(1) noise vector from the engine's generator (seeded rows replace
        theirs with hashed draws, seeded_draws.py)."""
        gen = self.runner.sampler.generator
        uniform = torch.rand(rows, device=dev, generator=gen)
        noise = torch.empty(rows, vocab, device=dev).exponential_(generator=gen)
        return uniform, noise

    # ---- MTP: cache entries for the known positions, then the next drafts --------------------------
    def _draft_counts(self, batch, emitted: dict[int, list[int]]) -> dict[int, int]:
        """Rank 0: batch row -> how many drafts it gets, never past max_tokens / max_model_len (token_limit) nor
        the model's context (also where no token_limit is given: the start-up warm-up, whose longest prompt fills
        the context)."""
        counts: dict[int, int] = {}
        for i, toks in emitted.items():
            s = batch[i]
            c = min(self.k, draft_room(s.seq.num_tokens, s.token_limit, self.context) - len(toks))
            if c > 0:
                counts[i] = c
            else:
                self.draft_probs.pop(s.seq.seq_id, None)
        return counts

    def _draft(self, batch, hidden, starts, emitted, failed: set[int], counts: dict[int, int], results) -> None:
        r = self.runner
        model, dev, bs = r.model, hidden.device, r.block_size
        next_ids: list[int] = []
        rows: list[int] = []
        m_starts, m_ends, tables = [], [], []
        for i, s in enumerate(batch):
            known = s.num_new_tokens - len(s.draft_token_ids)
            m_end = s.start_pos + known + (len(emitted[i]) - 1 if i in emitted else 0)
            if i in failed:  # a failed request: nothing more to compute
                m_end = s.start_pos
            # tok_{t+1} for MTP positions start_pos..m_end-1: known tokens (a prompt chunk short of the end: up to
            # the one after it), then the emitted ones
            known_end = s.start_pos + known + (0 if s.needs_sample else 1)
            ext = list(s.seq.token_ids[s.start_pos + 1 : known_end]) + emitted.get(i, [])
            next_ids.extend(ext[: m_end - s.start_pos])
            rows.extend(range(starts[i], starts[i] + m_end - s.start_pos))
            m_starts.append(s.start_pos)
            m_ends.append(m_end)
            tables.append(s.block_table)
        live = [i for i in range(len(batch)) if m_ends[i] > m_starts[i]]
        if not live:
            return
        plan = build_mtp_plan([tables[i] for i in live], [m_starts[i] for i in live], [m_ends[i] for i in live],
                              bs, dev)
        positions = torch.tensor([p for a, b in zip(m_starts, m_ends, strict=True) for p in range(a, b)],
                                 dtype=torch.long, device=dev)
        h = model.mtp_forward(torch.tensor(next_ids, dtype=torch.long, device=dev),
                              hidden[torch.tensor(rows, dtype=torch.long, device=dev)], positions, plan,
                              r.mtp_kv_cache)
        last_row: dict[int, int] = {}
        offset = 0
        for i in range(len(batch)):
            offset += m_ends[i] - m_starts[i]
            if i in counts:
                last_row[i] = offset - 1
        self._draft_more(batch, h, last_row, m_ends, tables, emitted, counts, results)

    def _draft_with_graphs(self, batch, bucket: int, emitted, failed: set[int], counts: dict[int, int],
                           results) -> None:
        """_draft for a step whose verify ran as a graph: the MTP pass over the flat rows replays the mtp graph."""
        seqs, m_ends, last_row = [], [], {}
        for i, s in enumerate(batch):
            toks = [] if i in failed else emitted.get(i, [])
            seqs.append((toks, s.start_pos, list(s.block_table)))
            m_ends.append(s.start_pos + len(toks))
            if i in counts:
                last_row[i] = i * (self.k + 1) + len(toks) - 1
        h = self.graphs.mtp(bucket, seqs)
        self._draft_more(batch, h, last_row, m_ends, [s.block_table for s in batch], emitted, counts, results)

    def _mtp_pass(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: list[int],
                  tables: list[list[int]]) -> torch.Tensor:
        """One recursive MTP pass (one position per row): a graph replay where one fits, else eager."""
        r = self.runner
        g = self.graphs
        if g is not None and g.k > 1 and g.fits(tables):
            return g.draft(tokens, hidden, positions, tables)
        plan = build_mtp_plan(tables, positions, [p + 1 for p in positions], r.block_size, hidden.device)
        return r.model.mtp_forward(tokens, hidden, torch.tensor(positions, dtype=torch.long, device=hidden.device),
                                   plan, r.mtp_kv_cache)

    def _draft_more(self, batch, h, last_row: dict[int, int], m_ends: list[int], tables, emitted,
                    counts: dict[int, int], results) -> None:
        """Drafts from the MTP output h at each drafting row's last known position, recursing for k > 1."""
        r = self.runner
        model, dev = r.model, h.device
        if not counts:
            return
        order = list(counts)
        cur_h = h[torch.tensor([last_row[i] for i in order], dtype=torch.long, device=dev)]
        cur_pos = {i: m_ends[i] - 1 for i in order}  # the MTP position whose output drafts the next token
        drafts: dict[int, list[int]] = {i: [] for i in order}
        dists: dict[int, list[torch.Tensor]] = {i: [] for i in order}
        for step in range(1, max(counts.values()) + 1):
            logits = model.compute_logits(cur_h).float()
            more = any(counts[i] > step for i in order)
            if not self.decides:  # a TP follower: rank 0's drafts, when another MTP pass needs them
                token_l = r.share_decision(None) if more else []
                token = torch.tensor(token_l, dtype=torch.long, device=dev)
            else:
                token, q = self._sample_drafts(batch, order, emitted, drafts, logits)
                token_l = token.tolist()
                if more:
                    r.share_decision(token_l)
                for j, i in enumerate(order):
                    drafts[i].append(token_l[j])
                    if not batch[i].seq.params.greedy:
                        dists[i].append(q[j])
            if not more:
                break
            keep = [j for j, i in enumerate(order) if counts[i] > step]
            order = [order[j] for j in keep]
            keep_t = torch.tensor(keep, dtype=torch.long, device=dev)
            for i in order:
                cur_pos[i] += 1
            cur_h = self._mtp_pass(token[keep_t], cur_h[keep_t], [cur_pos[i] for i in order],
                                   [tables[i] for i in order])
        if not self.decides:
            return
        for i in counts:
            results[i].draft_token_ids = drafts[i]
            if dists[i]:
                self.draft_probs[batch[i].seq.seq_id] = torch.stack(dists[i])
            else:
                self.draft_probs.pop(batch[i].seq.seq_id, None)

    def _sample_drafts(self, batch, order: list[int], emitted, drafts, logits) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank 0: the next draft token of each row in `order` and the distribution it was drawn from."""
        r = self.runner
        srows = []
        for i in order:
            base = r._sampling_row(batch[i].seq)
            out = batch[i].seq.output_token_ids + emitted[i] + drafts[i]
            srows.append(SamplingRow(base.params, base.prompt_token_ids, out, base.generator))
        q = r.sampler.probabilities(logits, srows)
        token = q.argmax(dim=-1)
        if not all(row.params.greedy for row in srows):
            noise = torch.empty_like(q).exponential_(generator=r.sampler.generator)
            sampled = (q / noise).argmax(dim=-1)
            seeds = RowSeeds.build([row_seed(batch[i].seq.params.seed, batch[i].seq.index) for i in order], q.device)
            if seeds is not None:  # hashed at the token position of each row's next draft
                pos = [batch[i].end_pos - len(batch[i].draft_token_ids) + len(emitted[i]) + len(drafts[i])
                       for i in order]
                u = seeds.uniforms_at(to_device(pos, torch.long, q.device), to_device([DRAFT], torch.long, q.device))
                sampled = seeds.draw(q, u[:, 0], sampled)
            greedy_t = torch.tensor([row.params.greedy for row in srows], dtype=torch.bool, device=q.device)
            token = torch.where(greedy_t, token, sampled)
        return token, q

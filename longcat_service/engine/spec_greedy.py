"""The whole spec step of a plain-greedy decode batch on the device (engine/spec_decode.py's fast path).

When every row of a decode spec batch draws exactly the argmax of the raw logits (Sampler.plain_greedy), the
verification needs no sampler. In the flat-row convention of spec_graph_runner.py (row i*(k+1) + j is sequence i's
verify token j: its last known token, then its drafts), the target's prediction of verify token j+1 is the argmax
of row j, so the draft at verify token j+1 is accepted while it equals argmax(row j) and every earlier draft was
accepted. With a drafts accepted the emitted tokens are argmax(rows 0..a) (the accepted drafts equal those
argmaxes; row a gives the correction or the bonus token): exactly what MTP off emits, one token at a time.

greedy_spec_step computes, without a host read: verify forward and argmax per flat row -> acceptance and emitted
count per sequence -> the MTP pass over the flat rows (tok_{t+1} = emitted token j; rows at or past the emitted
count masked: slot -1, seq_len 0) -> the first draft (lm_head argmax at each sequence's last emitted row) ->
for k > 1 the recursive MTP passes (rows past their draft count masked). SpecGraphRunner captures it as one CUDA
graph per bucket; the host then reads one small int64 tensor per step (pack_layout).

A sequence whose stopping row is not finite (NaN / inf logits, as the sampler's rule) emits nothing (count 0):
the engine fails that request, as the eager verification does; it writes no MTP entries and gets no drafts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from longcat_service.engine.seeded_draws import RowSeeds
from longcat_service.engine.spec_sampled import StepUniforms, plain_probabilities, sample_drafts, verify_sampled

# a sequence with no token limit (max_tokens None and no context bound): more room than any draft count needs
NO_LIMIT = 1 << 40


def draft_room(num_tokens: int, token_limit: int | None, context: int | None) -> int:
    """How many drafts a sequence of num_tokens tokens could take before emitting anything: the draft count after
    emitting c tokens is min(k, room - c) (at least 0), as SpecDecoder._draft_counts gives it; token_limit
    (max_tokens / max_model_len) and context (max_position_embeddings) bound it, None = no bound."""
    limit = min(x for x in (token_limit, context, NO_LIMIT) if x is not None)
    return limit - num_tokens - 1


@dataclass(frozen=True)
class GreedyLayout:
    """Columns of the step's one packed int64 output [b, 2k + 3]: emitted tokens (k+1; the first `count` are
    real), emitted count (0: padding or a failed sequence), drafts (k; the first `num_drafts` are real), number of
    drafts."""

    k: int

    @property
    def count(self) -> int:
        return self.k + 1

    @property
    def drafts(self) -> int:
        return self.k + 2

    @property
    def num_drafts(self) -> int:
        return 2 * self.k + 2

    @property
    def width(self) -> int:
        return 2 * self.k + 3

    def unpack(self, row: list[int]) -> tuple[list[int], list[int]]:
        """One sequence's packed row -> (emitted tokens, drafts)."""
        count, nd = row[self.count], row[self.num_drafts]
        return row[:count], row[self.drafts : self.drafts + nd]


def slot_at(tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slot of `positions` [N] in the block tables [N, W] (int32): a device-side slot_of. Positions past the
    table's width read its last column (only for rows the caller masks)."""
    idx = torch.div(positions, block_size, rounding_mode="floor").clamp(0, tables.shape[1] - 1)
    block = tables.gather(1, idx[:, None])[:, 0].to(torch.long)
    return block * block_size + positions % block_size


def argmax_and_finite(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the plain sampler's greedy token and whether the row is finite (Sampler.launch: argmax, and
    isfinite of the row max, which NaN, +inf and an all -inf row all fail)."""
    return logits.argmax(dim=-1), torch.isfinite(logits.amax(dim=-1))


MtpForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                      torch.Tensor]


def greedy_spec_step(k: int, block_size: int, verify: Callable[[], torch.Tensor], mtp: MtpForward,
                     logits_of: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, positions: torch.Tensor,
                     tables: torch.Tensor, seq_info: torch.Tensor,
                     sampling: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One greedy spec step of b sequences -> the packed [b, 2k+3] int64 result (GreedyLayout).
    With `sampling` = (options [4, b], q [b, k, V], seeds [5, b] or None) the batch mixes greedy and plain sampled
    rows (spec_sampled.py): options per sequence (temperature 0: greedy), q the distributions its pending drafts were
    drawn from where seq_info[2] is 1 (else a point mass at the draft, as the host path's default), seeds its
    seeded_draws.seed_columns (seeded rows hash their uniforms from seed and token position); the result is
    then (packed, the distributions of the new drafts [b, k, V]).

    ids / positions [b*(k+1)], tables [b*(k+1), W] int32: the flat verify rows (spec_graph_runner.verify_rows;
    padding rows at position 0). seq_info [2, b] int64: per sequence its number of drafts (-1: a padding
    sequence) and its draft_room. verify() -> the target's final hidden states of the flat rows (a forward over
    those rows' cache slots and lengths, which the caller holds). mtp(ids, hidden, positions, slots, seq_lens,
    tables) -> h': the MTP block over decode rows (slot -1 / seq_len 0: no cache write, no attention; it attends to
    positions 1..t+1, model/mtp.py). logits_of(hidden) -> fp32 logits (the lm_head)."""
    n = ids.shape[0]
    b = n // (k + 1)
    dev = ids.device
    num_drafts, room = seq_info[0], seq_info[1]
    hidden = verify()
    logits = logits_of(hidden)
    target, finite = argmax_and_finite(logits)
    target2, finite2 = target.view(b, k + 1), finite.view(b, k + 1)
    # draft j (verify token j+1) against the target's argmax at row j; acceptance stops at the first miss
    j = torch.arange(k, device=dev)
    drafted = ids.view(b, k + 1)[:, 1:]
    match = (j[None, :] < num_drafts[:, None]) & finite2[:, :k] & (drafted == target2[:, :k])
    accepted = ((~match).to(torch.long).cumsum(dim=1) == 0).sum(dim=1)
    start = positions.view(b, k + 1)[:, 0]  # the position of each sequence's last known token
    seeded = None
    if sampling is not None:  # sampled rows: rejection sampling; greedy rows keep the argmax rule above
        options, q_in, seed_cols = sampling
        if seed_cols is not None:
            seeded = StepUniforms.of(RowSeeds.from_columns(seed_cols), start, k)
        p, _ = plain_probabilities(logits, options[:, :, None].expand(4, b, k + 1).reshape(4, n))
        point = torch.zeros_like(q_in).scatter_(2, drafted[:, :, None], 1.0)
        q = torch.where((seq_info[2] > 0)[:, None, None], q_in, point)
        s_accepted, s_tokens = verify_sampled(p.view(b, k + 1, -1), q, drafted, num_drafts, finite2, seeded)
        greedy = options[0] == 0
        accepted = torch.where(greedy, accepted, s_accepted)
        target2 = torch.where(greedy[:, None], target2, s_tokens)
        target = target2.reshape(n)
    ok = finite2.gather(1, accepted[:, None])[:, 0] & (num_drafts >= 0)
    count = torch.where(ok, accepted + 1, 0)
    # MTP over the flat rows: row (i, j) is MTP position start_i + j reading tok_{t+1} = emitted token j
    jj = torch.arange(k + 1, device=dev)
    emitted = (jj[None, :] < count[:, None]).reshape(n)
    slots = torch.where(emitted, slot_at(tables, positions + 1, block_size), -1)
    lens = torch.where(emitted, positions + 2, 0)
    h = mtp(target, hidden, positions, slots, lens, tables)
    # drafts: from the MTP output at each sequence's last emitted row, then recursively
    n_drafts = torch.where(count > 0, (room - count).clamp(min=0, max=k), 0)
    cur_h = h.index_select(0, torch.arange(b, device=dev) * (k + 1) + (count - 1).clamp(min=0))
    draft_dists = []

    def next_draft(h_rows: torch.Tensor, step: int) -> torch.Tensor:
        if sampling is None:
            tok, fin = argmax_and_finite(logits_of(h_rows))
            return torch.where(fin, tok, 0)  # as the eager draft sampler: a non-finite row drafts token 0
        # draft `step` (1-based) sits at token position start + count + step
        if seeded is None:
            tok, dist = sample_drafts(logits_of(h_rows), sampling[0])
        else:
            tok, dist = sample_drafts(logits_of(h_rows), sampling[0], seeded.seeded, seeded.draft(count + step))
        draft_dists.append(dist)
        return tok

    drafts = [next_draft(cur_h, 1)]
    if k > 1:
        seq_tables = tables.view(b, k + 1, -1)[:, 0].contiguous()
    for step in range(2, k + 1):
        valid = n_drafts >= step
        pos = torch.where(valid, start + count + step - 2, 0)  # the MTP position of the previous draft
        d_slots = torch.where(valid, slot_at(seq_tables, pos + 1, block_size), -1)
        d_lens = torch.where(valid, pos + 2, 0)
        cur_h = mtp(drafts[-1], cur_h, pos, d_slots, d_lens, seq_tables)
        drafts.append(next_draft(cur_h, step))
    packed = torch.cat((target2, count[:, None], torch.stack(drafts, dim=1), n_drafts[:, None]), dim=1)
    return packed if sampling is None else (packed, torch.stack(draft_dists, dim=1))


class GreedyReadback:
    """The packed result of a launched greedy step, copied to host memory (CUDA: pinned, non-blocking, with an
    event to wait on only this step's copy, as SampledBatch does)."""

    def __init__(self, packed: torch.Tensor, num_seqs: int):
        self.num_seqs = num_seqs
        self.device_packed = packed  # a chained step's input (async scheduling); valid until the bucket's next replay
        if packed.is_cuda:
            self.host = packed[:num_seqs].to("cpu", non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host, self.ready = packed[:num_seqs].clone(), None

    def rows(self) -> list[list[int]]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()

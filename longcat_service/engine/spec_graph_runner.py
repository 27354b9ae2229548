"""CUDA graphs for the forwards of speculative decode steps (engine/spec_decode.py), one set per batch bucket.

A decode spec step of b sequences with d_i <= k drafts each becomes b * (k+1) flat decode rows: row i*(k+1) + j
is token j of sequence i's verify query (its last token, then its drafts) at position start_i + j, attending to
positions 0..start_i + j of the sequence's own block table. The fast decode kernels write every row's cache entry
(mla_prep) before any row attends (mla_decode), so row j sees rows 0..j-1 of its sequence from the same step: the
causal verify of a multi-token query, as one graph-capturable decode batch. Rows j > d_i and the rows past the
batch up to the bucket are padding (slot -1: no cache write; seq_len 0: no attention).

Per bucket b:
- verify: the target forward of the flat rows -> final hidden states and fp32 logits [b * (k+1), ...].
- mtp: the MTP block over the same flat rows: row (i, j) is MTP position start_i + j with tok_{t+1} = the j-th
  emitted token and h_t = the verify graph's hidden row (i, j) (read in place); rows past the emitted tokens are
  padding. Its cache entry goes to the slot of position t + 1 and it attends to positions 1..t+1 (model/mtp.py;
  mla_decode first_pos=1).
- draft (k > 1): one MTP pass over b rows, for the recursive drafts.
- greedy: the whole step of a batch whose every row is plain greedy (Sampler.plain_greedy), on the device
  (engine/spec_greedy.py): verify forward, argmax acceptance, the MTP pass over the flat rows (its slots and lengths
  derived from the verify rows and masked past each emitted count), the drafts and the recursive MTP passes. The
  host reads one small packed tensor per step. A chained step (async scheduling, engine/spec_chain.py) replays the
  same graph with its flat rows and seq_info built on the device from the previous step's packed output
  (spec_chain_rows.py); only the block tables come from the host.
- sampled: the same for a batch of plain-greedy and plain-sampled rows (Sampler.plain_sampled), with rejection
  sampling on the device (engine/spec_sampled.py): per-sequence options, seeds (engine/seeded_draws.py) and the
  pending drafts' distributions come from static buffers; the new drafts' distributions are a second output.
For other batches verification and draft sampling run eagerly between the verify / mtp / draft replays, on
Sampler.probabilities (every sampling option; host-built per-row tensors that a graph cannot hold), and the host
reads the emitted tokens once per step, as the eager step does. Buckets hold at most MAX_GRAPH_ROWS flat rows;
larger batches run the eager spec step.

Tensor parallelism (LONGCAT_TP_CUDA_GRAPHS=1): every rank holds a SpecGraphRunner with the same buckets and captures
the same graphs in the same order at start-up (NCCL collectives inside), and replays them in lockstep. Only the
host-verified kinds (verify, mtp, draft): rank 0 verifies and workers follow its shared decision
(SpecDecoder.decides), so the device-side greedy / sampled steps, which decide on the device of each rank, are off
(fused=False: not captured, no q buffer). Every graph/eager branch of a step (can_verify, the bucket, fits) reads only
what every rank has: the step's wire rows (engine/tp_messages.py), the shared decision, and equal buffer sizes (the
block count is all-reduced, the rest comes from the same EngineArgs). lockstep: a replay failure raises (the TP
failure policy ends the job) instead of falling back to eager steps on one rank, which would leave the others in a
collective.

The host-side row building (verify_rows, mtp_rows, draft_rows, spec_buckets) is plain Python, tested on CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from longcat_service.engine.cuda_graph_runner import BUCKETS, bucket_for, write_host_inputs
from longcat_service.engine.graph_capture import capture_stream
from longcat_service.engine.spec_chain_rows import chained_verify_inputs
from longcat_service.engine.spec_greedy import greedy_spec_step
from longcat_service.layers.attention_metadata import AttentionMetadata
from longcat_service.layers.fast_decode import DecodePlan
from longcat_service.layers.host_to_device import to_device

logger = logging.getLogger(__name__)

MAX_GRAPH_ROWS = 256  # flat rows of the largest verify graph: its fp32 logits are [rows, vocab]


@dataclass
class DecodeRows:
    """One decode row per entry; padding rows: token 0, position 0, slot -1, seq_len 0, an empty table."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    tables: list[list[int]] = field(default_factory=list)

    def add(self, token: int, position: int, slot: int, seq_len: int, table: list[int]) -> None:
        self.input_ids.append(token)
        self.positions.append(position)
        self.slots.append(slot)
        self.seq_lens.append(seq_len)
        self.tables.append(table)

    def pad(self) -> None:
        self.add(0, 0, -1, 0, [])

    def __len__(self) -> int:
        return len(self.input_ids)


def slot_of(table: list[int], position: int, block_size: int) -> int:
    return table[position // block_size] * block_size + position % block_size


def spec_buckets(k: int, max_num_seqs: int, max_rows: int = MAX_GRAPH_ROWS) -> tuple[int, ...]:
    """Batch buckets of the spec graphs: the decode buckets whose b * (k+1) flat rows fit max_rows and that a
    batch of max_num_seqs can need (the smallest bucket holding max_num_seqs, when it fits)."""
    fits = [b for b in BUCKETS if b * (k + 1) <= max_rows]
    need = bucket_for(max(max_num_seqs, 1), tuple(fits)) or (fits[-1] if fits else None)
    return tuple(b for b in fits if need is not None and b <= need)


def verify_rows(seqs: list[tuple[int, list[int], int, list[int], int | None]], k: int, block_size: int
                ) -> DecodeRows:
    """seqs: (last known token, drafts (<= k), start position, block table, where the last known token's entry goes
    instead of its own slot (None: its slot)) -> the b * (k+1) flat verify rows. The redirect is for a recomputed
    shared token (a prefix-cache hit or fork: its block is shared, spec_decode.py)."""
    rows = DecodeRows()
    for last, drafts, start, table, first_slot in seqs:
        if len(drafts) > k:
            raise ValueError(f"verify_rows: {len(drafts)} drafts for k = {k}")
        for j, token in enumerate([last, *drafts]):
            pos = start + j
            slot = first_slot if j == 0 and first_slot is not None else slot_of(table, pos, block_size)
            rows.add(token, pos, slot, pos + 1, table)
        for _ in range(k - len(drafts)):
            rows.pad()
    return rows


def mtp_rows(seqs: list[tuple[list[int], int, list[int]]], k: int, block_size: int) -> DecodeRows:
    """seqs: (emitted tokens (<= k+1; none for a failed row), start position, block table) -> the b * (k+1) flat
    MTP rows: row (i, j) is MTP position start + j reading tok_{t+1} = emitted[j]; its entry goes to the slot of
    position t + 1 and it attends to positions 1..t+1 (seq_len t + 2 with first_pos 1)."""
    rows = DecodeRows()
    for emitted, start, table in seqs:
        if len(emitted) > k + 1:
            raise ValueError(f"mtp_rows: {len(emitted)} emitted tokens for k = {k}")
        for j, token in enumerate(emitted):
            pos = start + j
            rows.add(token, pos, slot_of(table, pos + 1, block_size), pos + 2, table)
        for _ in range(k + 1 - len(emitted)):
            rows.pad()
    return rows


def draft_rows(positions: list[int], tables: list[list[int]], block_size: int) -> DecodeRows:
    """One recursive MTP pass: MTP position p per row (tokens come from the device)."""
    rows = DecodeRows()
    for pos, table in zip(positions, tables, strict=True):
        rows.add(0, pos, slot_of(table, pos + 1, block_size), pos + 2, table)
    return rows


class _StaticRows:
    """Device input buffers of one graph kind (packed ids / positions / slots / seq_lens, block tables) and their
    pinned host mirrors."""

    def __init__(self, num_rows: int, max_blocks: int, device: torch.device):
        cuda = device.type == "cuda"
        self.packed = torch.zeros(4, num_rows, dtype=torch.int64, device=device)
        self.packed_host = torch.zeros(4, num_rows, dtype=torch.int64)
        self.tables = torch.zeros(num_rows, max_blocks, dtype=torch.int32, device=device)
        self.tables_host = torch.zeros(num_rows, max_blocks, dtype=torch.int32)
        if cuda:
            self.packed_host, self.tables_host = self.packed_host.pin_memory(), self.tables_host.pin_memory()
        self.query_start_loc = torch.arange(num_rows + 1, dtype=torch.int32, device=device)
        self.packed_np, self.tables_np = self.packed_host.numpy(), self.tables_host.numpy()
        self.copy_done = torch.cuda.Event() if cuda else None

    def load(self, rows: DecodeRows, n: int) -> None:
        """Rows into the first n buffer rows (the rest of n: padding). Asynchronous (pinned memory)."""
        if self.copy_done is not None:  # the previous load's copies must be done before the host buffers change
            self.copy_done.synchronize()
        width = max(max((len(t) for t in rows.tables), default=0), 1)
        write_host_inputs(self.packed_np, self.tables_np, n, width, rows.input_ids, rows.positions, rows.slots,
                          rows.seq_lens, rows.tables)
        self.packed[:, :n].copy_(self.packed_host[:, :n], non_blocking=True)
        self.tables[:n, :width].copy_(self.tables_host[:n, :width], non_blocking=True)
        if self.copy_done is not None:
            self.copy_done.record()

    def metadata(self, n: int, block_size: int) -> AttentionMetadata:
        return AttentionMetadata(block_size=block_size, query_start_loc=self.query_start_loc[: n + 1],
                                 seq_lens=self.packed[3, :n], block_tables=self.tables[:n],
                                 slot_mapping=self.packed[2, :n], query_lens_cpu=[1] * n, seq_lens_cpu=[1] * n)

    def mtp_plan(self, n: int) -> DecodePlan:
        return DecodePlan(n, self.packed[2, :n], self.tables[:n], self.packed[3, :n], first_pos=1)


class SpecRowsRunner:
    """What a spec step asks of its graphs, on host rows: which batches qualify, and the rows of each pass.
    Subclasses run the rows: SpecGraphRunner replays CUDA graphs; tests run them eagerly on CPU (the same rows)."""

    def __init__(self, block_size: int, max_blocks_per_seq: int, k: int, buckets: tuple[int, ...],
                 scratch_slot: int | None = None):
        if not buckets:
            raise ValueError(f"no spec graph bucket fits {MAX_GRAPH_ROWS} rows at k = {k}")
        self.block_size, self.max_blocks, self.k = block_size, max_blocks_per_seq, k
        self.scratch_slot = scratch_slot  # where a recomputed shared token's entry goes (ModelRunner's scratch block)
        self.buckets = tuple(buckets)
        self.max_batch = self.buckets[-1]

    def fits(self, tables: list[list[int]]) -> bool:
        """Rows of these block tables fit a bucket and the table buffers."""
        return 0 < len(tables) <= self.max_batch and max(len(t) for t in tables) <= self.max_blocks

    def can_verify(self, batch) -> bool:
        """A pure decode spec batch: every sequence at its last prompt token or past it, computing its last token
        plus <= k drafts (no prompt logprobs to compute)."""
        for s in batch:
            if (not s.needs_sample or s.num_new_tokens != 1 + len(s.draft_token_ids) or len(s.draft_token_ids) > self.k
                    or s.start_pos < s.seq.num_prompt_tokens - 1):
                return False
            if self._redirected(s) and self.scratch_slot is None:
                return False
        return self.fits([s.block_table for s in batch])

    def verify(self, batch) -> tuple[int, torch.Tensor, torch.Tensor]:
        """The target forward of a batch that can_verify -> (bucket, hidden, fp32 logits) of the flat rows (row
        i*(k+1) + j is sequence i's verify token j; graph outputs are views valid until the bucket's next replay)."""
        b = bucket_for(len(batch), self.buckets)
        hidden, logits = self._run_verify(b, self._verify_rows(batch))
        return b, hidden, logits

    def greedy_step(self, batch, rooms: list[int]) -> tuple[int, torch.Tensor]:
        """The whole spec step of a plain-greedy batch that can_verify, on the device (spec_greedy.py). rooms: each
        sequence's spec_greedy.draft_room. -> (bucket, packed [bucket, 2k+3] int64 result, spec_greedy.GreedyLayout;
        rows past the batch are padding; a graph output valid until the bucket's next replay)."""
        b = bucket_for(len(batch), self.buckets)
        pad = b - len(batch)
        info = [[len(s.draft_token_ids) for s in batch] + [-1] * pad, list(rooms) + [0] * pad]
        return b, self._run_greedy(b, self._verify_rows(batch), info)

    def chained_greedy_step(self, batch, prev_packed: torch.Tensor, prev_starts: list[int], prev_rooms: list[int]
                            ) -> tuple[int, torch.Tensor]:
        """greedy_step for the step after an in-flight greedy step of the same sequences in the same order, launched
        before that one is read back (async scheduling): its tokens, drafts, positions, slots and draft rooms come
        from the in-flight step's packed result on the device (spec_chain_rows.py); prev_starts / prev_rooms: that
        step's first verify positions and draft rooms; the batch's block tables are reserved for every draft
        accepted. -> (bucket, packed result), as greedy_step."""
        b = bucket_for(len(batch), self.buckets)
        rows = DecodeRows()
        for s in batch:  # the tables only: the rest of each row comes from the device
            for _ in range(self.k + 1):
                rows.add(0, 0, -1, 0, list(s.block_table))
        return b, self._run_chained_greedy(b, rows, prev_packed[: len(batch)], prev_starts, prev_rooms)

    def sampled_step(self, batch, rooms: list[int], options: list[list[float]],
                     dists: list[torch.Tensor | None] | torch.Tensor, seeds: list[list[int]] | None = None
                     ) -> tuple[int, torch.Tensor, torch.Tensor]:
        """greedy_step for a batch mixing plain-greedy and plain-sampled rows (spec_sampled.py). options: the
        [4, len(batch)] spec_sampled.OPTIONS columns; dists: per sequence the distributions its drafts were drawn
        from ([>= drafts, V] on the device; None: none stored, a point mass), or all of them as one
        [len(batch), k, V] tensor; seeds: the [5, len(batch)] seeded_draws.seed_columns (None: no seeded row).
        -> (bucket, packed result, the new drafts' distributions [bucket, k, V]; graph outputs valid until the
        bucket's next replay)."""
        b = bucket_for(len(batch), self.buckets)
        pad = b - len(batch)
        if isinstance(dists, torch.Tensor):
            has = [1] * len(batch)
        else:
            has = [int(d is not None and d.shape[0] >= len(s.draft_token_ids)) for s, d in zip(batch, dists,
                                                                                                strict=True)]
        info = [[len(s.draft_token_ids) for s in batch] + [-1] * pad, list(rooms) + [0] * pad, has + [0] * pad]
        opts = [list(col) + [0.0] * pad for col in options]
        seed_cols = [list(col) + [0] * pad for col in (seeds or [[0] * len(batch)] * 5)]
        return (b, *self._run_sampled(b, self._verify_rows(batch), info, opts, dists, seed_cols))

    def _verify_rows(self, batch) -> DecodeRows:
        seqs = [(s.seq.token_ids[s.start_pos], list(s.draft_token_ids), s.start_pos, list(s.block_table),
                 self.scratch_slot if self._redirected(s) else None) for s in batch]
        return verify_rows(seqs, self.k, self.block_size)

    @staticmethod
    def _redirected(s) -> bool:
        return getattr(s.seq, "shared_recompute_pos", None) == s.start_pos

    def mtp(self, b: int, seqs: list[tuple[list[int], int, list[int]]]) -> torch.Tensor:
        """After verify (bucket b) and verification: the MTP block over the flat rows -> h' [b*(k+1), H].
        seqs: mtp_rows' input."""
        return self._run_mtp(b, mtp_rows(seqs, self.k, self.block_size))

    def draft(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: list[int], tables: list[list[int]]
              ) -> torch.Tensor:
        """One recursive MTP pass over len(positions) rows (tokens and hidden on the device) -> h' [rows, H]."""
        b = bucket_for(len(positions), self.buckets)
        return self._run_draft(b, draft_rows(positions, tables, self.block_size), tokens, hidden)

    def _run_verify(self, b: int, rows: DecodeRows) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _run_mtp(self, b: int, rows: DecodeRows) -> torch.Tensor:
        raise NotImplementedError

    def _run_draft(self, b: int, rows: DecodeRows, tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _run_greedy(self, b: int, rows: DecodeRows, seq_info: list[list[int]]) -> torch.Tensor:
        raise NotImplementedError

    def _run_sampled(self, b: int, rows: DecodeRows, seq_info: list[list[int]], options: list[list[float]],
                     dists, seeds: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _run_chained_greedy(self, b: int, rows: DecodeRows, prev_packed: torch.Tensor, prev_starts: list[int],
                            prev_rooms: list[int]) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def load_dists(q: torch.Tensor, dists, num_drafts: list[int]) -> None:
        """The stored draft distributions into q [>= b, k, V] (device-side copies; rows without any stay as they are:
        the step reads a point mass for them)."""
        if isinstance(dists, torch.Tensor):
            q[: dists.shape[0]].copy_(dists)
            return
        for i, (d, nd) in enumerate(zip(dists, num_drafts, strict=True)):
            if d is not None and nd and d.shape[0] >= nd:
                q[i, :nd].copy_(d[:nd])


class SpecGraphRunner(SpecRowsRunner):
    def __init__(self, model, kv_caches: list[torch.Tensor], mtp_kv_cache: torch.Tensor, block_size: int,
                 max_blocks_per_seq: int, k: int, buckets: tuple[int, ...], scratch_slot: int | None = None,
                 fused: bool = True, lockstep: bool = False):
        super().__init__(block_size, max_blocks_per_seq, k, buckets, scratch_slot)
        self.model, self.kv_caches, self.mtp_kv_cache = model, kv_caches, mtp_kv_cache
        self.lockstep = lockstep  # TP: every rank replays the same graphs; a failure cannot fall back on one rank
        dev = model.device
        # CPU (tests, with the Triton kernels interpreted): the same forwards on the same buffers, run eagerly
        self.use_graphs = dev.type == "cuda"
        flat = self.max_batch * (k + 1)
        self.verify_in = _StaticRows(flat, max_blocks_per_seq, dev)
        self.mtp_in = _StaticRows(flat, max_blocks_per_seq, dev)
        self.draft_in = _StaticRows(self.max_batch, max_blocks_per_seq, dev)
        self.draft_hidden = torch.zeros(self.max_batch, model.config.hidden_size, dtype=model.dtype, device=dev)
        # greedy / sampled steps: drafts, draft room, (sampled) whether the row's draft distributions are stored
        self.seq_info = torch.zeros(3, self.max_batch, dtype=torch.long, device=dev)
        # False once a greedy graph failed to capture at start-up (SpecDecoder then skips it); False from the start
        # without the device-side steps (fused=False: TP, where rank 0 decides on the host)
        self.greedy_ok = fused
        self.sampled_ok = fused  # the same for the sampled step
        # the sampled step's inputs: per sequence its spec_sampled.OPTIONS, and the distributions its pending drafts
        # were drawn from. [max_batch, k, vocab] fp32: at most MAX_GRAPH_ROWS * vocab * 4 bytes (k=1: 128 rows, 64 MiB
        # at vocab 131072); the graph's own [rows, vocab] temporaries (sorts, residuals) live in its pool
        self.sample_options = torch.zeros(4, self.max_batch, dtype=torch.float32, device=dev)
        self.sample_seeds = torch.zeros(5, self.max_batch, dtype=torch.int64, device=dev)  # seeded_draws.seed_columns
        self.draft_dists = torch.zeros(self.max_batch if self.sampled_ok else 0, k, model.config.vocab_size,
                                       dtype=torch.float32, device=dev)
        self.graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[str, int], tuple[torch.Tensor, ...]] = {}
        self.pool = None

    # ---- the forwards, captured per bucket ------------------------------------------------------------
    def _forward(self, kind: str, b: int) -> tuple[torch.Tensor, ...]:
        model, n = self.model, b * (self.k + 1)
        if kind == "verify":
            rows = self.verify_in
            hidden = model(rows.packed[0, :n], rows.packed[1, :n], rows.metadata(n, self.block_size), self.kv_caches)
            return hidden, model.compute_logits(hidden)
        if kind == "mtp":
            rows, (hidden, _) = self.mtp_in, self.outputs[("verify", b)]
            return (model.mtp_forward(rows.packed[0, :n], hidden, rows.packed[1, :n], rows.mtp_plan(n),
                                      self.mtp_kv_cache),)
        if kind == "greedy":
            rows = self.verify_in

            def verify() -> torch.Tensor:
                return model(rows.packed[0, :n], rows.packed[1, :n], rows.metadata(n, self.block_size),
                             self.kv_caches)

            return (greedy_spec_step(self.k, self.block_size, verify, self._mtp_rows, model.compute_logits,
                                     rows.packed[0, :n], rows.packed[1, :n], rows.tables[:n], self.seq_info[:2, :b]),)
        if kind == "sampled":
            rows = self.verify_in

            def verify() -> torch.Tensor:
                return model(rows.packed[0, :n], rows.packed[1, :n], rows.metadata(n, self.block_size),
                             self.kv_caches)

            return greedy_spec_step(self.k, self.block_size, verify, self._mtp_rows, model.compute_logits,
                                    rows.packed[0, :n], rows.packed[1, :n], rows.tables[:n], self.seq_info[:, :b],
                                    sampling=(self.sample_options[:, :b], self.draft_dists[:b],
                                              self.sample_seeds[:, :b]))
        rows = self.draft_in
        return (model.mtp_forward(rows.packed[0, :b], self.draft_hidden[:b], rows.packed[1, :b], rows.mtp_plan(b),
                                  self.mtp_kv_cache),)

    def _mtp_rows(self, ids, hidden, positions, slots, seq_lens, tables) -> torch.Tensor:
        """The MTP block over decode rows whose slots and lengths come from the device (the greedy step)."""
        plan = DecodePlan(ids.shape[0], slots, tables, seq_lens, first_pos=1)
        return self.model.mtp_forward(ids, hidden, positions, plan, self.mtp_kv_cache)

    def _inputs(self, kind: str) -> _StaticRows:
        return {"verify": self.verify_in, "mtp": self.mtp_in, "draft": self.draft_in, "greedy": self.verify_in,
                "sampled": self.verify_in}[kind]

    @torch.inference_mode()
    def capture(self, kind: str, b: int) -> None:
        """Capture one graph (inputs hold padding: no cache writes during warm-up or capture). The mtp graph reads
        the verify graph's output of its bucket: capture that first."""
        if kind == "mtp" and ("verify", b) not in self.graphs:
            self.capture("verify", b)
        self._inputs(kind).load(DecodeRows(), b if kind == "draft" else b * (self.k + 1))
        if kind in ("greedy", "sampled"):
            self.seq_info[0].fill_(-1)  # padding sequences only: nothing emitted, no MTP cache write
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(kind, b)  # compiles the Triton kernels and warms cuBLAS outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=capture_stream(self.draft_hidden.device)):
            out = self._forward(kind, b)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[(kind, b)], self.outputs[(kind, b)] = graph, out
        logger.info("captured spec-step %s CUDA graph for batch bucket %d", kind, b)

    def kinds(self) -> tuple[str, ...]:
        kinds = ("verify", "mtp", "draft") if self.k > 1 else ("verify", "mtp")
        return kinds + tuple(kind for kind, ok in (("greedy", self.greedy_ok), ("sampled", self.sampled_ok)) if ok)

    def capture_all(self) -> None:
        """Every bucket of every kind now, largest first (the shared pool is sized by it)."""
        for b in sorted(self.buckets, reverse=True):
            for kind in self.kinds():
                ok = {"greedy": self.greedy_ok, "sampled": self.sampled_ok}.get(kind, True)
                if (kind, b) in self.graphs or not ok:
                    continue
                try:
                    self.capture(kind, b)
                except Exception:
                    if kind not in ("greedy", "sampled"):
                        raise
                    # the whole-step graphs are an optimisation: without them those batches take the step-by-step
                    # graphs
                    logger.exception("capturing the device-side %s spec step failed; not using it", kind)
                    setattr(self, f"{kind}_ok", False)

    def _prepare(self, kind: str, b: int, rows: DecodeRows) -> None:
        """Captured (now, if not at start-up) and its inputs loaded."""
        if self.use_graphs and (kind, b) not in self.graphs:
            self.capture(kind, b)
        self._inputs(kind).load(rows, b if kind == "draft" else b * (self.k + 1))

    def _launch(self, kind: str, b: int) -> tuple[torch.Tensor, ...]:
        """Replay -> the graph's static outputs (views valid until its next replay)."""
        if self.use_graphs:
            self.graphs[(kind, b)].replay()
        else:
            self.outputs[(kind, b)] = self._forward(kind, b)
        return self.outputs[(kind, b)]

    @torch.inference_mode()
    def _run_verify(self, b: int, rows: DecodeRows) -> tuple[torch.Tensor, torch.Tensor]:
        self._prepare("verify", b, rows)
        hidden, logits = self._launch("verify", b)
        return hidden, logits

    @torch.inference_mode()
    def _run_mtp(self, b: int, rows: DecodeRows) -> torch.Tensor:
        self._prepare("mtp", b, rows)
        return self._launch("mtp", b)[0]

    @torch.inference_mode()
    def _run_draft(self, b: int, rows: DecodeRows, tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        self._prepare("draft", b, rows)
        n = len(rows)
        self.draft_in.packed[0, :n].copy_(tokens)  # stream-ordered after the host copy it overrides
        self.draft_hidden[:n].copy_(hidden)
        return self._launch("draft", b)[0][:n]

    @torch.inference_mode()
    def _run_greedy(self, b: int, rows: DecodeRows, seq_info: list[list[int]]) -> torch.Tensor:
        self._prepare("greedy", b, rows)
        self.seq_info[:2, :b].copy_(to_device(seq_info, torch.long, self.seq_info.device))
        return self._launch("greedy", b)[0]

    @torch.inference_mode()
    def _run_chained_greedy(self, b: int, rows: DecodeRows, prev_packed: torch.Tensor, prev_starts: list[int],
                            prev_rooms: list[int]) -> torch.Tensor:
        self._prepare("greedy", b, rows)  # the block tables; the rows' other columns are overwritten below
        n, dev = b * (self.k + 1), self.seq_info.device
        packed, info = chained_verify_inputs(self.k, self.block_size, prev_packed, to_device(prev_starts, torch.long, dev),
                                             to_device(prev_rooms, torch.long, dev), self.verify_in.tables[:n], b)
        # stream-ordered after the host copies they override and before the replay, which overwrites prev_packed
        self.verify_in.packed[:, :n].copy_(packed)
        self.seq_info[:2, :b].copy_(info)
        return self._launch("greedy", b)[0]

    @torch.inference_mode()
    def _run_sampled(self, b: int, rows: DecodeRows, seq_info: list[list[int]], options: list[list[float]],
                     dists, seeds: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        self._prepare("sampled", b, rows)
        self.seq_info[:, :b].copy_(to_device(seq_info, torch.long, self.seq_info.device))
        self.sample_options[:, :b].copy_(to_device(options, torch.float32, self.sample_options.device))
        self.sample_seeds[:, :b].copy_(to_device(seeds, torch.int64, self.sample_seeds.device))
        self.load_dists(self.draft_dists, dists, seq_info[0][: len(dists)])
        packed, dists_out = self._launch("sampled", b)
        return packed, dists_out


def create_spec_graph_runner(model_runner, k: int) -> SpecGraphRunner | None:
    """The spec graphs for this ModelRunner, or None where graphs cannot be used (CPU, no triton,
    LONGCAT_ENFORCE_EAGER=1, tensor parallelism without LONGCAT_TP_CUDA_GRAPHS=1, expert parallelism: its captured
    all-to-all would need the capacity-overflow re-run the plain decode graphs have). Under TP: the host-verified
    kinds only, on every rank (see the module doc)."""
    from longcat_service import envs
    from longcat_service.distributed.parallel_state import get_tp_size
    from longcat_service.kernels import fast_path_enabled

    tp = get_tp_size() > 1
    if envs.LONGCAT_ENFORCE_EAGER or not fast_path_enabled(model_runner.kv_caches[0]):
        return None
    if tp and (not envs.LONGCAT_TP_CUDA_GRAPHS or model_runner.args.enable_expert_parallel):
        return None
    cfg = model_runner.config
    max_len = model_runner.args.max_model_len or int(getattr(cfg, "max_position_embeddings", 0) or 0)
    max_len = min(max_len or 1 << 30, model_runner.num_blocks * model_runner.block_size)
    max_blocks = -(-max_len // model_runner.block_size)
    buckets = spec_buckets(k, model_runner.args.max_num_seqs)
    if not buckets:
        return None
    return SpecGraphRunner(model_runner.model, model_runner.kv_caches, model_runner.mtp_kv_cache,
                           model_runner.block_size, max_blocks, k, buckets,
                           scratch_slot=model_runner.num_blocks * model_runner.block_size, fused=not tp,
                           lockstep=tp)

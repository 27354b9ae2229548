"""An eager CPU twin of engine/spec_graph_runner.SpecGraphRunner: the same bucket choice and flat rows (the
production SpecRowsRunner), run through the model's reference path instead of captured graphs, so that CPU tests
cover what the graph spec step computes apart from the capture itself. Padding rows are skipped (the graphs give
them slot -1, seq_len 0) and their outputs left zero. The device-side greedy step (engine/spec_greedy.py) runs its
production tensor code here too, with these eager forwards; the MTP rows it builds on the device are checked
against the host's build_mtp_plan."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

from longcat_service.engine.spec_chain_rows import chained_verify_inputs
from longcat_service.engine.spec_graph_runner import DecodeRows, SpecGraphRunner, SpecRowsRunner
from longcat_service.engine.spec_greedy import greedy_spec_step
from longcat_service.layers.attention_metadata import AttentionMetadata
from longcat_service.model.mtp import build_mtp_plan

# Tests that run SpecGraphRunner's Triton decode kernels on CPU tensors need Triton's interpreter, which
# tests/conftest.py turns on only where there is no GPU; on a GPU the captured path has its own tests
# (tests/test_spec_decode_graphs_gpu.py).
interpreted_triton_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                             reason="CPU tensors through the Triton interpreter (no GPU machines)")



def install_uncaptured_spec_graphs(engine, monkeypatch, k: int, buckets=(1, 2)) -> SpecGraphRunner:
    """The production SpecGraphRunner on this CPU engine (its forwards on its static buffers, run eagerly, the Triton
    decode kernels interpreted with 4 splits, tests/decode_splits.py: mark the test interpreted_triton_only)."""
    from longcat_service.layers import fast_decode, layernorm
    from tests.decode_splits import cap_mla_decode_splits

    r = engine.runner
    graphs = r.spec_decoder.graphs = SpecGraphRunner(r.model, r.kv_caches, r.mtp_kv_cache, r.block_size, 16, k,
                                                     tuple(buckets), scratch_slot=r.num_blocks * r.block_size)
    monkeypatch.setattr(fast_decode, "fast_path_enabled", lambda t: True)
    monkeypatch.setattr(layernorm, "fast_path_enabled", lambda t: True)
    cap_mla_decode_splits(monkeypatch.setattr)
    return graphs

class EagerSpecRows(SpecRowsRunner):
    def __init__(self, runner, k: int, buckets: tuple[int, ...], max_blocks: int = 64):
        scratch = runner.num_blocks * runner.block_size if hasattr(runner, "num_blocks") else None
        super().__init__(runner.block_size, max_blocks, k, buckets, scratch)
        self.runner = runner
        self.calls: Counter = Counter()  # kind -> replays
        self.batch_sizes: list[int] = []  # sequences of each verify
        self.greedy_sizes: list[int] = []  # sequences of each device-side greedy step
        self.sampled_sizes: list[int] = []  # sequences of each device-side sampled step
        self.chained_sizes: list[int] = []  # sequences of each chained greedy step (async scheduling)
        self.chained_rows: list[list[list[int]]] = []  # each chained step's device-built ids, positions, slots, lens
        self._verify_hidden: dict[int, torch.Tensor] = {}

    def verify(self, batch):
        self.batch_sizes.append(len(batch))
        return super().verify(batch)

    @staticmethod
    def _real(rows: DecodeRows) -> list[int]:
        return [i for i, n in enumerate(rows.seq_lens) if n > 0]

    def _run_verify(self, b: int, rows: DecodeRows):
        self.calls["verify"] += 1
        return self._verify(b, rows)

    def _verify(self, b: int, rows: DecodeRows):
        r, n = self.runner, b * (self.k + 1)
        assert len(rows) <= n
        real = self._real(rows)
        assert all(rows.seq_lens[i] == rows.positions[i] + 1 for i in real)  # causal: up to its own position
        md = AttentionMetadata.build([1] * len(real), [rows.seq_lens[i] for i in real], [rows.tables[i] for i in real],
                                     r.block_size, r.device)
        slots = [rows.slots[i] for i in real]
        redirected = [j for j, (a, b) in enumerate(zip(md.slot_mapping.tolist(), slots, strict=True)) if a != b]
        assert all(slots[j] == self.scratch_slot for j in redirected)  # only recomputed shared tokens move
        self.calls["redirected"] += len(redirected)
        md.slot_mapping = torch.tensor(slots, dtype=torch.long, device=r.device)
        ids = torch.tensor([rows.input_ids[i] for i in real], dtype=torch.long, device=r.device)
        positions = torch.tensor([rows.positions[i] for i in real], dtype=torch.long, device=r.device)
        h = r.model(ids, positions, md, r.kv_caches)
        hidden = torch.zeros(n, h.shape[1], dtype=h.dtype, device=h.device)
        hidden[real] = h
        logits = torch.zeros(n, r.vocab_size, device=h.device)
        logits[real] = r.model.compute_logits(h).float()
        self._verify_hidden[b] = hidden
        return hidden, logits

    def _mtp(self, rows: DecodeRows, hidden: torch.Tensor, n: int) -> torch.Tensor:
        r = self.runner
        real = self._real(rows)
        out = torch.zeros(n, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
        if not real:
            return out
        # the graphs attend positions 1..t+1 (seq_len t + 2, first_pos 1): the context build_mtp_plan gives
        assert all(rows.seq_lens[i] == rows.positions[i] + 2 for i in real)
        pos = [rows.positions[i] for i in real]
        plan = build_mtp_plan([rows.tables[i] for i in real], pos, [p + 1 for p in pos], r.block_size, r.device)
        assert plan.slot_mapping.tolist() == [rows.slots[i] for i in real]
        ids = torch.tensor([rows.input_ids[i] for i in real], dtype=torch.long, device=r.device)
        out[real] = r.model.mtp_forward(ids, hidden[real], torch.tensor(pos, dtype=torch.long, device=r.device), plan,
                                        r.mtp_kv_cache)
        return out

    def _run_mtp(self, b: int, rows: DecodeRows):
        self.calls["mtp"] += 1
        return self._mtp(rows, self._verify_hidden[b], b * (self.k + 1))

    def _device_rows(self, b: int, rows: DecodeRows, seq_info) -> tuple[torch.Tensor, ...]:
        """The flat rows of bucket b (padded) as the graphs' device inputs: ids, positions, tables, seq_info."""
        n, dev = b * (self.k + 1), self.runner.device
        for _ in range(n - len(rows)):
            rows.pad()
        tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=dev)
        for i, t in enumerate(rows.tables):
            tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        return (torch.tensor(rows.input_ids, dtype=torch.long, device=dev),
                torch.tensor(rows.positions, dtype=torch.long, device=dev), tables,
                torch.tensor(seq_info, dtype=torch.long, device=dev))

    def greedy_step(self, batch, rooms):
        self.greedy_sizes.append(len(batch))
        return super().greedy_step(batch, rooms)

    def _run_greedy(self, b: int, rows: DecodeRows, seq_info: list[list[int]]) -> torch.Tensor:
        self.calls["greedy"] += 1
        r = self.runner
        ids, positions, tables, info = self._device_rows(b, rows, seq_info)
        return greedy_spec_step(self.k, self.block_size, lambda: self._verify(b, rows)[0], self._mtp_device_rows,
                                lambda h: r.model.compute_logits(h).float(), ids, positions, tables, info)

    def chained_greedy_step(self, batch, prev_packed, prev_starts, prev_rooms):
        self.chained_sizes.append(len(batch))
        return super().chained_greedy_step(batch, prev_packed, prev_starts, prev_rooms)

    def _run_chained_greedy(self, b: int, rows: DecodeRows, prev_packed, prev_starts, prev_rooms) -> torch.Tensor:
        """The production device-side row building (spec_chain_rows.py) on CPU tensors, then the greedy step on the
        rows it built (as the graph's static inputs would hold them)."""
        self.calls["chained_greedy"] += 1
        r = self.runner
        n = b * (self.k + 1)
        assert len(rows) <= n and all(s == -1 for s in rows.slots)  # the host gives the tables only
        _, _, tables, _ = self._device_rows(b, rows, [[0] * b, [0] * b])
        packed, info = chained_verify_inputs(self.k, self.block_size, prev_packed,
                                             torch.tensor(prev_starts, dtype=torch.long),
                                             torch.tensor(prev_rooms, dtype=torch.long), tables, b)
        ids, positions, slots, seq_lens = packed.tolist()
        self.chained_rows.append([ids, positions, slots, seq_lens])
        built = DecodeRows(ids, positions, slots, seq_lens, [rows.tables[i] if seq_lens[i] else [] for i in range(n)])
        return greedy_spec_step(self.k, self.block_size, lambda: self._verify(b, built)[0], self._mtp_device_rows,
                                lambda h: r.model.compute_logits(h).float(), packed[0], packed[1], tables, info)

    def sampled_step(self, batch, rooms, options, dists, seeds=None):
        self.sampled_sizes.append(len(batch))
        self.calls["seeded_rows"] += sum(seeds[0]) if seeds else 0
        return super().sampled_step(batch, rooms, options, dists, seeds)

    def _run_sampled(self, b: int, rows: DecodeRows, seq_info, options, dists, seeds):
        self.calls["sampled"] += 1
        r, dev = self.runner, self.runner.device
        ids, positions, tables, info = self._device_rows(b, rows, seq_info)
        q = torch.full((b, self.k, r.vocab_size), float("nan"), device=dev)  # rows without a stored q: never read
        self.load_dists(q, dists, seq_info[0][: len(dists)])
        for i, (nd, has) in enumerate(zip(seq_info[0], seq_info[2], strict=True)):
            if nd > 0 and options[0][i] > 0:  # a sampled row's drafts were drawn from its stored, now loaded, q
                assert has
                drafted = torch.tensor(rows.input_ids[i * (self.k + 1) + 1 : i * (self.k + 1) + 1 + nd])
                assert (q[i, :nd].gather(1, drafted[:, None]) > 0).all()
                torch.testing.assert_close(q[i, :nd].sum(dim=-1), torch.ones(nd))
                self.calls["q_checked"] += 1
        opts = torch.tensor(options, dtype=torch.float32, device=dev)
        seed_cols = torch.tensor(seeds, dtype=torch.int64, device=dev)
        return greedy_spec_step(self.k, self.block_size, lambda: self._verify(b, rows)[0], self._mtp_device_rows,
                                lambda h: r.model.compute_logits(h).float(), ids, positions, tables, info,
                                sampling=(opts, q, seed_cols))

    def _mtp_device_rows(self, ids, hidden, positions, slots, seq_lens, tables) -> torch.Tensor:
        """The greedy step's MTP pass: rows whose slots and lengths were built on the device."""
        self.calls["greedy_mtp"] += 1
        r, bs = self.runner, self.block_size
        out = torch.zeros_like(hidden)
        real = [i for i, n in enumerate(seq_lens.tolist()) if n > 0]
        if not real:
            return out
        pos = positions[real].tolist()
        assert seq_lens[real].tolist() == [p + 2 for p in pos]
        own = [tables[i, : -(-(p + 2) // bs)].tolist() for i, p in zip(real, pos, strict=True)]
        plan = build_mtp_plan(own, pos, [p + 1 for p in pos], bs, r.device)
        assert plan.slot_mapping.tolist() == slots[real].tolist()  # the device-built slots are the host's
        assert all(s == -1 for i, s in enumerate(slots.tolist()) if i not in set(real))  # masked rows write nothing
        idx = torch.tensor(real, dtype=torch.long, device=r.device)
        out[idx] = r.model.mtp_forward(ids[idx], hidden[idx], positions[idx], plan, r.mtp_kv_cache)
        return out

    def _run_draft(self, b: int, rows: DecodeRows, tokens: torch.Tensor, hidden: torch.Tensor):
        self.calls["draft"] += 1
        assert len(rows) <= b and tokens.shape[0] == hidden.shape[0] == len(rows)
        rows.input_ids = tokens.tolist()
        return self._mtp(rows, hidden, len(rows))

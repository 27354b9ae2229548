"""CUDA-graph capture and replay of the decode step (model forward + compute_logits).

One graph per batch-size bucket (1, 2, 4, ..., 256), all sharing one memory pool; ModelRunner captures them
at start-up (EngineArgs.capture_graphs_at_startup), else each is captured on first use.
The inputs live in static device buffers; a replay copies the step's values in (one host-to-device copy
of a packed int64 buffer plus the used block-table columns) and pads the batch up to the bucket with
rows that write no cache entry (slot -1) and attend to nothing (seq_len 0). Capture needs the decode
forward to be free of host syncs: longcat_service.kernels (attention, norms) plus the CUDA MoE ops.
"""

from __future__ import annotations

import logging

import torch

from longcat_service.distributed.ep_static_dispatch import static_dispatch
from longcat_service.engine.graph_capture import capture_stream
from longcat_service.layers.attention_metadata import AttentionMetadata

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket_for(batch_size: int, buckets: tuple[int, ...] = BUCKETS) -> int | None:
    for b in buckets:
        if b >= batch_size:
            return b
    return None


class CUDAGraphRunner:
    def __init__(self, model, kv_caches: list[torch.Tensor], block_size: int, max_blocks_per_seq: int,
                 buckets: tuple[int, ...] = BUCKETS):
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets must be ascending positive batch sizes, got {buckets}")
        if max_blocks_per_seq < 1:
            raise ValueError(f"max_blocks_per_seq must be >= 1, got {max_blocks_per_seq}")
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.buckets = tuple(buckets)
        self.max_batch = self.buckets[-1]
        self.max_blocks = max_blocks_per_seq
        dev = model.device
        if dev.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {dev}")
        n = self.max_batch
        # packed rows: input_ids, positions, slot_mapping, seq_lens (int64, read by the kernels as they are)
        self.packed = torch.zeros(4, n, dtype=torch.int64, device=dev)
        self.packed_host = torch.zeros(4, n, dtype=torch.int64).pin_memory()
        # static (not made inside the graph): the fast decode path reads neither, but the metadata carries them
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.block_tables_host = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32).pin_memory()
        self.packed_host_np = self.packed_host.numpy()  # share memory with the pinned tensors
        self.block_tables_host_np = self.block_tables_host.numpy()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None
        self.copy_done = torch.cuda.Event()

    def can_run(self, batch_size: int, max_seq_len: int) -> bool:
        return 0 < batch_size <= self.max_batch and -(-max_seq_len // self.block_size) <= self.max_blocks

    def _metadata(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            block_size=self.block_size,
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.packed[3, :b],  # int64: the decode kernels load it as is (no cast kernel per replay)
            block_tables=self.block_tables[:b],
            slot_mapping=self.packed[2, :b],
            query_lens_cpu=[1] * b,
            seq_lens_cpu=[1] * b,  # host copies are unused on the fast decode path
        )

    def _forward(self, b: int) -> torch.Tensor:
        # expert parallelism: fixed-capacity all-to-all (static shapes, no host sync); a no-op otherwise
        with static_dispatch():
            return self._forward_static(b)

    def _forward_static(self, b: int) -> torch.Tensor:
        hidden = self.model(self.packed[0, :b], self.packed[1, :b], self._metadata(b), self.kv_caches)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self, b: int) -> None:
        """Capture bucket b (inputs hold padding: no cache writes happen during warm-up or capture)."""
        write_host_inputs(self.packed_host_np, self.block_tables_host_np, b, 1, [], [], [], [], [])  # all padding
        self.packed.copy_(self.packed_host, non_blocking=True)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(b)  # compiles the Triton kernels and warms cuBLAS outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=capture_stream(self.packed.device)):
            logits = self._forward(b)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[b], self.logits[b] = graph, logits
        logger.info("captured decode CUDA graph for batch bucket %d", b)

    def capture_all(self) -> None:
        """Capture every bucket now, largest first (the shared pool is sized by it), so no request pays a
        capture (hundreds of ms at full width) when the batch first reaches a new size."""
        for b in sorted(self.buckets, reverse=True):
            if b not in self.graphs:
                self.capture(b)

    @torch.inference_mode()
    def run(self, input_ids: list[int], positions: list[int], slot_mapping: list[int], seq_lens: list[int],
            block_tables: list[list[int]], device_input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step for len(input_ids) sequences -> fp32 logits [B, vocab] (a view valid until the
        next replay). `device_input_ids` (on the device) replaces input_ids."""
        batch = len(input_ids)
        if not (len(positions) == len(slot_mapping) == len(seq_lens) == len(block_tables) == batch):
            raise ValueError("cuda graph run: input_ids, positions, slot_mapping, seq_lens, block_tables disagree")
        b = bucket_for(batch, self.buckets)
        width = max((len(t) for t in block_tables), default=0)
        if b is None or width > self.max_blocks:
            raise ValueError(f"cuda graph run: batch {batch} / {width} blocks exceed {self.max_batch} / {self.max_blocks}")
        if b not in self.graphs:
            self.capture(b)
        self.copy_done.synchronize()  # the last step's async copies must finish before the host buffers change
        width = max(width, 1)
        write_host_inputs(self.packed_host_np, self.block_tables_host_np, b, width, input_ids, positions,
                          slot_mapping, seq_lens, block_tables)
        host, tables = self.packed_host, self.block_tables_host[:b, :width]
        # pinned host buffers: the copies are asynchronous; the sampler's read-back is the step's only sync
        self.packed[:, :b].copy_(host[:, :b], non_blocking=True)
        self.block_tables[:b, :width].copy_(tables, non_blocking=True)
        self.copy_done.record()
        if device_input_ids is not None:  # stream-ordered after the host copy it overrides
            self.packed[0, :batch].copy_(device_input_ids)
        self.graphs[b].replay()
        return self.logits[b][:batch]


def write_host_inputs(packed, tables, bucket: int, width: int, input_ids, positions, slot_mapping, seq_lens,
                      block_tables) -> None:
    """Fill the (numpy views of the) pinned input buffers for one replay of `bucket` rows: packed [4, >= bucket]
    int64 rows input_ids / positions / slot_mapping / seq_lens, then padding rows (token 0, position 0, slot -1:
    no cache write, seq_len 0: no attention); tables [>= bucket, >= width] int32, zero past each row's blocks.
    Numpy takes the host lists directly (no tensor per list: this runs on the host for every decode step)."""
    batch = len(input_ids)
    for row, values, pad in ((0, input_ids, 0), (1, positions, 0), (2, slot_mapping, -1), (3, seq_lens, 0)):
        packed[row, :batch] = values
        packed[row, batch:bucket] = pad
    tables[:bucket, :width] = 0
    for i, t in enumerate(block_tables):
        tables[i, : len(t)] = t


def create_graph_runner(model_runner) -> CUDAGraphRunner | None:
    """A graph runner for this ModelRunner, or None where graphs cannot be used (CPU, no triton, or
    LONGCAT_ENFORCE_EAGER=1)."""
    from longcat_service import envs
    from longcat_service.kernels import fast_path_enabled

    if envs.LONGCAT_ENFORCE_EAGER or not fast_path_enabled(model_runner.kv_caches[0]):
        return None
    cfg = model_runner.config
    max_len = model_runner.args.max_model_len or int(getattr(cfg, "max_position_embeddings", 0) or 0)
    max_len = min(max_len or 1 << 30, model_runner.num_blocks * model_runner.block_size)
    max_blocks = -(-max_len // model_runner.block_size)
    buckets = tuple(b for b in BUCKETS if b <= max(model_runner.args.max_num_seqs, 1)) or (1,)
    if buckets[-1] < model_runner.args.max_num_seqs:
        buckets = buckets + (bucket_for(model_runner.args.max_num_seqs) or buckets[-1],)
    return CUDAGraphRunner(model_runner.model, model_runner.kv_caches, model_runner.block_size, max_blocks,
                           tuple(sorted(set(buckets))))


def decode_logits_with_graph(graph_runner: CUDAGraphRunner, batch, device_input_ids: torch.Tensor | None = None
                             ) -> torch.Tensor | None:
    """Replay the graph for a pure decode batch -> its logits (a view valid until the next replay); None when
    the batch does not qualify. Only enqueues work: the caller samples and reads back. With device_input_ids
    the batch's tokens come from the device (a chained step: the host does not know them yet)."""
    for s in batch:
        if s.num_new_tokens != 1 or not s.needs_sample or s.start_pos < s.seq.num_prompt_tokens - 1:
            return None
    if not graph_runner.can_run(len(batch), max(s.end_pos for s in batch)):
        return None
    bs = graph_runner.block_size
    input_ids, positions, slots, seq_lens, tables = [], [], [], [], []
    for s in batch:
        pos, table = s.start_pos, s.block_table
        input_ids.append(s.seq.token_ids[pos] if device_input_ids is None else 0)
        positions.append(pos)
        slots.append(table[pos // bs] * bs + pos % bs)
        seq_lens.append(s.end_pos)
        tables.append(list(table))
    return graph_runner.run(input_ids, positions, slots, seq_lens, tables, device_input_ids)

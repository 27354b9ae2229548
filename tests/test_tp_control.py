"""The TP control plane in one process: step-channel framing, step messages (token windows, block-table deltas),
heartbeats over a real TCPStore, torchrun environment parsing."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from longcat_service.distributed.heartbeat import Heartbeat
from longcat_service.distributed.launch import RankInfo, torchrun_env, torchrun_job
from longcat_service.distributed.step_channel import StepChannel
from longcat_service.engine.engine_args import EngineArgs
from longcat_service.engine.errors import EngineArgsError
from longcat_service.engine.scheduler import ScheduledSeq
from longcat_service.engine.sequence import SequenceGroup
from longcat_service.engine.tp_messages import StepDecoder, StepEncoder, TokenWindow
from longcat_service.sampling_params import SamplingParams


class LoopbackChannel(StepChannel):
    """Sender and receiver share a list of broadcast tensors instead of a process group."""

    def __init__(self, wire: list, frame_bytes: int):
        super().__init__(group=None, frame_bytes=frame_bytes)
        self.wire = wire

    def _broadcast(self, tensor):
        self.broadcasts += 1
        if self.wire and self.wire[0][0] is not self:  # receiving: take the sender's next tensor
            _, sent = self.wire.pop(0)
            assert sent.numel() == tensor.numel(), "sender and receiver disagree on a broadcast's size"
            tensor.copy_(sent)
        else:
            self.wire.append((self, tensor.clone()))


@pytest.mark.parametrize("payload_len, broadcasts", [(10, 1), (200, 2)])
def test_step_channel_one_broadcast_unless_the_frame_overflows(payload_len, broadcasts):
    wire: list = []
    sender, receiver = LoopbackChannel(wire, 128), LoopbackChannel(wire, 128)
    message = ("step", list(range(payload_len)), [7])
    sender.send(message)
    assert sender.broadcasts == broadcasts
    assert receiver.recv() == message and receiver.broadcasts == broadcasts and not wire


def test_step_channel_rejects_a_frame_without_room():
    with pytest.raises(ValueError, match="frame_bytes"):
        StepChannel(group=None, frame_bytes=8)


def test_token_window_absolute_positions_and_bounds():
    w = TokenWindow(10, [1, 2, 3])
    assert w[10:12] == [1, 2] and w[12] == 3 and w[11:11] == []
    for bad in (lambda: w[9], lambda: w[13], lambda: w[9:11], lambda: w[11:14], lambda: w[10:], lambda: w[::2]):
        with pytest.raises(IndexError):
            bad()


def _seq(prompt, n_out=0, table=(), prompt_logprobs=None):
    group = SequenceGroup("r", list(prompt), SamplingParams(prompt_logprobs=prompt_logprobs), 0.0)
    seq = group.seqs[0]
    seq.token_ids += list(range(100, 100 + n_out))
    seq.block_table = list(table)
    return seq


def test_step_messages_carry_what_execute_reads_and_table_deltas():
    enc, dec = StepEncoder(), StepDecoder()
    seq = _seq(range(1, 11), table=[4, 9, 2], prompt_logprobs=1)
    # a prefill chunk [0, 6): tokens up to one past the chunk travel (prompt logprobs need the next token)
    (r,) = dec.decode(enc.encode([ScheduledSeq(seq, 6, 0)]))
    assert (r.start_pos, r.num_new_tokens, r.end_pos, r.needs_sample) == (0, 6, 6, False)
    assert r.seq.token_ids[0:7] == list(range(1, 8)) and r.seq.block_table == [4, 9, 2]
    assert (r.seq.num_prompt_tokens, r.seq.index, r.seq.params.prompt_logprobs) == (10, 0, 1)
    # the rest of the prompt: the table grew by one block, which alone is sent
    seq.block_table.append(5)
    rows, released = enc.encode([ScheduledSeq(seq, 4, 6)])
    assert rows[0][8:10] == (3, [5]) and released == []
    (r,) = dec.decode((rows, released))
    assert r.seq.block_table == [4, 9, 2, 5] and r.needs_sample and r.seq.token_ids[6:10] == [7, 8, 9, 10]
    # preempted and rescheduled with other blocks: the whole table is resent
    seq.block_table = [1, 3]
    rows, _ = enc.encode([ScheduledSeq(seq, 8, 0)])
    assert rows[0][8:10] == (0, [1, 3])
    assert dec.decode((rows, []))[0].seq.block_table == [1, 3]
    # finished: the next message tells the workers to drop the table
    enc.forget(seq.seq_id)
    other = _seq([1, 2], table=[6])
    rows, released = enc.encode([ScheduledSeq(other, 2, 0)])
    assert released == [seq.seq_id]
    dec.decode((rows, released))
    assert seq.seq_id not in dec.tables and dec.tables[other.seq_id] == [6]


def test_step_messages_carry_speculative_drafts_and_the_recomputed_shared_position():
    enc, dec = StepEncoder(), StepDecoder()
    seq = _seq(range(1, 6), n_out=2, table=[3, 8])
    seq.shared_recompute_pos = 4
    (r,) = dec.decode(enc.encode([ScheduledSeq(seq, 3, 6, draft_token_ids=[41, 42])]))
    assert r.draft_token_ids == [41, 42] and r.seq.shared_recompute_pos == 4
    assert r.needs_sample and r.end_pos == 9 and r.seq.token_ids[6:7] == [101]
    (r,) = dec.decode(enc.encode([ScheduledSeq(_seq([1, 2], table=[6]), 2, 0)]))
    assert r.draft_token_ids == [] and r.seq.shared_recompute_pos is None


def test_decoder_refuses_a_delta_it_cannot_apply():
    with pytest.raises(RuntimeError, match="keeps 3 blocks"):
        StepDecoder().decode(([(1, 0, 0, 1, True, 1, None, [5], 3, [], [], None)], []))


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)


def test_heartbeat_reports_a_silent_rank_and_not_a_live_one(store, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", f"hb{time.monotonic_ns()}")
    lost: list[str] = []
    fired = threading.Event()

    def on_lost(reason):
        lost.append(reason)
        fired.set()

    watcher = Heartbeat(store, 0, [1], on_lost, period_s=0.05, timeout_s=0.5).start()
    peer = Heartbeat(store, 1, [], lambda r: None, period_s=0.05, timeout_s=0.5).start()
    time.sleep(1.0)
    assert not lost  # rank 1 beats: nothing reported
    peer.stop()
    assert fired.wait(15) and "rank 1 sent no heartbeat" in lost[0]
    watcher.stop()


def test_heartbeat_waits_for_a_first_beat_with_the_startup_timeout(store, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", f"hb{time.monotonic_ns()}")
    lost: list[str] = []
    hb = Heartbeat(store, 0, [1], lost.append, period_s=0.05, timeout_s=0.2, startup_timeout_s=60).start()
    time.sleep(0.6)
    hb.stop()
    assert not lost  # rank 1 never started yet: still within its startup allowance


def test_heartbeat_reports_an_unreachable_store():
    server = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", server.port, 1, False, timeout=timedelta(seconds=2))
    lost = threading.Event()
    reasons: list[str] = []
    hb = Heartbeat(client, 1, [0], lambda r: (reasons.append(r), lost.set()), period_s=0.05, timeout_s=30)
    del server  # the store's host goes away
    hb.start()
    assert lost.wait(10) and "store stopped answering" in reasons[0]


def test_torchrun_env_parsing_names_the_variable():
    base = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert torchrun_env({}) is None
    assert torchrun_env(base) == RankInfo(1, 2, 0, "10.0.0.1", 29500, False)
    assert torchrun_env({**base, "TORCHELASTIC_USE_AGENT_STORE": "True"}).agent_store
    for env, name in [({**base, "RANK": "x"}, "RANK"), ({**base, "RANK": "2"}, "RANK"),
                      ({k: v for k, v in base.items() if k != "MASTER_ADDR"}, "MASTER_ADDR"),
                      ({**base, "MASTER_PORT": "p"}, "MASTER_PORT"), ({**base, "LOCAL_RANK": "-1"}, "LOCAL_RANK")]:
        with pytest.raises(ValueError, match=f"^{name}:"):
            torchrun_env(env)


def test_torchrun_job_checks_the_tensor_parallel_size():
    env = {"RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert torchrun_job(1, env).world_size == 4  # the default flag takes WORLD_SIZE
    assert torchrun_job(4, env).rank == 0
    assert torchrun_job(1, {**env, "WORLD_SIZE": "1", "RANK": "0"}) is None
    with pytest.raises(ValueError, match="^--tensor-parallel-size: 2 does not match the 4 ranks"):
        torchrun_job(2, env)


def test_engine_args_tensor_parallel_size_is_validated():
    assert EngineArgs(tensor_parallel_size=2).tensor_parallel_size == 2
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(EngineArgsError, match="^tensor_parallel_size:"):
            EngineArgs(tensor_parallel_size=bad)


def test_model_group_collectives_are_noops_at_tp1():
    from longcat_service.distributed import parallel_state

    t = torch.ones(3)
    assert parallel_state.all_reduce(t) is t and parallel_state.all_gather(t) is t
    assert parallel_state.get_cpu_group() is None


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="needs a host with fewer than 2 GPUs")
def test_more_ranks_than_gpus_is_refused_before_spawning():
    from longcat_service.engine.tp_worker import create_model_runner

    with pytest.raises(EngineArgsError, match=r"^tensor_parallel_size: needs 2 GPUs on this node"):
        create_model_runner(EngineArgs(device="cuda", tensor_parallel_size=2), None)


def test_under_torchrun_only_rank0_builds_the_engine_and_sizes_must_agree(monkeypatch):
    from longcat_service.engine.tp_worker import create_model_runner

    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(EngineArgsError, match="only global rank 0 runs the engine"):
        create_model_runner(EngineArgs(device="cpu", tensor_parallel_size=2), None)
    with pytest.raises(EngineArgsError, match="WORLD_SIZE=2"):
        create_model_runner(EngineArgs(device="cpu", tensor_parallel_size=4), None)

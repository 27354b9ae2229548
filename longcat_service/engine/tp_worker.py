"""Tensor-parallel model runners: rank 0 drives, the other ranks follow.

Rank 0 (TPDriverRunner) runs the scheduler, sampler and detokenizer as at tp 1; before each step it broadcasts
the step's inputs (engine/tp_messages.py) over the gloo control group, then runs ModelRunner.execute. Every
other rank (TPWorkerRunner.serve_forever) receives them and runs the same execute on stand-ins with sampling
skipped, so the collectives inside the model line up. Sampled tokens exist on rank 0 only.

Failure policy: a TP job whose ranks disagree cannot recover, so losing any rank (heartbeat silence, a local
worker process exiting, an exception on rank 0 after the inputs went out) marks rank 0 failed (health
NOT_SERVING), then ends the process with TP_FAILURE_EXIT_CODE after FAILURE_EXIT_DELAY_S. Workers exit when rank
0 goes quiet. A clean shutdown (rank 0's close(), also at interpreter exit) tells the workers to exit 0.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from longcat_service import envs
from longcat_service.distributed import parallel_state
from longcat_service.distributed.heartbeat import Heartbeat, job_key
from longcat_service.distributed.launch import (
    RankInfo,
    default_backend,
    local_device,
    open_heartbeat_store,
    open_store,
    torchrun_env,
)
from longcat_service.distributed.step_channel import StepChannel
from longcat_service.engine.engine_args import EngineArgs
from longcat_service.engine.errors import EngineArgsError
from longcat_service.engine.model_runner import ModelRunner
from longcat_service.engine.tp_messages import StepDecoder, StepEncoder

logger = logging.getLogger(__name__)

TP_FAILURE_EXIT_CODE = 3
FAILURE_EXIT_DELAY_S = 2.0  # lets the health probe publish NOT_SERVING before the process goes
SHUTDOWN_ACK_TIMEOUT_S = 30.0
MSG_STEP, MSG_SHUTDOWN = "step", "shutdown"


_open_driver: TPDriverRunner | None = None  # this process's TP group's rank 0, from its start to its close()


def create_model_runner(args: EngineArgs, model_path) -> ModelRunner:
    """ModelRunner at tp 1; otherwise rank 0's TPDriverRunner (joining torchrun's job, or spawning local ranks)."""
    tp = args.tensor_parallel_size
    if _open_driver is not None:
        # a second engine would run its collectives in the open engine's group and hang there
        raise EngineArgsError("tensor_parallel_size", f"this process still drives a tensor-parallel engine of "
                              f"{_open_driver.info.world_size} ranks: close it first (LLM.close(), "
                              "LLMEngine.close(), or `with LLM(...) as llm:`)")
    env = torchrun_env()
    if env is not None and env.world_size > 1:
        if tp != env.world_size:
            raise EngineArgsError("tensor_parallel_size", f"is {tp} but torchrun started WORLD_SIZE={env.world_size} ranks")
        if env.rank != 0:
            raise EngineArgsError("tensor_parallel_size", f"rank {env.rank}: only global rank 0 runs the engine; "
                                  "the other ranks run longcat_service.engine.tp_worker.run_worker")
        return TPDriverRunner(args, model_path, env)
    if tp == 1:
        return ModelRunner(args, model_path)
    return TPDriverRunner(args, model_path, None)


def _check_gpu_count(needed: int) -> None:
    visible = torch.cuda.device_count()
    if visible < needed:
        raise EngineArgsError("tensor_parallel_size", f"needs {needed} GPUs on this node (one per local rank), "
                              f"{visible} visible")


class _TPRunnerMixin:
    """Joining the group before the model is built (layers read the tp rank/size when constructed)."""

    def _join(self, args: EngineArgs, info: RankInfo, store: dist.TCPStore) -> EngineArgs:
        device_type = args.torch_device.type
        if device_type == "cuda":
            _check_gpu_count(info.local_rank + 1)
            torch.cuda.set_device(info.local_rank)
        elif "OMP_NUM_THREADS" not in os.environ:  # CPU ranks share the host's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.world_size))
        parallel_state.init_distributed(
            info.world_size, info.rank, backend=default_backend(device_type),
            store=dist.PrefixStore("longcat/pg", store),
        )  # fmt: skip
        parallel_state.set_expert_parallel(args.enable_expert_parallel, args.expert_placement,
                                           args.ep_capacity_factor)
        self.info = info
        self.store = store
        self.channel = StepChannel(parallel_state.get_cpu_group())
        return dataclasses.replace(args, device=local_device(device_type, info))

    def _decide_num_blocks(self) -> int:
        # Every rank must allocate the same cache (rank 0's block ids index all of them): the smallest wins.
        n = torch.tensor([super()._decide_num_blocks()], dtype=torch.int64)
        dist.all_reduce(n, op=dist.ReduceOp.MIN, group=parallel_state.get_cpu_group())
        return int(n.item())


def _tp_cuda_graphs() -> bool:
    """LONGCAT_TP_CUDA_GRAPHS=1: every rank captures the decode graphs (with MTP: the host-verified spec-step graphs,
    engine/spec_graph_runner.py) (NCCL collectives inside) at start-up and replays them in lockstep. Opt-in until it has run on a multi-GPU machine (benchmarks/tp_session.sh)."""
    return envs.LONGCAT_TP_CUDA_GRAPHS


class TPDriverRunner(_TPRunnerMixin, ModelRunner):
    supports_chained_decode = False  # the workers get each step's token ids from the host
    # under EP the captured decode steps use the fixed-capacity all-to-all (distributed/ep_static_dispatch.py)
    uses_cuda_graphs = property(lambda self: _tp_cuda_graphs())

    def __init__(self, args: EngineArgs, model_path, env: RankInfo | None):
        self.failure: str | None = None  # set once the TP group is lost; the process then exits
        self._closing = False
        self._lock = threading.Lock()
        self._procs: list[multiprocessing.Process] = []
        self.encoder = StepEncoder()
        tp = args.tensor_parallel_size
        if env is None:  # local: this process hosts the store and spawns ranks 1..tp-1
            if args.torch_device.type == "cuda":
                _check_gpu_count(tp)
            store = open_store(RankInfo(0, tp, 0, "127.0.0.1", 0))
            info = RankInfo(0, tp, 0, "127.0.0.1", store.port)
            self._spawn_workers(args, model_path, info)
        else:
            info, store = env, open_store(env)
        self.heartbeat: Heartbeat | None = None
        try:
            self.heartbeat = Heartbeat(open_heartbeat_store(info, store.port), 0, list(range(1, tp)), self.fail).start()
            rank_args = self._join(args, info, store)
            super().__init__(rank_args, model_path)
        except BaseException:
            self._abandon_workers()
            raise
        atexit.register(self.close)
        global _open_driver
        _open_driver = self
        logger.info("tensor parallel: rank 0 of %d ready (%s)", tp, "torchrun" if env else "local processes")

    def _spawn_workers(self, args: EngineArgs, model_path, info: RankInfo) -> None:
        ctx = multiprocessing.get_context("spawn")  # fork would copy this process's threads and torch state
        for rank in range(1, info.world_size):
            rank_info = dataclasses.replace(info, rank=rank, local_rank=rank)
            proc = ctx.Process(target=_spawned_worker_main, args=(args, str(model_path), rank_info,
                               logging.getLogger().level), name=f"longcat-tp-rank{rank}", daemon=True)
            proc.start()
            self._procs.append(proc)
        threading.Thread(target=self._watch_local_workers, name="longcat-tp-procwatch", daemon=True).start()

    def _watch_local_workers(self) -> None:
        """A local worker that exits is noticed at once (the heartbeat would take its timeout)."""
        procs = list(self._procs)
        ready = multiprocessing.connection.wait([p.sentinel for p in procs])
        if self._closing:
            return
        dead = [p for p in procs if p.sentinel in ready]
        for p in dead:
            p.join(timeout=1.0)  # reap it: until then exitcode reads None
        self.fail(", ".join(f"{p.name} (pid {p.pid}) exited with code {p.exitcode}" for p in dead))

    # ---- the step ------------------------------------------------------------------------------
    def launch(self, batch):  # execute = collect(launch(batch)); the engine may collect after launching the next
        with self._lock:
            if self.failure is not None:
                self._wait_for_exit()
            if self._closing:
                raise RuntimeError("the tensor-parallel runner is closed (its workers have exited)")
            rows, released = self.encoder.encode(batch)
            try:
                self.channel.send((MSG_STEP, rows, released))
                return super().launch(batch)
            except BaseException as e:  # the workers may be inside a collective this rank never reaches
                self.fail(f"step failed on rank 0 after its inputs were broadcast ({type(e).__name__}: {e})")
                self._wait_for_exit()

    def share_decision(self, value):
        """Mid-step (speculative decoding): the workers follow rank 0's verification and drafts."""
        self.channel.send(value)
        return value

    def release(self, seq_id: int) -> None:
        super().release(seq_id)
        self.encoder.forget(seq_id)

    def is_healthy(self) -> bool:
        return self.failure is None

    # ---- failure and shutdown ------------------------------------------------------------------
    def fail(self, reason: str) -> None:
        if self.failure is not None or self._closing:
            return
        self.failure = f"tensor-parallel group lost: {reason}"
        logger.critical("%s; exiting with code %d in %.1fs", self.failure, TP_FAILURE_EXIT_CODE, FAILURE_EXIT_DELAY_S)
        threading.Thread(target=self._exit_soon, name="longcat-tp-exit", daemon=True).start()

    def _exit_soon(self) -> None:
        time.sleep(FAILURE_EXIT_DELAY_S)
        self._abandon_workers()
        logging.shutdown()
        os._exit(TP_FAILURE_EXIT_CODE)

    @staticmethod
    def _wait_for_exit():
        threading.Event().wait()  # the exit thread ends the process; no more steps, no error replies

    def _abandon_workers(self) -> None:
        self._closing = True
        if self.heartbeat is not None:
            self.heartbeat.stop()
        for p in self._procs:
            if p.is_alive():
                p.kill()

    def close(self) -> None:
        """Tell the workers to exit (they acknowledge through the store), wait for local ones, leave the group."""
        if not self._lock.acquire(timeout=SHUTDOWN_ACK_TIMEOUT_S):  # a step is stuck: nothing clean is possible
            logger.error("tensor parallel: a step is still running; abandoning the workers")
            self._abandon_workers()
            return
        try:
            if self._closing:
                return
            self._closing = True
            atexit.unregister(self.close)
            if self.failure is None:
                try:
                    self.channel.send((MSG_SHUTDOWN,))
                    self._wait_for_acks()
                except Exception:
                    logger.exception("tensor parallel: could not reach every worker to shut it down")
            for p in self._procs:
                p.join(timeout=SHUTDOWN_ACK_TIMEOUT_S)
                if p.is_alive():
                    logger.error("tensor parallel: %s did not exit; killing it", p.name)
                    p.kill()
            if self.heartbeat is not None:
                self.heartbeat.stop()
            parallel_state.destroy_distributed()
            global _open_driver
            if _open_driver is self:
                _open_driver = None
            logger.info("tensor parallel: all ranks shut down")
        finally:
            self._lock.release()

    def _wait_for_acks(self) -> None:
        want, deadline = self.info.world_size - 1, time.monotonic() + SHUTDOWN_ACK_TIMEOUT_S
        while self.store.add(job_key("shutdown_ack"), 0) < want and time.monotonic() < deadline:
            time.sleep(0.05)


class _SkipSampler:
    """Workers compute the sampled rows' logits (the all-gather needs them) but never draw tokens."""

    def __call__(self, logits: torch.Tensor, rows: list) -> tuple[list[int], list[None]]:
        return self.collect(self.launch(logits, rows))

    def launch(self, logits: torch.Tensor, rows: list, pending_tokens=None) -> int:
        return logits.shape[0]

    @staticmethod
    def collect(num_rows: int) -> tuple[list[int], list[None]]:
        return [0] * num_rows, [None] * num_rows


class TPWorkerRunner(_TPRunnerMixin, ModelRunner):
    supports_chained_decode = False
    samples_tokens = False
    # under EP the captured decode steps use the fixed-capacity all-to-all (distributed/ep_static_dispatch.py)
    uses_cuda_graphs = property(lambda self: _tp_cuda_graphs())

    def __init__(self, args: EngineArgs, model_path, info: RankInfo, store: dist.TCPStore):
        self._stopping = False
        self.heartbeat = Heartbeat(open_heartbeat_store(info, store.port), info.rank, [0], self._rank0_lost).start()
        rank_args = self._join(args, info, store)
        super().__init__(rank_args, model_path)
        self.sampler = _SkipSampler()
        self.decoder = StepDecoder()

    def _sampling_row(self, seq, pending: bool = False):
        return None

    def share_decision(self, value):
        return self.channel.recv()

    def _rank0_lost(self, reason: str) -> None:
        if not self._stopping:
            logger.critical("rank %d: rank 0 is gone (%s); exiting", self.info.rank, reason)
            logging.shutdown()
            os._exit(TP_FAILURE_EXIT_CODE)

    def serve_forever(self) -> int:
        """Follow rank 0 until it says shutdown (returns 0). Any error ends the process (rank 0 notices)."""
        try:
            while True:
                message = self.channel.recv()
                if message[0] == MSG_SHUTDOWN:
                    break
                if message[0] != MSG_STEP:
                    raise RuntimeError(f"unknown control message {message[0]!r}")
                self.execute(self.decoder.decode((message[1], message[2])))
        except BaseException:
            logger.exception("rank %d: worker loop failed; exiting", self.info.rank)
            logging.shutdown()
            os._exit(TP_FAILURE_EXIT_CODE)
        self._stopping = True
        self.store.add(job_key("shutdown_ack"), 1)
        self.heartbeat.stop()
        parallel_state.destroy_distributed()
        logger.info("rank %d: shut down", self.info.rank)
        return 0


def run_worker(args: EngineArgs, model_path, info: RankInfo) -> int:
    """A rank > 0: join the job, load this rank's shards, follow rank 0 until shutdown. Returns the exit code."""
    if info.rank == 0:
        raise ValueError("run_worker: rank 0 runs the engine (TPDriverRunner), not the worker loop")
    _leave_signals_to_rank0()
    if model_path is None:
        from longcat_service.demo import default_model_path

        model_path = default_model_path()
    args = dataclasses.replace(args, tensor_parallel_size=info.world_size)
    runner = TPWorkerRunner(args, Path(model_path), info, open_store(info))
    return runner.serve_forever()


def _leave_signals_to_rank0() -> None:
    """Ctrl-C reaches the whole process group and torchrun forwards SIGTERM: a worker that died on it would look
    like a lost rank. Rank 0 drains and then sends the shutdown message; until then workers keep serving."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: logger.info("worker: signal received; waiting for rank 0's shutdown"))


def _spawned_worker_main(args: EngineArgs, model_path: str, info: RankInfo, log_level: int) -> None:
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s [rank {info.rank}] %(name)s: %(message)s")
    code = run_worker(args, model_path, info)
    logging.shutdown()
    os._exit(code)  # skip interpreter teardown: nothing is left to flush, and it cannot hang on group threads

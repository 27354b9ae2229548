"""The synchronous engine loop: schedule -> run the model -> process outputs, one step at a time."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from longcat_service.engine.block_manager import BlockManager
from longcat_service.engine.engine_args import EngineArgs
from longcat_service.engine.errors import EngineArgsError
from longcat_service.engine.model_runner import SeqStepResult, StepHandle
from longcat_service.engine.output_processor import OutputProcessor, RequestState
from longcat_service.engine.request_checks import RequestLimits, check_request
from longcat_service.engine.scheduler import ScheduledSeq, Scheduler
from longcat_service.engine.sequence import Sequence, SequenceGroup
from longcat_service.engine.spec_chain import ChainedSpecPlan, SpecChain
from longcat_service.engine.step_trace import StepTrace
from longcat_service.engine.tp_worker import create_model_runner
from longcat_service.outputs import Logprob, RequestOutput
from longcat_service.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class EngineLoad:
    num_running: int
    num_waiting: int
    num_waiting_tokens: int
    kv_cache_usage: float  # share of KV blocks in use, 0..1
    expert_tokens: tuple[int, ...] | None = None  # with collect_expert_load: routed slots per expert so far
    # under expert parallelism: CUDA-graph decode steps run again eagerly because a fixed-capacity buffer overflowed
    ep_capacity_overflows: int | None = None


class LLMEngine:
    def __init__(self, args: EngineArgs | None = None, **kwargs):
        from longcat_service.tokenizer import has_tokenizer, load_tokenizer

        self.args = args = args if args is not None else EngineArgs(**kwargs)
        if args.model is None:
            from longcat_service.demo import DEMO_NOTICE, default_model_path

            model_path = default_model_path()
            logger.info(DEMO_NOTICE)
        else:
            model_path = args.model
        self.model_path = model_path
        # Without tokenizer.json the engine serves token ids only: empty text, EOS from config.json, no stop strings.
        self.tokenizer = load_tokenizer(model_path) if has_tokenizer(model_path) else None
        if self.tokenizer is None:
            logger.warning("%s has no tokenizer.json: serving token ids only (no text)", model_path)
        self.runner = create_model_runner(args, model_path)  # ModelRunner, or rank 0 of a TP group
        self.model_config = self.runner.config
        self.vocab_size = self.runner.vocab_size
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            eos = self.runner.sampler.eos_token_id
        self.eos_token_id = self.runner.sampler.eos_token_id = eos
        self.max_model_len = self._decide_max_model_len()
        self.block_manager = BlockManager(self.runner.num_blocks, args.block_size, args.enable_prefix_caching)
        spec = args.speculative_config
        self.num_speculative_tokens = spec.num_speculative_tokens if spec is not None else 0
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, args.max_num_batched_tokens,
                                   self.num_speculative_tokens, self.max_model_len)
        # async scheduling of device-side greedy spec steps (spec_chain.py)
        self.spec_chain = (SpecChain(self.scheduler, self.runner.sampler, self.num_speculative_tokens)
                           if self.num_speculative_tokens else None)
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_id, self.max_model_len)
        self.states: dict[str, RequestState] = {}
        self._pending: list[RequestOutput] = []  # final outputs of requests finished between steps (abort)
        self._inflight: _InFlight | None = None  # with overlap_steps: the step launched by the last call
        self.trace = StepTrace()  # LONGCAT_STEP_TRACE=<path>: one JSON line per step

    @property
    def trace(self) -> StepTrace:
        return self._trace

    @trace.setter
    def trace(self, trace: StepTrace) -> None:
        """The runner marks its own phases (prepare, forward, sample, wait, readback) into an enabled trace."""
        self._trace = trace
        self.runner.trace = trace if trace.enabled else None

    @property
    def description(self) -> str:
        """One line for the start-up log: what a newcomer needs to know is running."""
        from longcat_service import ops

        runner = self.runner
        dtype = str(getattr(runner, "dtype", "?")).removeprefix("torch.")
        name = self.model_path if self.args.model is not None else f"{self.model_path}, the embedded demo model,"
        return (f"model {name} ({self.model_config.num_layers} layers, vocab {self.vocab_size}), "
                f"device {getattr(runner, 'device', '?')}, dtype {dtype}, ops backend {ops.ACTIVE_BACKEND}, "
                f"tensor parallel {self.args.tensor_parallel_size}, max_model_len {self.max_model_len}, "
                f"max_num_batched_tokens {self.args.max_num_batched_tokens}, max_num_seqs {self.args.max_num_seqs}, "
                f"KV cache {self.block_manager.num_blocks} blocks of {self.args.block_size} tokens")

    def _decide_max_model_len(self) -> int:
        limit = int(getattr(self.model_config, "max_position_embeddings", 0) or 0) or None
        capacity = self.runner.num_blocks * self.args.block_size
        wanted = self.args.max_model_len
        if wanted is not None:
            if limit is not None and wanted > limit:
                raise EngineArgsError("max_model_len", f"{wanted} exceeds the model's max_position_embeddings {limit}")
            if wanted > capacity:
                raise EngineArgsError(
                    "num_kv_blocks", f"the KV cache holds {capacity} tokens, less than max_model_len {wanted}"
                )
            return wanted
        wanted = limit or capacity
        if wanted > capacity:
            logger.warning("max_model_len capped to the KV cache capacity: %d tokens (model allows %d)", capacity, wanted)
        return min(wanted, capacity)

    # ---- requests ------------------------------------------------------------------------------
    @property
    def request_limits(self) -> RequestLimits:
        return RequestLimits(self.vocab_size, self.max_model_len, self.eos_token_id, self.tokenizer is not None)

    def validate_request(self, prompt_token_ids: list[int], sampling_params: SamplingParams) -> None:
        """Raise PromptError / SamplingParamsError for a request this engine cannot serve (no state touched)."""
        check_request(prompt_token_ids, sampling_params, self.request_limits)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams | None = None,
        deadline: float | None = None,
        arrival_time: float | None = None,
    ) -> None:
        params = sampling_params if sampling_params is not None else SamplingParams()
        prompt_token_ids = list(prompt_token_ids) if prompt_token_ids is not None else []
        self.validate_request(prompt_token_ids, params)
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id: must be a non-empty string")
        if request_id in self.states:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        now = time.monotonic()
        group = SequenceGroup(request_id, prompt_token_ids, params, arrival_time or now, deadline)
        self.scheduler.add(group)
        self.states[request_id] = self.output_processor.new_state(group)

    def abort_request(self, request_id: str) -> bool:
        """Finish the request now (its blocks are freed); the next step() returns its final output."""
        if self.scheduler.abort(request_id) is None:
            return False
        self._pending.append(self._finalize(request_id))
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending) or self._inflight is not None

    def close(self) -> None:
        """Release what outlives the engine object: a tensor-parallel runner's worker ranks and process group (a
        later engine in this process needs them gone). Idempotent; steps after it fail their requests."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    def load(self) -> EngineLoad:
        return EngineLoad(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_waiting_tokens=self.scheduler.num_waiting_tokens,
            kv_cache_usage=self.block_manager.usage,
            expert_tokens=counter.snapshot() if (counter := getattr(self.runner, "expert_load", None)) else None,
            ep_capacity_overflows=getattr(self.runner, "ep_capacity_overflows", None),
        )

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step. With args.overlap_steps the model step launched here is collected by the next call:
        collect step N (the one sync) and apply its tokens with the cheap stop checks, schedule and launch step
        N+1, and only then do step N's host work (detokenization, logprobs, RequestOutputs) while the device
        computes N+1. Outputs are those of the plain engine, one call later."""
        trace = self.trace
        trace.start()
        outputs, self._pending = self._pending, []
        finalize: dict[str, None] = {}  # requests whose final output this call emits, after the token work
        applied: list[_AppliedToken] = []
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            chained = self._launch_chained(inflight, finalize)
            if chained is not None:
                trace.mark("launch")
            applied = self._collect(inflight, finalize)
            trace.mark("collect")
            if chained is not None:  # the step after the in-flight one is already computing: no scheduling
                if chained.spec_plan is not None:
                    self.spec_chain.commit(chained.spec_plan)
                else:
                    self._adopt_scratch_blocks(chained)
                self._inflight = chained
                outputs.extend(self._process(applied, finalize))
                if trace.enabled:
                    trace.mark("process")
                    trace.end(num_seqs=len(chained.batch), prefill_tokens=0, num_outputs=len(outputs), chained=1)
                return outputs
        sched = self.scheduler.schedule(time.monotonic())
        trace.mark("schedule")
        finalize.update(dict.fromkeys(g.request_id for g in sched.expired))
        if sched.scheduled:
            launched = self._launch(sched.scheduled, finalize)
            trace.mark("launch")
            # an execute-only runner has finished the step already: deferring it would only delay its outputs
            if launched is not None and launched.handle is not None and self._overlap:
                self._inflight = launched
            elif launched is not None:
                applied += self._collect(launched, finalize)  # after any in-flight step collected above
                trace.mark("collect")
        outputs.extend(self._process(applied, finalize))
        if trace.enabled:
            trace.mark("process")
            prefill = sum(s.num_new_tokens for s in sched.scheduled if s.num_new_tokens > 1 or not s.needs_sample)
            trace.end(num_seqs=len(sched.scheduled), prefill_tokens=prefill, num_outputs=len(outputs))
        return outputs

    # ---- async scheduling: a decode step chained to the in-flight one -------------------------------------
    def _launch_chained(self, inflight: _InFlight, finalize: dict[str, None]) -> _InFlight | None:
        """Launch the step after `inflight` before reading `inflight` back, when that step is what the
        scheduler would make: the same running sequences decoding one more token each (no free seat for a
        waiting request, no deadline due). Its input ids are the in-flight step's samples, taken on the device;
        the sampler counts them for penalties and min_tokens without reading them back. A sequence that stops
        on the in-flight token (EOS, stop id or string) is in the batch anyway; its extra token is dropped at
        collect. One that ends by length is left out, as the scheduler would. A token that starts a new KV
        block is written to a scratch block and copied to the sequence's real block once the in-flight step
        confirms it goes on (_adopt_scratch_blocks), so blocks are allocated in the plain engine's order.
        None: not chainable; the caller collects and schedules as usual. Speculative steps: _launch_chained_spec."""
        if not self._can_chain or inflight.handle is None:
            return None
        if self.num_speculative_tokens:
            return self._launch_chained_spec(inflight, finalize)
        if inflight.handle.sampled is None:
            return None
        sched = self.scheduler
        if any(not (s.num_new_tokens == 1 and s.needs_sample) for s in inflight.batch):
            return None
        rows = [i for i, s in enumerate(inflight.batch) if not s.seq.is_finished]
        if [inflight.batch[i].seq for i in rows] != sched.running:
            return None  # the scheduler would pick another batch (a new fork, a left-out sequence, ...)
        # Waiting requests are admitted only into a free seat. With every seat taken the scheduler admits no
        # one unless a sequence ends on the in-flight token: by length (known: fall back below) or by a stop
        # (not known yet: the waiting request then starts one step later than without async scheduling).
        if sched.waiting and len(sched.running) < sched.max_num_seqs:
            return None
        now = time.monotonic()
        if any(g.deadline is not None and now >= g.deadline for g in sched.groups.values()):
            return None
        bm, bs = self.block_manager, self.block_manager.block_size
        batch: list[ScheduledSeq] = []
        chain_rows: list[int] = []
        num_scratch = 0
        for i in rows:
            seq = inflight.batch[i].seq
            p = seq.params
            known = seq.num_output_tokens + 1  # with the in-flight token (the sampler counts it: num_pending)
            if (p.max_tokens is not None and known >= p.max_tokens) or seq.num_tokens + 1 >= self.max_model_len:
                if sched.waiting:
                    return None  # its seat goes to a waiting request in the next batch: let the scheduler do it
                continue  # ends by length on the in-flight token: not in the next batch
            pos = seq.num_tokens  # where the in-flight token goes
            s = ScheduledSeq(seq, 1, pos)
            s.needs_sample = True
            if pos // bs >= len(seq.block_table):
                s.block_table_override = seq.block_table + [self.runner.num_blocks + num_scratch]
                num_scratch += 1
            batch.append(s)
            chain_rows.append(i)
        if not batch or len(batch) > sched.max_num_batched_tokens:
            return None  # (a token budget below the seat count: the scheduler picks the subset)
        if num_scratch > bm.num_free_blocks or num_scratch > self.runner.num_scratch_blocks:
            return None  # not enough free blocks for the new ones: the scheduler preempts; let it
        try:
            handle = self.runner.launch(batch, input_ids=self.runner.sampled_tokens(inflight.handle, chain_rows))
        except Exception as e:
            self._fail_batch(batch, e, finalize)
            return None
        return _InFlight(batch, handle)

    def _launch_chained_spec(self, inflight: _InFlight, finalize: dict[str, None]) -> _InFlight | None:
        """The spec step after an in-flight device-side greedy step, launched before that one is read back: its blocks
        reserved for every draft accepted, its inputs from the device (spec_chain.py). step() commits it after
        applying the in-flight step."""
        if not self.runner.can_chain_spec(inflight.handle):
            return None
        plan = self.spec_chain.plan(inflight.batch, time.monotonic())
        if plan is None:
            return None
        try:
            handle = self.runner.launch_chained_spec(plan.batch, inflight.handle)
        except Exception:  # nothing lost: the in-flight step is collected and the next one scheduled as usual
            logger.exception("chained spec step failed to launch; spec steps are scheduled after the read-back from now on")
            self.spec_chain.enabled = False
            handle = None
        if handle is None:
            self.spec_chain.cancel(plan)
            return None
        self.spec_chain.num_chained += 1
        return _InFlight(plan.batch, handle, spec_plan=plan)

    def _adopt_scratch_blocks(self, chained: _InFlight) -> None:
        """After the in-flight step was applied: real blocks for the chained sequences that go on, in running
        order (as the scheduler would allocate them), and their scratch entries copied there."""
        bs = self.block_manager.block_size
        dst, src = [], []
        for s in chained.batch:
            if s.block_table_override is None or s.seq.is_finished:
                continue
            self.block_manager.allocate(s.seq, s.end_pos)
            dst.append(s.seq.block_table[-1] * bs + s.start_pos % bs)
            src.append(s.block_table_override[-1] * bs + s.start_pos % bs)
        self.runner.copy_kv_slots(dst, src)

    @property
    def _overlap(self) -> bool:
        """Speculative steps too: launch enqueues the target forward, collect verifies and drafts (spec_decode.py)."""
        return self.args.overlap_steps

    @property
    def _can_chain(self) -> bool:
        """With MTP only after device-side greedy steps (their whole result stays on the device: spec_chain.py); a
        host-verified spec step's next inputs and sampling rows depend on its read-back."""
        runner = self.runner
        if not (self.args.async_scheduling and self._overlap and self._runner_can_launch()
                and getattr(runner, "supports_chained_decode", False)):
            return False
        return bool(self.num_speculative_tokens) or getattr(runner, "num_scratch_blocks", 0) > 0

    def _launch(self, batch: list[ScheduledSeq], finalize: dict[str, None]) -> _InFlight | None:
        try:
            if not self._runner_can_launch():
                return _InFlight(batch, None, self.runner.execute(batch))
            return _InFlight(batch, self.runner.launch(batch))
        except Exception as e:  # fail this batch's requests, keep the engine serving
            self._fail_batch(batch, e, finalize)
            return None

    def _collect(self, inflight: _InFlight, finalize: dict[str, None]) -> list[_AppliedToken]:
        """Wait for a launched step and apply it: computed chunks, appended tokens, the cheap stop checks (so a
        finished sample is not scheduled again). A sample finished while the step ran (an abort between calls)
        is skipped: its token is dropped, its blocks are already free."""
        try:
            results = inflight.results if inflight.handle is None else self.runner.collect(inflight.handle)
        except Exception as e:
            self._fail_batch(inflight.batch, e, finalize)
            return []
        now = time.monotonic()
        applied: list[_AppliedToken] = []
        for s, r in zip(inflight.batch, results, strict=True):
            seq = s.seq
            if seq.is_finished:
                continue
            state = self.states[seq.request_id]
            if r.spec_token_ids is not None:
                applied.extend(self._apply_spec(s, r, state, now))
                continue
            self.scheduler.on_computed(s)
            if r.error is not None:  # this request alone fails; the rest of the batch goes on
                self._fail_request(seq.group, r.error, finalize)
                continue
            if r.prompt_logprobs:
                self.output_processor.record_prompt_logprobs(state, s.start_pos, r.prompt_logprobs)
            if r.token_id is None:
                continue
            seq.append_token(r.token_id)
            finish = self.output_processor.check_finish(state, seq, r.token_id)
            if finish is not None:
                self.scheduler.finish_seq(seq, *finish)
                self.runner.release(seq.seq_id)
            applied.append(_AppliedToken(state, seq, r.token_id, r.logprob, now, finish))
        return applied

    def _apply_spec(self, s: ScheduledSeq, r: SeqStepResult, state: RequestState, now: float) -> list[_AppliedToken]:
        """A speculative step's tokens, one at a time with the stop checks: the tokens after a stop (or past
        max_tokens) are dropped. The cache is valid up to the last accepted draft; the rejected drafts' slots
        are simply not counted as computed (overwritten by later steps, freed with the sequence)."""
        seq = s.seq
        seq.num_spec_steps += r.num_draft_tokens > 0
        seq.num_draft_tokens += r.num_draft_tokens
        seq.num_accepted_tokens += r.num_accepted_tokens
        if r.prompt_logprobs:
            self.output_processor.record_prompt_logprobs(state, s.start_pos, r.prompt_logprobs)
        applied = []
        finish = None
        for tok, lp in zip(r.spec_token_ids, r.spec_logprobs, strict=True):
            seq.append_token(tok)
            finish = self.output_processor.check_finish(state, seq, tok)
            applied.append(_AppliedToken(state, seq, tok, lp, now, finish))
            if finish is not None:
                break
        valid = s.end_pos - (r.num_draft_tokens - r.num_accepted_tokens)
        self.scheduler.on_computed(s, min(valid, seq.num_tokens - 1))
        if finish is not None:
            self.scheduler.finish_seq(seq, *finish)
            self.runner.release(seq.seq_id)
        else:
            seq.draft_token_ids = list(r.draft_token_ids)
        return applied

    def _process(self, applied: list[_AppliedToken], finalize: dict[str, None]) -> list[RequestOutput]:
        """The host work of applied tokens, then one output per touched request (final ones last, once)."""
        touched: dict[str, RequestState] = {}
        for a in applied:
            self.output_processor.on_token(a.state, a.seq, a.token_id, a.logprob, a.now, a.finish)
            touched[a.seq.request_id] = a.state
        outputs = []
        for rid, state in touched.items():
            if state.group.is_finished:
                finalize[rid] = None
            elif rid not in finalize:
                outputs.append(self.output_processor.make_output(state, state.group.num_cached_tokens))
        outputs.extend(self._finalize(rid) for rid in finalize)
        return outputs

    def _runner_can_launch(self) -> bool:
        """Runners that only offer execute (stand-ins that replace or wrap it: benchmarks/fake_compute.py, tests
        injecting faults) run each step to completion; nothing is overlapped with them."""
        runner = self.runner
        return callable(getattr(type(runner), "launch", None)) and "execute" not in vars(runner)

    def _fail_batch(self, batch: list[ScheduledSeq], error: Exception, finalize: dict[str, None]) -> None:
        logger.error("engine step failed for %d sequences", len(batch), exc_info=error)
        for rid in dict.fromkeys(s.seq.request_id for s in batch):
            group = self.scheduler.groups.get(rid)
            # the group of this batch only: an in-flight batch may hold an aborted request whose id is reused now
            if group is not None and any(s.seq.group is group for s in batch):
                self.scheduler.finish_group(group, "error")
                self.states[rid].error = f"{type(error).__name__}: {error}"
                finalize[rid] = None

    def _fail_request(self, group, error: str, finalize: dict[str, None]) -> None:
        """Non-finite logits: this request alone ends with "error"; its cached KV blocks are not offered to later
        prompts (a NaN in the cache would fail every request that reused it)."""
        logger.error("request %s failed: %s", group.request_id, error)
        for seq in group.seqs:
            self.block_manager.uncache(seq)
        self.scheduler.finish_group(group, "error")
        self.states[group.request_id].error = error
        finalize[group.request_id] = None

    def _finalize(self, request_id: str) -> RequestOutput:
        """Last output of a request whose samples are all finished; forget it."""
        state = self.states.pop(request_id)
        for seq in state.group.seqs:
            self.output_processor.finish_without_token(state, seq)
            self.runner.release(seq.seq_id)
        state.finished_time = time.monotonic()
        return self.output_processor.make_output(state, state.group.num_cached_tokens)


@dataclass
class _InFlight:
    """A launched model step whose results have not been read back yet."""

    batch: list[ScheduledSeq]
    handle: StepHandle | None  # None: the runner ran the step to completion (execute-only runners)
    results: list[SeqStepResult] | None = None
    spec_plan: ChainedSpecPlan | None = None  # a chained spec step: committed once the step before it is applied


@dataclass
class _AppliedToken:
    """A token appended to its sample whose remaining host work (OutputProcessor.on_token) is still to do."""

    state: RequestState
    seq: Sequence
    token_id: int
    logprob: Logprob | None
    now: float
    finish: tuple[str, str | int | None] | None

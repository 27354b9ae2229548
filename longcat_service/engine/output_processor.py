"""Turns sampled tokens into streamed RequestOutputs: detokenization, stop conditions, logprobs, timings."""

from __future__ import annotations

from longcat_service.engine.detokenizer import Decoder, IncrementalDetokenizer
from longcat_service.engine.sequence import Sequence, SequenceGroup
from longcat_service.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput


class SeqOutputState:
    def __init__(self, tokenizer: Decoder | None, seq: Sequence):
        self.seq = seq
        # No tokenizer (token-ids-only model): the text stays empty.
        self.detokenizer = IncrementalDetokenizer(tokenizer, seq.params.skip_special_tokens) if tokenizer is not None else None
        self.text = ""  # output text so far, cut before a matched stop string
        self.logprobs: list[Logprob] | None = [] if seq.params.logprobs is not None else None
        self.num_emitted_tokens = 0
        self.num_emitted_chars = 0
        self.closed = False  # text is final (finished, or cut at a stop string)


class RequestState:
    def __init__(self, tokenizer: Decoder | None, group: SequenceGroup):
        self.group = group
        self.seqs = [SeqOutputState(tokenizer, s) for s in group.seqs]
        self.prompt_logprobs: list[Logprob | None] | None = None
        if group.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(group.prompt_token_ids)
        self.num_prompt_logprobs_done = 1  # position 0 has no logprob
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finished_time: float | None = None
        self.error: str | None = None


class OutputProcessor:
    def __init__(self, tokenizer: Decoder | None, eos_token_id: int | None, max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.max_model_len = max_model_len

    def new_state(self, group: SequenceGroup) -> RequestState:
        return RequestState(self.tokenizer, group)

    def check_finish(self, state: RequestState, seq: Sequence, token_id: int) -> tuple[str, str | int | None] | None:
        """The stop checks for a token just appended to `seq`, done before the next step is scheduled:
        (finish_reason, stop_reason) if it ends the sample. EOS, stop ids and lengths are comparisons; a
        sample with stop strings is detokenized here (only those), because finishing it later would leave
        it in the next step's batch and change that batch (budget, blocks, prefix-cache order)."""
        out = state.seqs[seq.index]
        p = seq.params
        may_stop = seq.num_output_tokens >= p.min_tokens
        if may_stop and not p.ignore_eos and token_id == self.eos_token_id:
            return "stop", None
        if may_stop and token_id in p.stop_token_ids:
            return "stop", token_id  # the stop token is kept out of the text
        if p.stop:
            prev_len = len(out.text)
            self._add_text(out, token_id)
            if may_stop:
                hit = self._find_stop(out.text, prev_len, p.stop)
                if hit is not None:
                    idx, stop = hit
                    out.text = out.text[:idx]
                    out.closed = True
                    return "stop", stop
        if p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            return "length", None
        if seq.num_tokens >= self.max_model_len:
            return "length", None
        return None

    def on_token(
        self, state: RequestState, seq: Sequence, token_id: int, logprob: Logprob | None, now: float,
        finish: tuple[str, str | int | None] | None,
    ) -> None:
        """The rest of a token's host work, which may run while the next step computes: timings, logprobs,
        the text of samples without stop strings, closing the text of a finished sample. `finish` is what
        check_finish returned for this token."""
        out = state.seqs[seq.index]
        if state.first_token_time is None:
            state.first_token_time = now
        state.last_token_time = now
        if out.logprobs is not None and logprob is not None:
            out.logprobs.append(logprob)
        if out.closed:  # cut at a stop string
            return
        token_stop = finish is not None and finish[0] == "stop"  # EOS / stop id: not part of the text
        if not seq.params.stop and not token_stop:
            self._add_text(out, token_id)
        if finish is not None:
            self._finish_text(out, None)

    @staticmethod
    def _add_text(out: SeqOutputState, token_id: int) -> None:
        if out.detokenizer is not None:
            out.text += out.detokenizer.add([token_id])

    def finish_without_token(self, state: RequestState, seq: Sequence) -> None:
        """A sample ended from outside (abort, deadline, error): keep what it produced, flushed."""
        self._finish_text(state.seqs[seq.index], None)

    def _finish_text(self, out: SeqOutputState, result):
        if not out.closed:
            if out.detokenizer is not None:
                out.text += out.detokenizer.flush()
            out.closed = True
        return result

    @staticmethod
    def _find_stop(text: str, prev_len: int, stops: list[str]) -> tuple[int, str] | None:
        """Earliest stop string that ends in the new text (it may start in text seen before); of stop strings
        starting at the same place, the one listed first."""
        best: tuple[int, str] | None = None
        for stop in stops:
            idx = text.find(stop, max(0, prev_len - len(stop) + 1))
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, stop)
        return best

    def record_prompt_logprobs(self, state: RequestState, start: int, logprobs: list[Logprob]) -> None:
        """logprobs[k] is for prompt position start + 1 + k (predicted from the token before it)."""
        if state.prompt_logprobs is None:
            return
        for k, lp in enumerate(logprobs):
            pos = start + 1 + k
            if pos < len(state.prompt_logprobs) and state.prompt_logprobs[pos] is None:
                state.prompt_logprobs[pos] = lp
        state.num_prompt_logprobs_done = max(state.num_prompt_logprobs_done, start + 1 + len(logprobs))

    def make_output(self, state: RequestState, num_cached_tokens: int) -> RequestOutput:
        """The request's output so far, with the deltas since the previous call."""
        group = state.group
        completions = []
        for out in state.seqs:
            seq = out.seq
            finished = seq.is_finished
            # a later token might complete a stop string, so its possible beginning is held back
            holdback = 0 if finished or not seq.params.stop else max(len(s) for s in seq.params.stop) - 1
            visible = max(out.num_emitted_chars, len(out.text) - holdback)
            token_ids = seq.output_token_ids
            comp = CompletionOutput(
                index=seq.index,
                token_ids=list(token_ids),
                text=out.text[:visible],
                logprobs=list(out.logprobs) if out.logprobs is not None else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                new_token_ids=list(token_ids[out.num_emitted_tokens :]),
                text_delta=out.text[out.num_emitted_chars : visible],
                new_logprobs=out.logprobs[out.num_emitted_tokens :] if out.logprobs is not None else None,
            )
            out.num_emitted_tokens = len(token_ids)
            out.num_emitted_chars = visible
            completions.append(comp)
        finished = group.is_finished
        prompt_logprobs = None
        if state.prompt_logprobs is not None and state.num_prompt_logprobs_done >= len(group.prompt_token_ids):
            prompt_logprobs = state.prompt_logprobs
        return RequestOutput(
            request_id=group.request_id,
            prompt_token_ids=group.prompt_token_ids,
            outputs=completions,
            finished=finished,
            num_cached_tokens=num_cached_tokens,
            prompt_logprobs=prompt_logprobs,
            metrics=self._metrics(state),
            error=state.error,
        )

    @staticmethod
    def _metrics(state: RequestState) -> RequestMetrics:
        group = state.group
        m = RequestMetrics(arrival_time=group.arrival_time, finished_time=state.finished_time)
        if group.first_scheduled_time is not None:
            m.queue_time_s = group.first_scheduled_time - group.arrival_time
        if state.first_token_time is not None:
            m.time_to_first_token_s = state.first_token_time - group.arrival_time
            longest = max(s.num_output_tokens for s in group.seqs)
            if longest > 1 and state.last_token_time is not None:
                m.mean_time_per_output_token_s = (state.last_token_time - state.first_token_time) / (longest - 1)
        m.num_spec_steps = sum(s.num_spec_steps for s in group.seqs)
        m.num_draft_tokens = sum(s.num_draft_tokens for s in group.seqs)
        m.num_accepted_tokens = sum(s.num_accepted_tokens for s in group.seqs)
        if m.num_draft_tokens:
            m.spec_acceptance_rate = m.num_accepted_tokens / m.num_draft_tokens
        if m.num_spec_steps:
            m.spec_mean_accepted_length = (m.num_accepted_tokens + m.num_spec_steps) / m.num_spec_steps
        return m

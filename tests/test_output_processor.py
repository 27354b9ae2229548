"""OutputProcessor on its own, driven the way the engine drives it (append a token, check_finish, finish the sample
if it ended, on_token, make_output), with a byte-level decoder: token i < 256 is the byte i, EOS is 256. ASCII bytes
are released by the detokenizer at once, so only the output processor's holdback keeps back a possible stop string."""

from __future__ import annotations

import random

import pytest

from longcat_service.engine.output_processor import OutputProcessor
from longcat_service.engine.sequence import SequenceGroup, SequenceStatus
from longcat_service.outputs import Logprob
from longcat_service.sampling_params import SamplingParams

EOS = 256
SEP = 257  # a special token with text "<sep>", shown only when special tokens are not skipped
WORDS = {300: "xyz", 301: "abab", 302: "abc"}  # multi-character tokens
PROMPT = [1, 2, 3]


class ByteDecoder:
    def decode(self, ids, skip_special_tokens=True):  # EOS has no text
        parts, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            parts.append(WORDS.get(i, "<sep>" if i == SEP and not skip_special_tokens else ""))
        return "".join(parts) + run.decode("utf-8", errors="replace")


def byte_ids(text: str) -> list[int]:
    return list(text.encode())


class Driver:
    """One request through an OutputProcessor; `outputs` collects every make_output result."""

    def __init__(self, params: SamplingParams, max_model_len: int = 1000, tokenizer=ByteDecoder(), arrival=0.0,
                 prompt=PROMPT):
        self.op = OutputProcessor(tokenizer, EOS, max_model_len)
        self.group = SequenceGroup("r", prompt, params, arrival)
        self.state = self.op.new_state(self.group)
        self.outputs = []

    def step(self, token_id: int, index: int = 0, logprob: Logprob | None = None, now: float = 0.0, emit=True):
        seq = self.group.seqs[index]
        assert not seq.is_finished
        seq.append_token(token_id)
        finish = self.op.check_finish(self.state, seq, token_id)
        if finish is not None:
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason, seq.stop_reason = finish
        self.op.on_token(self.state, seq, token_id, logprob, now, finish)
        if emit:
            self.outputs.append(self.op.make_output(self.state, 5))
        return finish

    def feed(self, token_ids, index: int = 0):
        """Step through token_ids until the sample finishes; the finish of the last step taken."""
        finish = None
        for t in token_ids:
            finish = self.step(t, index)
            if finish is not None:
                break
        return finish

    def finalize(self, reason: str = "abort"):
        """The engine's end of a request: samples still running end from outside, then the last output."""
        for seq in self.group.seqs:
            if not seq.is_finished:
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = reason
            self.op.finish_without_token(self.state, seq)
        self.outputs.append(self.op.make_output(self.state, 5))
        return self.outputs[-1]

    def deltas(self, index: int = 0) -> list[str]:
        return [c.text_delta for o in self.outputs for c in o.outputs if c.index == index]


def assert_never_withdrawn(deltas: list[str], final_text: str) -> None:
    shown = ""
    for d in deltas:
        shown += d
        assert final_text.startswith(shown), (shown, final_text)
    assert shown == final_text


# ---- finish conditions ------------------------------------------------------------------------------------------

def test_eos_stops_and_is_not_text():
    d = Driver(SamplingParams(max_tokens=10))
    assert d.feed(byte_ids("hi") + [EOS, ord("x")]) == ("stop", None)
    out = d.finalize()
    assert (out.outputs[0].text, out.outputs[0].token_ids, out.finished) == ("hi", byte_ids("hi") + [EOS], True)
    assert "".join(d.deltas()) == "hi"


def test_eos_ignored_when_asked_or_before_min_tokens():
    d = Driver(SamplingParams(max_tokens=10, ignore_eos=True))
    assert d.feed([ord("a"), EOS, ord("b")]) is None
    d = Driver(SamplingParams(max_tokens=10, min_tokens=2))
    assert d.step(EOS) is None  # 1 output token < min_tokens
    assert d.step(EOS) == ("stop", None)  # 2 output tokens: may stop


def test_stop_token_ids_stop_with_the_token_as_reason_and_out_of_the_text():
    d = Driver(SamplingParams(max_tokens=10, stop_token_ids=[ord("!")]))
    assert d.feed(byte_ids("ok!more")) == ("stop", ord("!"))
    out = d.finalize()
    assert (out.outputs[0].text, out.outputs[0].stop_reason, out.outputs[0].finish_reason) == ("ok", ord("!"), "stop")
    d = Driver(SamplingParams(max_tokens=10, stop_token_ids=[ord("!")], min_tokens=2))
    assert d.step(ord("!")) is None
    assert d.step(ord("!")) == ("stop", ord("!"))


def test_max_tokens_and_context_end_give_length():
    d = Driver(SamplingParams(max_tokens=3))
    assert [d.step(t) for t in byte_ids("abc")] == [None, None, ("length", None)]
    d = Driver(SamplingParams(max_tokens=None), max_model_len=len(PROMPT) + 2)
    assert [d.step(t) for t in byte_ids("ab")] == [None, ("length", None)]
    out = d.finalize()
    assert (out.outputs[0].text, out.outputs[0].finish_reason) == ("ab", "length")


def test_eos_and_stop_strings_win_over_length_on_the_same_token():
    d = Driver(SamplingParams(max_tokens=2))
    assert [d.step(t) for t in [ord("a"), EOS]] == [None, ("stop", None)]
    d = Driver(SamplingParams(max_tokens=2, stop=["ab"]))
    assert [d.step(t) for t in byte_ids("ab")] == [None, ("stop", "ab")]
    assert d.finalize().outputs[0].text == ""


def test_stop_string_spanning_tokens_cuts_the_text_before_it():
    d = Driver(SamplingParams(max_tokens=20, stop=["ea"]))
    assert d.feed(byte_ids("the idea is")) == ("stop", "ea")
    out = d.finalize()
    assert (out.outputs[0].text, out.outputs[0].stop_reason) == ("the id", "ea")
    assert out.outputs[0].token_ids == byte_ids("the idea")  # the stop string's tokens stay in token_ids
    assert_never_withdrawn(d.deltas(), "the id")


def test_earliest_of_several_stop_strings_wins():
    for stops in (["dea", "a"], ["a", "dea"]):
        d = Driver(SamplingParams(max_tokens=20, stop=stops))
        assert d.feed(byte_ids("idea")) == ("stop", "dea")
        out = d.finalize()
        assert out.outputs[0].text == "i"
        assert_never_withdrawn(d.deltas(), "i")


def test_stop_string_inside_one_token():
    d = Driver(SamplingParams(max_tokens=20, stop=["y"]))
    assert d.feed([300]) == ("stop", "y")  # "xyz"
    assert d.finalize().outputs[0].text == "x"


def test_first_occurrence_of_a_stop_string_that_one_token_adds_twice():
    d = Driver(SamplingParams(max_tokens=20, stop=["ab"]))
    assert d.feed([ord("-"), 301]) == ("stop", "ab")  # "-abab"
    assert d.finalize().outputs[0].text == "-"


def test_stop_strings_starting_at_the_same_place_the_first_listed_wins():
    for stops in (["ab", "abc"], ["abc", "ab"]):
        d = Driver(SamplingParams(max_tokens=20, stop=stops))
        assert d.feed([302]) == ("stop", stops[0])  # "abc" holds both from position 0
        assert d.finalize().outputs[0].text == ""


def test_stop_strings_are_matched_only_from_min_tokens_on():
    d = Driver(SamplingParams(max_tokens=20, min_tokens=3, stop=["a"]))
    assert d.feed(byte_ids("bab")) is None  # "a" came at output token 2 < min_tokens
    assert d.feed(byte_ids("ca")) == ("stop", "a")
    out = d.finalize()
    assert out.outputs[0].text == "babc"  # cut at the "a" that may stop, not the earlier one
    assert_never_withdrawn(d.deltas(), "babc")


def test_stop_string_completed_by_a_later_token_across_the_boundary():
    d = Driver(SamplingParams(max_tokens=20, stop=["abc"]))
    assert d.feed(byte_ids("xab")) is None
    assert d.step(ord("c")) == ("stop", "abc")
    assert d.finalize().outputs[0].text == "x"
    assert_never_withdrawn(d.deltas(), "x")


def test_text_after_a_stop_string_cut_is_never_added():
    d = Driver(SamplingParams(max_tokens=20, stop=["b"]))
    seq = d.group.seqs[0]
    seq.append_token(ord("a"))
    d.op.on_token(d.state, seq, ord("a"), None, 0.0, d.op.check_finish(d.state, seq, ord("a")))
    seq.append_token(ord("b"))
    finish = d.op.check_finish(d.state, seq, ord("b"))
    assert finish == ("stop", "b")
    d.op.on_token(d.state, seq, ord("b"), None, 0.0, finish)  # the stopping token's host work comes after the cut
    seq.status, seq.finish_reason, seq.stop_reason = SequenceStatus.FINISHED, *finish
    assert d.op.make_output(d.state, 0).outputs[0].text == "a"


# ---- streamed text ----------------------------------------------------------------------------------------------

def test_stream_holds_back_a_possible_stop_string_start():
    """The planted bug of issue 21: without the holdback, "e" of "ea" is streamed and then withdrawn."""
    d = Driver(SamplingParams(max_tokens=20, stop=["ea"]))
    d.feed(byte_ids("ide"))
    assert "".join(d.deltas()) == "id"  # "e" may start "ea"
    d.feed(byte_ids("a"))
    assert_never_withdrawn(d.deltas(), d.finalize().outputs[0].text)


def test_holdback_is_the_longest_stop_string_minus_one():
    d = Driver(SamplingParams(max_tokens=50, stop=["a", "0123456"]))
    d.feed(byte_ids("xyzxyzxyz"))
    assert "".join(d.deltas()) == "xyz"  # 9 characters, 6 held back
    assert [o.outputs[0].text for o in d.outputs][-1] == "xyz"


def test_short_text_with_a_long_stop_string_streams_nothing_until_it_is_safe():
    d = Driver(SamplingParams(max_tokens=50, stop=["0123456789"]))
    d.feed(byte_ids("abc"))
    assert d.deltas() == ["", "", ""]
    assert [o.outputs[0].text for o in d.outputs] == ["", "", ""]
    out = d.finalize()
    assert (out.outputs[0].text, d.deltas()[-1]) == ("abc", "abc")


def test_without_stop_strings_text_streams_at_once():
    d = Driver(SamplingParams(max_tokens=20))
    d.feed(byte_ids("abc"))
    assert d.deltas() == ["a", "b", "c"]


def test_random_streams_never_withdraw_text_and_end_with_the_full_text():
    rng = random.Random(0)
    alphabet = "abe "
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 25)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        d = Driver(SamplingParams(max_tokens=100, stop=stops))
        finish = d.feed(byte_ids(text))
        final = d.finalize()
        found = [(text.find(s), s) for s in stops if s in text]
        if found:  # the earliest occurrence of any stop string, the first-listed on a tie at the same end
            cut = min(i + len(s) for i, s in found)
            first = min(i for i, s in found if i + len(s) == cut)
            assert finish[0] == "stop" and final.outputs[0].text == text[:first], (text, stops)
        else:
            assert final.outputs[0].text == text
        assert_never_withdrawn(d.deltas(), final.outputs[0].text)


def test_split_multibyte_character_is_held_and_an_unfinished_one_flushed_at_the_end():
    d = Driver(SamplingParams(max_tokens=20))
    d.feed(byte_ids("a😀")[:-1])
    assert "".join(d.deltas()) == "a"
    out = d.finalize()
    assert out.outputs[0].text == "a\ufffd" and out.outputs[0].finish_reason == "abort"
    assert "".join(d.deltas()) == "a\ufffd"


def test_held_back_bytes_are_flushed_when_a_sample_finishes_on_eos():
    d = Driver(SamplingParams(max_tokens=20))
    d.feed(byte_ids("é")[:1] + [EOS])
    assert d.outputs[-1].outputs[0].text == "\ufffd"  # the finished sample's text is final at once


def test_special_tokens_in_the_text_when_not_skipped():
    for skip, text in ((True, "ab"), (False, "a<sep>b")):
        d = Driver(SamplingParams(max_tokens=3, skip_special_tokens=skip))
        d.feed([ord("a"), SEP, ord("b")])
        assert d.finalize().outputs[0].text == text


def test_no_tokenizer_keeps_text_empty():
    d = Driver(SamplingParams(max_tokens=3, stop=["a"]), tokenizer=None)
    assert [d.step(t) for t in byte_ids("abc")] == [None, None, ("length", None)]
    out = d.finalize()
    assert (out.outputs[0].text, out.outputs[0].token_ids) == ("", byte_ids("abc"))


def test_new_token_ids_and_logprobs_are_the_deltas():
    d = Driver(SamplingParams(max_tokens=20, logprobs=1))
    lps = [Logprob(t, -0.5 * k, {t: -0.5 * k}) for k, t in enumerate(byte_ids("abc"))]
    d.step(lps[0].token_id, logprob=lps[0])
    d.step(lps[1].token_id, logprob=lps[1], emit=False)
    d.step(lps[2].token_id, logprob=lps[2])
    first, second = (o.outputs[0] for o in d.outputs)
    assert (first.new_token_ids, first.new_logprobs, first.text_delta) == ([ord("a")], lps[:1], "a")
    assert (second.new_token_ids, second.new_logprobs, second.text_delta) == (byte_ids("bc"), lps[1:], "bc")
    assert (second.token_ids, second.logprobs, second.text) == (byte_ids("abc"), lps, "abc")
    assert not second.finished and not d.outputs[-1].finished
    assert d.outputs[-1].error is None and d.outputs[-1].metrics.finished_time is None


def test_no_logprobs_unless_asked():
    d = Driver(SamplingParams(max_tokens=20))
    d.step(ord("a"), logprob=Logprob(ord("a"), -1.0))
    comp = d.outputs[0].outputs[0]
    assert comp.logprobs is None and comp.new_logprobs is None
    d = Driver(SamplingParams(max_tokens=20, logprobs=0))
    d.step(ord("a"), logprob=None)  # a step without a logprob (none computed) adds none
    assert d.outputs[0].outputs[0].logprobs == []


def test_samples_of_one_request_have_their_own_text_and_finish():
    d = Driver(SamplingParams(n=2, max_tokens=20, stop=["!"]))
    d.step(ord("a"), index=0)
    d.step(ord("x"), index=1)
    assert d.step(ord("!"), index=0) == ("stop", "!")
    assert not d.outputs[-1].finished
    d.step(ord("y"), index=1)
    out = d.finalize("length")
    assert [(c.index, c.text, c.finish_reason) for c in out.outputs] == [(0, "a", "stop"), (1, "xy", "length")]
    assert out.finished and out.num_cached_tokens == 5
    assert "".join(d.deltas(1)) == "xy" and "".join(d.deltas(0)) == "a"


def test_error_and_request_fields_pass_through():
    d = Driver(SamplingParams(max_tokens=20))
    d.step(ord("a"))
    d.state.error = "boom"
    out = d.finalize("error")
    assert (out.request_id, out.prompt_token_ids, out.error, out.outputs[0].finish_reason) == (
        "r", PROMPT, "boom", "error")


# ---- prompt logprobs --------------------------------------------------------------------------------------------

def lp(k: int) -> Logprob:
    return Logprob(k, -float(k))


def test_prompt_logprobs_come_once_every_position_is_known():
    prompt = [10, 11, 12, 13, 14]
    d = Driver(SamplingParams(max_tokens=5, prompt_logprobs=0), prompt=prompt)
    d.op.record_prompt_logprobs(d.state, 0, [lp(1), lp(2), lp(3)])  # chunk of positions 0-2 predicts 1-3
    assert d.op.make_output(d.state, 0).prompt_logprobs is None
    d.op.record_prompt_logprobs(d.state, 3, [lp(4), lp(99)])  # chunk 3-4: position 4, then the first sample's
    assert d.op.make_output(d.state, 0).prompt_logprobs == [None, lp(1), lp(2), lp(3), lp(4)]


def test_prompt_logprobs_first_value_stays_when_recomputed():
    d = Driver(SamplingParams(max_tokens=5, prompt_logprobs=0), prompt=[10, 11, 12])
    d.op.record_prompt_logprobs(d.state, 0, [lp(1)])
    assert d.op.make_output(d.state, 0).prompt_logprobs is None
    d.op.record_prompt_logprobs(d.state, 0, [lp(7), lp(2), lp(9)])  # recomputed after a preemption
    assert d.op.make_output(d.state, 0).prompt_logprobs == [None, lp(1), lp(2)]


def test_prompt_logprobs_unknown_when_a_request_ends_before_its_prompt_is_computed():
    d = Driver(SamplingParams(max_tokens=5, prompt_logprobs=0), prompt=[10, 11])
    assert d.finalize().prompt_logprobs is None


def test_prompt_logprobs_of_a_one_token_prompt_and_none_unless_asked():
    d = Driver(SamplingParams(max_tokens=5, prompt_logprobs=0), prompt=[10])
    assert d.op.make_output(d.state, 0).prompt_logprobs == [None]
    d = Driver(SamplingParams(max_tokens=5), prompt=[10, 11])
    d.op.record_prompt_logprobs(d.state, 0, [lp(1)])
    assert d.op.make_output(d.state, 0).prompt_logprobs is None


# ---- metrics ----------------------------------------------------------------------------------------------------

def test_metrics_from_the_token_times():
    d = Driver(SamplingParams(max_tokens=20), arrival=10.0)
    m = d.op.make_output(d.state, 0).metrics
    assert (m.arrival_time, m.queue_time_s, m.time_to_first_token_s, m.mean_time_per_output_token_s) == (
        10.0, None, None, None)
    d.group.first_scheduled_time = 10.5
    d.step(ord("a"), now=12.0)
    m = d.outputs[-1].metrics
    assert (m.queue_time_s, m.time_to_first_token_s, m.mean_time_per_output_token_s) == (0.5, 2.0, None)
    d.step(ord("b"), now=13.0)
    assert d.outputs[-1].metrics.mean_time_per_output_token_s == 1.0
    d.step(ord("c"), now=16.0)
    m = d.outputs[-1].metrics
    assert (m.time_to_first_token_s, m.mean_time_per_output_token_s) == (2.0, 2.0)  # (16 - 12) / 2
    d.state.finished_time = 17.0
    assert d.finalize().metrics.finished_time == 17.0


def test_time_per_output_token_uses_the_longest_sample():
    d = Driver(SamplingParams(n=2, max_tokens=20), arrival=0.0)
    d.step(ord("a"), index=0, now=1.0)
    d.step(ord("b"), index=1, now=1.0)
    d.step(ord("c"), index=0, now=4.0)
    d.step(ord("d"), index=0, now=7.0)
    assert d.outputs[-1].metrics.mean_time_per_output_token_s == 3.0  # (7 - 1) / (3 - 1)


def test_speculative_metrics_sum_over_samples():
    d = Driver(SamplingParams(n=2, max_tokens=20))
    m = d.op.make_output(d.state, 0).metrics
    assert (m.num_spec_steps, m.num_draft_tokens, m.spec_acceptance_rate, m.spec_mean_accepted_length) == (
        0, 0, None, None)
    for seq, (steps, drafts, accepted) in zip(d.group.seqs, [(2, 4, 3), (3, 6, 1)], strict=True):
        seq.num_spec_steps, seq.num_draft_tokens, seq.num_accepted_tokens = steps, drafts, accepted
    m = d.op.make_output(d.state, 0).metrics
    assert (m.num_spec_steps, m.num_draft_tokens, m.num_accepted_tokens) == (5, 10, 4)
    assert m.spec_acceptance_rate == pytest.approx(0.4)
    assert m.spec_mean_accepted_length == pytest.approx((4 + 5) / 5)

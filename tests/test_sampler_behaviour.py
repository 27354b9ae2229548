"""Sampler behaviour that the mutation run (tools/mutation.sh sampler) found unchecked."""

import dataclasses

import torch

from longcat_service.engine.sampler import Sampler, SamplingRow
from longcat_service.sampling_params import SamplingParams

VOCAB, EOS = 8, 7


def test_repetition_penalty_divides_every_positive_logit_and_multiplies_every_negative_one():
    logits = torch.tensor([[0.5, 1.0, 0.25, -0.5, -3.0, 0.0, 2.0, 4.0]])
    row = SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=2.0), [0, 1, 2], [3, 4, 5])
    processed = Sampler(VOCAB, EOS, "cpu")._process(logits.clone(), [row])
    # seen tokens 0-5: positive / 2 (also below 1), negative * 2, zero stays; unseen 6 and 7 unchanged
    assert processed[0].tolist() == [0.25, 0.5, 0.125, -1.0, -6.0, 0.0, 2.0, 4.0]


NEG = float("-inf")


def draws(params_per_row, logits_row, calls=300, seed=0):
    """Tokens drawn per row over `calls` sampler calls (one token per row per call)."""
    s = Sampler(VOCAB, EOS, "cpu", seed)
    rows = [SamplingRow(p, [], []) for p in params_per_row]
    seen = [[] for _ in rows]
    for _ in range(calls):
        tokens, _ = s(logits_row.expand(len(rows), -1).clone(), rows)
        for i, t in enumerate(tokens):
            seen[i].append(t)
    return seen


def test_pending_token_zero_is_penalized_like_any_other():
    logits = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0]])
    row = SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=2.0), [5], [], num_pending=1)
    processed = Sampler(VOCAB, EOS, "cpu")._process(logits.clone(), [row], torch.tensor([0]))
    assert processed[0, :2].tolist() == [0.5, 1.0]


def test_top_k_1_always_takes_the_most_likely_token():
    logits = torch.tensor([0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0])
    assert set(draws([SamplingParams(temperature=1.0, top_k=1)], logits)[0]) == {0}


def test_top_k_per_row_in_a_batch_smaller_than_the_vocabulary():
    logits = torch.tensor([0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    off, two = draws([SamplingParams(temperature=1.0, top_k=0), SamplingParams(temperature=1.0, top_k=2)], logits)
    assert len(set(off)) > 2 and set(two) == {0, 1}


def test_top_p_keeps_the_smallest_prefix_that_reaches_it_exactly():
    logits = torch.tensor([0.0, 0.0, 0.0, 0.0, NEG, NEG, NEG, NEG])  # 4 x 0.25, exact in binary
    assert len(set(draws([SamplingParams(temperature=1.0, top_p=0.5)], logits)[0])) == 2
    # a small top_p keeps the most likely token, never drops it
    peaked = torch.tensor([2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert set(draws([SamplingParams(temperature=1.0, top_p=0.1)], peaked)[0]) == {0}


def test_min_p_keeps_tokens_exactly_at_the_threshold():
    logits = torch.tensor([0.0, 0.0, NEG, NEG, NEG, NEG, NEG, NEG])  # 0.5 and 0.5: both at min_p * max
    assert set(draws([SamplingParams(temperature=1.0, min_p=1.0)], logits)[0]) == {0, 1}


def test_logprobs_of_a_row_after_one_without_them():
    logits = torch.tensor([[3.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]).expand(3, -1).clone()
    rows = [SamplingRow(SamplingParams(temperature=0.0, logprobs=n), [], []) for n in (None, 2, None)]
    tokens, logprobs = Sampler(VOCAB, EOS, "cpu")(logits, rows)
    assert tokens == [0, 0, 0] and logprobs[0] is None and logprobs[2] is None
    assert logprobs[1].token_id == 0 and set(logprobs[1].top) == {0, 1}


def test_request_seeds_that_differ_give_different_generators():
    s = Sampler(VOCAB, EOS, "cpu")
    draws_by_seed = [torch.rand(8, generator=s.make_generator(seed)).tolist() for seed in (1, 3, 4)]
    assert len({tuple(d) for d in draws_by_seed}) == 3


def test_frequency_or_presence_penalty_alone_applies():
    logits = torch.zeros(1, VOCAB)
    s = Sampler(VOCAB, EOS, "cpu")
    freq_only = s._process(logits.clone(), [SamplingRow(SamplingParams(frequency_penalty=0.5), [], [1, 1])])
    pres_only = s._process(logits.clone(), [SamplingRow(SamplingParams(presence_penalty=0.25), [], [1, 1])])
    assert freq_only[0, 1].item() == -1.0 and pres_only[0, 1].item() == -0.25
    assert freq_only[0, 0].item() == 0.0 and pres_only[0, 0].item() == 0.0


def test_unseeded_draws_follow_the_sampler_seed_not_the_global_rng():
    logits = torch.zeros(64, VOCAB)
    rows = [SamplingRow(SamplingParams(temperature=1.0), [], []) for _ in range(64)]
    a = Sampler(VOCAB, EOS, "cpu", seed=5)(logits.clone(), rows)[0]
    torch.rand(100)  # moves the global generator only
    b = Sampler(VOCAB, EOS, "cpu", seed=5)(logits.clone(), rows)[0]
    c = Sampler(VOCAB, EOS, "cpu", seed=6)(logits.clone(), rows)[0]
    assert a == b and a != c


def test_a_negative_request_seed_is_its_64_bit_twos_complement():
    s = Sampler(VOCAB, EOS, "cpu")
    for seed in (-1, -(2**63)):
        twin = seed % 2**64
        assert torch.rand(4, generator=s.make_generator(seed)).tolist() == \
            torch.rand(4, generator=s.make_generator(twin)).tolist()


def _rich_rows():
    """Every option at once, so that each tensor the sampler builds is exercised: greedy, seeded and generator-drawn
    rows; penalties over prompt and output tokens and a pending token; logit_bias; top-k / top-p / min-p; logprobs."""
    return [
        SamplingRow(SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=1.5), [1, 2], [3]),
        SamplingRow(SamplingParams(temperature=0.8, top_k=3, top_p=0.9, seed=5, presence_penalty=0.5,
                                   frequency_penalty=0.25, logprobs=0), [4], [4, 4, 6]),
        SamplingRow(SamplingParams(temperature=1.2, min_p=0.05, logit_bias={2: 3.0, 5: -2.0}, logprobs=3), [], [0],
                    num_pending=1),
        SamplingRow(SamplingParams(temperature=1.0, min_tokens=4, stop_token_ids=[6]), [6], []),
    ]


def _sample_twice(rows_fn, sampler_seed=3):
    s = Sampler(VOCAB, EOS, "cpu", sampler_seed)
    logits = torch.linspace(-2.0, 2.0, 4 * VOCAB, dtype=torch.float32, device="cpu").reshape(4, VOCAB).cos() * 3
    out = []
    for _ in range(2):
        batch = s.launch(logits.clone(), rows_fn(), pending_tokens=torch.tensor([0, 0, 1, 0], device="cpu"))
        out.append(s.collect(batch))
    return out


def _greedy_rows():
    """_rich_rows at temperature 0: every tensor but the sampling draw's."""
    return [SamplingRow(dataclasses.replace(r.params, temperature=0.0, seed=None), r.prompt_token_ids,
                        r.output_token_ids, num_pending=r.num_pending) for r in _rich_rows()]


def _assert_same_samples(got, want):
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in want]
    for (_, lp_got), (_, lp_want) in zip(got, want, strict=True):
        for a, b in zip(lp_got, lp_want, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert a == b


def test_sampler_computes_in_its_own_dtypes_whatever_the_default_float_dtype():
    """A process may change torch's default float dtype: the sampler's tensors keep the dtypes it computes in
    (fp32 logits, counts, penalties; int64 ids), so tokens and logprobs do not change."""
    want = _sample_twice(_rich_rows)
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        got = _sample_twice(_rich_rows)
    finally:
        torch.set_default_dtype(old)
    _assert_same_samples(got, want)


def test_sampler_builds_its_tensors_on_its_own_device_whatever_the_default_device():
    """A process may change torch's default device (libraries do): every tensor the sampler builds goes to its own
    device (host staging to the CPU). The meta default device makes any tensor built without one fail. Greedy
    rows only: torch's default-device mode does not support a generator-driven draw at all."""
    want = _sample_twice(_greedy_rows)
    with torch.device("meta"):
        got = _sample_twice(_greedy_rows)
    _assert_same_samples(got, want)


def test_a_row_with_non_finite_logits_gets_the_nonfinite_token_and_no_logprob_others_are_untouched():
    from longcat_service.engine.sampler import NONFINITE_TOKEN

    logits = torch.tensor([[0.0, 5.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0], [float("nan")] + [0.0] * 7])
    rows = [SamplingRow(SamplingParams(temperature=0.0, logprobs=1), [], []) for _ in range(2)]
    tokens, logprobs = Sampler(VOCAB, EOS, "cpu")(logits, rows)
    assert tokens == [1, NONFINITE_TOKEN]
    assert logprobs[0] is not None and logprobs[0].token_id == 1 and logprobs[1] is None


def test_a_batch_without_a_finite_mask_reads_every_row_as_finite():
    from longcat_service.engine.sampler import SampledBatch

    tokens, logprobs = Sampler.collect(SampledBatch(torch.tensor([3, 0, 6]), [None, None, None]))
    assert tokens == [3, 0, 6] and logprobs == [None, None, None]


def test_huge_logits_at_a_small_temperature_still_sample_the_top_token():
    """The temperature divides logits already shifted by the row max (all <= 0): near-fp32-max logits at T = 0.1
    must neither overflow to inf nor turn into NaN."""
    logits = torch.tensor([2.9e38, 3e38, -3e38, 0.0, 0.0, 0.0, 0.0, 0.0])  # the top token is not the first
    seen = draws([SamplingParams(temperature=0.1)], logits, calls=20)[0]
    assert set(seen) == {1}

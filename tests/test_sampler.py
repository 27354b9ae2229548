"""Sampler semantics on fixed logits. Statistical checks use fixed seeds and wide bounds."""

import math

import pytest
import torch

from longcat_service.engine.sampler import Sampler, SamplingRow
from longcat_service.sampling_params import SamplingParams

VOCAB = 8
EOS = 7


def sampler(seed=0):
    return Sampler(VOCAB, EOS, "cpu", seed)


def rows(params, m=1, prompt=(), output=()):
    return [SamplingRow(params, list(prompt), list(output)) for _ in range(m)]


def probs_logits(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float32))


def frequencies(tokens):
    counts = torch.bincount(torch.tensor(tokens), minlength=VOCAB).float()
    return counts / counts.sum()


def draw_many(params, logits_row, m=4000, seed=0):
    logits = logits_row.expand(m, -1).clone()
    tokens, _ = sampler(seed)(logits, rows(params, m))
    return frequencies(tokens)


P = [0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005]


def test_greedy_is_exact_argmax():
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(3))
    tokens, _ = sampler()(logits, rows(SamplingParams(temperature=0.0), 5))
    assert tokens == logits.argmax(-1).tolist()


def test_temperature_one_matches_distribution():
    freq = draw_many(SamplingParams(temperature=1.0), probs_logits(P))
    assert torch.allclose(freq, torch.tensor(P), atol=0.03)


def test_low_temperature_sharpens():
    freq = draw_many(SamplingParams(temperature=0.2), probs_logits(P))
    assert freq[0] > 0.9


def test_top_k_keeps_only_k_most_likely():
    freq = draw_many(SamplingParams(top_k=2), probs_logits(P))
    assert freq[2:].sum() == 0
    assert abs(freq[0] - 0.4 / 0.65) < 0.04


def test_top_p_keeps_smallest_prefix_reaching_p():
    freq = draw_many(SamplingParams(top_p=0.7), probs_logits(P))  # 0.4 + 0.25 < 0.7 -> needs token 2 too
    assert freq[3:].sum() == 0 and freq[2] > 0
    freq = draw_many(SamplingParams(top_p=0.35), probs_logits(P))
    assert freq[0] == 1.0


def test_min_p_drops_tokens_below_fraction_of_max():
    freq = draw_many(SamplingParams(min_p=0.5), probs_logits(P))  # threshold 0.2: tokens 0 and 1 survive
    assert freq[2:].sum() == 0
    assert abs(freq[0] - 0.4 / 0.65) < 0.04


def test_repetition_penalty_over_prompt_and_output():
    logits = torch.tensor([[2.0, 1.5, -1.0, -1.2, -5, -5, -5, -5]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    # token 0 in the prompt: 2.0 -> 1.0, so token 1 wins
    assert sampler()(logits, [SamplingRow(params, [0], [])])[0] == [1]
    # tokens 0 and 1 in the output: 1.0 and 0.75; negative logits are multiplied: -1.0 -> -2.0
    row = SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=2.0), [4], [0, 1, 2])
    processed = sampler()._process(logits.clone(), [row])
    assert torch.allclose(processed[0, :4], torch.tensor([1.0, 0.75, -2.0, -1.2]))


def test_frequency_and_presence_penalties_count_output_only():
    logits = torch.zeros(1, VOCAB)
    row = SamplingRow(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), [3, 3, 3], [1, 1, 2])
    processed = sampler()._process(logits.clone(), [row])
    expected = torch.zeros(VOCAB)
    expected[1] = -(0.5 * 2 + 0.25)
    expected[2] = -(0.5 * 1 + 0.25)
    assert torch.allclose(processed[0], expected)


def test_logit_bias_changes_the_argmax():
    logits = torch.tensor([[3.0, 2.0, 0, 0, 0, 0, 0, 0]])
    tokens, _ = sampler()(logits, rows(SamplingParams(temperature=0.0, logit_bias={1: 1.5})))
    assert tokens == [1]
    tokens, _ = sampler()(logits, rows(SamplingParams(temperature=0.0, logit_bias={0: -100})))
    assert tokens == [1]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 0, 0, 0, 0, 4.0, 1.0, 5.0]])  # EOS (7) then stop id 5 are the most likely
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[5])
    assert sampler()(logits, [SamplingRow(params, [0], [6])])[0] == [6]
    assert sampler()(logits, [SamplingRow(params, [0], [6, 6])])[0] == [EOS]
    ignore = SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True)
    assert sampler()(logits, [SamplingRow(ignore, [0], [])])[0] == [EOS]  # EOS is not a stop then


def test_seeded_rows_do_not_depend_on_the_batch():
    s = sampler(seed=123)
    params = SamplingParams(temperature=1.0, seed=42)
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(0))

    def run(batch_rows, order):
        gen = s.make_generator(42)
        out = []
        for _ in range(20):
            rs = [SamplingRow(SamplingParams(temperature=1.0), [], []) for _ in range(batch_rows)]
            rs[order] = SamplingRow(params, [], [], gen)
            lg = torch.randn(batch_rows, VOCAB)
            lg[order] = logits[0]
            out.append(s(lg, rs)[0][order])
        return out

    alone = run(1, 0)
    assert run(4, 2) == alone
    assert run(3, 0) == alone
    assert len(set(alone)) > 1  # actually random


def test_logprobs_are_raw_log_softmax_with_top_n():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0, 0.5, 0.1, -2.0]])
    params = SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.5, logit_bias={4: 10.0})
    tokens, lps = sampler()(logits, [SamplingRow(params, [1], [])])
    raw = torch.log_softmax(logits[0], -1)
    lp = lps[0]
    assert tokens == [4] and lp.token_id == 4  # the bias decided the token ...
    assert math.isclose(lp.logprob, raw[4].item(), rel_tol=1e-6)  # ... but logprobs describe the raw model
    assert list(lp.top)[:3] == [1, 2, 0]
    assert set(lp.top) == {1, 2, 0, 4}
    for t, v in lp.top.items():
        assert math.isclose(v, raw[t].item(), rel_tol=1e-6)


def test_logprobs_zero_gives_chosen_token_only_and_none_when_not_asked():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0, 0.5, 0.1, -2.0]] * 2)
    r = [SamplingRow(SamplingParams(temperature=0.0, logprobs=0), [], []),
         SamplingRow(SamplingParams(temperature=0.0), [], [])]
    _, lps = sampler()(logits, r)
    assert lps[0].top.keys() == {1} and lps[1] is None


def test_row_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="rows"):
        sampler()(torch.zeros(2, VOCAB), rows(SamplingParams(), 1))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, repetition_penalty=1.7),
    SamplingParams(temperature=0.0, frequency_penalty=0.6, presence_penalty=0.3),
    SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5]),
    SamplingParams(temperature=0.0, min_tokens=4, stop_token_ids=[5]),
    SamplingParams(temperature=0.9, top_k=4, seed=11, repetition_penalty=1.3, frequency_penalty=0.2),
])
def test_pending_device_token_counts_as_if_it_were_on_the_host(params):
    """A chained step's last token is still on the device (num_pending=1, value in pending_tokens): penalties and
    the min_tokens mask must treat it exactly as the same token in output_token_ids."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, VOCAB, generator=g)
    prompts, outputs, last = [[1, 2], [7], [3, 3, 7]], [[4, 5], [6], [2]], [5, 6, 2]
    s = sampler()
    host_rows = [SamplingRow(params, p, o + [t], s.make_generator(1) if params.seed else None)
                 for p, o, t in zip(prompts, outputs, last, strict=True)]
    device_rows = [SamplingRow(params, p, o, s.make_generator(1) if params.seed else None, num_pending=1)
                   for p, o in zip(prompts, outputs, strict=True)]
    want = s._process(logits.clone(), host_rows)
    got = s._process(logits.clone(), device_rows, torch.tensor(last))
    assert torch.equal(got, want)
    assert s.collect(s.launch(logits, device_rows, torch.tensor(last)))[0] == \
        s.collect(s.launch(logits, host_rows))[0]


def test_pending_rows_need_their_tokens():
    row = SamplingRow(SamplingParams(temperature=0.0), [1], [2], num_pending=1)
    with pytest.raises(ValueError, match="pending_tokens"):
        sampler().launch(torch.zeros(1, VOCAB), [row])


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0),  # plain greedy: the logits are used without a copy
    SamplingParams(temperature=0.0, logit_bias={3: 50.0}),  # edited in place: on a copy
    SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[0]),  # the argmax banned below min_tokens
    SamplingParams(temperature=0.7, top_k=3, repetition_penalty=1.5, seed=1),
])
def test_sampling_never_modifies_the_callers_logits(params):
    """The logits may be a CUDA graph's output buffer that the caller (prompt logprobs, the next step) reads again."""
    logits = probs_logits(P)[None].repeat(2, 1)
    before = logits.clone()
    tokens, _ = sampler()(logits, [SamplingRow(params, [0], [1]), SamplingRow(SamplingParams(temperature=0.0), [], [])])
    assert torch.equal(logits, before)
    if params.logit_bias:
        assert tokens[0] == 3  # the bias still applies
    if params.min_tokens:
        assert tokens[0] == 1  # token 0 (the most likely) is still masked

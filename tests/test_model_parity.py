"""Our paged-cache LongCat-Flash vs transformers 4.57 (the numerical reference) on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

from longcat_service.model.loader import load_model
from tests.hf_tiny import TINY_CONFIGS, load_hf_model
from tests.paged_driver import PagedDriver

FP32_REL_TOL = 1e-4  # of max |logit|
# bf16 (max |diff| of max |logit|), from the noise measured against transformers in bf16 on 12 tiny checkpoints
# (base, odd, nozero_top1 x weight seeds 0-3; prompts of 9 and 4 tokens):
# - prefill: correct code 0 to 6.4e-3 (base seed 0: 5.6e-3); every planted bug tried is >= 9.2e-3 on every one of
#   them (RoPE pairs swapped 9.2e-3 to 2.3e-2, softmax scale from the nope dims only 9.2e-3 to 0.11, the kv LoRA
#   scale or the LoRA norms missing >= 0.29). 8e-3 sits between the two.
# - one weight-absorbed decode step (another summation order than transformers' naive attention): correct code up to
#   1.08e-2, so 1.25e-2; on base seed 0 a RoPE swap measures 1.49e-2 there, the other bugs far more.
BF16_PREFILL_REL_TOL = 8e-3
BF16_DECODE_REL_TOL = 1.25e-2


def _prompts(vocab: int, lengths: list[int], seed: int = 1) -> dict[int, list[int]]:
    g = torch.Generator().manual_seed(seed)
    return {i: torch.randint(3, vocab, (n,), generator=g).tolist() for i, n in enumerate(lengths)}


def _hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel} * max|logit| {scale:.3g}"


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_prefill_batch_logits_match_hf(tiny_checkpoint, name):
    path = tiny_checkpoint(name)
    hf, ours = load_hf_model(path), load_model(path, dtype=torch.float32, device="cpu")
    prompts = _prompts(ours.config.vocab_size, [11, 5, 8])
    logits = PagedDriver(ours, block_size=4).step(prompts)  # one flat batch, shuffled block ids
    for sid, toks in prompts.items():
        _assert_close(logits[sid], _hf_logits(hf, toks), FP32_REL_TOL)


@pytest.mark.parametrize("name", ["base", "odd"])
def test_greedy_generation_matches_hf_generate(tiny_checkpoint, name):
    path = tiny_checkpoint(name)
    hf, ours = load_hf_model(path), load_model(path, dtype=torch.float32, device="cpu")
    prompts = _prompts(ours.config.vocab_size, [7, 3], seed=2)
    generated = PagedDriver(ours, block_size=4).greedy(prompts, max_new_tokens=32)
    for sid, toks in prompts.items():
        with torch.no_grad():
            ref = hf.generate(torch.tensor([toks]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
        ref_new = ref[0, len(toks) :].tolist()
        assert len(ref_new) == 32
        assert generated[sid] == ref_new


def test_incremental_chunked_and_mixed_steps_equal_full_forward(tiny_checkpoint):
    path = tiny_checkpoint("base")
    hf, ours = load_hf_model(path), load_model(path, dtype=torch.float32, device="cpu")
    seqs = _prompts(ours.config.vocab_size, [14, 12], seed=3)
    full = {sid: _hf_logits(hf, toks) for sid, toks in seqs.items()}
    a, b = seqs[0], seqs[1]
    driver = PagedDriver(ours, block_size=4, seed=5)
    steps = [
        {0: a[:5]},  # prefill a prefix
        {0: a[5:9], 1: b[:6]},  # chunked prefill (query offset 5) next to a fresh prefill
        {0: a[9:10], 1: b[6:9]},  # mixed: one decode token + one prefill chunk in one batch
        {0: a[10:11], 1: b[9:10]},  # pure decode, different context lengths
        {0: a[11:12], 1: b[10:11]},
        {0: a[12:14], 1: b[11:12]},
    ]
    done = {0: 0, 1: 0}
    for step in steps:
        logits = driver.step(step)
        for sid, toks in step.items():
            expect = full[sid][done[sid] : done[sid] + len(toks)]
            _assert_close(logits[sid], expect, FP32_REL_TOL)
            done[sid] += len(toks)
    assert done == {0: 14, 1: 12}


@pytest.mark.parametrize("name", ["base", "odd"])
def test_bf16_logits_close_to_hf(tiny_checkpoint, name):
    path = tiny_checkpoint(name)
    hf, ours = load_hf_model(path, dtype=torch.bfloat16), load_model(path, dtype=torch.bfloat16, device="cpu")
    assert ours.model.layers[0].mlp.router.classifier.weight.dtype == torch.float32  # router stays fp32
    prompts = _prompts(ours.config.vocab_size, [9, 4], seed=4)
    driver = PagedDriver(ours, block_size=4)
    logits = driver.step(prompts)
    for sid, toks in prompts.items():
        _assert_close(logits[sid], _hf_logits(hf, toks), BF16_PREFILL_REL_TOL)
    # one weight-absorbed decode step as well
    nxt = {sid: [int(lg[-1].argmax())] for sid, lg in logits.items()}
    logits = driver.step(nxt)
    for sid, toks in prompts.items():
        _assert_close(logits[sid][-1], _hf_logits(hf, toks + nxt[sid])[-1], BF16_DECODE_REL_TOL)


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 0.8}


@pytest.mark.parametrize(
    "overrides",
    [{"rope_scaling": YARN, "rope_theta": 1e4}, {"tie_word_embeddings": True}, {"router_bias": True}],
    ids=["yarn", "tied_embeddings", "router_bias_ignored"],
)
def test_variant_checkpoints_match_hf(tmp_path, overrides):
    from tests.hf_tiny import build_hf_model, save_hf_model

    path = save_hf_model(build_hf_model("base", **overrides), tmp_path)
    hf, ours = load_hf_model(path), load_model(path, dtype=torch.float32, device="cpu")
    prompts = _prompts(ours.config.vocab_size, [40, 6])  # positions past original_max_position_embeddings/2
    driver = PagedDriver(ours, block_size=4)
    logits = driver.step(prompts)
    for sid, toks in prompts.items():
        _assert_close(logits[sid], _hf_logits(hf, toks), FP32_REL_TOL)
    nxt = {sid: [int(lg[-1].argmax())] for sid, lg in logits.items()}
    logits = driver.step(nxt)
    for sid, toks in prompts.items():
        _assert_close(logits[sid][-1], _hf_logits(hf, toks + nxt[sid])[-1], FP32_REL_TOL)

"""The shipped trained demo model: what LLM() loads by default, legible greedy output, transformers parity, its MTP
layer's keys; the trainer's tiny CPU run; the perplexity harness against an independent transformers computation."""

from __future__ import annotations

import json
import math
import re
import unicodedata
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer, models

from longcat_service.demo import DEMO_CHECKPOINT_DIR, default_model_path
from longcat_service.eval.perplexity import perplexity, window_ids
from longcat_service.sampling_params import SamplingParams

WORDS_FILE = Path(__file__).with_name("data") / "words.txt"
SHIPPED = DEMO_CHECKPOINT_DIR
needs_shipped = pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="no trained demo checkpoint")


@pytest.fixture(scope="module")
def dictionary() -> set[str]:
    lines = WORDS_FILE.read_text(encoding="utf-8").splitlines()
    return {w for w in lines if w and not w.startswith("#")}


@pytest.fixture(scope="module")
def llm():
    from longcat_service.llm import LLM

    return LLM(model=str(SHIPPED) if (SHIPPED / "model.safetensors").is_file() else None, dtype="float32")


def legibility(text: str, dictionary: set[str], min_words: int = 10) -> float:
    """Share of dictionary words; the text must have min_words words, at least 4 of them distinct (not one loop)."""
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", text)]
    assert len(words) >= min_words, f"too few words to judge: {text!r}"
    assert len(set(words)) >= min(4, min_words), f"one word repeated is not English: {text!r}"
    return sum(w in dictionary for w in words) / len(words)


def assert_no_control_chars(text: str) -> None:
    bad = [c for c in text if unicodedata.category(c) in ("Cc", "Cs", "Co", "Cn") and c not in "\n\t"]
    assert not bad, f"control characters {bad!r} in {text!r}"
    assert "\ufffd" not in text, f"replacement character (broken UTF-8) in {text!r}"


@needs_shipped
def test_llm_without_model_loads_the_shipped_checkpoint(monkeypatch):
    from longcat_service.engine.llm_engine import LLMEngine

    monkeypatch.delenv("LONGCAT_DEMO_MODEL")  # the suite's conftest picks the random tiny demo for other tests
    assert default_model_path() == SHIPPED
    engine = LLMEngine(device="cpu", num_kv_blocks=16)
    assert Path(engine.model_path) == SHIPPED
    assert engine.vocab_size == json.loads((SHIPPED / "config.json").read_text())["vocab_size"]
    monkeypatch.setenv("LONGCAT_DEMO_MODEL", "random")
    assert default_model_path() != SHIPPED
    monkeypatch.setenv("LONGCAT_DEMO_MODEL", "bogus")
    with pytest.raises(ValueError, match="LONGCAT_DEMO_MODEL"):
        default_model_path()


@needs_shipped
def test_shipped_checkpoint_has_the_full_architecture_and_fits_one_transfer():
    cfg = json.loads((SHIPPED / "config.json").read_text())
    assert cfg["moe_topk"] > 1 and cfg["zero_expert_num"] > 0 and cfg["n_routed_experts"] > 1
    assert cfg["mla_scale_q_lora"] and cfg["mla_scale_kv_lora"]
    with safe_open(str(SHIPPED / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        bias = f.get_tensor("model.layers.0.mlp.router.e_score_correction_bias")
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in keys
    assert bias.abs().max() > 0, "the router correction bias was never trained"
    for key in ("model.mtp.layers.0.eh_proj.weight", "model.mtp.layers.0.enorm.m.weight", "model.mtp.norm.weight",
                "model.mtp.layers.0.transformer_layer.mlp.down_proj.weight", "model.mtp.layers.0.self_attn.kv_b_proj.weight"):
        assert key in keys
    for f in SHIPPED.iterdir():
        assert f.stat().st_size <= 16 * 2**20, f"{f.name} is over 16 MiB"
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) <= 25 * 10**6


@needs_shipped
@pytest.mark.parametrize("kind", ["story", "chat"])
def test_greedy_output_is_legible_english(llm, dictionary, kind):
    params = SamplingParams(max_tokens=48, temperature=0.0)
    if kind == "story":
        text = llm.generate("Once upon a time", params)[0].outputs[0].text
    else:  # replies learned from one-line dialogues are short and end with EOS
        text = llm.chat([{"role": "user", "content": "Hello, how are you?"}], params)[0].outputs[0].text
    assert_no_control_chars(text)
    share = legibility(text, dictionary, min_words=10 if kind == "story" else 3)
    assert share >= 0.8, f"only {share:.0%} dictionary words in {text!r}"


def test_legibility_check_rejects_gibberish(dictionary):
    assert legibility(" maldalked hmall Esore de tworl grindle plonk sassafrax vorpt mimsy quaff", dictionary) < 0.8
    with pytest.raises(AssertionError, match="repeated"):
        legibility("the the the the the the the the the the the", dictionary)
    with pytest.raises(AssertionError):
        assert_no_control_chars("ok \x1b[2J then")


@needs_shipped
def test_transformers_greedy_tokens_match_llm_fp32(llm):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(SHIPPED), dtype=torch.float32).eval()
    for prompt in ("Once upon a time", "[Round 0] USER:What is your name? ASSISTANT:"):
        ids = llm.get_tokenizer().encode(prompt)
        ours = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None)
        assert ours[0].outputs[0].token_ids == ref[0, len(ids):].tolist(), prompt


def test_perplexity_windows():
    assert window_ids(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert window_ids(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a 1-token tail scores nothing
    assert window_ids(list(range(10)), 4, max_tokens=6) == [[0, 1, 2, 3], [4, 5]]
    with pytest.raises(ValueError, match="window"):
        window_ids([1, 2], 1)


def test_perplexity_matches_transformers_log_softmax(llm):
    """The engine's prompt logprobs give the same NLL as transformers' full forward on the same windows."""
    from transformers import AutoModelForCausalLM

    text = "In the beginning God created the heaven and the earth. And the earth was without form, and void."
    res = perplexity(llm, [text, " Hello, how are you?"], window=16)
    ids = llm.get_tokenizer().encode(text) + llm.get_tokenizer().encode(" Hello, how are you?")
    hf = AutoModelForCausalLM.from_pretrained(str(llm.engine.model_path), dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for w in window_ids(ids, 16):
        with torch.no_grad():
            logp = hf(torch.tensor([w])).logits[0].log_softmax(-1)
        nll -= sum(logp[i - 1, w[i]].item() for i in range(1, len(w)))
        count += len(w) - 1
    assert res["tokens"] == count
    assert res["nll"] == pytest.approx(nll / count, rel=1e-4)
    assert res["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-3)


def test_tiny_training_run_writes_a_checkpoint_every_loader_reads(tmp_path):
    from transformers import AutoModelForCausalLM

    from longcat_service.demo.train import main as train_main
    from longcat_service.llm import LLM
    from longcat_service.model.loader import load_model

    out = tmp_path / "ckpt"
    summary = train_main(["--device", "cpu", "--tiny", "--max-steps", "3", "--batch", "4", "--seq-len", "32",
                          "--eval-every", "2", "--eval-batches", "1", "--out", str(out)])
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "train_log.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    assert "mtp_agree" in summary["saved_eval_of_best"] and "mtp_acc" in summary["saved_eval_of_best"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "eval"] == [0, 2, 3]
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    model = load_model(out, device="cpu")
    assert any(k.startswith("model.mtp.layers.0.") for k in model.mtp_weight_names)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = [5, 17, 99, 300, 42]
    ours = LLM(model=str(out), dtype="float32").generate({"prompt_token_ids": ids},
                                                         SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert ours[0].outputs[0].token_ids == ref[0, len(ids):].tolist()


def test_training_model_matches_transformers_logits(tmp_path):
    """The trainer's own forward (used for its loss and MTP metrics) is transformers' math: random weights,
    random norms and correction bias, fp32."""
    from transformers import AutoModelForCausalLM

    from longcat_service.demo.modeling import TrainableLongcatFlash
    from longcat_service.demo.train import (
        DEMO_TRAINED_CONFIG,
        TINY_OVERRIDES,
        _load_hf_state,
        derive_config,
        write_checkpoint,
    )

    cfg = derive_config(DEMO_TRAINED_CONFIG, TINY_OVERRIDES)
    model = TrainableLongcatFlash(cfg)
    gen = torch.Generator().manual_seed(7)
    model.init_weights(gen)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.mul_(4.0)
        for moe in model.moe_layers():
            moe.e_score_correction_bias.copy_(0.05 * torch.randn(moe.e_score_correction_bias.shape, generator=gen))
    write_checkpoint(model, Tokenizer(models.BPE()), cfg, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    _load_hf_state(model, load_file(str(tmp_path / "model.safetensors")))  # the bf16-rounded weights HF reads
    model.eval()
    ids = torch.randint(4, cfg["vocab_size"], (2, 13), generator=gen)
    with torch.no_grad():
        ours = model.lm_head(model(ids)[0])
        ref = hf(ids).logits
    assert (ours - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_training_run_on_cuda_with_bf16_autocast(tmp_path):
    from longcat_service.demo.train import main as train_main

    summary = train_main(["--device", "cuda", "--tiny", "--max-steps", "20", "--batch", "8", "--seq-len", "64",
                          "--eval-every", "10", "--out", str(tmp_path)])
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    evals = [r["main"] for r in log if r["event"] == "eval"]
    assert evals[-1] < evals[0], "held-out loss did not fall"
    assert math.isfinite(summary["saved_eval_of_best"]["mtp"])

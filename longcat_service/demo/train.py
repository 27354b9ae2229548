"""Train the demo LongCat-Flash model (main model + MTP head) on the committed corpus and write an HF checkpoint.

    python -m longcat_service.demo.train --device cuda --max-minutes 8 --out /tmp/demo     # the shipped model
    python -m longcat_service.demo.train --device cpu --max-steps 20 --tiny --out /tmp/t    # a seconds-long smoke run

Reproducible from --seed: tokenizer, initial weights and batch order depend only on the seed and the corpus; with
--max-steps (and a --max-minutes that is not reached) the run is deterministic up to the device's kernels. The time
budget stretches the learning-rate schedule over whichever of steps or minutes runs out first.

The output dir gets the checkpoint (config.json, generation_config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) of the step with the lowest held-out loss, train_log.jsonl (one line per log/eval step) and
summary.json (final held-out loss and perplexity, MTP top-1 accuracy and agreement, greedy samples).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from longcat_service.chat_template import LONGCAT_CHAT_TEMPLATE, render_chat_template
from longcat_service.demo.corpus import CORPUS_FILE, load_corpus
from longcat_service.demo.modeling import TrainableLongcatFlash

SPECIAL_TOKENS = ("<unk>", "<longcat_s>", "</longcat_s>", "<longcat_pad>")  # ids 0..3: unk, bos, eos, pad
EOS_ID = 2
HELDOUT_EVERY = 25  # every 25th corpus document is held out (never trained on)
CHAT_REPEAT = 4  # the dialogues are ~6% of the text; repeat them so chat turns get learned

DEMO_TRAINED_CONFIG = {
    "architectures": ["LongcatFlashForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "dtype": "bfloat16",
    "eos_token_id": 2,
    "expert_ffn_hidden_size": 128,
    "ffn_hidden_size": 384,
    "head_dim": 16,  # must equal qk_rope_head_dim (spec §8.3)
    "hidden_act": "silu",
    "hidden_size": 256,
    "initializer_range": 0.02,
    "kv_lora_rank": 64,
    "max_position_embeddings": 2048,
    "mla_scale_kv_lora": True,
    "mla_scale_q_lora": True,
    "model_type": "longcat_flash",
    "moe_topk": 3,
    "n_routed_experts": 8,
    "num_attention_heads": 8,
    "num_hidden_layers": 4,  # HF 4.57 saves 2 * num_layers (spec §8.2)
    "num_key_value_heads": 8,
    "num_layers": 2,
    "num_nextn_predict_layers": 1,  # one MTP layer under model.mtp.* (original LongCat config name)
    "pad_token_id": 3,
    "q_lora_rank": 128,
    "qk_head_dim": 48,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "routed_scaling_factor": 2.0,
    "router_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.57.6",
    "use_cache": True,
    "v_head_dim": 32,
    "vocab_size": 4096,
    "zero_expert_num": 4,
    "zero_expert_type": "identity",
}

# --preset small: a CPU-trainable fallback (~1.8M parameters) with every architecture feature
SMALL_OVERRIDES = {
    "hidden_size": 128, "ffn_hidden_size": 256, "expert_ffn_hidden_size": 64, "q_lora_rank": 64, "kv_lora_rank": 32,
    "num_attention_heads": 4, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16, "vocab_size": 2048,
}

# --tiny: the same architecture features at toy size (CPU tests)
TINY_OVERRIDES = {
    "hidden_size": 64, "ffn_hidden_size": 96, "expert_ffn_hidden_size": 32, "q_lora_rank": 32, "kv_lora_rank": 16,
    "num_attention_heads": 4, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "vocab_size": 512, "n_routed_experts": 4, "zero_expert_num": 2, "moe_topk": 2,
}


def derive_config(base: dict, overrides: dict) -> dict:
    """base + overrides, with the fields that follow from others recomputed (spec §1.1, §8.2-8.3)."""
    cfg = dict(base, **overrides)
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    cfg["head_dim"] = cfg["qk_rope_head_dim"]
    cfg["qk_head_dim"] = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    cfg["num_hidden_layers"] = 2 * cfg["num_layers"]
    return cfg


def split_corpus(docs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, held-out): a fixed, interleaved split so both halves cover the whole corpus."""
    train = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY]
    heldout = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == 0]
    return train, heldout


def heldout_texts(path: Path = CORPUS_FILE) -> list[str]:
    """The held-out documents as text (for evaluation); a book chapter ends with the EOS token as in training."""
    return [d["text"] if d["kind"] == "chat" else d["text"] + SPECIAL_TOKENS[EOS_ID] for d in split_corpus(load_corpus(path))[1]]


def train_tokenizer(docs: list[dict], vocab_size: int) -> Tokenizer:
    """Byte-level BPE on the training text; the 4 special tokens take ids 0..3 (as in LongCat)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [d["text"].replace(SPECIAL_TOKENS[EOS_ID], " ") for d in docs]
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, expected {vocab_size}")
    return tok


def encode_docs(tok: Tokenizer, docs: list[dict], chat_repeat: int = 1) -> torch.Tensor:
    """One token stream: every document followed by EOS (a chat transcript already ends with it)."""
    ids: list[int] = []
    for d in docs:
        enc = tok.encode(d["text"], add_special_tokens=False).ids
        if d["kind"] == "chat":
            ids.extend(enc * chat_repeat)
        else:
            ids.extend(enc + [EOS_ID])
    return torch.tensor(ids, dtype=torch.long)


def lr_at(progress: float, peak: float, warmup: float = 0.03, floor: float = 0.1) -> float:
    if progress < warmup:
        return peak * progress / warmup
    t = min(1.0, (progress - warmup) / (1 - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def losses(model: TrainableLongcatFlash, ids: torch.Tensor, mtp_weight: float) -> dict[str, torch.Tensor]:
    """Next-token loss on positions 0..S-2 and the MTP's next-next-token loss on positions 0..S-3."""
    hidden, mtp_hidden = model(ids)
    logits = model.lm_head(hidden[:, :-1]).float()
    mtp_logits = model.lm_head(mtp_hidden[:, :-1]).float()
    main = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    mtp = F.cross_entropy(mtp_logits.flatten(0, 1), ids[:, 2:].flatten())
    return {"loss": main + mtp_weight * mtp, "main": main, "mtp": mtp, "logits": logits, "mtp_logits": mtp_logits}


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, seq_len: int, batch: int, device, autocast) -> dict[str, float]:
    """Held-out: mean next-token loss, MTP loss, MTP top-1 accuracy (vs the data's token t+2) and MTP agreement
    (vs the main model's own greedy choice at t+1, which is what a speculative draft must match)."""
    model.eval()
    n = (stream.numel() - 1) // seq_len
    windows = stream[: n * seq_len].view(n, seq_len)
    tot = {"main": 0.0, "mtp": 0.0, "mtp_acc": 0.0, "mtp_agree": 0.0}
    count = 0
    for i in range(0, n, batch):
        ids = windows[i : i + batch].to(device)
        with autocast():
            out = losses(model, ids, 1.0)
        pred_next = out["logits"].argmax(-1)  # [B, S-1]: main model's prediction for token t+1
        draft = out["mtp_logits"].argmax(-1)  # [B, S-2]: MTP's prediction for token t+2
        w = ids.shape[0]
        tot["main"] += out["main"].item() * w
        tot["mtp"] += out["mtp"].item() * w
        tot["mtp_acc"] += (draft == ids[:, 2:]).float().mean().item() * w
        tot["mtp_agree"] += (draft == pred_next[:, 1:]).float().mean().item() * w
        count += w
    model.train()
    res = {k: v / max(count, 1) for k, v in tot.items()}
    res["ppl"] = math.exp(res["main"])
    return res


@torch.no_grad()
def greedy(model, tok: Tokenizer, prompt: str, device, new_tokens: int = 40) -> str:
    model.eval()
    ids = tok.encode(prompt, add_special_tokens=False).ids
    for _ in range(new_tokens):
        hidden, _ = model(torch.tensor([ids], device=device))
        nxt = int(model.lm_head(hidden[0, -1]).argmax())
        if nxt == EOS_ID:
            break
        ids.append(nxt)
    model.train()
    return tok.decode(ids[len(tok.encode(prompt, add_special_tokens=False).ids):])


def write_checkpoint(model: TrainableLongcatFlash, tok: Tokenizer, cfg: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", cfg)
    _write_json(out / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
        "transformers_version": cfg["transformers_version"],
    })
    tok.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", _tokenizer_config(cfg))
    save_file(model.hf_state_dict(), str(out / "model.safetensors"), metadata={"format": "pt"})


def _tokenizer_config(cfg: dict) -> dict:
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": added,
        "bos_token": SPECIAL_TOKENS[1], "chat_template": LONGCAT_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": SPECIAL_TOKENS[2], "model_max_length": cfg["max_position_embeddings"], "pad_token": SPECIAL_TOKENS[3],
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": SPECIAL_TOKENS[0],
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Train the LongCat-Flash demo model (with its MTP head).")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--max-minutes", type=float, default=8.0)
    p.add_argument("--max-steps", type=int, default=4000, help="~45 passes over the data at the default batch")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--mtp-weight", type=float, default=0.5)
    p.add_argument("--dropout", type=float, default=0.1, help="training-only dropout on each residual branch")
    p.add_argument("--bias-rate", type=float, default=2e-4, help="router correction-bias update per step")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-batches", type=int, default=0, help="limit held-out windows to this many batches (0: all)")
    p.add_argument("--preset", choices=("demo", "small"), default="demo", help="demo: the shipped size; small: CPU fallback")
    p.add_argument("--tiny", action="store_true", help="toy model and a 5%% slice of the corpus (CPU smoke test)")
    p.add_argument("--corpus", type=Path, default=CORPUS_FILE)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (1 is many times faster on a CPU shared with other work)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cfg = derive_config(DEMO_TRAINED_CONFIG, TINY_OVERRIDES if args.tiny else SMALL_OVERRIDES if args.preset == "small" else {})
    docs = load_corpus(args.corpus)
    if args.tiny:
        docs = docs[::20]
    train_docs, held_docs = split_corpus(docs)
    tok = train_tokenizer(train_docs, cfg["vocab_size"])
    train_stream = encode_docs(tok, train_docs, CHAT_REPEAT)
    held_stream = encode_docs(tok, held_docs)
    if args.eval_batches:
        held_stream = held_stream[: args.eval_batches * args.batch * args.seq_len + 1]

    model = TrainableLongcatFlash(cfg, args.dropout)
    model.init_weights(torch.Generator().manual_seed(args.seed))
    model.to(device).train()
    decay = [q for n, q in model.named_parameters() if q.dim() >= 2 and "embed" not in n]
    no_decay = [q for n, q in model.named_parameters() if not (q.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    use_bf16 = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16) if use_bf16 else torch.autocast("cpu", enabled=False)

    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / "train_log.jsonl").open("w")
    n_params = sum(q.numel() for q in model.parameters())
    header = {"event": "start", "params": n_params, "train_tokens": train_stream.numel(),
              "heldout_tokens": held_stream.numel(), "config": cfg, "args": {k: str(v) for k, v in vars(args).items()}}
    log.write(json.dumps(header) + "\n")
    print(f"params {n_params / 1e6:.2f}M, train tokens {train_stream.numel()}, held-out tokens {held_stream.numel()}", flush=True)

    gen = torch.Generator().manual_seed(args.seed + 1)
    span = args.seq_len + 1
    start, budget = time.time(), args.max_minutes * 60
    best, best_step, step, tokens = float("inf"), -1, 0, 0
    last = {}
    while True:
        elapsed = time.time() - start
        progress = max(step / args.max_steps, elapsed / budget)
        done = progress >= 1.0
        if step % args.eval_every == 0 or done:
            ev = evaluate(model, held_stream, args.seq_len, args.batch, device, autocast)
            rec = {"event": "eval", "step": step, "tokens": tokens, "minutes": elapsed / 60, **ev}
            if ev["main"] < best:
                best, best_step = ev["main"], step
                write_checkpoint(model, tok, cfg, args.out)
                rec["saved"] = True
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
            last = rec
        if done:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, args.lr)
        starts = torch.randint(0, train_stream.numel() - span, (args.batch,), generator=gen)
        ids = torch.stack([train_stream[s : s + span] for s in starts.tolist()]).to(device, non_blocking=True)
        with autocast():
            out = losses(model, ids, args.mtp_weight)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for moe in model.moe_layers():
            moe.update_bias(args.bias_rate)
        step += 1
        tokens += ids.numel()
        if step % 50 == 0:
            rec = {"event": "train", "step": step, "minutes": (time.time() - start) / 60, "loss": out["main"].item(),
                   "mtp_loss": out["mtp"].item(), "lr": opt.param_groups[0]["lr"]}
            log.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)

    # samples and summary from the saved (best) checkpoint's weights: reload them into the training model
    from safetensors.torch import load_file

    saved = load_file(str(args.out / "model.safetensors"))
    _load_hf_state(model, saved)
    samples = {
        "Once upon a time": greedy(model, tok, "Once upon a time", device),
        "chat": greedy(model, tok, render_chat_template([{"role": "user", "content": "Hello, how are you?"}]), device),
    }
    summary = {"best_step": best_step, "best_heldout_loss": best, "final_eval": last, "steps": step, "tokens": tokens,
               "minutes": (time.time() - start) / 60, "params": n_params, "samples": samples,
               "saved_eval_of_best": evaluate(model, held_stream, args.seq_len, args.batch, device, autocast)}
    _write_json(args.out / "summary.json", summary)
    log.write(json.dumps({"event": "end", **summary}) + "\n")
    log.close()
    print(json.dumps(summary, indent=1), flush=True)
    return summary


def _load_hf_state(model: TrainableLongcatFlash, hf: dict[str, torch.Tensor]) -> None:
    """Inverse of hf_state_dict (bf16 values, so the summary describes exactly what was shipped)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_gather_param(model, name, hf).to(p.device, p.dtype))
        for moe_i, moe in enumerate(model.moe_layers()):
            moe.e_score_correction_bias.copy_(hf[f"model.layers.{moe_i}.mlp.router.e_score_correction_bias"].float())


def _gather_param(model: TrainableLongcatFlash, name: str, hf: dict[str, torch.Tensor]) -> torch.Tensor:
    parts = name.split(".")
    if parts[0] == "layers" and parts[2] == "mlp" and parts[3] in ("w_gate", "w_up", "w_down"):
        i, proj = parts[1], {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}[parts[3]]
        n = model.cfg["n_routed_experts"]
        return torch.stack([hf[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"] for e in range(n)])
    if parts[0] == "layers" and parts[2] == "mlp" and parts[3] == "classifier":
        return hf[f"model.layers.{parts[1]}.mlp.router.classifier.weight"]
    if parts[0] == "mtp":
        rest = ".".join(parts[1:])
        rest = {"enorm.weight": "enorm.m.weight", "hnorm.weight": "hnorm.m.weight"}.get(rest, rest)
        if rest.startswith("mlp."):
            rest = "transformer_layer." + rest
        if rest == "norm.weight":
            return hf["model.mtp.norm.weight"]
        return hf[f"model.mtp.layers.0.{rest}"]
    if name == "lm_head.weight":
        return hf[name]
    return hf["model." + name]


if __name__ == "__main__":
    main()

"""A tiny LongCat-Flash checkpoint built deterministically from a fixed seed (no download needed).

Layout is the HF transformers 4.57 one (spec §5): per-expert keys, router classifier +
e_score_correction_bias, bf16 safetensors, config.json as `save_pretrained` writes it, and a byte-level
BPE tokenizer with the LongCat special tokens and chat template. The same bytes result on every machine:
weights come from uniform draws of a seeded CPU `torch.Generator` (serial, unlike the vectorised normal
sampler) in fp32, then one cast to bf16; the tokenizer merges are learned by a tie-broken count over an
embedded text. This module deliberately does not import the model code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from longcat_service import envs
from longcat_service.chat_template import LONGCAT_CHAT_TEMPLATE

DEMO_FORMAT_VERSION = 1  # bump when the construction below changes
DEMO_SEED = 20250901

SPECIAL_TOKENS = ("<unk>", "<longcat_s>", "</longcat_s>", "<longcat_pad>")  # ids 0..3: unk, bos, eos, pad

DEMO_CONFIG = {
    "architectures": ["LongcatFlashForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "dtype": "bfloat16",
    "eos_token_id": 2,
    "expert_ffn_hidden_size": 128,
    "ffn_hidden_size": 512,
    "head_dim": 16,  # must equal qk_rope_head_dim: HF sizes RoPE's inv_freq from head_dim (spec §8.3)
    "hidden_act": "silu",
    "hidden_size": 256,
    "initializer_range": 0.02,
    "kv_lora_rank": 64,
    "max_position_embeddings": 4096,
    "mla_scale_kv_lora": True,
    "mla_scale_q_lora": True,
    "model_type": "longcat_flash",
    "moe_topk": 4,
    "n_routed_experts": 16,
    "num_attention_heads": 8,
    "num_hidden_layers": 4,  # HF 4.57 saves 2 * num_layers (attention sublayers), spec §8.2
    "num_key_value_heads": 8,
    "num_layers": 2,
    "pad_token_id": 3,
    "q_lora_rank": 128,
    "qk_head_dim": 48,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000000.0,
    "routed_scaling_factor": 6.0,
    "router_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",  # pre-4.56 name of "dtype"; kept for readers that only know it
    "transformers_version": "4.57.6",
    "use_cache": True,
    "v_head_dim": 32,
    "vocab_size": 512,
    "zero_expert_num": 8,
    "zero_expert_type": "identity",
}

# Standard deviations of the uniform init (uniform so that draws are serial and machine-independent).
INIT_STD = {"embed": 0.05, "lm_head": 0.05, "router": 0.05, "linear": 0.03, "norm": 0.05, "bias": 0.01}

# Merges are learned from this text (any fixed text works; it only has to yield enough distinct pairs).
CORPUS = """\
The cat sat in the warm sun by the window and watched the birds in the garden. It was a long day, and the
cat was in no hurry. A small bird landed on the fence, looked at the cat, and then flew away over the
houses. The wind moved the leaves of the old tree, and the light changed from gold to grey.
In the kitchen, someone was making tea. The kettle sang, the cups were set out on the table, and the
smell of fresh bread filled the room. There were apples in a bowl, a jar of honey, and a plate of
cheese. People came in one by one, talked about the weather, and sat down to eat together.
Language models read text as a sequence of tokens. Each token is a piece of a word, a whole word, or a
single byte. A model learns which token is likely to come next, given all of the tokens that came
before it. To answer a question, it writes one token at a time until it reaches the end of its answer.
A mixture of experts sends every token to a few of many small networks. A router scores the experts,
picks the best ones, and adds their outputs together with the scores as weights. Some experts do no
work at all and simply pass the input through, which saves time when the token is easy.
The service accepts requests over the network, schedules them in batches, and streams the new text
back to each client as soon as it is ready. When a request is cancelled, its memory is returned so
that other requests can use it. Health checks tell the load balancer whether the server is ready.
What is the capital of France? Paris is the capital of France. How many legs does a cat have? A cat
has four legs. Please write a short poem about the sea. The sea is wide, the sea is deep, it sings
the sailors all to sleep. Thank you! You are welcome. Can you help me with my homework? Of course.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 2025. Code: def main(): return 0; if x == 1: print(x)
"""


def ensure_demo_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the demo checkpoint dir `<cache_dir>/demo-<hash>`, writing it first if missing.

    `cache_dir` defaults to `$LONGCAT_CACHE_DIR`, else `~/.cache/longcat_service`. The directory is built
    under a temporary name and renamed into place, so concurrent callers never see a partial one.
    """
    root = Path(cache_dir or envs.LONGCAT_CACHE_DIR or Path.home() / ".cache" / "longcat_service")
    target = root / f"demo-{demo_version_hash()}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        write_demo_model(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # a real failure, not another process winning the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def demo_version_hash() -> str:
    recipe = {
        "format": DEMO_FORMAT_VERSION,
        "seed": DEMO_SEED,
        "config": DEMO_CONFIG,
        "init": INIT_STD,
        "special": SPECIAL_TOKENS,
        "corpus": CORPUS,
        "chat_template": LONGCAT_CHAT_TEMPLATE,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def write_demo_model(out_dir: Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "config.json", DEMO_CONFIG)
    _write_json(
        out_dir / "generation_config.json",
        {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
         "transformers_version": DEMO_CONFIG["transformers_version"]},
    )
    build_demo_tokenizer().save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config())
    save_file(demo_state_dict(), str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def demo_param_specs(cfg: dict = DEMO_CONFIG) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init kind) in generation order: the order fixes which random numbers each tensor gets."""
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    qk_head = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    r_q, r_kv, rope = cfg["q_lora_rank"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    ffn, eff = cfg["ffn_hidden_size"], cfg["expert_ffn_hidden_size"]
    n_router = cfg["n_routed_experts"] + cfg["zero_expert_num"]
    specs = [("model.embed_tokens.weight", (cfg["vocab_size"], h), "embed")]
    for i in range(cfg["num_layers"]):
        p = f"model.layers.{i}."
        for j in range(2):
            a = f"{p}self_attn.{j}."
            specs += [
                (f"{p}input_layernorm.{j}.weight", (h,), "norm"),
                (f"{a}q_a_proj.weight", (r_q, h), "linear"),
                (f"{a}q_a_layernorm.weight", (r_q,), "norm"),
                (f"{a}q_b_proj.weight", (nh * qk_head, r_q), "linear"),
                (f"{a}kv_a_proj_with_mqa.weight", (r_kv + rope, h), "linear"),
                (f"{a}kv_a_layernorm.weight", (r_kv,), "norm"),
                (f"{a}kv_b_proj.weight", (nh * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), r_kv), "linear"),
                (f"{a}o_proj.weight", (h, nh * cfg["v_head_dim"]), "linear"),
                (f"{p}post_attention_layernorm.{j}.weight", (h,), "norm"),
                (f"{p}mlps.{j}.gate_proj.weight", (ffn, h), "linear"),
                (f"{p}mlps.{j}.up_proj.weight", (ffn, h), "linear"),
                (f"{p}mlps.{j}.down_proj.weight", (h, ffn), "linear"),
            ]
        specs += [
            (f"{p}mlp.router.classifier.weight", (n_router, h), "router"),
            (f"{p}mlp.router.e_score_correction_bias", (n_router,), "bias"),
        ]
        for e in range(cfg["n_routed_experts"]):
            x = f"{p}mlp.experts.{e}."
            specs += [
                (f"{x}gate_proj.weight", (eff, h), "linear"),
                (f"{x}up_proj.weight", (eff, h), "linear"),
                (f"{x}down_proj.weight", (h, eff), "linear"),
            ]
    specs += [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (cfg["vocab_size"], h), "lm_head")]
    return specs


def demo_state_dict() -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(DEMO_SEED)
    state = {}
    for name, shape, kind in demo_param_specs():
        # uniform on [-sqrt(3)·std, sqrt(3)·std] has standard deviation std
        noise = (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * (math.sqrt(3) * INIT_STD[kind])
        value = 1.0 + noise if kind == "norm" else noise
        state[name] = value.to(torch.bfloat16).contiguous()
    return state


def build_demo_tokenizer() -> Tokenizer:
    """Byte-level BPE: 4 special tokens, the 256 byte symbols, then merges learned on CORPUS up to vocab_size."""
    byte_symbols = list(_bytes_to_unicode().values())  # in byte order 0..255
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for symbol in byte_symbols:
        vocab[symbol] = len(vocab)
    merges = _learn_merges(DEMO_CONFIG["vocab_size"] - len(vocab))
    for a, b in merges:
        vocab[a + b] = len(vocab)
    if len(vocab) != DEMO_CONFIG["vocab_size"]:
        raise RuntimeError(f"demo tokenizer built {len(vocab)} tokens, expected {DEMO_CONFIG['vocab_size']}")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _learn_merges(num_merges: int) -> list[tuple[str, str]]:
    # Plain BPE training: repeatedly merge the most frequent adjacent pair; ties go to the smallest pair
    # (lexicographic), so the result never depends on hash or thread order.
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    word_counts = Counter(piece for piece, _ in pre.pre_tokenize_str(CORPUS))
    words = {w: list(w) for w in word_counts}
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter = Counter()
        for w, symbols in words.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += word_counts[w]
        if not pairs:
            raise RuntimeError("demo tokenizer corpus ran out of pairs to merge")
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged = best[0] + best[1]
        for w, symbols in words.items():
            i, out = 0, []
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            words[w] = out
    return merges


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's printable stand-ins for bytes, the alphabet of the ByteLevel pre-tokenizer.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _tokenizer_config() -> dict:
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": SPECIAL_TOKENS[1],
        "chat_template": LONGCAT_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": SPECIAL_TOKENS[2],
        "model_max_length": DEMO_CONFIG["max_position_embeddings"],
        "pad_token": SPECIAL_TOKENS[3],
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": SPECIAL_TOKENS[0],
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")

"""Held-out metrics of a checkpoint's MTP layer, computed with the trainer's plain-PyTorch model (which matches
transformers' main-model logits; tests/test_demo_trained.py) over full windows; the engine's own acceptance with
MTP speculative decoding on is measured by benchmarks/bench_mtp.py.

    python -m longcat_service.eval.mtp [--model DIR]      # default: the built-in demo checkpoint

Prints next-token loss/perplexity, the MTP's next-next-token loss, its top-1 accuracy against the data (mtp_acc),
and its top-1 agreement with the main model's own greedy next-next token (mtp_agree: what a one-token speculative
draft would have accepted under greedy decoding).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer


def evaluate_checkpoint(model_dir: str | Path, seq_len: int = 256, batch: int = 16, device: str = "cpu") -> dict:
    from longcat_service.demo.corpus import load_corpus
    from longcat_service.demo.modeling import TrainableLongcatFlash
    from longcat_service.demo.train import _load_hf_state, encode_docs, evaluate, split_corpus

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    model = TrainableLongcatFlash(cfg)
    _load_hf_state(model, load_file(str(model_dir / "model.safetensors")))
    model.to(device).eval()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    stream = encode_docs(tok, split_corpus(load_corpus())[1])
    res = evaluate(model, stream, seq_len, batch, torch.device(device), lambda: torch.autocast("cpu", enabled=False))
    return {"model": str(model_dir), "heldout_tokens": stream.numel(), **res}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Held-out MTP metrics of a checkpoint.")
    p.add_argument("--model", default=None, help="checkpoint dir (default: the built-in demo model)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.model is None:
        from longcat_service.demo import DEMO_CHECKPOINT_DIR

        args.model = DEMO_CHECKPOINT_DIR
    res = evaluate_checkpoint(args.model, device=args.device)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()

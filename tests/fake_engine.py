"""A scriptable stand-in for AsyncEngine (same API) for the server's fault-injection tests:
stalls before the first token, huge chunks, engine failures, an unhealthy engine. Correctness tests
use the real engine on the demo model."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from longcat_service.engine.errors import PromptError
from longcat_service.outputs import CompletionOutput, RequestMetrics, RequestOutput

VOCAB_SIZE = 256


class ByteTokenizer:
    """One token per byte; enough for the servicer (encode, vocab, special tokens, chat template)."""

    vocab_size = VOCAB_SIZE
    eos_token_id = 0
    bos_token_id = 1
    special_tokens = {"<eos>": 0, "<bos>": 1}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant:" if add_generation_prompt else "")


@dataclass
class Script:
    """How the fake engine behaves for every request."""

    step_delay_s: float = 0.001
    token_text: str = "x"  # text of every output token (make it large to fill the transport)
    hold: asyncio.Event | None = None  # when set: wait for it before the first token (requests stay queued)
    fail_after_tokens: int | None = None  # raise RuntimeError after this many tokens
    finish_with_error: bool = False  # finish the request with finish_reason "error" instead
    outputs: tuple[str, ...] = ()  # when set: the text of each output token in turn, then finish_reason "stop"


@dataclass
class FakeEngine:
    script: Script = field(default_factory=Script)
    healthy: bool = True
    max_model_len: int = 512

    def __post_init__(self):
        self.tokenizer = ByteTokenizer()
        self.model_config = SimpleNamespace(
            vocab_size=VOCAB_SIZE, hidden_size=8, num_layers=1, num_attention_heads=1, n_routed_experts=4,
            zero_expert_num=2, moe_topk=2, torch_dtype="float32")
        self.running: set[str] = set()
        self.aborted: list[str] = []  # ids aborted by abort() or by leaving the stream early
        self.finished: list[str] = []
        self.tokens_produced: dict[str, int] = {}
        self.prompts: dict[str, list[int]] = {}  # request id -> prompt token ids
        self._abort_flags: dict[str, asyncio.Event] = {}
        self.started = False

    async def start(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        self.started = False

    def is_healthy(self) -> bool:
        return self.healthy

    def load(self):
        return SimpleNamespace(num_running=len(self.running), num_waiting=0, num_waiting_tokens=0, kv_cache_usage=0.0)

    async def abort(self, request_id: str) -> bool:
        if request_id not in self.running:
            return False
        self._abort_flags[request_id].set()
        return True

    async def generate(self, prompt_token_ids, sampling_params, request_id, deadline=None):
        if not prompt_token_ids:
            raise PromptError("prompt", "the prompt is empty")
        if len(prompt_token_ids) + 1 > self.max_model_len:
            raise PromptError("prompt", f"{len(prompt_token_ids)} tokens do not fit max_model_len {self.max_model_len}")
        self.running.add(request_id)
        self.prompts[request_id] = list(prompt_token_ids)
        self._abort_flags[request_id] = abort_flag = asyncio.Event()
        seq = CompletionOutput(index=0)
        metrics = RequestMetrics(arrival_time=time.monotonic())
        out = RequestOutput(request_id, list(prompt_token_ids), [seq], metrics=metrics)
        s = self.script
        clean_exit = False
        try:
            if s.hold is not None:
                await s.hold.wait()
            while True:
                seq.new_token_ids, seq.text_delta = [], ""
                if abort_flag.is_set():
                    seq.finish_reason = "abort"
                elif deadline is not None and time.monotonic() >= deadline:
                    seq.finish_reason = "deadline"
                elif s.fail_after_tokens is not None and len(seq.token_ids) >= s.fail_after_tokens:
                    raise RuntimeError("injected engine failure")
                elif s.finish_with_error and seq.token_ids:
                    seq.finish_reason, out.error = "error", "injected error"
                else:
                    text = s.outputs[len(seq.token_ids)] if s.outputs else s.token_text
                    seq.new_token_ids = [ord("x")]
                    seq.text_delta = text
                    seq.token_ids.append(ord("x"))
                    self.tokens_produced[request_id] = len(seq.token_ids)
                    seq.text += text
                    if s.outputs and len(seq.token_ids) == len(s.outputs):
                        seq.finish_reason = "stop"
                    elif len(seq.token_ids) >= (sampling_params.max_tokens or self.max_model_len):
                        seq.finish_reason = "length"
                out.finished = seq.finished
                yield out
                if out.finished:
                    clean_exit = True
                    return
                await asyncio.sleep(s.step_delay_s)
        finally:
            self.running.discard(request_id)
            (self.finished if clean_exit and seq.finish_reason != "abort" else self.aborted).append(request_id)

"""Offline batch API in the vLLM convention: `LLM(...).generate(prompts, sampling_params)`."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence

from longcat_service.engine.engine_args import EngineArgs
from longcat_service.engine.llm_engine import LLMEngine
from longcat_service.outputs import RequestOutput
from longcat_service.sampling_params import SamplingParams

PromptInput = str | Sequence[int] | Mapping


class LLM:
    """Load a LongCat-Flash checkpoint (None: the built-in demo model) and generate offline.

    `engine_kwargs` are EngineArgs fields (block_size, num_kv_blocks, max_num_seqs, max_model_len, ...).
    """

    def __init__(
        self,
        model: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        load_format: str = "auto",
        seed: int = 0,
        **engine_kwargs,
    ):
        args = EngineArgs(model=model, dtype=dtype, device=device, load_format=load_format, seed=seed, **engine_kwargs)
        self.engine = LLMEngine(args)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.tokenizer

    def close(self) -> None:
        """Stop a tensor-parallel engine's worker ranks and leave its process group, so that another LLM can be
        created in this process (it is refused while one with tensor_parallel_size > 1 is open). Also on exit of
        `with LLM(...) as llm:`; harmless at tp 1 and when called twice."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """prompts: a string, a list of strings, a list of token-id lists, or dicts with "prompt" or
        "prompt_token_ids". Returns one finished RequestOutput per prompt, in input order."""
        token_lists = [self._to_token_ids(p, i) for i, p in enumerate(self._as_list(prompts))]
        if sampling_params is None:
            params = [SamplingParams()] * len(token_lists)
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(token_lists)
        else:
            params = list(sampling_params)
            if len(params) != len(token_lists):
                raise ValueError(f"sampling_params: {len(params)} given for {len(token_lists)} prompts")
        for ids, p in zip(token_lists, params, strict=True):  # validate all before queueing any
            self.engine.validate_request(ids, p)
        request_ids = [f"llm-{next(self._ids)}" for _ in token_lists]
        for rid, ids, p in zip(request_ids, token_lists, params, strict=True):
            self.engine.add_request(rid, ids, p)
        finished: dict[str, RequestOutput] = {}
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
        except BaseException:
            for rid in request_ids:
                self.engine.abort_request(rid)
            raise
        return [finished[rid] for rid in request_ids]

    def chat(
        self,
        messages: Sequence[Mapping] | Sequence[Sequence[Mapping]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them, through the chat template."""
        if self.tokenizer is None:
            raise ValueError("messages: this model has no tokenizer (no tokenizer.json) to render a chat")
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        prompts = [
            {"prompt": self.tokenizer.apply_chat_template(list(c), add_generation_prompt=add_generation_prompt),
             "add_special_tokens": False}
            for c in conversations
        ]
        return self.generate(prompts, sampling_params)

    @staticmethod
    def _as_list(prompts) -> list:
        if isinstance(prompts, (str, Mapping)):
            return [prompts]
        if not isinstance(prompts, Iterable):
            raise TypeError(f"prompts: expected a string, token ids, a dict or a list of them, got "
                            f"{type(prompts).__name__}")
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]  # a single token-id prompt
        return prompts

    def _to_token_ids(self, prompt, index: int) -> list[int]:
        if self.tokenizer is None and (isinstance(prompt, str) or (isinstance(prompt, Mapping) and "prompt" in prompt
                                                                   and "prompt_token_ids" not in prompt)):
            raise ValueError(f"prompts[{index}]: this model has no tokenizer (no tokenizer.json); pass token ids")
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, Mapping):
            if "prompt_token_ids" in prompt:
                return list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self.tokenizer.encode(prompt["prompt"], add_special_tokens=prompt.get("add_special_tokens", True))
            raise ValueError(f"prompts[{index}]: a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, Sequence):
            return list(prompt)
        raise TypeError(f"prompts[{index}]: expected a string, token ids or a dict, got {type(prompt).__name__}")

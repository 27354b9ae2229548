"""Token text for logprobs: each token decoded alone (special tokens included), or `token_id:N` without a
tokenizer (vLLM's convention for token-id-only models)."""

from __future__ import annotations

from longcat_service.outputs import Logprob
from longcat_service.server.openai_api.protocol import TokenLogprobEntry, TopLogprob


class TokenText:
    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = (self._tokenizer.decode([token_id], skip_special_tokens=False) if self._tokenizer is not None
                    else f"token_id:{token_id}")
            if len(self._cache) < 65536:
                self._cache[token_id] = text
        return text

    def chat_entries(self, logprobs: list[Logprob], top_n: int) -> list[TokenLogprobEntry]:
        entries = []
        for lp in logprobs:
            token = self(lp.token_id)
            top = sorted(lp.top.items(), key=lambda kv: -kv[1])[:top_n]
            entries.append(TokenLogprobEntry(
                token=token, logprob=lp.logprob, bytes=list(token.encode()),
                top_logprobs=[TopLogprob(token=self(t), logprob=v, bytes=list(self(t).encode())) for t, v in top]))
        return entries

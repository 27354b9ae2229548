"""Tokenizer: `tokenizer.json` through the `tokenizers` library, plus special tokens and the chat template
from `tokenizer_config.json` (falling back to config.json's bos/eos ids)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from longcat_service.chat_template import render_chat_template

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class Tokenizer:
    def __init__(self, backend: HFTokenizer, tokenizer_config: Mapping | None = None, model_config: Mapping | None = None):
        self._tok = backend
        tokenizer_config = dict(tokenizer_config or {})
        model_config = dict(model_config or {})
        self.chat_template: str | None = _chat_template_from(tokenizer_config)
        self._add_bos_token = bool(tokenizer_config.get("add_bos_token", False))

        # Named special tokens (bos/eos/...) as strings; the config may give a string or an AddedToken dict.
        self.special_token_names: dict[str, str] = {}
        for key in _SPECIAL_TOKEN_KEYS:
            content = _token_content(tokenizer_config.get(key))
            if content is not None and backend.token_to_id(content) is not None:
                self.special_token_names[key] = content

        self.bos_token_id = self._named_id("bos_token", model_config.get("bos_token_id"))
        self.eos_token_id = self._named_id("eos_token", model_config.get("eos_token_id"))
        self.pad_token_id = self._named_id("pad_token", model_config.get("pad_token_id"))
        self.unk_token_id = self._named_id("unk_token", None)

        # special_tokens: token string -> id for every special token the checkpoint declares.
        special: dict[str, int] = {}
        for added in backend.get_added_tokens_decoder().values():
            if added.special:
                special[added.content] = backend.token_to_id(added.content)
        for id_str, entry in (tokenizer_config.get("added_tokens_decoder") or {}).items():
            if isinstance(entry, Mapping) and entry.get("special", False) and "content" in entry:
                special[entry["content"]] = int(id_str)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            token_id = getattr(self, name)
            if token_id is not None:
                special[self.id_to_token(token_id) or f"<id:{token_id}>"] = token_id
        self.special_tokens: dict[str, int] = dict(sorted(special.items(), key=lambda kv: kv[1]))
        self.all_special_ids: list[int] = sorted(set(self.special_tokens.values()))

    def _named_id(self, key: str, fallback) -> int | None:
        if key in self.special_token_names:
            return self._tok.token_to_id(self.special_token_names[key])
        if isinstance(fallback, list):  # config.json may list several eos ids; the first is the canonical one
            fallback = fallback[0] if fallback else None
        return int(fallback) if fallback is not None else None

    @property
    def bos_token(self) -> str | None:
        return self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self.id_to_token(self.eos_token_id) if self.eos_token_id is not None else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:  # a lone surrogate (a Python str can hold one) reads "TextInputSequence must be str"
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"text contains an unpaired UTF-16 surrogate at character {e.start} (not valid "
                                 "Unicode text)") from None
            raise
        # Like transformers' fast tokenizers: add_bos_token in tokenizer_config asks for a BOS even when
        # tokenizer.json carries no post-processor that adds it.
        if add_special_tokens and self._add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        return [self._tok.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        """Join tokens through the decoder (byte-level tokens are not plain text on their own)."""
        if self._tok.decoder is None:
            return "".join(tokens)
        return self._tok.decoder.decode(list(tokens))

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render the prompt string (no tokenization); LongCat's format when the checkpoint has no template."""
        return render_chat_template(
            messages,
            self.chat_template,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_token_names,
            **kwargs,
        )

    def __len__(self) -> int:
        return self.vocab_size


def has_tokenizer(model_dir: str | Path) -> bool:
    """Whether the checkpoint ships a fast tokenizer (dummy-weight benchmark configs hold only config.json)."""
    return (Path(model_dir) / "tokenizer.json").is_file()


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    model_dir = Path(model_dir)
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"tokenizer.json not found: {tokenizer_file} (the model directory needs a fast tokenizer)")
    backend = HFTokenizer.from_file(str(tokenizer_file))
    tokenizer_config = _read_json(model_dir / "tokenizer_config.json")
    # transformers >= 4.50 may save the template as a separate file, which then takes precedence.
    template_file = model_dir / "chat_template.jinja"
    if template_file.is_file():
        tokenizer_config["chat_template"] = template_file.read_text(encoding="utf-8")
    return Tokenizer(backend, tokenizer_config=tokenizer_config, model_config=_read_json(model_dir / "config.json"))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path.name}: invalid JSON ({e})") from e


def _token_content(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _chat_template_from(tokenizer_config: Mapping) -> str | None:
    template = tokenizer_config.get("chat_template")
    # Some checkpoints ship a list of named templates; "default" is the one transformers picks.
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None

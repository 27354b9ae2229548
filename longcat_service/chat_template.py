"""Chat prompt rendering: a checkpoint's jinja chat template, or LongCat-Flash-Chat's format by default.

The jinja environment mirrors transformers' `apply_chat_template` (sandboxed, trim/lstrip blocks,
`raise_exception`, `tojson`, `strftime_now`, `bos_token`/`eos_token` variables) so that a checkpoint's
template renders the same string here as it does there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

VALID_ROLES = ("system", "user", "assistant")
LONGCAT_EOS = "</longcat_s>"

# LongCat-Flash-Chat (spec §6): `SYSTEM:{s} [Round 0] USER:{q} ASSISTANT:{a}</longcat_s> [Round 1] USER:{q1} ASSISTANT:`.
# No BOS. Shipped as jinja too so a checkpoint (the demo model) can carry it in tokenizer_config.json;
# it must render exactly what `render_longcat_chat` renders (tested).
LONGCAT_CHAT_TEMPLATE = (
    "{%- set ns = namespace(round=0) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}{{- raise_exception('a system message is only allowed first') -}}{%- endif -%}"
    "{{- 'SYSTEM:' + message['content'] -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- ('' if loop.first else ' ') + '[Round ' + ns.round|string + '] USER:' + message['content'] -}}"
    "{%- set ns.round = ns.round + 1 -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ASSISTANT:' + message['content'] + '</longcat_s>' -}}"
    "{%- else -%}"
    "{{- raise_exception('unknown role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' ASSISTANT:' -}}{%- endif -%}"
)


class ChatTemplateError(ValueError):
    """Bad chat input or template; `.field` names the offending field (e.g. `messages[2].role`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def validate_messages(messages: object) -> list[Mapping]:
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise ChatTemplateError("messages", f"must be a list of {{role, content}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ChatTemplateError("messages", "must contain at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"messages[{i}]", f"must be a dict with role and content, got {type(message).__name__}")
        role = message.get("role")
        if role not in VALID_ROLES:
            raise ChatTemplateError(f"messages[{i}].role", f"must be one of {', '.join(VALID_ROLES)}, got {role!r}")
        if role == "system" and i != 0:
            raise ChatTemplateError(f"messages[{i}].role", "a system message is only allowed as the first message")
        content = message.get("content")
        if not isinstance(content, str):
            raise ChatTemplateError(f"messages[{i}].content", f"must be a string, got {type(content).__name__}")
    return list(messages)


def render_longcat_chat(messages: Sequence[Mapping], add_generation_prompt: bool = True) -> str:
    """LongCat-Flash-Chat's format in plain Python (the default when a checkpoint has no template)."""
    parts: list[str] = []
    round_index = 0
    for message in validate_messages(messages):
        role, content = message["role"], message["content"]
        if role == "system":
            parts.append(f"SYSTEM:{content}")
        elif role == "user":
            parts.append(f"{' ' if parts else ''}[Round {round_index}] USER:{content}")
            round_index += 1
        else:
            parts.append(f" ASSISTANT:{content}{LONGCAT_EOS}")
    if add_generation_prompt:
        parts.append(" ASSISTANT:")
    return "".join(parts)


def render_chat_template(
    messages: Sequence[Mapping],
    template: str | None = None,
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str] | None = None,
    **template_kwargs,
) -> str:
    """Render `messages` with a jinja `template` (transformers semantics), or LongCat's format if None.

    `special_tokens` supplies template variables such as `bos_token`/`eos_token` (names -> token strings).
    """
    messages = validate_messages(messages)
    if template is None:
        return render_longcat_chat(messages, add_generation_prompt)
    variables = {"bos_token": "", "eos_token": "", **(special_tokens or {}), **template_kwargs}
    compiled = _compile(template)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except _TemplateRaised as e:  # the template's own raise_exception(): it rejected the conversation
        raise ChatTemplateError("messages", str(e)) from e
    except jinja2.TemplateError as e:
        raise ChatTemplateError("chat_template", f"rendering failed: {e}") from e


class _TemplateRaised(jinja2.TemplateError):
    pass


def _raise_exception(message: str):
    raise _TemplateRaised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's built-in tojson HTML-escapes; transformers overrides it the same way.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    if not isinstance(template, str) or not template:
        raise ChatTemplateError("chat_template", "must be a non-empty string")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError("chat_template", f"invalid jinja syntax (line {e.lineno}): {e.message}") from e

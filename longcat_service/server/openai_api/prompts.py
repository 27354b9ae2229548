"""OpenAI chat messages and tools -> the LongCat prompt; completion prompts -> token ids.

Messages go through the checkpoint's chat template (LongCat-Flash-Chat's format by default). Tools follow spec §6:
the `## Tools` description, then `## Messages` and the rendered conversation. An assistant turn's tool calls are
written back as `<longcat_tool_call>` blocks, and tool results as a user turn of `<longcat_tool_response>` blocks
(that tag is what third-party LongCat templates use; the released template is unverified). tool_choice "required"
and a named function open the assistant turn with `<longcat_tool_call>` (and the function's name), so that the
model continues a call instead of being asked politely; the parser reads that prefix as part of the output."""

from __future__ import annotations

import json
from dataclasses import dataclass

from longcat_service.chat_template import ChatTemplateError
from longcat_service.server.convert import MAX_CHARS_PER_TOKEN, MAX_CHAT_MESSAGES
from longcat_service.server.openai_api.errors import invalid
from longcat_service.server.openai_api.protocol import ChatCompletionRequest, ChatMessage, Tool
from longcat_service.server.openai_api.tool_parser import TOOL_CALL_END, TOOL_CALL_START

TOOL_RESPONSE_START = "<longcat_tool_response>"
TOOL_RESPONSE_END = "</longcat_tool_response>"
MAX_TOOLS = 128

TOOL_CALL_NOTE = (
    "**Note**: For each function call, return a json object with function name and arguments within "
    f"{TOOL_CALL_START}{TOOL_CALL_END} XML tags as follows:\n"
    f'{TOOL_CALL_START}\n{{"name": <function-name>, "arguments": <args-dict>}}\n{TOOL_CALL_END}\n'
    f"When several functions are called at once, wrap each call in its own {TOOL_CALL_START} tags, one after another."
)


@dataclass
class ChatPrompt:
    text: str
    token_ids: list[int]
    output_prefix: str = ""  # the forced start of the assistant turn: the parsers see it before the output
    tools_enabled: bool = False


def tool_description(tools: list[Tool]) -> str:
    parts = ["## Tools\nYou have access to the following tools: \n\n### Tool namespace: function\n"]
    for tool in tools:
        fn = tool.function
        schema = json.dumps(fn.parameters if fn.parameters is not None else {"type": "object", "properties": {}},
                            indent=2, ensure_ascii=False)
        parts.append(f"\n#### Tool name: {fn.name}\n\nDescription: {fn.description or ''}\n\nInputSchema: \n{schema}\n")
    parts.append("\n" + TOOL_CALL_NOTE)
    return "".join(parts)


def _text_of(message: ChatMessage, i: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise invalid(f"messages[{i}].content[{j}]", f"only text parts are supported, got type {part.type!r}")
        texts.append(part.text)
    return "".join(texts)


def _call_block(message: ChatMessage, i: int) -> str:
    blocks = []
    for j, call in enumerate(message.tool_calls or ()):
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except ValueError as e:
            raise invalid(f"messages[{i}].tool_calls[{j}].function.arguments", f"not valid JSON ({e})") from e
        body = json.dumps({"name": call.function.name, "arguments": arguments}, ensure_ascii=False)
        blocks.append(f"{TOOL_CALL_START}{body}{TOOL_CALL_END}")
    return "".join(blocks)


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """OpenAI messages -> the {role, content} turns of the chat template."""
    if not messages:
        raise invalid("messages", "must contain at least one message")
    if len(messages) > MAX_CHAT_MESSAGES:
        raise invalid("messages", f"{len(messages)} messages is more than the limit of {MAX_CHAT_MESSAGES}")
    turns: list[dict] = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if m.content is None and role in ("system", "user", "tool"):  # as OpenAI: an assistant turn may omit it
            raise invalid(f"messages[{i}].content", f"required for role {m.role!r}")
        text = _text_of(m, i)
        if role == "tool":
            block = f"{TOOL_RESPONSE_START}{text}{TOOL_RESPONSE_END}"
            if turns and turns[-1].get("_tool"):  # consecutive results: one user turn
                turns[-1]["content"] += "\n" + block
            else:
                turns.append({"role": "user", "content": block, "_tool": True})
            continue
        if role == "assistant":
            text += _call_block(m, i)
        elif m.tool_calls:
            raise invalid(f"messages[{i}].tool_calls", "only assistant messages carry tool calls")
        turns.append({"role": role, "content": text, "_index": i})
    return turns


def render_chat(request: ChatCompletionRequest, tokenizer, max_model_len: int) -> ChatPrompt:
    if tokenizer is None:
        raise invalid("messages", "this model has no tokenizer (no tokenizer.json in its checkpoint); "
                                  "use /v1/completions with token ids")
    turns = template_messages(request.messages)
    max_chars = max_model_len * MAX_CHARS_PER_TOKEN
    total = 0
    for t in turns:
        total += len(t["content"])
        if total > max_chars:
            raise invalid("messages", f"the messages exceed the limit of {max_chars} characters")
    try:
        text = tokenizer.apply_chat_template([{"role": t["role"], "content": t["content"]} for t in turns],
                                             add_generation_prompt=True)
    except ChatTemplateError as e:
        raise invalid(_original_field(e.field, turns), e.message) from e
    tools, prefix = _active_tools(request)
    if tools:
        text = f"{tool_description(tools)}\n\n## Messages\n{text}"
    text += prefix
    # The rendered template holds its own special tokens (as in LLM.chat and the gRPC messages prompt).
    return ChatPrompt(text, tokenizer.encode(text, add_special_tokens=False), prefix, bool(tools))


def _active_tools(request: ChatCompletionRequest) -> tuple[list[Tool], str]:
    tools = list(request.tools or [])
    if len(tools) > MAX_TOOLS:
        raise invalid("tools", f"at most {MAX_TOOLS} tools, got {len(tools)}")
    choice = request.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return [], ""
    if not tools:
        raise invalid("tool_choice", f"{choice if isinstance(choice, str) else 'a named function'} needs tools")
    if choice == "auto":
        return tools, ""
    if choice == "required":
        return tools, TOOL_CALL_START
    named = [t for t in tools if t.function.name == choice.function.name]
    if not named:
        raise invalid("tool_choice.function.name", f"{choice.function.name!r} is not one of the tools")
    return named, f'{TOOL_CALL_START}{{"name": {json.dumps(choice.function.name, ensure_ascii=False)}, "arguments": '


def _original_field(field: str, turns: list[dict]) -> str:
    """The template names `messages[k]` of its own turn list; report the request's message index."""
    if field.startswith("messages[") and "]" in field:
        k = int(field[len("messages["):field.index("]")])
        if 0 <= k < len(turns) and "_index" in turns[k]:
            return f"messages[{turns[k]['_index']}]" + field[field.index("]") + 1:]
    return field


def completion_prompts(prompt, tokenizer, max_model_len: int) -> list[list[int]]:
    """/v1/completions prompt (a string, strings, token ids, lists of token ids) -> token-id prompts."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise invalid("prompt", "must not be empty")
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    out = []
    max_chars = max_model_len * MAX_CHARS_PER_TOKEN
    for i, p in enumerate(prompt):
        if isinstance(p, list):
            out.append(list(p))
            continue
        if tokenizer is None:
            raise invalid("prompt", "this model has no tokenizer (no tokenizer.json); send token ids")
        if not p:
            raise invalid(f"prompt[{i}]", "the prompt is empty")
        if len(p) > max_chars:
            raise invalid(f"prompt[{i}]", f"{len(p)} characters is more than the limit of {max_chars}")
        out.append(tokenizer.encode(p, add_special_tokens=True))  # as the gRPC text prompt and the offline LLM
    if len(out) > 64:
        raise invalid("prompt", f"at most 64 prompts per request, got {len(out)}")
    return out

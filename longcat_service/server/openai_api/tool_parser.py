"""LongCat tool calls in model output: `<longcat_tool_call>{"name": ..., "arguments": {...}}</longcat_tool_call>`.

A block whose body is not a JSON object with a string `name` and object `arguments` stays in the content, tags and
all: the client sees what the model wrote and the request never fails on it. The streaming parser emits each call as
soon as its closing tag arrives (arguments in one piece: a call is only known to be well-formed when it is complete,
and an already sent call cannot be taken back), and content as it arrives, holding back only what might still turn
out to be a tag or whitespace before a call. Its content and calls equal the one-shot parser's on the same text,
however it is split."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

TOOL_CALL_START = "<longcat_tool_call>"
TOOL_CALL_END = "</longcat_tool_call>"


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def parse_call_body(body: str) -> ParsedToolCall | None:
    """The call in one block's body, or None when it is not a well-formed call."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models emit the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def extract_tool_calls(text: str) -> tuple[str | None, list[ParsedToolCall]]:
    """(content, calls) of a complete output. Without calls the content is the text unchanged; with calls, the
    text outside the well-formed blocks without trailing whitespace (None when nothing is left)."""
    parser = ToolCallStreamParser()
    events = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if e.call is None)
    calls = [e.call for e in events if e.call is not None]
    return (content or None) if calls else text, calls


@dataclass
class ToolEvent:
    text: str = ""  # content delta (when call is None)
    call: ParsedToolCall | None = None


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag (it may still become the tag)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolCallStreamParser:
    def __init__(self):
        self._pending = ""  # outside a block: text not yet emitted (a possible tag start)
        self._whitespace = ""  # emitted only if more content follows or the output has no calls
        self._block: str | None = None  # inside a block: its body so far
        self.num_calls = 0

    def feed(self, delta: str) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        text = delta
        while text:
            if self._block is None:
                buf = self._pending + text
                text = ""
                start = buf.find(TOOL_CALL_START)
                if start >= 0:
                    self._content(buf[:start], events)
                    self._pending, self._block = "", ""
                    text = buf[start + len(TOOL_CALL_START):]
                else:
                    hold = _held_prefix(buf, TOOL_CALL_START)
                    self._content(buf[:len(buf) - hold], events)
                    self._pending = buf[len(buf) - hold:]
            else:
                body = self._block + text
                text = ""
                end = body.find(TOOL_CALL_END)
                if end < 0:
                    self._block = body
                    continue
                self._block = None
                text = body[end + len(TOOL_CALL_END):]
                call = parse_call_body(body[:end])
                if call is None:
                    self._content(TOOL_CALL_START + body[:end] + TOOL_CALL_END, events)
                else:
                    self._whitespace = ""
                    self.num_calls += 1
                    events.append(ToolEvent(call=call))
        return events

    def finish(self) -> list[ToolEvent]:
        """The output ended: an unclosed block and held text are content."""
        events: list[ToolEvent] = []
        rest = self._pending if self._block is None else TOOL_CALL_START + self._block
        self._pending, self._block = "", None
        self._content(rest, events)
        if self.num_calls == 0 and self._whitespace:
            events.append(ToolEvent(self._whitespace))
        self._whitespace = ""
        return events

    def _content(self, text: str, events: list[ToolEvent]) -> None:
        if not text:
            return
        stripped = text.rstrip()
        if not stripped:
            self._whitespace += text
            return
        events.append(ToolEvent(self._whitespace + stripped))
        self._whitespace = text[len(stripped):]

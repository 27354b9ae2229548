"""LongCat-Flash-Thinking reasoning: output that starts with `<longcat_think>` is reasoning up to `</longcat_think>`,
the rest is content (`--reasoning-parser longcat`). Output that does not start with the tag is all content. The
streaming parser holds back only what may still be a tag; its pieces join to the one-shot parser's result."""

from __future__ import annotations

THINK_START = "<longcat_think>"
THINK_END = "</longcat_think>"
REASONING_PARSERS = ("longcat",)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, content) of a complete output."""
    parser = ReasoningStreamParser()
    pieces = parser.feed(text) + parser.finish()
    reasoning = [t for kind, t in pieces if kind == "reasoning"]
    content = "".join(t for kind, t in pieces if kind == "content")
    return ("".join(reasoning) if parser.saw_reasoning else None), content


class ReasoningStreamParser:
    def __init__(self):
        self._state = "start"  # start -> reasoning -> content, or start -> content
        self._held = ""
        self.saw_reasoning = False

    def feed(self, delta: str) -> list[tuple[str, str]]:
        """[(kind, text)] with kind "reasoning" or "content"."""
        out: list[tuple[str, str]] = []
        text = self._held + delta
        self._held = ""
        if self._state == "start":
            head = text.lstrip()
            if head.startswith(THINK_START):
                self._state, self.saw_reasoning = "reasoning", True
                text = head[len(THINK_START):]
            elif THINK_START.startswith(head):  # empty or a tag prefix: undecided
                self._held = text
                return out
            else:
                self._state = "content"
        if self._state == "reasoning":
            end = text.find(THINK_END)
            if end < 0:
                hold = next((n for n in range(min(len(text), len(THINK_END) - 1), 0, -1)
                             if THINK_END.startswith(text[-n:])), 0)
                if text[:len(text) - hold]:
                    out.append(("reasoning", text[:len(text) - hold]))
                self._held = text[len(text) - hold:]
                return out
            if text[:end]:
                out.append(("reasoning", text[:end]))
            self._state = "content"
            text = text[end + len(THINK_END):]
        if text:
            out.append(("content", text))
        return out

    def finish(self) -> list[tuple[str, str]]:
        held, self._held = self._held, ""
        if not held:
            return []
        return [("reasoning" if self._state == "reasoning" else "content", held)]

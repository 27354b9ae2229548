"""Errors the engine raises for bad requests."""

from __future__ import annotations


class PromptError(ValueError):
    """The prompt cannot be served; `field` names the offending input ("prompt" or "token_ids")."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class EngineArgsError(ValueError):
    """An engine option is invalid; `field` names it."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name

"""Whether the C++ extension's tests may skip. With LONGCAT_REQUIRE_EXTENSION=1 (set by .ci/run) they never skip
for a missing extension: they run, and fail, so a tree that never built `_C` cannot go green."""

from __future__ import annotations

import os

import pytest

import longcat_service.ops as ops

REQUIRE_EXTENSION = os.environ.get("LONGCAT_REQUIRE_EXTENSION") == "1"
HAVE_EXT = ops.ACTIVE_BACKEND.startswith("extension")


def skip_without_extension(available: bool, reason: str):
    """skipif(not available), unless the extension is required."""
    return pytest.mark.skipif(not available and not REQUIRE_EXTENSION, reason=reason)

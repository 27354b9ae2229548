"""With LONGCAT_REQUIRE_EXTENSION=1 (CI) the compiled extension must be the active ops backend."""

import pytest

import longcat_service.ops as ops
from tests.extension_switch import REQUIRE_EXTENSION


@pytest.mark.skipif(not REQUIRE_EXTENSION, reason="LONGCAT_REQUIRE_EXTENSION is not 1")
def test_required_extension_is_the_active_backend():
    assert ops.ACTIVE_BACKEND.startswith("extension"), f"the C++ extension is required, ops backend is {ops.ACTIVE_BACKEND}"
    from longcat_service import _C  # noqa: F401

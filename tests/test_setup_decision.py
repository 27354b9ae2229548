"""setup.py's decision to build the extension (issue 14): no silent pure-Python install (no real pip build here)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

SETUP = runpy.run_path(str(Path(__file__).resolve().parents[1] / "setup.py"), run_name="setup_under_test")
plan = SETUP["extension_plan"]


def test_without_torch_the_build_fails_saying_what_to_run():
    with pytest.raises(Exception, match="torch is not importable") as err:
        plan({}, torch_importable=False)
    text = str(err.value)
    assert "pip install --no-build-isolation ." in text and "LONGCAT_BUILD_EXT=0 pip install ." in text


def test_with_torch_the_extension_is_built():
    assert plan({}, torch_importable=True) is True
    assert plan({"LONGCAT_BUILD_EXT": "1"}, torch_importable=True) is True


@pytest.mark.parametrize("torch_importable", [False, True])
def test_build_ext_0_installs_pure_python_on_purpose(torch_importable):
    assert plan({"LONGCAT_BUILD_EXT": "0"}, torch_importable=torch_importable) is False


def test_an_unknown_build_ext_value_is_refused():
    with pytest.raises(Exception, match="LONGCAT_BUILD_EXT must be 0 or 1"):
        plan({"LONGCAT_BUILD_EXT": "maybe"}, torch_importable=True)

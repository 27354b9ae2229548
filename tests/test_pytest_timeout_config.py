"""The project's pytest configuration turns a hung test into a failure with its traceback, and the run goes on."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_hung_test_fails_with_a_traceback_and_the_session_continues(tmp_path):
    (tmp_path / "test_hang.py").write_text(
        "import time\n\ndef test_hangs():\n    time.sleep(120)\n\ndef test_after():\n    assert True\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
         "-p", "no:cacheprovider", "-q", "-o", "timeout=2", str(tmp_path / "test_hang.py")],
        capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Timeout (>2.0s) from pytest-timeout" in proc.stdout
    assert "time.sleep(120)" in proc.stdout  # the hung line, from the test's traceback
    assert "1 failed, 1 passed" in proc.stdout

"""Checks `longcat-serve` runs before it binds a port or loads anything: a missing model directory, a bad
config.json or a port in use end the process with one line naming the problem, not tracebacks after a bound
port and a started load.

Exit codes of longcat-serve (also in its --help):
  0  stopped by SIGTERM/SIGINT (drained; or a signal before serving, also while Python still imports torch)
  1  the engine failed while starting or serving
  2  a bad command line: a flag's value, the model directory, its config.json
  3  a tensor-parallel rank was lost
  4  an address is in use (--port, --metrics-port)
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

EXIT_USAGE = 2
EXIT_ADDRESS_IN_USE = 4
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")  # as model/loader.py reads them


class StartupError(Exception):
    """A problem found before serving: `str()` is the one line to print, `exit_code` the status."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


def check_model_dir(model: str | None, load_format: str, hf_overrides: dict | None) -> None:
    """The checkpoint directory exists and holds a config.json that parses; weights unless load_format dummy.
    None (the embedded demo model) needs no check."""
    if model is None:
        return
    from longcat_service.config import ConfigError, ModelConfig

    path = Path(model)
    if not path.exists():
        raise StartupError(f"--model {model}: no such directory")
    if not path.is_dir():
        raise StartupError(f"--model {model}: not a directory (expected a checkpoint directory with config.json)")
    config = path / "config.json"
    if not config.is_file():
        raise StartupError(f"--model {model}: no config.json in this directory")
    try:
        ModelConfig.from_pretrained(config)
        if hf_overrides:
            import json

            ModelConfig.from_dict({**json.loads(config.read_text()), **hf_overrides}, source=f"{config} with "
                                  "--hf-overrides")
    except ConfigError as e:
        raise StartupError(f"--model {model}: bad config.json: {e}") from None
    if load_format != "dummy" and not any((path / name).is_file() for name in WEIGHT_FILES):
        raise StartupError(f"--model {model}: no {' or '.join(WEIGHT_FILES)} in this directory "
                           "(--load-format dummy serves random weights of the config's shape)")


def check_port_free(host: str, port: int | None, flag: str) -> None:
    """Bind `host:port` once and let go. gRPC binds with SO_REUSEPORT, which would share a port with another
    server silently; a plain bind here fails for any listener. Port 0 (any free port) needs no check."""
    if not port:
        return
    host = host.strip("[]")  # gRPC's [::] form
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise StartupError(f"{flag} {port}: {host}:{port} is already in use", EXIT_ADDRESS_IN_USE) from None
            raise StartupError(f"{flag} {port}: cannot bind {host}:{port} ({e.strerror})") from None

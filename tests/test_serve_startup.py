"""longcat-serve for a newcomer (issue 14): a bad --model, config.json or busy port is one line on stderr and a
documented exit code before anything is bound or loaded; a signal while Python still imports exits 0 quietly;
--help gives every flag of longcat-serve and longcat-client a text and its default."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longcat_service.client.cli import build_parser as client_parser
from longcat_service.engine.engine_args import EngineArgs
from longcat_service.server.cli import build_parser as serve_parser

REPO = Path(__file__).resolve().parents[1]


def _serve(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "longcat_service.server.cli", "--device", "cpu", *argv],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _stderr_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def _listening_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_a_missing_model_directory_is_one_line_and_exit_2():
    proc = _serve("--model", "/nonexistent/longcat", "--port", "0")
    assert proc.returncode == 2, proc.stderr
    lines = _stderr_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert "/nonexistent/longcat" in lines[0] and "no such directory" in lines[0]
    assert "listening" not in proc.stdout


@pytest.mark.parametrize("config_text, problem", [
    ("{not json", "not valid JSON"),
    ('{"model_type": "longcat_flash"}', "missing"),
])
def test_a_bad_config_json_is_one_line_and_exit_2(tmp_path, config_text, problem):
    (tmp_path / "config.json").write_text(config_text)
    proc = _serve("--model", str(tmp_path), "--port", "0")
    assert proc.returncode == 2, proc.stderr
    lines = _stderr_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert str(tmp_path) in lines[0] and "config.json" in lines[0] and problem in lines[0]


def test_a_model_directory_without_weights_is_one_line_unless_dummy(tmp_path):
    from longcat_service.demo_model import ensure_demo_model

    (tmp_path / "config.json").write_text((ensure_demo_model() / "config.json").read_text())
    proc = _serve("--model", str(tmp_path), "--port", "0")
    assert proc.returncode == 2 and len(_stderr_lines(proc)) == 1, proc.stderr
    assert "model.safetensors" in proc.stderr and "--load-format dummy" in proc.stderr


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_a_port_in_use_is_one_line_naming_it_and_exit_4(flag):
    with _listening_socket() as busy:
        port = busy.getsockname()[1]
        # --http-port 0: the default HTTP port 8000 may be busy on a shared machine and would be named first
        argv = (["--port", str(port), "--http-port", "0"] if flag == "--port"
                else ["--port", "0", "--metrics-port", str(port)])
        proc = _serve(*argv)
    assert proc.returncode == 4, proc.stderr
    lines = _stderr_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert f"{flag} {port}" in lines[0] and "already in use" in lines[0]


def test_a_bad_engine_flag_is_exit_2():
    proc = _serve("--block-size", "0", "--port", "0")
    assert proc.returncode == 2 and len(_stderr_lines(proc)) == 1, proc.stderr
    assert "--block-size" in proc.stderr


@pytest.mark.parametrize("flag,value,reason", [
    ("--port", "99999", "must be a port number in [0, 65535], got 99999"),  # was an OverflowError traceback
    ("--http-port", "-1", "must be a port number in [0, 65535], got -1"),
    ("--metrics-port", "x", "not an integer: 'x'"),
    ("--max-queued-requests", "0", "must be >= 1, got 0"),  # was a ValueError traceback after the engine loaded
    ("--max-queued-tokens", "-5", "must be >= 1, got -5"),
    ("--stream-buffer-size", "0", "must be >= 1, got 0"),
    ("--slow-reader-timeout-s", "nan", "must be a finite number > 0, got nan"),
    ("--drain-grace-s", "-3", "must be a finite number >= 0, got -3"),  # was accepted
])
def test_a_bad_server_flag_is_refused_by_the_parser_naming_it(capsys, flag, value, reason):
    with pytest.raises(SystemExit) as exit_info:
        serve_parser().parse_args([flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: {reason}" in capsys.readouterr().err


def _catches(pid: int, sig: int) -> bool:
    """The process has a handler for `sig` (/proc/<pid>/status SigCgt)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_still_importing_exits_0_without_a_traceback(sig):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # the console script's import: only the standard library until main() runs
    code = "import sys; from longcat_service.server.cli import main; assert 'torch' not in sys.modules; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", code, "--device", "cpu", "--port", "0"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _catches(proc.pid, signal.SIGTERM):  # main() has set its handlers (SIGTERM and SIGINT together)
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.005)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert err.strip() == "" and "listening" not in out


def _help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser.formatter_class(parser.prog)
    return formatter._expand_help(action) if action.help else ""


@pytest.mark.parametrize("parser", [serve_parser(), client_parser()], ids=["longcat-serve", "longcat-client"])
def test_every_flag_has_help_and_shows_its_default(parser):
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = _help_of(parser, action)
        assert text.strip(), f"{action.option_strings or action.dest}: no help text"
        assert "default" in text, f"{action.option_strings or action.dest}: no default in {text!r}"
        if action.default is not None and not isinstance(action.default, bool) and action.default != []:
            assert f"default: {action.default}" in text, text


def test_engine_defaults_quoted_in_the_help_are_the_engine_defaults():
    parser, engine = serve_parser(), EngineArgs(device="cpu")
    helps = {a.dest: _help_of(parser, a) for a in parser._actions}
    for dest in ("max_num_seqs", "block_size", "seed", "gpu_memory_utilization"):
        assert f"default: {getattr(engine, dest)}" in helps[dest], dest
    assert f"default: {engine.step_timeout_s:g}" in helps["step_timeout_s"]
    assert f"{EngineArgs(device='cpu').max_num_batched_tokens} on CPU" in helps["max_num_batched_tokens"]
    assert f"{EngineArgs(device='cuda').max_num_batched_tokens} on CUDA" in helps["max_num_batched_tokens"]


def test_exit_codes_are_in_the_help():
    text = serve_parser().format_help()
    for code in ("0", "1", "2", "3", "4"):
        assert f"\n  {code}  " in text


def test_the_step_budget_default_is_per_device_and_prefills_4096_tokens_in_one_step_on_cuda():
    assert EngineArgs(device="cuda").max_num_batched_tokens >= 4096
    assert EngineArgs(device="cpu").max_num_batched_tokens == 2048
    assert EngineArgs(device="cuda", max_num_batched_tokens=1024).max_num_batched_tokens == 1024


def test_the_prefill_warm_up_runs_a_step_of_the_whole_token_budget():
    from tests.engine_utils import make_engine

    engine = make_engine(block_size=16, num_kv_blocks=512, max_model_len=4096, max_num_batched_tokens=3000)
    runner, steps = engine.runner, []
    runner.execute = lambda batch: steps.append(sum(s.num_new_tokens for s in batch)) or []
    assert runner.warm_up_prefill()
    assert max(steps) == 3000
    small = make_engine(block_size=16, num_kv_blocks=120, max_model_len=1024, max_num_batched_tokens=8192)
    small.runner.execute = lambda batch: steps.append(sum(s.num_new_tokens for s in batch)) or []
    assert small.runner.warm_up_prefill()  # the cache cannot hold the budget: the 1100-token step still runs
    assert steps[-2] == 1101
    assert 4096 not in steps  # no step between the 1100-token one and a budget below 4096


def test_the_prefill_warm_up_runs_a_step_at_each_kernel_regime_below_the_budget(monkeypatch):
    """A budget above 4096 tokens: besides the budget's step, a 4096-token prompt step (the FP8 prefill experts'
    middle config, kernels/fp8_gemm.prefill_expert_configs), so that no prompt length compiles inside a request."""
    from longcat_service.engine.model_runner import WARMUP_MID_STEP_TOKENS
    from longcat_service.kernels.fp8_gemm import prefill_expert_configs
    from tests.engine_utils import make_engine

    engine = make_engine(block_size=16, num_kv_blocks=800, max_model_len=4096, max_num_batched_tokens=9000)
    import dataclasses

    # the tiny model's context is 4096 tokens: a copy of its config with a longer one (the warm-up reads only this)
    monkeypatch.setattr(engine.runner, "config", dataclasses.replace(engine.runner.config, max_position_embeddings=16384))
    steps = []
    engine.runner.execute = lambda batch: steps.append(sum(s.num_new_tokens for s in batch)) or []
    free_before = engine.scheduler.block_manager.num_free_blocks
    assert engine.runner.warm_up_prefill()
    assert max(steps) == 9000 and 4096 in steps
    assert engine.scheduler.block_manager.num_free_blocks == free_before
    # every config of the FP8 prefill experts is reached by one of the steps
    reached = {prefill_expert_configs(n) for n in steps}
    assert reached == {prefill_expert_configs(n) for n in (512, 4096, 9000)} and len(reached) == 3
    assert WARMUP_MID_STEP_TOKENS == (4096,)


def test_the_server_logs_what_it_runs_at_start():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "longcat_service.server.cli", "--device", "cpu", "--port", "0",
                             "--num-kv-blocks", "64"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening" in line, proc.stderr.read() if proc.poll() is not None else line
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    serving = [line for line in err.splitlines() if " serving model " in line]
    assert len(serving) == 1, err
    for part in ("device cpu", "dtype float32", "ops backend ", "max_num_batched_tokens 2048", "demo model"):
        assert part in serving[0], serving[0]


def test_an_unreadable_tls_file_is_one_line_and_exit_2(tmp_path):
    proc = _serve("--port", "0", "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(tmp_path / "k.pem"))
    assert proc.returncode == 2 and len(_stderr_lines(proc)) == 1, proc.stderr
    assert "missing.pem" in proc.stderr

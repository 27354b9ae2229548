"""`longcat-client`: stream a completion (or, with --chat, a chat reply) to the terminal.

    longcat-client "Once upon a time" --max-tokens 64
    echo "Hello" | longcat-client --chat --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys

from longcat_service.client.errors import LongCatError
from longcat_service.client.sync_client import LongCatClient


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default; a flag whose value is left to the server says so in its help instead."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


SERVER_DEFAULT = "default: the server's, "


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longcat-client", description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("prompt", nargs="*", help="prompt text (default: read from stdin)")
    p.add_argument("--address", default="127.0.0.1:50051", help="host:port, grpc:// or grpcs://")
    p.add_argument("--chat", action="store_true", help="send the prompt as one user message (chat template)")
    p.add_argument("--system", default=None, help="system message for --chat (default: none)")
    p.add_argument("--json", action="store_true", help="one JSON object per streamed event")
    p.add_argument("--timeout", type=_positive_seconds, default=600.0, help="seconds for the whole call")
    p.add_argument("--api-key", default=None, help="sent as 'authorization: Bearer KEY' (default: none)")
    p.add_argument("--tls", action="store_true", help="connect with TLS (implied by grpcs://)")
    p.add_argument("--root-cert", default=None,
                   help="PEM file of the CA that signed the server certificate (default: the system's CAs)")
    s = p.add_argument_group("sampling (unset: the server's default)")
    s.add_argument("--max-tokens", type=int, help=SERVER_DEFAULT + "16; at most the context length minus the prompt")
    s.add_argument("--temperature", type=float, help=SERVER_DEFAULT + "1.0; 0 (or below 1e-5) is greedy")
    s.add_argument("--top-p", type=float, help=SERVER_DEFAULT + "1.0 (off)")
    s.add_argument("--top-k", type=int, help=SERVER_DEFAULT + "0 (off)")
    s.add_argument("--min-p", type=float, help=SERVER_DEFAULT + "0.0 (off)")
    s.add_argument("--repetition-penalty", type=float, help=SERVER_DEFAULT + "1.0 (off)")
    s.add_argument("--frequency-penalty", type=float, help=SERVER_DEFAULT + "0.0 (off)")
    s.add_argument("--presence-penalty", type=float, help=SERVER_DEFAULT + "0.0 (off)")
    s.add_argument("--seed", type=int, help=SERVER_DEFAULT + "none (the server's generator)")
    s.add_argument("--min-tokens", type=int,
                   help=SERVER_DEFAULT + "0; EOS and stop ids are masked until this many tokens are out")
    s.add_argument("--ignore-eos", action="store_true", default=None,
                   help=SERVER_DEFAULT + "off; keep generating after EOS")
    s.add_argument("--stop", action="append", help="stop string (repeatable; default: none)")
    s.add_argument("--logprobs", type=int, help="log-probabilities of each token and this many alternatives "
                                                "(default: none)")
    s.add_argument("-n", type=int, dest="n", help=SERVER_DEFAULT + "1; completions of the one prompt")
    return p


# C0/C1 control characters (except newline and tab), DEL, and the bidi overrides/isolates that can make a terminal
# show text other than what was received (escape sequences, carriage-return overwrites, reordering).
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def terminal_safe(text: str) -> str:
    """Text for a terminal: every unsafe character shown as a visible escape (\\x1b, \\u202e), the rest unchanged."""
    return _UNSAFE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
             "presence_penalty", "seed", "min_tokens", "ignore_eos", "stop", "logprobs", "n")


def _print_whole(parts: dict[int, list[str]], finished: dict[int, str]) -> None:
    for index in sorted(finished):
        print(terminal_safe("".join(parts.get(index, []))), flush=True)
        print(finished[index], file=sys.stderr, flush=True)
    finished.clear()


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    text = " ".join(args.prompt) if args.prompt else sys.stdin.read()
    sampling = {k: getattr(args, k) for k in _SAMPLING if getattr(args, k) is not None}
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": text})
        target = {"messages": messages}
    else:
        target = {"prompt": text}
    try:
        client = LongCatClient(args.address, api_key=args.api_key, tls=args.tls or None,
                               root_certificates=args.root_cert, timeout=args.timeout)
    except OSError as e:  # the --root-cert file
        print(f"longcat-client: --root-cert {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    # one completion streams as it comes; several would interleave their chunks: they are printed whole, in index
    # order, when the stream ends (also when it ends with an error: the finished ones)
    several = (args.n or 1) > 1
    parts: dict[int, list[str]] = {}
    finished: dict[int, str] = {}
    try:
        with client, client.generate_stream(**target, **sampling) as stream:
            for chunk in stream:
                marker = None
                if chunk.finished:
                    marker = f"[{chunk.index}: {chunk.finish_reason}, {chunk.usage.completion_tokens} tokens]"
                if args.json:
                    print(json.dumps(dataclasses.asdict(chunk)), flush=True)
                elif several:
                    parts.setdefault(chunk.index, []).append(chunk.text)
                    if marker:
                        finished[chunk.index] = marker
                elif marker:
                    print(flush=True)
                    print(marker, file=sys.stderr, flush=True)
                else:
                    print(terminal_safe(chunk.text), end="", flush=True)
        _print_whole(parts, finished)
    except LongCatError as e:
        _print_whole(parts, finished)
        if args.json:
            print(json.dumps({"error": e.code.name if e.code else "UNKNOWN", "details": e.details}), flush=True)
        print(f"longcat-client: {e.code.name if e.code else 'error'}: {terminal_safe(str(e.details))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`longcat-client ... | head`): stop quietly, like other CLIs
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python would report the pipe again when it flushes at exit
        return 141  # 128 + SIGPIPE, the status a shell gives a writer killed by a closed pipe
    return 0


if __name__ == "__main__":
    sys.exit(main())

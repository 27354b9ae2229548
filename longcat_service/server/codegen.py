"""Regenerate the committed Python gRPC code from proto/longcat/v1/longcat.proto.

    python -m longcat_service.server.codegen            # rewrite longcat_service/server/generated/
    python -m longcat_service.server.codegen --check    # exit 1 if the committed code is stale

Generate with grpcio-tools 1.84.x (protobuf 7.35 gencode): protobuf refuses gencode newer than its
runtime, and the generated stub refuses grpcio older than the grpcio-tools that wrote it, so the oldest
tools we accept bound the oldest runtime (pyproject: protobuf>=7.35.1, grpcio>=1.84).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILE = "longcat/v1/longcat.proto"
PACKAGE_DIR = Path(__file__).resolve().parent
GENERATED_DIR = PACKAGE_DIR / "generated"
SHIPPED_PROTO = PACKAGE_DIR / "proto" / "longcat.proto"  # the copy shipped in the wheel
GENERATED_FILES = ("longcat_pb2.py", "longcat_pb2.pyi", "longcat_pb2_grpc.py")

# protoc writes `from longcat.v1 import longcat_pb2`; the package lives elsewhere.
_IMPORT_FROM = "from longcat.v1 import longcat_pb2"
_IMPORT_TO = "from longcat_service.server.generated import longcat_pb2"


def generate(out_dir: Path) -> None:
    """Run protoc (grpc_tools) into out_dir, with imports rewritten for our package."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO_FILE,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_ROOT / PROTO_FILE}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in GENERATED_FILES:
            text = (Path(tmp) / "longcat" / "v1" / name).read_text()
            (out_dir / name).write_text(text.replace(_IMPORT_FROM, _IMPORT_TO))


_VERSION_LINES = re.compile(
    r"^(# Protobuf Python Version: .*|GRPC_GENERATED_VERSION = .*|\s*\d+,\s*$)$", re.MULTILINE
)


def normalise(text: str) -> str:
    """Mask the tool-version lines so a check with other grpcio-tools compares only content."""
    return _VERSION_LINES.sub("<version>", text)


def stale_files(out_dir: Path = GENERATED_DIR) -> list[str]:
    """Names of committed files that differ from a fresh generation (empty when current)."""
    stale = []
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for name in GENERATED_FILES:
            committed = out_dir / name
            fresh = (Path(tmp) / name).read_text()
            if not committed.exists() or normalise(committed.read_text()) != normalise(fresh):
                stale.append(name)
    if SHIPPED_PROTO.read_bytes() != (PROTO_ROOT / PROTO_FILE).read_bytes():
        stale.append(str(SHIPPED_PROTO.relative_to(REPO_ROOT)))
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report whether the committed code is current")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {name}", file=sys.stderr)
        return 1 if stale else 0
    generate(GENERATED_DIR)
    SHIPPED_PROTO.parent.mkdir(exist_ok=True)
    shutil.copyfile(PROTO_ROOT / PROTO_FILE, SHIPPED_PROTO)
    print(f"wrote {', '.join(GENERATED_FILES)} to {GENERATED_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

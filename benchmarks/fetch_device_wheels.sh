#!/usr/bin/env bash
# Downloads (on the CPU machine, which reaches PyPI) the wheels the H200 image lacks, into .whl/ (git-ignored),
# for `run(carry=[".whl"])` + benchmarks/gpu_session.sh. Versions match the image's grpcio 1.84 (newer health /
# reflection stubs refuse to import on an older grpcio).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl grpcio-health-checking==1.84.0 grpcio-reflection==1.84.0
ls .whl

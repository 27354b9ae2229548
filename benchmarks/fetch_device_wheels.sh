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
# The OpenAI-compatible HTTP API (longcat_service/server/openai_api/) and benchmarks/bench_http.py: the versions
# tested on the CPU machine, pydantic and pydantic-core together.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 httptools==0.9.0 h11==0.16.0 click==8.5.1 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 opentelemetry-api==1.45.2 anyio==4.16.0 sniffio==1.3.1 idna==3.20 httpx==0.29.0 \
  httpcore==1.0.9 certifi==2026.10.19.post1
ls .whl

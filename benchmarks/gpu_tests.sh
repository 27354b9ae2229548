#!/usr/bin/env bash
# The GPU test files on the H200, one pytest run per file, as one device call (from the repo root):
#   run(carry=[".whl"], timeout_s=600, command="OUT=$OUT bash benchmarks/gpu_tests.sh > $OUT/trace.log 2>&1;
#       cat $OUT/summary.txt")
# One run per file, each under `timeout` (PER_FILE seconds, capped by what is left of BUDGET), so that a slow or
# hung file costs only itself and every failure is named in the summary (a single capped run of several files
# ends before pytest prints which tests failed). FILES="tests/a.py tests/b.py" picks files and their order
# (default: the *_gpu.py files, then the files whose GPU cases skip on CPU machines); SKIP_BUILD=1 with a carried
# longcat_service/_C*.so skips the build. Logs in $OUT/logs (tarred into $OUT/logs.tgz: fewer files come back).
set -x
OUT=${OUT:-$PWD/gpu_out}
L=$OUT/logs
mkdir -p "$L"
BUDGET=${BUDGET:-540}
PER_FILE=${PER_FILE:-180}
: > "$L/steps.tsv"
source "$(dirname "${BASH_SOURCE[0]}")/session_steps.sh"  # step NAME CAP CMD...

session_python  # PY, the carried wheels, PYTHONPATH
if [[ -z ${SKIP_BUILD:-} ]]; then
  step build 220 LONGCAT_BUILD_CUDA=1 MAX_JOBS=16 $PY setup.py build_ext --inplace
fi
DEFAULT_FILES="$(ls tests/*_gpu.py) tests/test_kernels.py tests/test_dense_gemv.py tests/test_ops.py tests/test_gpu_twins.py
  tests/test_counter_hash_kernel.py tests/test_fused_add_rmsnorm.py tests/test_prefill_attn_triton.py"
for f in ${FILES:-$DEFAULT_FILES}; do
  name=$(basename "$f" .py)
  # -v: one line per test as it ends, so a run cut by its cap still names the failures before the cut
  step "$name" "$PER_FILE" $PY -m pytest -v -rfE -p no:cacheprovider "$f"
done

set +x
{
  echo "== steps (name, exit code: 0 passed, 1 failures, 124 cut by its cap; seconds) =="
  cat "$L/steps.tsv"
  tail -1 "$L/build.log" 2>/dev/null
  for log in "$L"/test_*.log; do
    [[ -f $log ]] || continue
    echo "== $(basename "$log" .log): $(grep -E '(passed|failed|error|skipped)' "$log" | tail -1)"
    grep -E '^(FAILED|ERROR)| (FAILED|ERROR)( |$)' "$log" | cut -c1-300 | sort -u | head -15
  done
} >"$OUT/summary.txt" 2>&1
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"

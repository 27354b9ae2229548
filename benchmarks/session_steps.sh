# Sourced by the device session scripts (gpu_session.sh, fp8_session.sh, gpu_tests.sh, tp_session.sh), which set
# BUDGET and L.
# step NAME CAP_SECONDS CMD... : run CMD (through env, so VAR=value prefixes work) with a timeout of
# min(CAP, time left of BUDGET); skip when under 25 s are left, or when STEPS is set and does not name NAME
# ("build" always runs). Records name, exit code (124: timeout) and seconds in $L/steps.tsv.
step() {
  local name=$1 cap=$2
  shift 2
  if [[ -n ${STEPS:-} && " $STEPS build " != *" $name "* ]]; then
    printf '%s\tnot in STEPS\t0\n' "$name" >>"$L/steps.tsv"
    return
  fi
  local left=$((BUDGET - SECONDS))
  if ((left < 25)); then
    printf '%s\tskipped\t0\n' "$name" >>"$L/steps.tsv"
    return
  fi
  local t=$((cap < left ? cap : left)) t0=$SECONDS
  timeout -k 10 "$t" env "$@" >"$L/$name.log" 2>&1
  printf '%s\t%s\t%s\n' "$name" "$?" "$((SECONDS - t0))" >>"$L/steps.tsv"
}

# session_python: PY (the device's python), the carried wheels of .whl/ (benchmarks/fetch_device_wheels.sh)
# installed into /tmp/site, and PYTHONPATH=/tmp/site:the repo. Logs the install to $L/wheels.log.
session_python() {
  PY=$(command -v python || command -v python3)
  if compgen -G ".whl/*.whl" >/dev/null; then
    pip install --no-index --no-deps --target /tmp/site .whl/*.whl >"$L/wheels.log" 2>&1
  fi
  export PYTHONPATH=/tmp/site:$PWD
}

# Sourced by gpu_session.sh and tp_session.sh (which set BUDGET and L).
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

#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut 3 (pip install mutmut; not part of CI: it takes ~10-40 minutes
# per module on 2 cores). Each module is mutated in its own scratch copy of the repository and checked only by the
# fast tests that target it, so that a run stays feasible on a small machine.
#
#   tools/mutation.sh                 # every module below
#   tools/mutation.sh sampler block_manager
#   MUTATION_RESUME=1 tools/mutation.sh sampler   # after adding tests: re-run only that module's survivors (and mutants no test reached)
#
# Results: a "module killed/total score" line per module on stdout and in $MUTATION_DIR/<module>/score.txt;
# surviving mutants with `cd $MUTATION_DIR/<module> && mutmut results` and `mutmut show <name>`.
# docs/mutation-testing.md records the scores and the surviving mutants judged equivalent.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MUTATION_DIR=${MUTATION_DIR:-$ROOT/.mutation}
CHILDREN=${MUTATION_CHILDREN:-2}

# module name -> "file to mutate|pytest arguments, separated by ;" (fast tests that target the module)
declare -A MODULES=(
  [sampler]="longcat_service/engine/sampler.py|tests/test_sampler.py;tests/test_sampler_behaviour.py"
  [output_processor]="longcat_service/engine/output_processor.py|tests/test_output_processor.py"
  [detokenizer]="longcat_service/engine/detokenizer.py|tests/test_detokenizer.py"
  [block_manager]="longcat_service/engine/block_manager.py|tests/test_block_manager.py;tests/test_block_manager_behaviour.py;tests/test_prefix_cache_hits.py;-k;not engine"
  [scheduler]="longcat_service/engine/scheduler.py|tests/test_scheduler.py;tests/test_scheduler_behaviour.py"
  [rotary]="longcat_service/layers/rotary.py|tests/test_rope_table.py;tests/test_rotary_reference.py"
  [router]="longcat_service/layers/router.py|tests/test_moe_prefill.py;tests/test_ops.py;tests/test_router_unit.py"
  [moe_reference]="longcat_service/ops/reference.py|tests/test_ops.py;tests/test_moe_prefill.py;tests/test_moe_reference_unit.py"
  [config]="longcat_service/config.py|tests/test_config.py;tests/test_config_parsing.py"
  [convert]="longcat_service/server/convert.py|tests/test_convert.py"
  [call_status]="longcat_service/server/call_status.py|tests/test_call_status.py"
  [admission]="longcat_service/server/admission.py|tests/test_admission.py"
)
ORDER=(sampler block_manager output_processor scheduler convert call_status admission detokenizer config rotary router moe_reference)
[ $# -gt 0 ] && ORDER=("$@")

for name in "${ORDER[@]}"; do
  spec=${MODULES[$name]:?unknown module $name (one of: ${!MODULES[*]})}
  file=${spec%%|*}
  IFS=";" read -r -a args <<< "${spec#*|}"
  work=$MUTATION_DIR/$name
  resume=0
  if [ "${MUTATION_RESUME:-0}" = 1 ] && [ -d "$work/mutants" ]; then
    resume=1
  else
    rm -rf "$work" && mkdir -p "$work"
    cp -r longcat_service setup.py "$work"/
  fi
  cp -r tests "$work"/
  # the scratch copy's pyproject: the project's, with a [tool.mutmut] section for this module only
  {
    cat pyproject.toml
    printf '\n[tool.mutmut]\nsource_paths = ["longcat_service"]\nonly_mutate = ["%s"]\n' "$file"
    printf 'pytest_add_cli_args_test_selection = ['; printf '"%s", ' "${args[@]}"; printf ']\n'
    printf 'pytest_add_cli_args = ["-p", "no:cacheprovider", "-o", "timeout=120"]\n'
    printf 'process_isolation = "forkserver"\nuse_git_change_detection = false\n'
  } > "$work/pyproject.toml"
  if [ $resume = 1 ]; then
    # after adding tests: refresh them in the scratch copy and re-run only the mutants that survived
    cp -r tests "$work/mutants"/ && cp "$work/pyproject.toml" "$work/mutants/"
    mapfile -t survivors < <(cd "$work" && mutmut results 2>/dev/null | awk -F: '/: (survived|no tests)$/ {gsub(/ /, "", $1); print $1}')
    if [ ${#survivors[@]} -gt 0 ]; then
      (cd "$work" && nice -n 10 mutmut run --max-children "$CHILDREN" "${survivors[@]}" > rerun.log 2>&1) || true
    fi
  else
    (cd "$work" && nice -n 10 mutmut run --max-children "$CHILDREN" > run.log 2>&1) || true
  fi
  # per-mutant status; in a resumed run the earlier verdicts stand for the mutants it did not re-run
  (cd "$work" && mutmut results --all true 2>/dev/null) > "$work/results.new" || true
  python3 - "$name" "$work" <<'PY'
import sys
from pathlib import Path

name, work = sys.argv[1], Path(sys.argv[2])


def load(path):
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if ": " in line:
                key, status = line.strip().rsplit(": ", 1)
                out[key] = status
    return out


merged = load(work / "results.txt")
merged.update({k: v for k, v in load(work / "results.new").items() if v != "not checked"})
(work / "results.txt").write_text("".join(f"{k}: {v}\n" for k, v in sorted(merged.items())))
counts = {}
for status in merged.values():
    counts[status] = counts.get(status, 0) + 1
killed = sum(counts.get(s, 0) for s in ("killed", "timeout", "segfault"))
total = sum(counts.values()) - counts.get("skipped", 0)
detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
line = f"{name}: {killed}/{total} killed ({100 * killed / max(total, 1):.1f}%) [{detail}]"
(work / "score.txt").write_text(line + "\n")
print(line, flush=True)
PY
done

#!/usr/bin/env bash
# .ci/run on clean clones of this checkout's HEAD, RUNS times in a row, each with one process spinning on
# a core for the whole run (issue 10's check that the suite never fails by chance). Stops at the first
# red run. Logs: $OUT_DIR/ciN.log; one summary line per run on stdout.
#
#   bash benchmarks/ci_under_load.sh [RUNS]        # default 5; about 11 minutes a run on 2 cores
set -u
runs=${1:-5}
repo=$(git rev-parse --show-toplevel)
OUT_DIR=${OUT_DIR:-/tmp/ci-under-load}
pyenv=${PYENV_ROOT:-$HOME/.pyenv}  # where a pyenv Python is (the path is harmless without one)
mkdir -p "$OUT_DIR"
for n in $(seq 1 "$runs"); do
    dir="$OUT_DIR/clone$n"
    rm -rf "$dir" && git clone -q "$repo" "$dir" || exit 1
    timeout 5400 python3 -c "while True: pass" &
    spinner=$!
    start=$(date +%s)
    # A clean environment: nothing of this shell (PYTHONPATH, a venv) reaches the run; no stdin, as in CI.
    (cd "$dir" && env -i PATH="$pyenv/shims:$pyenv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        HOME="$HOME" LANG=C.UTF-8 CI=true bash .ci/run </dev/null >"$OUT_DIR/ci$n.log" 2>&1)
    rc=$?
    kill "$spinner" 2>/dev/null
    summary=$(grep -E "^=+ .*(passed|failed|error).* =+$" "$OUT_DIR/ci$n.log" | tail -1)
    echo "run $n $(git -C "$dir" rev-parse --short HEAD): rc $rc, $(( $(date +%s) - start )) s, $summary"
    [ "$rc" -eq 0 ] || exit "$rc"
done

#!/usr/bin/env bash
# A whole GPU session in one device call (docs/bench.md, "GPU run (H200)"): a short run that checks the CUDA
# graph capture at the 7B shape (FiCoCo-V, -L and -VL at 64, vanilla twice), then the full table. If that
# check fails (a capture error, a failed configuration, replayed tokens that differ from eager ones), the full
# table still runs, decoded eagerly on the static cache (`--decode static`), so the session is not lost and
# no table mixes graph and eager decoding.
#
#   tools/gpu-session.sh OUT_DIR [gpu-bench arguments, given to both runs after the script's own]
#
# OUT_DIR gets smoke.{md,json,err}, smoke-profile.txt, gpu-bench.{md,json,err} and session.txt (which
# decoding the full table used, and why). Exit status: the full table's. GPU_BENCH (default
# tools/gpu-bench.sh) is the command run.
set -uo pipefail
OUT=${1:?usage: tools/gpu-session.sh OUT_DIR [gpu-bench arguments...]}
shift
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2   # before the cd below: a relative OUT_DIR is the caller's
cd "$(dirname "$0")/.."
read -r -a BENCH <<< "${GPU_BENCH:-tools/gpu-bench.sh}"
PYTHON=${PYTHON:-python3}

# --profile: where the FiCoCo prefills' time goes on the GPU (operators, kernel launches, host reads)
"${BENCH[@]}" --decode graph --methods ficoco-v ficoco-l ficoco-vl --budgets 64 --profile "$OUT/smoke-profile.txt" \
    "$@" --json "$OUT/smoke.json" 2>"$OUT/smoke.err" | tee "$OUT/smoke.md"
smoke_status=$?
# the capture works when the check ran with graphs, nothing failed, and every replay gave the eager tokens
if [ "$smoke_status" -eq 0 ] && "$PYTHON" - "$OUT/smoke.json" <<'EOF'
import json, sys

result = json.load(open(sys.argv[1]))
checks = [row["graph_check"] for row in result["rows"]]
passed = result["decode"] == "graph" and checks and all(check and check["passed"] for check in checks)
sys.exit(0 if passed else 1)
EOF
then
    decode=(--decode graph)
    echo "full table: --decode graph (the capture check passed: smoke.md)" | tee "$OUT/session.txt"
else
    decode=(--decode static)
    echo "full table: --decode static (the capture check failed: exit status $smoke_status, or replayed tokens" \
         "that differ from the eager ones; smoke.md, smoke.err)" | tee "$OUT/session.txt"
fi

"${BENCH[@]}" --time-limit 330 "$@" "${decode[@]}" --json "$OUT/gpu-bench.json" 2>"$OUT/gpu-bench.err" \
    | tee "$OUT/gpu-bench.md"

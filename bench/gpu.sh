#!/usr/bin/env bash
# One command for a GPU machine, all inside ~9 minutes (BENCH_DEADLINE_S, default 540):
#   1. build/install nft_fast (bash .ci/setup; falls back to a plain editable install offline),
#   2. the GPU op tests: gpu-marked ones and every cuda-backend test (on the GPU here; CI runs
#      those on the CPU emulator), plus the 10-step Purifier comparisons; carrying on after failures,
#   3. the op microbenchmarks (bench/test_ops_bench.py, pytest-benchmark JSON + markdown),
#   4. the step bench, every workload, bf16 (bench/step.py, compile rows last under a time budget).
# Everything lands in bench/results/ (names end in <gpu>_<date>) and is copied to "$OUT" when set.
# SKIP_SETUP=1 skips step 1 (an installed checkout); STEP_ARGS adds flags to bench/step.py.
# The microbenchmarks run before the step bench (the cheap, most informative results first): they take
# ~30 s, while the step bench fills whatever time is left and stops itself before the deadline.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
START=$SECONDS
DEADLINE=${BENCH_DEADLINE_S:-540}
RES=bench/results
mkdir -p "$RES"

left() { echo $((DEADLINE - (SECONDS - START))); }
# cap WANT RESERVE: WANT seconds, or what is left after keeping RESERVE seconds back (at least 10)
cap() {
  local l=$(($(left) - $2))
  if ((l < 10)); then l=10; fi
  if (($1 < l)); then echo "$1"; else echo "$l"; fi
}

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
slug=$(echo "${gpu:-gpu}" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
STEM="${slug:-gpu}_$(date -u +%Y%m%d-%H%M)"
LOG="$RES/gpu_${STEM}.log"

run_all() {
echo "== nft_fast GPU run $STEM: ${gpu:-no nvidia-smi}; deadline ${DEADLINE}s"

# 1. build. NFT_FAST_DATA_DIR set: the setup would otherwise apt-get Fashion-MNIST (no network here).
echo "== [$((SECONDS - START))s] setup"
if [ -n "${SKIP_SETUP:-}" ]; then
  echo "skipped (SKIP_SETUP)"
elif ! NFT_FAST_DATA_DIR=${NFT_FAST_DATA_DIR:-/nonexistent} timeout -k 10 "$(cap 240 240)" bash .ci/setup; then
  echo "== .ci/setup failed; trying a plain editable install"
  timeout -k 10 "$(cap 180 240)" "$PY" -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e . \
    || echo "== install failed too: what follows may not import nft_fast"
fi
"$PY" -c "import json, torch, nft_fast; print('torch', torch.__version__, 'cuda', torch.version.cuda, json.dumps(nft_fast.build_info()))"

# 2. GPU tests of the ops (SIGINT on timeout: pytest still prints what it ran).
echo "== [$((SECONDS - START))s] pytest -k 'gpu or cuda' tests/ops tests/test_purifier_backends.py"
timeout -s INT -k 15 "$(cap 150 300)" "$PY" -m pytest -k "gpu or cuda" tests/ops tests/test_purifier_backends.py \
  -q -p no:cacheprovider -rfEs \
  2>&1 | tee "$RES/gpu_tests_${STEM}.txt"
echo "tests exit: ${PIPESTATUS[0]}"

# 3. op microbenchmarks
echo "== [$((SECONDS - START))s] op microbenchmarks"
timeout -s INT -k 15 "$(cap 90 200)" "$PY" -m pytest bench/test_ops_bench.py -q -p no:cacheprovider \
  --benchmark-json "$RES/ops_${STEM}.json" --benchmark-max-time 0.25 --benchmark-min-rounds 5 \
  --benchmark-columns median,iqr,rounds --benchmark-sort name
[ -f "$RES/ops_${STEM}.json" ] && "$PY" bench/test_ops_bench.py "$RES/ops_${STEM}.json" "$RES/ops_${STEM}.md" >/dev/null

# 4. the step bench: the rest of the time; it stops starting rows 45 s before its own timeout.
T=$(cap 100000 15)
echo "== [$((SECONDS - START))s] bench/step.py (timeout ${T}s)"
timeout -s INT -k 15 "$T" "$PY" bench/step.py --dtype bf16 --compile-last --budget-s $((T > 90 ? T - 45 : T / 2)) \
  --tag "step_${STEM}" ${STEP_ARGS:-}
echo "step bench exit: $?"
echo "== [$((SECONDS - START))s] done"
}

run_all 2>&1 | tee "$LOG"
ls -l "$RES"/*"${STEM}"* 2>/dev/null
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT" && cp "$RES"/*"${STEM}"* "$OUT"/ && echo "copied to $OUT"
fi

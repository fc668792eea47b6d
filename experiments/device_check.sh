#!/usr/bin/env bash
# The whole GPU check, run from the repo root on the device machine (H100/H200; see the README):
#   bash experiments/device_check.sh [stage ...]      stages: build test bench moe kernels jax train (default: all)
# `build` installs DeepGEMM (and torchao for the peer rows) from .devcache/ (see build_deepgemm.sh); `test`
# runs the whole pytest suite (the CUDA tests run here); `bench`, `moe` (the MoE layer benchmark,
# bench_moe_layer.py; MOE_ARGS adds flags), `kernels`, `jax` and `train` run the benchmarks and the training
# experiment. Logs and results are written to $LOGS and packed into
# $OUT/results.tgz after every stage (the device tool brings back only a few files, and a call cut off by
# its time limit still returns what finished). PYTEST_ARGS narrows the test stage, TRAIN_ARGS adds flags
# to train_moe.py (the fused-block issue's check, ~5 min on an H200:
# TRAIN_ARGS="--framework torch --seeds 0,1,2 --steps 250"); STAGE_TIMEOUT (seconds, default 1800) bounds each command.
set -uo pipefail
OUT=${OUT:-/tmp/fp8moe-out}
LOGS=${LOGS:-/tmp/fp8moe-logs}
mkdir -p "$OUT" "$LOGS"
export CUDA_HOME=/usr/local/cuda PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD
stages=${*:-build test bench moe kernels jax train}
status=0
run() {  # run <log name> <command...>: tee into $LOGS/<log name>, remember failures
  local log=$1; shift
  echo "== $* (log $log)"
  timeout "${STAGE_TIMEOUT:-1800}" "$@" 2>&1 | tee "$LOGS/$log" || status=1
}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$LOGS/device.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$LOGS/device.txt"
for stage in $stages; do
  case $stage in
    build) run build.log bash .devcache/build_deepgemm.sh .devcache ;;
    test) run pytest.log python -m pytest -q -ra -p no:cacheprovider ${PYTEST_ARGS:-tests} ;;
    bench) run bench_grouped_mm.log python experiments/bench_grouped_mm.py --out "$LOGS" ;;
    moe) run bench_moe_layer.log python experiments/bench_moe_layer.py --out "$LOGS" ${MOE_ARGS:-} ;;
    kernels) run bench_kernels.log python experiments/bench_kernels.py --out "$LOGS" ;;
    jax) run bench_jax.log python experiments/bench_jax.py --out "$LOGS" ;;
    train) run train.log python experiments/train_moe.py --out "$LOGS/train" ${TRAIN_ARGS:-} ;;
    *) run "$stage.log" python "$stage" ;;  # any other argument: a Python script to run
  esac
  tar -czf "$OUT/results.tgz" -C "$LOGS" .
done
exit $status

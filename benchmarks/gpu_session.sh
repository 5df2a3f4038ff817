#!/usr/bin/env bash
# One GPU session's measurements (benchmarks/gpu_session.py: the groups, most wanted first, each in its own process).
# Run on the device machine from the repository root, after ../shared/gpu/wheels.sh put the bitsandbytes and
# apollo-torch wheels in .whl/ (carry ".whl"):
#
#   bash benchmarks/gpu_session.sh        # $OUT/gpu-results.tgz (JSON + PNG per group) and $OUT/gpu-session.log
#
# BUDGET_S (default 480): no new case starts after that many seconds of the Python run.
# BENCH_GROUPS="lst-7b loram-1b": only those groups, in that order (names: gpu_session.py's groups).
# GPU_TESTS="tests/plugins/test_lst_compile.py -k cuda_graphs": run those tests (the ones that skip without a GPU)
# first, into the same log.
# SHAPE_SMALL / SHAPE_LARGE / SHAPE_LARGEST (1b / 7b / 13b) and STEPS (5) size the runs; on a CPU:
# SHAPE_SMALL=tiny SHAPE_LARGE=tiny SHAPE_LARGEST=tiny DEVICE=cpu.
# Every result carries estimate_gib and estimate_vs_peak: the check of `trainer-plugins estimate`.
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
log="$out/gpu-session.log"
export PYTHONUNBUFFERED=1
{
  if [ -d .whl ] && ! python3 -c "import bitsandbytes" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  fi
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  if ! python3 -c "import trainer_plugins_meft" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . -e plugins/apollo -e plugins/loram \
      -e plugins/lst -e plugins/meft -e plugins/sparse
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -m trainer_plugins doctor
  if [ -n "${GPU_TESTS:-}" ]; then
    # shellcheck disable=SC2086  # the variable holds pytest's arguments
    TORCH_LOGS=perf_hints timeout 240 python3 -m pytest -q -rs -p no:cacheprovider $GPU_TESTS  # perf_hints: why a CUDA graph was skipped
  fi
  python3 benchmarks/gpu_session.py --results /tmp/gpu-results --pack "$out" --budget "${BUDGET_S:-480}" \
    --steps "${STEPS:-5}" ${DEVICE:+--device "$DEVICE"}
  echo "gpu_session.sh done in $SECONDS s"
} 2>&1 | tee "$log"

#!/usr/bin/env bash
# One GPU session's measurements, most wanted first, each group written as soon as it is done (a session
# cut short keeps what finished). Run on the device machine from the repository root, after
# ../shared/gpu/wheels.sh put bitsandbytes / apollo-torch / deepspeed wheels in .whl/ (carry ".whl"):
#
#   bash benchmarks/gpu_session.sh            # results under $OUT/results (or benchmarks/results)
#
# BUDGET_S (default 480) stops starting new groups once that many seconds have passed; SHAPE_SMALL /
# SHAPE_LARGE (1b / 7b) and STEPS (5) size the runs (on a CPU: SHAPE_SMALL=tiny SHAPE_LARGE=tiny to try it).
# Every result carries estimate_gib and estimate_vs_peak: the check of `trainer-plugins estimate`.
set -uo pipefail
budget=${BUDGET_S:-480}
small=${SHAPE_SMALL:-1b}
large=${SHAPE_LARGE:-7b}
steps=${STEPS:-5}
out=${OUT:-benchmarks}/results
mkdir -p "$out"

if [ -d .whl ] && ! python3 -c "import bitsandbytes" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
if ! python3 -c "import trainer_plugins_meft" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . -e plugins/apollo -e plugins/loram \
    -e plugins/lst -e plugins/meft -e plugins/sparse
fi
python3 -m trainer_plugins doctor | tee "$out/gpu-doctor.txt"

bench() {  # NAME SHAPE [bench args...]
  local name=$1 shape=$2
  shift 2
  if [ "$SECONDS" -ge "$budget" ]; then
    echo "skipped $name: $SECONDS s used of BUDGET_S=$budget" | tee -a "$out/gpu-skipped.txt"
    return
  fi
  python3 -m trainer_plugins bench --shape "$shape" --warmup 2 --steps "$steps" --out "$out/$name.json" "$@" \
    || echo "failed: $name" | tee -a "$out/gpu-failed.txt"
}

# issue 7 (MEFT) and 8 (estimate vs measured on every case), then 3 (APOLLO), 6 (LST), 5 (LoRAM), depth
bench "meft-$small" "$small" --methods adamw lora lora-checkpointing meft
bench "apollo-$small" "$small" --methods adamw sgd apollo-torch apollo-torch-mini apollo apollo-mini apollo-mini-layerwise
bench "lst-$small" "$small" --methods adamw lora-r16 qlora-r16-peft lst lst-4bit
bench "loram-$small" "$small" --methods lora qlora-peft qlora-peft-no-checkpointing loram-50 loram-65 qloram-65
bench "apollo-$large" "$large" --methods adamw sgd apollo-torch-mini apollo-mini
bench "lst-$large" "$large" --methods adamw lora-r16 qlora-r16-peft lst lst-4bit
bench "loram-$large" "$large" --methods lora qlora-peft loram-65 qloram-65
for n in 12 24 48; do
  bench "meft-$small-$n-layers" "$small" --layers "$n" --methods lora meft
done
echo "done in $SECONDS s; results in $out"

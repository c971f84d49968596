#!/usr/bin/env bash
# Every GPU check in one go (what docs/benchmarks.md's GPU rows come from):
#   bash benchmarks/gpu_suite.sh [OUT_DIR]
# 1. the tests marked `gpu`; 2. batched augmentation on the GPU; 3. BMB vs FixMatch step time
# (WRN-28-2 @32, ResNet-50 @64 and @224, bf16) = the trainer's consumption rate; 4. input
# pipelines with GPU rows; 5. with IN127=1, the ImageNet127-64 1% preset on a synthetic stand-in
# of the same shape (127 classes, 64 px), a few hundred steps of BMB and of FixMatch.
# Before 3, `bench_step.py --audit-syncs` lists every host-GPU synchronisation of a step.
# DRY_RUN=1: list each python command in OUT_DIR/dry_run.txt (one line, `python ARGS`) instead of
# running it, no GPU needed; tests/test_benchmarks_smoke.py checks those commands against the
# scripts' own argument parsers.
set -uo pipefail
OUT=${1:-${OUT:-gpu_out}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DRY=${DRY_RUN:-0}
[ "$DRY" = 1 ] && : > "$OUT/dry_run.txt"
log() { echo; echo "=== $*"; }
# py SECONDS ARGS...: python ARGS under a time limit (SECONDS 0: none), or its line in a dry run.
py() {
    local t=$1; shift
    if [ "$DRY" = 1 ]; then { printf 'python'; printf ' %q' "$@"; echo; } >> "$OUT/dry_run.txt"; return 0; fi
    if [ "$t" = 0 ]; then "$PY" "$@"; else timeout "$t" "$PY" "$@"; fi
}
log "device"
if [ "$DRY" = 1 ]; then echo "(dry run)" > "$OUT/device.txt"; else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"; fi
py 0 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"
log "gpu tests"; py 90 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
log "host-GPU syncs per training step"; py 120 benchmarks/bench_step.py --encoder wrn --size 32 --mixed-precision bf16 \
    --steps 4 --audit-syncs 2>&1 | grep -v WARNING | tail -20 | tee "$OUT/syncs.txt"
: > "$OUT/step.txt"
# WRN-28-2 @32 is launch-bound and its runs vary by a few percent: three runs, with BMB's CUDA
# graphs off as a third column.
for run in 1 2 3; do
    log "step wrn 32, run $run"
    py 70 benchmarks/bench_step.py --encoder wrn --size 32 --batch 64 --mixed-precision bf16 --steps 20 \
        --blocks 6 --eager-bank 2>&1 | grep -v WARNING | tail -5 | tee -a "$OUT/step.txt"
done
for size in 64 224; do
    log "step resnet50 $size"
    py 70 benchmarks/bench_step.py --encoder resnet50 --size "$size" --batch 64 --mixed-precision bf16 --steps 10 \
        --blocks 4 2>&1 | grep -v WARNING | tail -4 | tee -a "$OUT/step.txt"
done
log "augment"; py 80 benchmarks/bench_augment.py --device cuda --seconds 2 --repeats 1 2>&1 | tail -12 | tee "$OUT/augment.txt"
# shellcheck disable=SC2086  # PIPELINE_SIZES is a list of sizes
log "pipelines"; py 150 benchmarks/bench_pipelines.py --device cuda --steps 10 --workers "${WORKERS:-12}" \
    --sizes ${PIPELINE_SIZES:-32 64 224} 2>&1 | tail -30 | tee "$OUT/pipelines.txt"
[ "${IN127:-0}" = 1 ] || exit 0
log "imagenet127-64 1% stand-in"
DATA=/tmp/in127-standin
py 0 -m shards demo --out "$DATA" --num-classes 127 --size 64 --n1 400 --m1 2000 --gamma-l 286 --gamma-u 286 \
    --test-per-class 20 --formats wds,arrays --workers 8 --no-progress | tail -3
for algo in bmb fixmatch; do
    py 100 launch/train.py --config launch/configs/imagenet127_1p_64.yaml data.dataset=$DATA \
        method.algorithm=$algo train.max_steps=200 train.eval_every=200 train.checkpoint_every=200 \
        train.progress=false name=in127-$algo train.out_dir=/tmp/gpu_runs 2>&1 | grep -E "done|top-1|error" | tee -a "$OUT/in127.txt"
    py 0 -c "import json; f=json.load(open('/tmp/gpu_runs/in127-$algo/final.json')); print('$algo', 'steps', f['steps'], 'seconds', round(f['seconds'],1), 'steps/s', round(f['steps']/f['seconds'],2), 'gpu GiB', round(f.get('max_gpu_memory_gib', 0), 2))" | tee -a "$OUT/in127.txt"
done

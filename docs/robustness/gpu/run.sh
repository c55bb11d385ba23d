#!/bin/bash
# Work for a lent GPU (an H200 here; 15 minutes of device time in all, the machine's start included). The jobs
# share the one chip and are time-boxed; they run in their own process sessions, so that they go on between
# two calls of the device tool while the machine stays warm:
#   bash docs/robustness/gpu/run.sh start     # set up, launch every job, pack what finished by PACK_AT s, return
#   bash docs/robustness/gpu/run.sh collect   # the next call: wait for the jobs (or the deadlines), pack all
# Training (the classifier stage at row 7's settings at 8/255, PGD-3 with steps of 2.5 epsilon / 3, seed 1). The
# plan of 2026-12-04's lent H200 (commit f04c947: widths (64, 256, 256) and (96, 384, 384) at 15 epochs, the wide
# net at 30, the wide net at PGD-2 and lr 0.75; PLAN=2 then the wide net at PGD-4 for 30) trained in bf16
# autocast, and every run leaked the label in its last epoch, airbench's widths outright (docs/robustness.md, the
# width lever). This plan repeats two of them in fp32 (PRECISION), the comparison the width lever waits on:
#   w64-p3-15   airbench's widths, 15 epochs: against the bf16 run (leaked) and the CPU's fp32 run of it
#   w96-p3-30   widths (96, 384, 384), lr 1.17 (airbench96's ratio), 30 epochs: the candidate, against v8
# Evaluation of each finished classifier behind the served RT and purifier (models/zoo/purifier): clean on all
# 10,000, PGD-EOT 20 x 4 on the 512, the classifier served bare under PGD-20 + AutoAttack-rand on the 512, the
# worst case of PGD-EOT + AutoAttack-rand on the 128; and the served model's (v11's) full-strength pair
# (PGD-200 x EOT-20, AutoAttack-rand 100 x 20) on those 128 (the first plan's did v8's: docs/robustness/v8/full-128/;
# the CPU has v9's on 64, where it broke a few images the quick pair did not).
# Needs: the repository root as working directory, .data/cifar10-jpg.tar.gz and .whl/ (torchattacks) carried.
# Writes $OUT/log.txt and $OUT/results.tar.part-* (cat them into one tar; state files are left out).
# TINY=1 runs the same plan on the CPU on a few images: a check of this script, not of the models.
set -u
W=${W:-/tmp/gpu-runs}
PY=${PY:-python3}  # the python that has torch (the device image's plain python3)
TINY=${TINY:-0}
TRAIN_DEADLINE=${TRAIN_DEADLINE:-640}  # s after start: training still running is stopped (its last epoch kept)
DEADLINE=${DEADLINE:-740}              # s after start: evaluations still running are stopped
PACK_AT=${PACK_AT:-555}                # s after start: `start` packs what is done and returns (calls last <= 600 s)
export PYTHONPATH=/tmp/site:$PWD/models:$PWD/proto
export OMP_NUM_THREADS=2 TQDM_MININTERVAL=30 PYTHONUNBUFFERED=1
DATA="--data-source .data/cifar10-jpg.tar.gz --data-cache-dir /tmp/cache"
if [ "$TINY" = 1 ]; then
    DEVICE=cpu SMALL="--data-train-images 600 --data-eval-images 100 --eval-robust-images 16 --leak-check-images 16"
    CLEAN_IMAGES="--images 50" IMG512=16 IMG128=8 EPOCHS15=1 EPOCHS30=1 FULL_STEPS=2 FULL_EOT=2
else
    DEVICE=cuda SMALL="" CLEAN_IMAGES="" IMG512=512 IMG128=128 EPOCHS15=15 EPOCHS30=30 FULL_STEPS=200 FULL_EOT=20
fi

start_time() { cat "$W/start"; }
left() { echo $(($(start_time) + $1 - $(date +%s))); }
stamp() { echo "[$(($(date +%s) - $(start_time))) s] $*" | tee -a "$W/events.log"; }

# $1 run name, $2 widths, $3 epsilon, $4 PGD steps, $5 step size (both in 255ths), $6 epochs, $7 peak lr
train() {
    local eps step
    eps=$(python3 -c "print($3 / 255)")
    step=$(python3 -c "print($5 / 255)")
    stamp "train $1: widths $2, PGD-$4 at $3/255 (steps of $5/255), $6 epochs"
    boxed "$TRAIN_DEADLINE" "$W/$1.train.log" atop_models.train.cli classifier --out "$W/$1" $SMALL \
        --arch airbench --arch-kwargs "{\"flip_average\": true, \"widths\": $2}" --epochs "$6" --lr "$7" \
        --adv-kind pgd --adv-epsilon "$eps" --adv-steps "$4" --adv-step-size "$step" --seed 1 \
        --precision "${PRECISION:-fp32}"
}

# $1 deadline (s after start), $2 log file, then a python module and its arguments (device and data appended):
# run it time-boxed to the deadline, or skip it when under 10 s are left
boxed() {
    local budget log=$2 module=$3
    budget=$(left "$1")
    shift 3
    [ "$budget" -gt 10 ] || { stamp "skip $log (deadline)"; return 1; }
    mkdir -p "$(dirname "$log")"
    timeout "$budget" $PY -m "$module" "$@" --device $DEVICE $DATA >"$log" 2>&1
    local rc=$?
    stamp "$log: exited $rc"
    return $rc
}

# $1 output folder, then atop-eval's options
attack() {
    local out=$1
    shift
    boxed "$DEADLINE" "$out.log" atop_models.evaluation.cli --out "$out" --norms linf --linf-epsilons 8/255 \
        --seed 0 "$@"
}

# $1 run name: the evaluations of a trained classifier, most needed first
evaluate() {
    local c=$W/$1/classifier e=$W/$1/eval
    boxed "$DEADLINE" "$e/clean.log" atop_models.evaluation.clean --classifier "$c" --atop models/zoo/purifier \
        --defenses undefended rt+atop $CLEAN_IMAGES --out "$e/clean-10000.json"
    attack "$e/pipe-512" --classifier "$c" --atop models/zoo/purifier --defenses rt+atop --images $IMG512 \
        --attacks pgd-eot --pgd-steps 20 --eot 4
    attack "$e/bare-512" --classifier "$c" --defenses undefended --images $IMG512 \
        --attacks pgd-eot autoattack-rand --pgd-steps 20 --apgd-steps 20 --eot 1
    attack "$e/pipe-wc128" --classifier "$c" --atop models/zoo/purifier --defenses rt+atop --images $IMG128 \
        --attacks pgd-eot autoattack-rand --pgd-steps 20 --apgd-steps 20 --eot 4
}

running() { pgrep -f "gpu/run.sh job" >/dev/null; }

pack() {
    stamp "packing"
    rm -f "$OUT"/results.tar.part-*
    (cd "$W" && tar cf - --exclude='state.safetensors' --exclude='progress.safetensors' --exclude='examples_*.safetensors' .) \
        | split -b 15M - "$OUT/results.tar.part-"
    cp "$W/events.log" "$OUT/events.log"
    ls -la "$OUT"
}

case "${1:-}" in
job)  # one job, in its own process session: a training run and its evaluations, or one attack
    shift
    case "$1" in
    train) shift; train "$@" && evaluate "$1" ;;
    attack) shift; attack "$@" ;;
    esac
    ;;
start)
    mkdir -p "$OUT" "$W"
    date +%s >"$W/start"
    exec > >(tee -a "$OUT/log.txt") 2>&1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    [ "$TINY" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.is_available())"
    stamp "decoding the data set once for every job"
    $PY -c "
from atop_models.data import load_split
for split in ('train', 'test'):
    print(split, len(load_split('.data/cifar10-jpg.tar.gz', split, 32, '/tmp/cache', workers=16)))" || exit 1
    launch() { setsid nohup bash docs/robustness/gpu/run.sh job "$@" >>"$W/jobs.log" 2>&1 & }
    launch train w64-p3-15 "[64, 256, 256]" 8 3 6.6667 $EPOCHS15 1.5
    launch train w96-p3-30 "[96, 384, 384]" 8 3 6.6667 $EPOCHS30 1.173913
    launch attack "$W/served/full-128" --classifier models/zoo/classifier --atop models/zoo/purifier \
        --defenses rt+atop --images $IMG128 --batch-size 64 --attacks pgd-eot autoattack-rand \
        --pgd-steps $FULL_STEPS --apgd-steps $((FULL_STEPS / 2)) --eot $FULL_EOT
    sleep 5
    while running && [ "$(left "$PACK_AT")" -gt 0 ]; do
        sleep 20
        [ "$TINY" = 1 ] || nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    done
    pack
    ;;
collect)
    exec > >(tee -a "$OUT/log.txt") 2>&1
    while running && [ "$(left "$DEADLINE")" -gt -5 ]; do sleep 10; done
    pack
    ;;
*) echo "usage: $0 start|collect" >&2; exit 2 ;;
esac

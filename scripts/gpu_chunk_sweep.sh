#!/usr/bin/env bash
# The relation loss's block size on a GPU, measured: AUTO_CHUNK_ELEMENTS["other"] in arc_dist/distill/relation_loss.py
# comes from this sweep. One call on a lent GPU machine, after scripts/gpu_kit.sh here (as scripts/gpu_check.sh):
#
#   run(command="bash scripts/gpu_chunk_sweep.sh", carry=[".gpu-kit"], timeout_s=360)
#
# On an H200 (2026-12-04) it took 205 s without the 64M and 128M budgets, which ran in a second call (82 s with
# its setup).
#
# For each shape and work-buffer budget E (elements per buffer; the loss keeps four), benchmarks/relation_loss.py
# runs with min(S, 512) query rows R per block and E / (R x S) (batch, head) pairs, in bf16, against the reference, and
# the JSON lines land in $OUT/sweep.jsonl. Shapes: issue #5's (B=8, A_r=12, teacher 768, student 384) at S = 512,
# 1024 and 2048, and a BERT-large stage-1 shape (B=32, A_r=64, teacher 1024, student 384, S=512). Then the stage-1
# step at batch 256 x 128, where a 3x384 student's fp32 step is no longer mostly waiting on the host.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/.gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEVICE=${ARC_CHECK_DEVICE:-cuda}  # rehearsal here: ARC_CHECK_DEVICE=cpu PYTHON=.venv/bin/python (tiny sizes)
bash scripts/gpu_check.sh --step setup > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD
LOG=$OUT/sweep.log
: > "$OUT/sweep.jsonl"
sweep() {  # sweep "SHAPE ARGS" S BUDGET...
    local shape=$1 s=$2 budget heads rows
    shift 2
    rows=$(( s < 512 ? s : 512 ))  # as auto_chunk: whole rows up to 512 keys
    for budget in "$@"; do
        heads=$(( budget / (rows * s) ))
        [ "$heads" -ge 1 ] || heads=1
        echo "=== $shape S=$s budget=$budget chunk_heads=$heads" | tee -a "$LOG"
        # the last stdout line is the report, one JSON line
        timeout 60 "$PY" benchmarks/relation_loss.py --device "$DEVICE" --dtype bfloat16 $shape --seq-lens "$s" \
            --chunk-size 512 --chunk-heads "$heads" --out /tmp/sweep.json 2>> "$LOG" | tee -a "$LOG" \
            | tail -n 1 >> "$OUT/sweep.jsonl"
    done
}
M=$((1 << 20))
if [ "$DEVICE" != cuda ]; then
    sweep "--batch 1 --heads 12 --teacher-width 768 --student-width 384" 64 $((64 * 512)) $((64 * 1024))
    "$PY" benchmarks/stage1_step.py --device "$DEVICE" --teacher /tmp/minilm_random --quick --out /tmp/s1.json >> "$LOG"
    cat "$OUT/sweep.jsonl"
    exit
fi
ISSUE="--batch 8 --heads 12 --teacher-width 768 --student-width 384"
LARGE="--batch 32 --heads 64 --teacher-width 1024 --student-width 384"
sweep "$ISSUE" 512 $((32 * M)) $((8 * M)) $((4 * M)) $((2 * M)) $((1 * M))
sweep "$ISSUE" 1024 $((32 * M)) $((8 * M)) $((2 * M))
sweep "$ISSUE" 2048 $((128 * M)) $((64 * M)) $((32 * M)) $((8 * M)) $((2 * M))
sweep "$LARGE" 512 $((128 * M)) $((64 * M)) $((32 * M)) $((8 * M)) $((2 * M))
echo "=== stage-1 step, batch 256 x 128" | tee -a "$LOG"
timeout 120 "$PY" benchmarks/stage1_step.py --device "$DEVICE" --teacher /tmp/minilm_random --dtypes bf16 fp32 \
    --batch 256 --out "$OUT/stage1_step_b256.json" >> "$LOG" 2>&1
echo "=== done rc=$?" | tee -a "$LOG"
grep -E "^ +[0-9]+ +[0-9.]+ " "$LOG"

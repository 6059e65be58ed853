#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (the `device` tool; 15 minutes of device time a session).
# Prepare here first: `scripts/gpu_kit.sh` (writes the git-ignored .gpu-kit/). Then one call:
#
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu-kit"], timeout_s=600)
#
# On an H200 (2026-12-04) it took 255 s: setup 26, benchmarks 7 + 28 + 17, pipeline 177; the steps' time limits
# add up to 570 s:
# 1. setup: the kit's wheels into the image's Python (no PyPI there), versions, the GPU; a MiniLM-shaped teacher
#    with random weights (the real weights are 88 MB; timings do not depend on the values).
# 2. benchmarks 1-3 of issue #5 (what it asks of a GPU, so first): relation loss (bf16), stage-1 step (speed-up
#    and MFU) and inference, bf16 and fp32.
# 3. pipeline: the whole ARC pipeline end to end on one GPU through the deepspeed launcher: NCCL, bf16, the
#    teacher fine-tuned, stage 1 with the ZeRO-3 teacher, stage 2 with the rank-synchronised sampler, the exports
#    (small step counts: this proves the GPU path, it measures nothing).
# A rehearsal here, on CPU with tiny sizes, checks the script itself before device time is spent on it:
#   ARC_CHECK_DEVICE=cpu PYTHON=.venv/bin/python bash scripts/gpu_check.sh     (a few minutes; output in .gpu-out/)
# Everything lands in $OUT (the tool's folder; .gpu-out/ elsewhere): all.log and one JSON per benchmark. A step
# that fails is reported and the next one still runs, so one call gives every answer it can.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SELF=$PWD/scripts/gpu_check.sh
KIT=$PWD/.gpu-kit
OUT=${OUT:-$PWD/.gpu-out}
mkdir -p "$OUT"
LOG=$OUT/all.log
PY=${PYTHON:-python3}
DEVICE=${ARC_CHECK_DEVICE:-cuda}
QUICK=()  # the rehearsal on CPU: the benchmarks' --quick sizes, fewer pipeline steps
[ "$DEVICE" = cuda ] || QUICK=(--quick)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}  # DeepSpeed's CPU op, built once
if [ ! -d "$KIT/wheels" ]; then
    echo "error: $KIT missing: run scripts/gpu_kit.sh here and carry .gpu-kit" | tee "$LOG"
    exit 2
fi
failed=()

step() {  # step NAME TIMEOUT_S COMMAND...: run, log, report; never stops the script
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "=== $name: $*" | tee -a "$LOG"
    timeout "$limit" bash "$SELF" --step "$@" >> "$LOG" 2>&1  # a child, so that functions run under timeout too
    rc=$?
    echo "=== $name: rc=$rc after $(( $(date +%s) - start )) s" | tee -a "$LOG"
    [ "$rc" = 0 ] || failed+=("$name")
    return 0
}

setup() {
    # Into the image's own Python (its bin/ must hold the `deepspeed` launcher the pipeline calls), no deps: the
    # kit holds exactly what the image lacks.
    if [ "$DEVICE" = cuda ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            "$KIT"/wheels/*.whl || return 1
        nvidia-smi -L
    fi
    "$PY" - <<'EOF'
import importlib.metadata as m
import torch
print({p: m.version(p) for p in ("torch", "deepspeed", "transformers", "webdataset", "pydantic")})
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), "bf16 native:", torch.cuda.is_bf16_supported(including_emulation=False))
from transformers import AutoConfig, AutoModel, AutoTokenizer
config = AutoConfig.from_pretrained(".gpu-kit/minilm")
torch.manual_seed(0)
AutoModel.from_config(config).save_pretrained("/tmp/minilm_random")
AutoTokenizer.from_pretrained(".gpu-kit/minilm").save_pretrained("/tmp/minilm_random")
from arc_dist.engine.distributed import resolve_dtype
print("train.precision=auto resolves to", resolve_dtype("auto"))
EOF
}

pipeline() {
    local p=() stage steps=${#QUICK[@]}
    for stage in finetune distill compress; do
        [ "$DEVICE" = cuda ] && p+=(--set "$stage.train.precision=bf16")
    done
    # 120/60/120 steps on the GPU; a tenth of that in the rehearsal
    [ "$steps" = 0 ] && steps=10 || steps=1
    "$PY" -m arc_dist.pipeline --teacher /tmp/minilm_random --task sst2 --glue-dir "$KIT/glue" \
        --text "$KIT/text" --out /tmp/gpu_pipeline --nprocs 1 "${p[@]}" \
        --set finetune.train.steps=$((12 * steps)) --set finetune.data.eval_every_steps=$((6 * steps)) \
        --set distill.train.steps=$((6 * steps)) --set distill.metrics.log_every=$steps \
        --set compress.train.steps=$((12 * steps)) --set compress.schedule.replacing_steps=$((8 * steps)) \
        --set compress.data.eval_every_steps=$((6 * steps)) \
        --set finetune.optim.warmup_steps=$steps --set distill.optim.warmup_steps=$steps \
        --set compress.optim.warmup_steps=$steps || return 1
    cp /tmp/gpu_pipeline/report.json "$OUT/pipeline_report.json"
    "$PY" - <<'EOF'
import json, pathlib
for path in sorted(pathlib.Path("/tmp/gpu_pipeline").rglob("summary.json")):
    print(path, json.loads(path.read_text()))
EOF
}

if [ "${1:-}" = --step ]; then  # inside step(): run one function or command
    shift
    "$@"
    exit
fi
: > "$LOG"
step setup 90 setup
if [ ${#failed[@]} = 0 ]; then
    # The benchmarks first: they are what issue #5 asks of a GPU; the end-to-end run after them.
    step relation_loss 60 "$PY" benchmarks/relation_loss.py --device "$DEVICE" --dtype bfloat16 \
        "${QUICK[@]}" --out "$OUT/relation_loss_bf16.json"
    step stage1_step 90 "$PY" benchmarks/stage1_step.py --device "$DEVICE" --teacher /tmp/minilm_random \
        --dtypes bf16 fp32 "${QUICK[@]}" --out "$OUT/stage1_step.json"
    step inference 60 "$PY" benchmarks/inference.py --device "$DEVICE" --teacher /tmp/minilm_random \
        --dtypes bf16 fp32 "${QUICK[@]}" --out "$OUT/inference.json"
    step pipeline 270 pipeline
fi
echo "failed steps: ${failed[*]:-none}" | tee -a "$LOG"
[ ${#failed[@]} = 0 ]

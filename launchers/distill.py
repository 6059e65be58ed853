"""Stage 1 launcher: parses arguments and calls the library.

    deepspeed --num_gpus 2 launchers/distill.py --config configs/distill_minilm.yaml train.steps=300
    torchrun --nproc_per_node 2 launchers/distill.py --config configs/distill_minilm.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e`

from arc_dist.cli import run_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_job("distill", sys.argv[1:]))

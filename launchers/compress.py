"""Stage 2 launcher (one-to-one layer replacement on a GLUE task): parses arguments and calls the library.

    deepspeed --num_gpus 2 launchers/compress.py --config configs/compress_minilm_sst2.yaml [section.key=value ...]
    torchrun --nproc_per_node 2 launchers/compress.py --config ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e`

from arc_dist.cli import run_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_job("replace", sys.argv[1:]))

import os
import sys
from pathlib import Path

# The suite is the CPU suite (gloo, DeepSpeed's CPU accelerator), also on a GPU host, where the code would otherwise
# pick CUDA + NCCL under a CPU accelerator. GPU checks are run by hand (README, Performance).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed JIT-compiles its CPU comm op on first use; cache it in the repo so only the first run pays (~20 s).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

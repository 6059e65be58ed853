"""Process-group set-up and DeepSpeed engine construction (teacher and student), shared by both stages."""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from arc_dist.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("arc_dist")

# Top-level DeepSpeed keys we accept. DeepSpeed silently ignores unknown keys, so a typo ("zero_optimisation")
# would run a job without ZeRO at all; we refuse it instead.
KNOWN_DS_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "bf16", "fp16", "zero_optimization", "zero_allow_untested_optimizer", "steps_per_print",
    "wall_clock_breakdown", "activation_checkpointing", "communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "flops_profiler", "tensorboard", "comms_logger", "checkpoint", "data_types",
    "zero_force_ds_cpu_optimizer", "memory_breakdown", "dump_state", "seed", "timers",
}
KNOWN_ZERO_KEYS = {
    "stage", "overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size",
    "reduce_scatter", "allgather_partitions", "round_robin_gradients", "offload_param", "offload_optimizer",
    "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_model_persistence_threshold",
    "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_gather_16bit_weights_on_model_save",
    "sub_group_size", "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_gradients",
    "memory_efficient_linear", "mics_shard_size", "elastic_checkpoint", "ignore_unused_parameters",
    "use_multi_rank_bucket_allreduce", "load_from_fp32_weights",
}


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float = 600.0) -> DistEnv:
    """Join (or create, for a plain `python` run) the process group: NCCL on GPU, gloo on CPU.

    Works under the `deepspeed` launcher, torchrun and Slurm-started torchrun alike: all of them export
    RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT.
    """
    import deepspeed

    # DeepSpeed JIT-builds its CPU comm op with the first `ninja` on PATH. A system ninja and the venv's hash the
    # build differently and rebuild each other's output (30-100 s each time): always use the venv's.
    venv_bin = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != venv_bin:
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
    if "RANK" not in os.environ:  # a single process started without a launcher
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend, auto_mpi_discovery=False, verbose=False,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        if device.type == "cpu":  # only DeepSpeed's CPU backend makes the buffer
            release_deepspeed_shm_buffer()
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def deepspeed_shm_buffer(rank: int | str, addr: str | None = None, port: int | str | None = None) -> Path:
    """The /dev/shm file DeepSpeed's CPU backend creates for `rank` of the job rendezvousing at `addr`:`port`
    (default: MASTER_ADDR and MASTER_PORT); "*" in any of them makes it a glob pattern."""
    addr = os.environ.get("MASTER_ADDR", "") if addr is None else addr
    port = os.environ.get("MASTER_PORT", "") if port is None else port
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_deepspeed_shm_buffer() -> None:
    """Unlink this rank's DeepSpeed shared-memory all-reduce buffer (after every rank has mapped it).

    On CPU, when every rank is on one node (the deepspeed launcher sets LOCAL_SIZE), DeepSpeed's init maps a 69 MB
    /dev/shm buffer per rank for its shared-memory all-reduce and never unlinks it: every such job leaked 69 MB of
    RAM per rank until reboot (21 GB on one 24 GB test machine after a day). Each rank opens every other rank's
    buffer inside init, so once all ranks are past init (the barrier) the names are no longer needed; the mappings
    stay valid until the processes exit, and then the memory is freed.
    """
    dist.barrier()
    deepspeed_shm_buffer(dist.get_rank()).unlink(missing_ok=True)


def native_bf16() -> bool:
    """Whether bf16 matmuls run natively: a CUDA device that supports them, or a CPU with AMX or AVX512-BF16.
    Elsewhere PyTorch emulates bf16, and it is far slower than fp32 (measured 0.6 vs 46 GFLOP/s per core on an
    AVX2 EPYC, against ~4x faster than fp32 on an AMX Xeon)."""
    if torch.cuda.is_available():
        # Not the default including_emulation=True: pre-Ampere GPUs (V100, T4) pass that check by running bf16
        # emulated, which is what `auto` must avoid. This form reads the device's properties and creates no context.
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(precision: str) -> torch.dtype:
    """train.precision -> dtype: 'auto' is bf16 where it is native (see `native_bf16`), else fp32."""
    if precision == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    if precision == "bf16" and not native_bf16():
        log.warning("train.precision=bf16 on a device without native bf16 matmuls: they are emulated and much "
                    "slower than fp32 here; train.precision=auto picks the fast one")
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def load_ds_config(path: str, fill: dict[str, Any]) -> dict[str, Any]:
    """Read a DeepSpeed JSON and fill its "auto" values from the project config (the one source of truth).

    `fill` maps dotted keys ("bf16.enabled") to values. A key that is set to something other than "auto" and
    disagrees with the project config is an error: two places disagreeing about the batch size is a bug.
    """
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = REPO_ROOT / p
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist (see ds_configs/ for the shipped ones)")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {p} is not valid JSON: {e}") from None
    unknown = sorted(set(cfg) - KNOWN_DS_KEYS)
    if unknown:
        raise ConfigError(f"DeepSpeed config {p}: unknown top-level keys {unknown} (DeepSpeed would ignore them)")
    unknown = sorted(set(cfg.get("zero_optimization", {})) - KNOWN_ZERO_KEYS)
    if unknown:
        raise ConfigError(f"DeepSpeed config {p}: unknown zero_optimization keys {unknown}")
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ConfigError(f"DeepSpeed config {p}: remove {key!r}; the optimizer and schedule come from `optim.*`")
    cfg = copy.deepcopy(cfg)
    for dotted, value in fill.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        current = node.get(leaf, "auto")
        if current == "auto":
            node[leaf] = value
        elif current != value:
            raise ConfigError(
                f"DeepSpeed config {p}: {dotted}={current!r} disagrees with the project config ({value!r}); "
                f'set it to "auto" there and change it in the YAML config instead'
            )
    return cfg


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous started right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

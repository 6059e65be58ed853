# shellcheck shell=bash
# Shared logic of slurm/*.sbatch: sourced by the batch script (on the first node of the allocation), never run.
#
# What it does, once per attempt (a requeued job runs it again, with the same job id and the same run_dir):
#   1. resolves the settings below from the environment (sbatch exports the submitting shell's environment);
#   2. traps USR1 (`#SBATCH --signal=B:USR1@N`, the warning before the time limit, or
#      `scancel --batch --signal=USR1 <job>`) and TERM: the trap only touches <run_dir>/STOP, kills nothing;
#      every rank of the training program sees the file, finishes its step, all ranks agree, write a checkpoint,
#      rank 0 deletes STOP, the program exits 0 with "completed": false in <run_dir>/summary.json;
#   3. srun: one task per node, each running torchrun with a c10d rendezvous on the first node of the job;
#   4. afterwards: stop requested and summary.json (written by this attempt) says completed=false ->
#      `scontrol requeue $SLURM_JOB_ID` and exit 0; the next attempt resumes from <run_dir>/checkpoints by itself
#      (checkpoint.resume=auto). Otherwise exit with srun's status.
#
# Settings (environment variables; defaults in brackets):
#   ARC_REPO        the checkout holding launchers/ and .venv       [found by the sbatch file]
#   ARC_LAUNCHER    python program, relative to ARC_REPO or absolute [set by the sbatch file]
#   ARC_CONFIG      YAML config (relative to the submit dir, else to ARC_REPO); empty = no --config
#   ARC_RUN_DIR     run directory, the same for every attempt        [run_dir: of ARC_CONFIG]
#   ARC_OVERRIDES   extra config overrides, space separated ("train.steps=100 optim.lr=1e-4"); arguments given
#                   to the sbatch script itself are appended as overrides too
#   GPUS_PER_NODE   ranks per node        [$SLURM_GPUS_ON_NODE, else the GPUs nvidia-smi lists, else 1 (CPU)]
#   ARC_PYTHON      python of the environment                        [$ARC_REPO/.venv/bin/python, else python3]
#   ARC_RDZV_PORT   rendezvous port on the first node                [20000 + job id % 10000]
#   ARC_LOG_DIR     per-job log directory, holding attempt<N>-<node>.log (torchrun and all ranks of that node)
#                   [the job's --output file without its .out suffix, e.g. runs/slurm/<name>-<id>/]
#   OMP_NUM_THREADS [CPUs of the task / ranks per node, at least 1]
#   TORCH_EXTENSIONS_DIR [$ARC_REPO/.cache/torch_extensions, shared so DeepSpeed's JIT ops build once]
#   GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME: set them when the node's hostname does not resolve to the address
#                   of the interface the nodes talk over (gloo and NCCL pick their address from the hostname).
#
# GPU notes: request GPUs with `#SBATCH --gpus-per-node=G` (or `sbatch --gpus-per-node=G`); one task per node
# still, torchrun starts G ranks (LOCAL_RANK selects the GPU; the launchers use NCCL on GPU). Give the task the
# node's CPUs (`--cpus-per-task`), which srun here passes on explicitly (Slurm 22.05 srun does not read
# SLURM_CPUS_PER_TASK). Useful NCCL settings: NCCL_DEBUG=WARN (INFO to debug hangs), NCCL_SOCKET_IFNAME=<the
# cluster interface, e.g. ib0 or ^lo,docker>, NCCL_IB_DISABLE=1 only where there is no InfiniBand,
# TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (set below) so a dead rank ends the job instead of hanging it.

arc_log() { echo "[arc-slurm $(date '+%F %T') job ${SLURM_JOB_ID:-?} attempt ${SLURM_RESTART_COUNT:-0}] $*"; }
arc_die() { arc_log "error: $*" >&2; exit 2; }

arc_abspath() {  # $1 path, $2 base directory for a relative path
  case $1 in /*) echo "$1" ;; *) echo "$2/$1" ;; esac
}

arc_resolve_settings() {
  [ -n "${SLURM_JOB_ID:-}" ] || arc_die "not inside a Slurm job (submit with sbatch)"
  [ -n "${ARC_REPO:-}" ] && [ -d "$ARC_REPO" ] || arc_die "ARC_REPO is not a directory: '${ARC_REPO:-}'"
  [ -n "${ARC_LAUNCHER:-}" ] || arc_die "ARC_LAUNCHER is not set"
  local submit=${SLURM_SUBMIT_DIR:-$PWD}
  ARC_LAUNCHER=$(arc_abspath "$ARC_LAUNCHER" "$ARC_REPO")
  [ -f "$ARC_LAUNCHER" ] || arc_die "launcher $ARC_LAUNCHER does not exist"
  if [ -z "${ARC_PYTHON:-}" ]; then
    if [ -x "$ARC_REPO/.venv/bin/python" ]; then ARC_PYTHON=$ARC_REPO/.venv/bin/python; else ARC_PYTHON=python3; fi
  fi
  ARC_CONFIG_ARGS=()
  if [ -n "${ARC_CONFIG:-}" ]; then
    if [ ! -f "$(arc_abspath "$ARC_CONFIG" "$submit")" ] && [ -f "$(arc_abspath "$ARC_CONFIG" "$ARC_REPO")" ]; then
      ARC_CONFIG=$(arc_abspath "$ARC_CONFIG" "$ARC_REPO")
    else
      ARC_CONFIG=$(arc_abspath "$ARC_CONFIG" "$submit")
    fi
    [ -f "$ARC_CONFIG" ] || arc_die "config $ARC_CONFIG does not exist"
    ARC_CONFIG_ARGS=(--config "$ARC_CONFIG")
  fi
  if [ -z "${ARC_RUN_DIR:-}" ] && [ -n "${ARC_CONFIG:-}" ]; then
    ARC_RUN_DIR=$("$ARC_PYTHON" -c \
      'import sys, yaml; print((yaml.safe_load(open(sys.argv[1])) or {}).get("run_dir") or "")' "$ARC_CONFIG") \
      || arc_die "cannot read run_dir from $ARC_CONFIG with $ARC_PYTHON"
  fi
  [ -n "${ARC_RUN_DIR:-}" ] \
    || arc_die "set ARC_RUN_DIR (the same directory for every attempt, so that a requeued job resumes)"
  ARC_RUN_DIR=$(arc_abspath "$ARC_RUN_DIR" "$submit")
  mkdir -p "$ARC_RUN_DIR" || arc_die "cannot create $ARC_RUN_DIR"

  ARC_NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  if [ -z "${GPUS_PER_NODE:-}" ]; then
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then GPUS_PER_NODE=$SLURM_GPUS_ON_NODE
    elif command -v nvidia-smi >/dev/null 2>&1 && [ "$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" -gt 0 ]; then
      GPUS_PER_NODE=$(nvidia-smi -L | grep -c '^GPU')
    else GPUS_PER_NODE=1; fi
  fi
  ARC_HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  [ -n "$ARC_HEAD" ] || arc_die "cannot expand SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'"
  ARC_RDZV_PORT=${ARC_RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}

  if [ -z "${ARC_LOG_DIR:-}" ]; then
    local out
    out=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p' | head -n 1)
    if [ -n "$out" ] && [ "$out" != "/dev/null" ]; then ARC_LOG_DIR=${out%.*}
    else ARC_LOG_DIR=$ARC_RUN_DIR/slurm-logs/${SLURM_JOB_NAME:-job}-$SLURM_JOB_ID; fi
  fi
  mkdir -p "$ARC_LOG_DIR" || arc_die "cannot create log directory $ARC_LOG_DIR"

  local cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / GPUS_PER_NODE > 0 ? cpus / GPUS_PER_NODE : 1 ))}
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ARC_REPO/.cache/torch_extensions}
  export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export PYTHONUNBUFFERED=1
}

ARC_STOP_REQUESTED=0
arc_on_signal() {  # only touch the stop file: the ranks checkpoint and exit by themselves
  ARC_STOP_REQUESTED=1
  if [ -n "${ARC_SETTINGS_DONE:-}" ]; then
    arc_log "received SIG$1: touching $ARC_RUN_DIR/STOP (the ranks finish the step, checkpoint and exit)"
    touch "$ARC_RUN_DIR/STOP"
  else
    arc_log "received SIG$1 before the launch: the run will stop after its first step"
  fi
}

# $1: path of summary.json; prints true/false when written by this attempt (newer than the marker), else nothing
arc_summary_completed() {
  [ -f "$1" ] && [ "$1" -nt "$2" ] || return 0
  "$ARC_PYTHON" -c 'import json, sys; print(str(json.load(open(sys.argv[1])).get("completed")).lower())' \
    "$1" 2>/dev/null
}

# Entry point: arc_slurm_main [extra overrides...]
arc_slurm_main() {
  trap 'arc_on_signal USR1' USR1
  trap 'arc_on_signal TERM' TERM
  arc_resolve_settings
  ARC_SETTINGS_DONE=1
  local attempt=${SLURM_RESTART_COUNT:-0}
  local overrides=()
  # shellcheck disable=SC2206  # word splitting of ARC_OVERRIDES is the point
  [ -n "${ARC_OVERRIDES:-}" ] && overrides=($ARC_OVERRIDES)
  overrides+=("$@")

  arc_log "attempt $attempt (SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-unset}) on $SLURM_JOB_NODELIST:" \
    "$ARC_NNODES node(s) x $GPUS_PER_NODE rank(s), rendezvous $ARC_HEAD:$ARC_RDZV_PORT"
  arc_log "launcher $ARC_LAUNCHER ${ARC_CONFIG_ARGS[*]} run_dir=$ARC_RUN_DIR ${overrides[*]}"
  arc_log "logs: $ARC_LOG_DIR/attempt$attempt-<node>.log; python $ARC_PYTHON; OMP_NUM_THREADS=$OMP_NUM_THREADS"

  local marker=$ARC_LOG_DIR/.attempt$attempt.started
  touch "$marker"
  if [ "$ARC_STOP_REQUESTED" = 1 ]; then
    touch "$ARC_RUN_DIR/STOP"
  elif [ -e "$ARC_RUN_DIR/STOP" ]; then
    arc_log "removing a stale $ARC_RUN_DIR/STOP"
    rm -f "$ARC_RUN_DIR/STOP"
  fi

  local srun_opts=(--nodes="$ARC_NNODES" --ntasks="$ARC_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1
                   --output="$ARC_LOG_DIR/attempt$attempt-%N.log" --open-mode=append)
  [ -n "${SLURM_CPUS_PER_TASK:-}" ] && srun_opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  # srun runs in the background so that `wait` returns at once when USR1/TERM arrive (bash runs traps only
  # between commands); the loop then waits again until srun really ends.
  srun "${srun_opts[@]}" \
    "$ARC_PYTHON" -m torch.distributed.run --nnodes "$ARC_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
      --rdzv_backend c10d --rdzv_endpoint "$ARC_HEAD:$ARC_RDZV_PORT" --rdzv_id "$SLURM_JOB_ID" --max_restarts 0 \
      "$ARC_LAUNCHER" "${ARC_CONFIG_ARGS[@]}" "run_dir=$ARC_RUN_DIR" "${overrides[@]}" &
  local srun_pid=$! rc
  while :; do
    wait "$srun_pid"; rc=$?
    if [ "$rc" -gt 128 ] && kill -0 "$srun_pid" 2>/dev/null; then continue; fi
    break
  done
  arc_log "srun exited with status $rc"

  local completed
  completed=$(arc_summary_completed "$ARC_RUN_DIR/summary.json" "$marker")
  if [ "$rc" -ne 0 ]; then
    local f
    for f in "$ARC_LOG_DIR"/attempt"$attempt"-*.log; do
      [ -f "$f" ] && { arc_log "last lines of $f:"; tail -n 30 "$f"; }
    done
  fi
  if [ "$ARC_STOP_REQUESTED" = 1 ] && [ "$completed" = false ]; then
    trap - USR1 TERM
    arc_log "stopped before the end (summary.json: completed=false); requeueing job $SLURM_JOB_ID"
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit 0
    fi
    arc_log "error: scontrol requeue $SLURM_JOB_ID failed (submitted without --requeue, or cancelled?)"
    exit 3
  fi
  arc_log "done (completed=${completed:-unknown}, stop requested=$ARC_STOP_REQUESTED)"
  exit "$rc"
}

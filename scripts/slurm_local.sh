#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for testing the sbatch scripts (root only).
#
#   scripts/slurm_local.sh up        # install slurm-wlm + munge if missing, start munged, slurmctld, 2 slurmd
#   export SLURM_CONF=$(scripts/slurm_local.sh conf)
#   sbatch --wait ... ; sinfo ; squeue
#   scripts/slurm_local.sh status
#   scripts/slurm_local.sh down      # cancel jobs, stop daemons by PID file, delete veths, namespaces, bridge
#
# Layout: the controller runs on the host on bridge arcbr0 = 10.200.0.1; nodes n1 (10.200.0.2) and n2
# (10.200.0.3) are slurmd daemons in network namespaces arc_n1/arc_n2, each also in its own UTS namespace
# (hostname n1/n2) and private mount namespace (a bind-mounted /etc/hosts naming the three addresses). Jobs run
# inside the node's namespaces, see the same filesystem, and can only talk to the other node and the controller.
# munged is private too (own key, socket and PID file under the state directory), so it never touches the
# system's /run/munge. Every file lives under $SLURM_LOCAL (default <repo>/.slurm-local, git-ignored).
#
# The bridge and namespace names are machine-wide, so only one such cluster can exist at a time: `up` and `down`
# take the lock $ARC_SLURM_LOCK (flock); tests/integration/slurm_harness.py holds it for a whole pytest session
# and tells this script so with ARC_SLURM_LOCK_HELD=1. A cluster started by hand holds no lock once `up` returns:
# the next `up` (e.g. a pytest session) replaces it.
#
# Exit codes of `up`: 0 ok, 3 packages missing and cannot be installed, 4 `ip netns` not permitted, 5 not root,
# 6 another session holds the lock, 1 anything else (the daemons' logs are in $SLURM_LOCAL/log).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
D=${SLURM_LOCAL:-$REPO/.slurm-local}
D=$(mkdir -p "$D" && cd "$D" && pwd)
CONF=$D/slurm.conf
MUNGE_SOCKET=$D/munge/munge.socket
NODES=(n1 n2)
BRIDGE=arcbr0
BRIDGE_ADDR=10.200.0.1
CLUSTER=arclocal
CTLD_PORT=${ARC_SLURMCTLD_PORT:-6917}   # the reference recipes use 6817/6837/6857 and slurmd 6818
SLURMD_PORT=${ARC_SLURMD_PORT:-6918}
WAIT_IDLE_S=${ARC_SLURM_WAIT_S:-60}
LOCK=${ARC_SLURM_LOCK:-/run/lock/arc-slurm-local.lock}

log() { echo "slurm_local: $*" >&2; }
node_addr() { case $1 in n1) echo 10.200.0.2 ;; n2) echo 10.200.0.3 ;; esac; }
netns() { echo "arc_$1"; }
veth() { echo "arcv-$1"; }

take_lock() {  # on fd 9, released when this script exits; the daemons are started with fd 9 closed
  [ "${ARC_SLURM_LOCK_HELD:-0}" = 1 ] && return 0
  exec 9>>"$LOCK" || return 0
  flock -n 9 || { log "another session holds $LOCK (a pytest run using the cluster?); try again later"; exit 6; }
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pidfile() {  # $1 = PID file: SIGTERM, wait up to 10 s, then SIGKILL; remove the file
  local f=$1 p i
  [ -s "$f" ] || { rm -f "$f"; return 0; }
  p=$(cat "$f")
  if kill -0 "$p" 2>/dev/null; then
    kill "$p" 2>/dev/null
    for i in $(seq 1 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$p" 2>/dev/null; then kill -9 "$p" 2>/dev/null; log "killed $(basename "$f") pid=$p"
    else log "stopped $(basename "$f") pid=$p"; fi
  fi
  rm -f "$f"
}

kill_netns_pids() {  # leftover job processes (slurmstepd, torchrun, python) inside one of OUR namespaces
  local ns=$1 pids i
  [ -e "/run/netns/$ns" ] || return 0
  pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
  [ -n "${pids// /}" ] || return 0
  log "terminating processes left in netns $ns: $pids"
  kill $pids 2>/dev/null
  for i in $(seq 1 20); do
    pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
    [ -n "${pids// /}" ] || return 0
    sleep 0.25
  done
  kill -9 $pids 2>/dev/null
}

ensure_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    && command -v sbatch >/dev/null && return 0
  command -v apt-get >/dev/null || { log "slurm-wlm/munge missing and no apt-get"; return 3; }
  log "installing slurm-wlm and munge with apt-get"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >"$D/apt.log" 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$D/apt.log" 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >>"$D/apt.log" 2>&1 \
      || { log "apt-get install slurm-wlm munge failed (see $D/apt.log): $(tail -n 2 "$D/apt.log" | tr '\n' ' ')"
           return 3; }
  fi
  command -v slurmctld >/dev/null && command -v munged >/dev/null \
    || { log "slurm-wlm installed but no slurmctld/munged"; return 3; }
}

check_netns() {
  local probe="arc_probe_$$"
  if ! ip netns add "$probe" 2>"$D/netns_probe.err"; then
    log "ip netns is not permitted here: $(cat "$D/netns_probe.err")"; return 4
  fi
  ip netns del "$probe" 2>/dev/null
  command -v nsenter >/dev/null && command -v unshare >/dev/null \
    || { log "nsenter/unshare missing (util-linux)"; return 4; }
}

cmd_down() {
  if [ -f "$CONF" ] && pid_alive "$D/slurmctld.pid"; then
    # cancel jobs first so that slurmstepd and the job's processes end cleanly (bounded)
    SLURM_CONF=$CONF timeout 10 scancel --full --user="$(id -un)" 2>/dev/null
    SLURM_CONF=$CONF timeout 10 scancel --user="$(id -un)" 2>/dev/null
    local i
    for i in $(seq 1 30); do
      [ -z "$(SLURM_CONF=$CONF timeout 5 squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  local n
  for n in "${NODES[@]}"; do stop_pidfile "$D/slurmd-$n.pid"; done
  stop_pidfile "$D/slurmctld.pid"
  for n in "${NODES[@]}"; do kill_netns_pids "$(netns "$n")"; done
  stop_pidfile "$D/munge/munged.pid"
  # network: veths before namespaces, then the bridge
  for n in "${NODES[@]}"; do
    ip link del "$(veth "$n")" 2>/dev/null && log "deleted veth $(veth "$n")"
    ip netns del "$(netns "$n")" 2>/dev/null && log "deleted netns $(netns "$n")"
  done
  ip link del "$BRIDGE" 2>/dev/null && log "deleted bridge $BRIDGE"
  return 0
}

start_munge() {
  local m=$D/munge i
  mkdir -p "$m"
  chown munge:munge "$m" && chmod 700 "$m"
  if [ ! -s "$m/munge.key" ]; then
    if command -v mungekey >/dev/null; then mungekey --create --keyfile="$m/munge.key" >/dev/null 2>&1
    else dd if=/dev/urandom of="$m/munge.key" bs=1 count=1024 2>/dev/null; fi
  fi
  chown munge:munge "$m/munge.key" && chmod 400 "$m/munge.key"
  # the socket's directory must be reachable by every client (root here, but keep it usable)
  chmod 711 "$m"
  if ! pid_alive "$m/munged.pid"; then
    runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_SOCKET" --key-file="$m/munge.key" \
      --pid-file="$m/munged.pid" --log-file="$m/munged.log" --seed-file="$m/munged.seed" \
      || { log "munged failed to start: $(tail -n 3 "$m/munged.log" 2>/dev/null)"; return 1; }
  fi
  for i in $(seq 1 40); do
    munge -S "$MUNGE_SOCKET" -n 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1 && return 0
    sleep 0.25
  done
  log "munged does not answer on $MUNGE_SOCKET"; return 1
}

write_conf() {
  local h=$1 n
  mkdir -p "$D/state" "$D/spool" "$D/log"
  {
    echo "127.0.0.1 localhost"
    echo "$BRIDGE_ADDR $h ctl"
    for n in "${NODES[@]}"; do echo "$(node_addr "$n") $n"; done
  } >"$D/hosts"
  cat >"$CONF" <<EOC
# written by scripts/slurm_local.sh; do not edit (rewritten by every 'up')
ClusterName=$CLUSTER
SlurmctldHost=${h}($BRIDGE_ADDR)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also the delay before a requeued job may start again (default 120 s)
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
KillWait=10
# 0 = never purge finished jobs (scontrol still shows them) and keeps `sbatch --wait` polling every 2 s
# (it backs off x4 up to MinJobAge/2: 2, 10, 42 s... with the default)
MinJobAge=0
SchedulerParameters=sched_interval=2,bf_interval=5
EOC
  for n in "${NODES[@]}"; do
    echo "NodeName=$n NodeAddr=$(node_addr "$n") CPUs=1 State=UNKNOWN" >>"$CONF"
  done
  echo "PartitionName=debug Default=YES Nodes=ALL MaxTime=INFINITE State=UP" >>"$CONF"
}

setup_network() {
  ip link add "$BRIDGE" type bridge || return 1
  ip addr add "$BRIDGE_ADDR/24" dev "$BRIDGE" && ip link set "$BRIDGE" up || return 1
  local n
  for n in "${NODES[@]}"; do
    ip netns add "$(netns "$n")" || return 1
    ip link add "$(veth "$n")" type veth peer name eth0 netns "$(netns "$n")" || return 1
    ip link set "$(veth "$n")" master "$BRIDGE" up || return 1
    ip -n "$(netns "$n")" link set lo up || return 1
    ip -n "$(netns "$n")" addr add "$(node_addr "$n")/24" dev eth0 || return 1
    ip -n "$(netns "$n")" link set eth0 up || return 1
  done
}

nodes_idle() {
  local states
  states=$(SLURM_CONF=$CONF timeout 5 sinfo -h -N -o '%N %t' 2>/dev/null | sort -u)
  [ "$(echo "$states" | grep -c ' idle$')" -eq "${#NODES[@]}" ]
}

cmd_up() {
  [ "$(id -u)" -eq 0 ] || { log "must run as root (network namespaces, munge, slurmd)"; return 5; }
  ensure_packages || return $?
  check_netns || return $?
  cmd_down >/dev/null 2>&1   # leftovers of an earlier run (by PID file; stale namespaces and bridge)
  local h n i
  h=$(hostname -s)
  write_conf "$h"
  start_munge || return 1
  setup_network || { log "network setup failed"; return 1; }
  export SLURM_CONF=$CONF
  # -c: start with an empty queue (a killed session may have left jobs in the state files); -i: ignore state errors
  slurmctld -f "$CONF" -c -i || { log "slurmctld failed: $(tail -n 5 "$D/log/slurmctld.log")"; return 1; }
  # NB: nsenter + unshare, NOT `ip netns exec`: the latter remounts /sys, /sys/fs/cgroup is then empty and
  # slurmd 22.05 dies with "Unable to initialize cgroup plugin".
  for n in "${NODES[@]}"; do
    nsenter --net="/run/netns/$(netns "$n")" unshare --uts --mount --propagation private \
      sh -c "hostname $n && mount --bind '$D/hosts' /etc/hosts && exec slurmd -f '$CONF' -N $n" \
      || { log "slurmd $n failed: $(tail -n 5 "$D/log/slurmd-$n.log" 2>/dev/null)"; return 1; }
  done
  for i in $(seq 1 $((WAIT_IDLE_S * 2))); do
    nodes_idle && { SLURM_CONF=$CONF sinfo -N >&2; log "up: export SLURM_CONF=$CONF"; return 0; }
    sleep 0.5
  done
  log "nodes not idle after ${WAIT_IDLE_S}s:"
  SLURM_CONF=$CONF timeout 5 sinfo -N -l >&2
  tail -n 5 "$D"/log/*.log >&2
  return 1
}

cmd_status() {
  local f
  for f in "$D/munge/munged.pid" "$D/slurmctld.pid" "$D"/slurmd-*.pid; do
    [ -e "$f" ] || continue
    if pid_alive "$f"; then echo "$(basename "$f") pid=$(cat "$f") running"; else echo "$(basename "$f") stale"; fi
  done
  ip netns list 2>/dev/null | grep -E '^arc_n[0-9]' || echo "no namespaces"
  ip -br addr show "$BRIDGE" 2>/dev/null || echo "no bridge $BRIDGE"
  if pid_alive "$D/slurmctld.pid"; then
    SLURM_CONF=$CONF timeout 5 sinfo -N
    SLURM_CONF=$CONF timeout 5 squeue
    echo "export SLURM_CONF=$CONF"
  else
    echo "slurmctld not running"; return 1
  fi
}

case "${1:-}" in
  up) take_lock; cmd_up 9>&- ;;
  down) take_lock; cmd_down 9>&- ;;
  status) cmd_status ;;
  conf) echo "$CONF" ;;
  *) echo "usage: $0 up|down|status|conf   (state dir: \$SLURM_LOCAL, default <repo>/.slurm-local)" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A real, single-machine Slurm cluster on the loopback, for CI and for trying launchers/slurm.sbatch.
#
#   bash launchers/ci_slurm.sh install        # apt-get install slurmctld slurmd slurm-client munge (if missing)
#   bash launchers/ci_slurm.sh start DIR      # configure + start munged, slurmctld, slurmd under DIR
#   SLURM_CONF=DIR/slurm.conf sbatch ...      # talk to it (start prints the export line)
#   bash launchers/ci_slurm.sh stop DIR       # stop the daemons started by `start DIR`, remove DIR
#
# Everything lives in DIR: a freshly generated munge key and munged socket, slurm.conf (one node,
# NodeName=localhost, CPUs=2 by default), state, spool, logs and pid files, so nothing under /etc is
# touched and `stop` undoes `start`. Daemons run as root (SlurmUser=root), which a CI container is.
# Ports: SLURMCTLD_PORT / SLURMD_PORT (default: free loopback ports). Node size: SLURM_CPUS (default:
# every CPU of the machine). No accounting daemon (slurmdbd), so `sacct` is unavailable: job states
# come from `scontrol show job` (finished jobs are kept for an hour) and DIR/jobcomp.log.
set -euo pipefail

die() { echo "ci_slurm.sh: $*" >&2; exit 2; }
need_root() { [ "$(id -u)" -eq 0 ] || die "$1 needs root (got uid $(id -u)). Fix: run it as root or with sudo."; }
PACKAGES=(slurmctld slurmd slurm-client munge)

missing() {
  local m=()
  for b in slurmctld slurmd sbatch scontrol munged; do command -v "$b" >/dev/null 2>&1 || m+=("$b"); done
  echo "${m[*]:-}"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for SECONDS COMMAND...: poll COMMAND every 0.2 s until it succeeds; fail after SECONDS
wait_for() {
  local secs="$1"; shift
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

cmd_install() {
  local m; m=$(missing)
  if [ -z "$m" ]; then echo "ci_slurm.sh: Slurm and munge are installed"; return 0; fi
  need_root install
  command -v apt-get >/dev/null 2>&1 || die "missing $m and no apt-get. Fix: install Slurm (slurmctld, slurmd, client) and munge with your package manager."
  echo "ci_slurm.sh: installing ${PACKAGES[*]} (missing: $m)"
  DEBIAN_FRONTEND=noninteractive apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
}

dump_logs() {
  local dir="$1" f
  for f in "$dir"/munged.log "$dir"/slurmctld.log "$dir"/slurmd.log "$dir"/slurmctld.out "$dir"/slurmd.out; do
    [ -s "$f" ] && { echo "---- $f (last 20 lines)" >&2; tail -n 20 "$f" >&2; }
  done
  return 0
}

cmd_start() {
  local dir="${1:?usage: ci_slurm.sh start DIR}"
  local m; m=$(missing)
  [ -z "$m" ] || die "Slurm is not installed (missing: $m). Fix: bash launchers/ci_slurm.sh install (apt-get install -y --no-install-recommends ${PACKAGES[*]})"
  need_root start
  [ -e "$dir/slurm.conf" ] && die "$dir already holds a cluster. Fix: bash launchers/ci_slurm.sh stop $dir"
  mkdir -p "$dir"/{state,spool,munge}
  dir=$(cd "$dir" && pwd)
  chmod 700 "$dir/munge"
  local cpus="${SLURM_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"  # nproc obeys OMP_NUM_THREADS
  local ctld_port="${SLURMCTLD_PORT:-$(free_port)}" slurmd_port="${SLURMD_PORT:-$(free_port)}"

  # munge: a fresh key and a private socket (Slurm finds it through AuthInfo/CredInfo below)
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$dir/munge/munge.key"
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.sock" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/munged.seed" \
    || { dump_logs "$dir"; die "munged did not start"; }
  wait_for 10 munge --socket="$dir/munge/munge.sock" -n \
    || { dump_logs "$dir"; die "munged does not answer on $dir/munge/munge.sock"; }

  cat > "$dir/slurm.conf" <<EOF
# written by launchers/ci_slurm.sh: one node on the loopback
ClusterName=ci
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.sock
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/slurmd-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups (a container may not delegate them): track processes by /proc, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.log
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MinJobAge=3600
KillWait=5
SlurmdTimeout=60
InactiveLimit=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=ci Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF="$dir/slurm.conf"
  # -D: stay in the foreground under setsid, so `stop` can end the whole process group by its pid
  setsid slurmctld -D -i -f "$SLURM_CONF" >"$dir/slurmctld.out" 2>&1 < /dev/null &
  echo $! > "$dir/slurmctld.pgid"
  wait_for 30 scontrol ping \
    || { dump_logs "$dir"; die "slurmctld did not answer within 30 s (see $dir/slurmctld.log)"; }
  setsid slurmd -D -N localhost -f "$SLURM_CONF" >"$dir/slurmd.out" 2>&1 < /dev/null &
  echo $! > "$dir/slurmd.pgid"
  node_up() { sinfo -h -n localhost -o %T | grep -qE '^(idle|mixed|allocated)'; }
  wait_for 30 node_up \
    || { dump_logs "$dir"; sinfo -N -l >&2 || true; die "node localhost did not become idle within 30 s"; }
  echo "ci_slurm.sh: cluster up ($cpus CPUs, slurmctld on 127.0.0.1:$ctld_port)"
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop_pgids() {  # stop_pgids FILE...: TERM the process groups whose leaders' pids are in FILEs, KILL after 5 s
  local f pids=() pid
  for f in "$@"; do [ -s "$f" ] && pids+=("$(cat "$f")"); done
  [ "${#pids[@]}" -gt 0 ] || return 0
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for _ in $(seq 50); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
    [ "$alive" -eq 1 ] || return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}

cmd_stop() {
  local dir="${1:?usage: ci_slurm.sh stop DIR}"
  [ -d "$dir" ] || return 0
  [ -f "$dir/slurm.conf" ] && SLURM_CONF="$dir/slurm.conf" timeout 10 scancel --quiet --user=root 2>/dev/null || true
  stop_pgids "$dir/slurmd.pgid" "$dir/slurmctld.pgid"
  if [ -s "$dir/munge/munged.pid" ]; then
    local pid; pid=$(cat "$dir/munge/munged.pid")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 10); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true  # munged keeps nothing we need: DIR is removed next
  fi
  rm -rf "$dir"
}

case "${1:-}" in
  install) cmd_install ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  *) die "usage: ci_slurm.sh install | start DIR | stop DIR" ;;
esac

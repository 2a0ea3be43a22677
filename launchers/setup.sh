#!/usr/bin/env bash
# Set up a virtual environment for dist_attn in ./.venv (idempotent).
#   bash launchers/setup.sh          # runtime + DeepSpeed and megatron-core backends
#   bash launchers/setup.sh dev      # + test dependencies (and, as root, iproute2 + a local Slurm via apt)
# On a machine without an NVIDIA GPU, torch and triton are pinned through constraints-cpu.txt so the
# local CPU build of torch 2.13.0 is used and no CUDA wheels are pulled. On a GPU machine the torch
# already installed in the environment is kept (create the venv with --system-site-packages, or set
# DIST_ATTN_PYTHON to an interpreter that has your torch).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="deepspeed,megatron"
[ "${1:-}" = "dev" ] && extras="deepspeed,megatron,dev"

py="${DIST_ATTN_PYTHON:-}"
if [ -z "$py" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  py=.venv/bin/python
fi
"$py" -m pip install -q --upgrade pip >/dev/null

constraints=()
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  constraints=(-c constraints-cpu.txt)
  "$py" -m pip install -q "${constraints[@]}" torch triton
fi
# DeepSpeed's setup imports torch: build it against the torch installed above, and build no CUDA ops.
DS_BUILD_OPS=0 "$py" -m pip install -q "${constraints[@]}" --no-build-isolation -e ".[${extras}]"
if [ "${1:-}" = "dev" ]; then
  # The multi-node (network namespaces) and Slurm tests need iproute2 and a local Slurm with munge.
  sys_pkgs=(iproute2 slurmctld slurmd slurm-client munge)
  if ! command -v ip >/dev/null 2>&1 || ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -q >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${sys_pkgs[@]}" >/dev/null
    else
      echo "setup.sh: the multi-node and Slurm tests need, as root: apt-get install ${sys_pkgs[*]}" >&2
    fi
  fi
fi
echo "dist_attn environment ready: $py ($("$py" -c 'import torch; print("torch", torch.__version__)'))"

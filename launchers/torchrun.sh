#!/usr/bin/env bash
# Launch `python -m launchers.train` with torchrun on one or several nodes; Hydra overrides pass through.
#
#   bash launchers/torchrun.sh parallel.cp=2                        # one node: every GPU, or 2 CPU processes
#   NPROC_PER_NODE=4 bash launchers/torchrun.sh parallel.cp=4 trainer.steps=200
#   # two nodes (run on each, same MASTER_ADDR/PORT and DIST_ATTN_RUN_ID, NODE_RANK 0 and 1):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 DIST_ATTN_RUN_ID=exp1 bash launchers/torchrun.sh parallel.cp=16
#
# Environment: NNODES (1), NODE_RANK (0), MASTER_ADDR (one node: unset, a free local port is used),
# MASTER_PORT (29500),
# NPROC_PER_NODE (GPUs on this node, else 2), DIST_ATTN_PYTHON (.venv/bin/python),
# DIST_ATTN_RUN_ID (names the run directory outputs/<id>; every node must use the same one).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${DIST_ATTN_PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=python3
nnodes="${NNODES:-1}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  NPROC_PER_NODE=$([ "${gpus:-0}" -gt 0 ] && echo "$gpus" || echo 2)
fi
if [ -z "${DIST_ATTN_RUN_ID:-}" ]; then
  if [ "$nnodes" -gt 1 ]; then
    echo "torchrun.sh: set DIST_ATTN_RUN_ID to the same value on every node (it names the run directory)" >&2
    exit 2
  fi
  DIST_ATTN_RUN_ID="$(date +%Y-%m-%d_%H-%M-%S)"
fi
export DIST_ATTN_RUN_ID
# one thread per CPU process unless told otherwise (torchrun would say the same, noisily)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [ "$nnodes" -eq 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  where=(--standalone)  # one node: torchrun picks a free local port
else
  where=(--nnodes "$nnodes" --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}"
         --master_port "${MASTER_PORT:-29500}")
fi
exec "$py" -m torch.distributed.run "${where[@]}" --nproc_per_node "$NPROC_PER_NODE" -m launchers.train "$@"

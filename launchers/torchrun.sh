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
# DIST_ATTN_RUN_ID (names the run directory outputs/<id>; every node must use the same one),
# MAX_RESTARTS (0: torchrun restarts every worker of the job up to this many times after one fails;
# pair it with trainer.resume=auto), RDZV_TIMEOUT (600: seconds to wait for all nodes to join; the
# rendezvous host must answer within min(RDZV_TIMEOUT, 60) s).
# Several nodes rendezvous through torchrun's c10d backend at MASTER_ADDR:MASTER_PORT (the node
# with NODE_RANK=0 hosts it; global ranks follow arrival, not NODE_RANK): a worker that fails on one
# node restarts the workers of every node.
# On CPU, gloo picks its interface from the hostname; set GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME on
# GPUs) to the interface that reaches the other nodes.
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
# Workers get a fresh store from the rank-0 agent on every (re)start instead of sharing the rendezvous
# store: with the shared one, restarted gloo/NCCL workers can read the dead attempt's addresses and
# hang or fail connecting (pytorch/pytorch#135712; seen here with torch 2.13 and --max_restarts).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
# one thread per CPU process unless told otherwise (torchrun would say the same, noisily)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [ "$nnodes" -eq 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  where=(--standalone)  # one node: torchrun picks a free local port
else
  if [ -z "${MASTER_ADDR:-}" ]; then
    echo "torchrun.sh: NNODES=$nnodes needs MASTER_ADDR, the host of the node with NODE_RANK=0 (same on every node)" >&2
    exit 2
  fi
  if ! getent ahosts "$MASTER_ADDR" >/dev/null; then  # a typo would otherwise wait for the store timeout
    echo "torchrun.sh: MASTER_ADDR=$MASTER_ADDR does not resolve on $(hostname); set it to the hostname or IP of the node with NODE_RANK=0" >&2
    exit 2
  fi
  # c10d rendezvous (not static): after a failure the agents of all nodes re-rendezvous and restart together
  join="${RDZV_TIMEOUT:-600}"
  connect=$(( join < 60 ? join : 60 ))  # the rendezvous host must answer within this (torch's default: 60 s)
  conf="join_timeout=$join,read_timeout=$connect"
  # NODE_RANK given: node 0 hosts the store (MASTER_ADDR may be an address torch cannot match to this
  # machine); not given: torch decides by comparing MASTER_ADDR with this machine's names and addresses
  [ -n "${NODE_RANK:-}" ] && conf="$conf,is_host=$([ "$NODE_RANK" -eq 0 ] && echo true || echo false)"
  where=(--nnodes "$nnodes" --rdzv_backend c10d --rdzv_id "$DIST_ATTN_RUN_ID"
         --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_conf "$conf")
fi
exec "$py" -m torch.distributed.run "${where[@]}" --nproc_per_node "$NPROC_PER_NODE" \
  --max_restarts "${MAX_RESTARTS:-0}" -m launchers.train "$@"

#!/usr/bin/env bash
# Start plt_train with torchrun on this node; extra arguments are Hydra overrides.
#
#   launch/torchrun.sh train.steps=100                       # one node, all GPUs (or 2 CPU procs)
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh model=1b moe=dense parallel=data \
#       train.global_batch_size=256   # on every node (NODE_RANK 0..3)
#
# Environment (all optional):
#   NPROC_PER_NODE  processes per node (default: number of GPUs, else 2 on CPU)
#   NNODES          nodes (default 1: --standalone, no rendezvous server needed)
#   MASTER_ADDR / MASTER_PORT   c10d rendezvous endpoint for multi-node (default port 29500)
#   NODE_RANK       this node's index (0..NNODES-1); node 0 hosts the rendezvous store
#                   (torchrun --rdzv-conf is_host=1, the others is_host=0).  Without it torchrun
#                   guesses by comparing MASTER_ADDR with this host's names and addresses.
#   LOCAL_ADDR      this node's address on the interconnect (torchrun --local-addr).  torchrun
#                   hands its workers the node's host NAME otherwise; where that name does not
#                   resolve to the interconnect (a management hostname; "localhost" in a network
#                   namespace) workers of other nodes cannot connect.  Setting LOCAL_ADDR also
#                   sets GLOO_SOCKET_IFNAME to its interface when that is unset, so CPU (gloo)
#                   traffic takes the same network.
#   RDZV_ID         rendezvous id shared by all nodes (default: plt-<MASTER_ADDR>-<PORT>)
#   PYTHON          interpreter (default: .venv/bin/python if present, else python3)
# The backend (NCCL with GPUs, gloo without) is chosen by plt_train at start-up.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}

if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
NNODES=${NNODES:-1}

# Usual settings: one OpenMP thread per rank on CPU; megatron-core needs CUDA_DEVICE_MAX_CONNECTIONS=1
# for tensor-parallel communication overlap.  The hang diagnostics (NCCL error handling, the
# flight recorder and its dump on a timeout, into <run_dir>/flight_recorder/) are set by
# plt_train itself at start-up (plt_train/runtime/hangs.py), so every launcher gets them;
# variables exported here win over its defaults.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export PYTHONUNBUFFERED=1
# torchrun forwards these signals to the workers, which checkpoint at the end of the current step
# and exit (Slurm sends USR1 or TERM before a time limit); it waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT
# seconds for them before SIGKILL, so leave time to write a checkpoint.  (PET_* variables are
# torchrun's own way to take its --signals-to-handle option from the environment.)
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}

if [ "$NNODES" = 1 ]; then
  exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC_PER_NODE" \
       -m plt_train.train "$@"
fi
: "${MASTER_ADDR:?set MASTER_ADDR (the first node) for a multi-node run}"
MASTER_PORT=${MASTER_PORT:-29500}
node_args=()
if [ -n "${NODE_RANK:-}" ]; then
  node_args+=(--rdzv-conf "is_host=$([ "$NODE_RANK" = 0 ] && echo 1 || echo 0)")
fi
if [ -n "${LOCAL_ADDR:-}" ]; then
  node_args+=(--local-addr "$LOCAL_ADDR")
  if [ -z "${GLOO_SOCKET_IFNAME:-}" ] && command -v ip >/dev/null; then
    iface=$(ip -o addr show to "$LOCAL_ADDR" | awk '{print $2; exit}')
    [ -n "$iface" ] && [ "$iface" != lo ] && export GLOO_SOCKET_IFNAME=$iface
  fi
fi
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
     --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
     --rdzv-id "${RDZV_ID:-plt-$MASTER_ADDR-$MASTER_PORT}" "${node_args[@]}" \
     -m plt_train.train "$@"

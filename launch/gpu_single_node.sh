#!/usr/bin/env bash
# Train on every GPU of one machine: one process drives all local GPUs (no launcher needed).
#   bash launch/gpu_single_node.sh CONFIG WORKDIR [extra train flags...]
set -euo pipefail
CONFIG=$1 WORKDIR=$2
shift 2
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[cuda]"
# Let XLA use almost all GPU memory (JAX preallocates 75 % by default).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
exec python -m mapo_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"

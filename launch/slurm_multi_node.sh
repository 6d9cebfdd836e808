#!/usr/bin/env bash
# Train on several GPU nodes under SLURM: one process per node, each driving its node's GPUs.
#   sbatch --nodes=4 launch/slurm_multi_node.sh CONFIG WORKDIR [extra train flags...]
# WORKDIR and the config's paths must be on a filesystem every node sees.
# A worker that dies makes the others exit within --config.peer_timeout_s (default 100 s) naming it;
# rerun this script to resume from the last complete checkpoint (README, "What a pod does when it fails").
#SBATCH --job-name=mapo_jax
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
set -euo pipefail
CONFIG=$1 WORKDIR=$2
shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
COORDINATOR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
# Install once per node (the environment is assumed shared or prepared: `pip install -e ".[cuda]"`).
srun --ntasks-per-node=1 bash -c "
  python -m mapo_jax.train --config $CONFIG --workdir $WORKDIR \
    --coordinator_address=$COORDINATOR:12355 --num_processes=\$SLURM_NTASKS --process_id=\$SLURM_PROCID $*
"

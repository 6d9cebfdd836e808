#!/usr/bin/env bash
# Train on a TPU pod slice: every worker runs the same command; JAX finds the other hosts itself.
#   bash launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [extra train flags...]
# WORKDIR and the config's pipeline/data paths must be on a filesystem every worker mounts (NFS,
# Filestore, a gcsfuse mount); paths are local paths. The repository is copied to each worker first.
# A worker that dies makes the others exit within --config.peer_timeout_s (default 100 s) naming it;
# rerun this script to resume from the last complete checkpoint (README, "What a pod does when it fails").
set -euo pipefail
TPU_NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
REPO=$(cd "$(dirname "$0")/.." && pwd)

gcloud compute tpus tpu-vm scp --recurse "$REPO" "$TPU_NAME":~/mapo_jax_src --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  cd ~/mapo_jax_src
  python3 -m pip install -q -e '.[tpu]'
  python3 -m mapo_jax.train --config $CONFIG --workdir $WORKDIR --distributed $*
"

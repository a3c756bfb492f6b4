#!/usr/bin/env bash
# FaceMAE deployment on Slurm: faces of unseen identities -> masked -> reconstructed shards (the released,
# privacy-preserving set), or a baseline (masked, blur, noise, original). One task per GPU; rank r of W
# takes input shards r, r+W, ... (no collectives in the hot path).
#
#   sbatch [sbatch flags] slurm/reconstruct.sh INPUT_SPLIT OUTPUT_SPLIT --model RUN_DIR [options]
#                                                                     # submit from the repository root
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=10 \
#       slurm/reconstruct.sh shards/casia/unseen shards/casia/released --model runs/mae-1234 --mask-ratio 0.75
#   NODES=2 GPUS_PER_NODE=8 bash slurm/reconstruct.sh ...     # submits itself (see slurm/common.sh)
#
# Options are those of `facemae reconstruct --help`. The batch log is ./<job name>-<job id>.out (or
# -o/--output). On USR1 before the time limit the job requeues itself; a run again skips the output shards
# already complete, so resuming by hand is submitting the same command again.
#SBATCH --job-name=facemae-reconstruct
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=08:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
# sbatch runs a copy of this file from its spool directory: the repository is where sbatch was called
FACEMAE_HOME=${FACEMAE_HOME:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
[ -f "$FACEMAE_HOME/slurm/common.sh" ] || {
  echo "facemae: $FACEMAE_HOME is not the facemae-dist repository: submit from its root or set FACEMAE_HOME" >&2
  exit 2
}
# shellcheck source=slurm/common.sh
source "$FACEMAE_HOME/slurm/common.sh"
[ $# -ge 2 ] || facemae_die "usage: sbatch slurm/reconstruct.sh INPUT_SPLIT OUTPUT_SPLIT --model RUN_DIR [options]"
facemae_stage reconstruct facemae_dist.reconstruct "$@"

#!/usr/bin/env bash
# FaceMAE pretraining (MAE + IRM, DeepSpeed ZeRO) on Slurm: one task per GPU, any number of nodes.
#
#   sbatch [sbatch flags] slurm/train_mae.sh CONFIG [key=value ...]      # submit from the repository root
#
#   # 4 nodes × 8 GPUs (GPU counts go on the command line: a Slurm without GPUs rejects --gpus-per-node):
#   sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=10 \
#       slurm/train_mae.sh configs/mae/vit_b8_casia.yaml data.train=shards/casia/train
#   # CPU-only cluster (gloo): the defaults below, e.g. 2 nodes × 1 task
#   sbatch --nodes=2 slurm/train_mae.sh configs/mae/tiny_cpu.yaml data.train=shards/train run.max_steps=100
#   # without sbatch flags: this script submits itself, sized from NODES / GPUS_PER_NODE / CPUS_PER_TASK /
#   # PARTITION / TIME_LIMIT / ACCOUNT (FACEMAE_DRY_RUN=1 prints the command)
#   NODES=4 GPUS_PER_NODE=8 bash slurm/train_mae.sh configs/mae/vit_b8_casia.yaml data.train=...
#
# The run directory is runs/mae-$SLURM_JOB_ID unless run.out_dir=... is given; the batch log is
# ./<job name>-<job id>.out (or -o/--output), linked from the run directory. 5 minutes before the time
# limit Slurm sends USR1: the ranks checkpoint, the job requeues itself and resumes under the same job id.
# To resume by hand, submit again with run.out_dir=<the run directory>. Shared logic: slurm/common.sh.
#SBATCH --job-name=facemae-mae
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
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
facemae_trainer mae facemae_dist.pretrain "$@"

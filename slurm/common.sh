# shellcheck shell=bash
# Shared logic of slurm/train_mae.sh, slurm/train_recog.sh and slurm/reconstruct.sh (sourced, never run).
#
# What a stage script does under sbatch:
#   1. finds the repository ($FACEMAE_HOME, else $SLURM_SUBMIT_DIR: submit from the repository root),
#      cds there and puts .venv/bin first on PATH when it exists;
#   2. picks the backend: GPUs on the node (nvidia-smi) => NCCL; none => gloo and DS_ACCELERATOR=cpu;
#   3. exports MASTER_ADDR (first node of the allocation) and MASTER_PORT (facemae_master_port: from the job
#      id and the attempt, below the ephemeral port range);
#   4. runs `srun --kill-on-bad-exit=1 python -m <stage module> ARGS`, one task per allocated task slot (ask
#      for one per GPU); facemae_dist/dist.py reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID in every task.
#      Trainers (facemae_trainer) get `--config CONFIG [key=value ...] run.out_dir=runs/<stage>-$SLURM_JOB_ID`
#      unless run.out_dir is given;
#   5. forwards SIGUSR1/SIGTERM received by the batch shell (`--signal=B:USR1@300`, `scancel --batch`) to
#      the step as SIGUSR1 (srun kills the tasks on a TERM): every rank writes a checkpoint and exits 75;
#      after a USR1 the script requeues the job (`scontrol requeue`), which keeps its job id, hence its
#      run directory: it resumes from there. After a TERM it ends (cancelled, or Slurm requeues it).
#      A stage without checkpoints killed by the USR1 is requeued too (reconstruct skips finished shards).
#
# Outside Slurm, `bash slurm/<stage>.sh CONFIG ...` submits itself with sbatch, sized from the environment:
#   NODES, GPUS_PER_NODE (=> --gpus-per-node and one task per GPU), CPUS_PER_TASK, PARTITION, TIME_LIMIT,
#   ACCOUNT; FACEMAE_DRY_RUN=1 prints the sbatch command (shell-quoted) instead of running it. First it runs
#   the stage's own checks for that job size (`facemae submit --check`): a bad key or value fails now,
#   not after the queue (FACEMAE_SKIP_PREFLIGHT=1 where this node cannot see the job's paths).
# Other knobs: FACEMAE_HOME, FACEMAE_RUNS (default runs), FACEMAE_OUT_KEY (default run.out_dir; empty:
#   pass no run directory), FACEMAE_ACCELERATOR=cpu|gpu (skip detection), FACEMAE_MAX_REQUEUES (default 20),
#   FACEMAE_SRUN_ARGS (extra srun flags), FACEMAE_MASTER_PORT, OMP_NUM_THREADS (default: cpus per task).

FACEMAE_EXIT_PREEMPTED=75 # facemae_dist/engine/loop.py EXIT_PREEMPTED: checkpoint written, run again
FACEMAE_SIGNAL=""         # the last signal the batch shell forwarded to the step
FACEMAE_SRUN_PID=""

facemae_log() { echo "[facemae-slurm $(date +%H:%M:%S)] $*" >&2; }

facemae_die() {
  facemae_log "error: $*"
  exit 2
}

facemae_home() {  # the repository root: FACEMAE_HOME, else where sbatch was called, else beside this file
  local home=${FACEMAE_HOME:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
  [ -f "$home/slurm/common.sh" ] ||
    facemae_die "$home is not the facemae-dist repository: submit from its root or set FACEMAE_HOME"
  (cd "$home" && pwd)
}

facemae_gpu_count() {  # GPUs on this node (0 without nvidia-smi); FACEMAE_ACCELERATOR=cpu|gpu overrides
  case "${FACEMAE_ACCELERATOR:-}" in
    cpu) echo 0 ;;
    gpu) echo "${SLURM_GPUS_ON_NODE:-1}" ;;
    *)
      if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi -L | grep -c '^GPU'
      else
        echo 0
      fi
      ;;
  esac
}

facemae_master_port() {  # facemae_master_port JOB_ID [RESTART]: the rendezvous port of that attempt
  # 15000-29000, below Linux's ephemeral range (32768-60999) where any outgoing socket may hold a port.
  # Each job owns a block of 32 ports, one per attempt (FACEMAE_MAX_REQUEUES=20 stays below 32), so a job's
  # attempts never meet those of its neighbours (the next 436 job ids). = facemae_dist/dist.py job_port.
  local job=${1//[^0-9]/}
  echo $((15000 + (10#${job:-0} * 32 + ${2:-0}) % 14001))
}

facemae_setup() {  # environment every stage shares: repository, venv, threads, backend, rendezvous
  FACEMAE_HOME=$(facemae_home)
  export FACEMAE_HOME
  cd "$FACEMAE_HOME" || exit 2
  if [ -x .venv/bin/python ] && [ -z "${VIRTUAL_ENV:-}" ]; then
    export VIRTUAL_ENV=$FACEMAE_HOME/.venv PATH=$FACEMAE_HOME/.venv/bin:$PATH
  fi
  export PYTHONUNBUFFERED=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  if [ "$(facemae_gpu_count)" -gt 0 ]; then
    FACEMAE_BACKEND=nccl
    # a dead rank aborts the others' NCCL collectives (after the process group timeout) instead of a hang
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  else
    FACEMAE_BACKEND=gloo
    export DS_ACCELERATOR=cpu
  fi
  if [ -n "${SLURM_JOB_NODELIST:-}" ]; then # from the allocation, not from the submitting shell
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    # one port per job and attempt: a requeued attempt never meets a socket of the previous one
    MASTER_PORT=${FACEMAE_MASTER_PORT:-$(facemae_master_port "$SLURM_JOB_ID" "${SLURM_RESTART_COUNT:-0}")}
    export MASTER_ADDR MASTER_PORT
  fi
}

_facemae_forward() {  # trap handler: ask every task of the running step to checkpoint and stop
  FACEMAE_SIGNAL=$1 # TERM: do not requeue afterwards (facemae_finish)
  facemae_log "got SIG$1: forwarding it to the step as SIGUSR1 (every rank checkpoints, then exits $FACEMAE_EXIT_PREEMPTED)"
  # always USR1: srun passes it to the tasks as it is, but answers a TERM by killing every task
  # ("forcing job termination"), which would leave no checkpoint; the ranks treat both alike
  if [ -n "$FACEMAE_SRUN_PID" ]; then kill -s USR1 "$FACEMAE_SRUN_PID" 2>/dev/null || true; fi
}

facemae_traps() {  # from the start of the batch script on: a signal before the step starts is remembered
  trap '_facemae_forward USR1' USR1
  trap '_facemae_forward TERM' TERM
}

facemae_srun() {  # facemae_srun CMD...: one srun step in the background so that traps run; returns its status
  local -a flags=(--kill-on-bad-exit=1)
  [ -n "${SLURM_CPUS_PER_TASK:-}" ] && flags+=(--cpus-per-task="$SLURM_CPUS_PER_TASK") # 22.05 no longer inherits it
  # shellcheck disable=SC2206 # word splitting of user-given extra flags is intended
  [ -n "${FACEMAE_SRUN_ARGS:-}" ] && flags+=($FACEMAE_SRUN_ARGS)
  facemae_traps
  srun "${flags[@]}" "$@" &
  FACEMAE_SRUN_PID=$!
  local rc again
  while :; do
    rc=0
    wait "$FACEMAE_SRUN_PID" || rc=$?
    [ "$rc" -gt 128 ] || break
    # a trapped signal interrupts `wait` with status > 128 while srun still runs: wait again
    if kill -0 "$FACEMAE_SRUN_PID" 2>/dev/null; then continue; fi
    # srun is gone, maybe at the instant the signal came: that status may be the interruption's;
    # bash keeps srun's own for one more `wait` (127: none kept, then rc was srun's)
    again=0
    wait "$FACEMAE_SRUN_PID" 2>/dev/null || again=$?
    [ "$again" = 127 ] || rc=$again
    break
  done
  FACEMAE_SRUN_PID=""
  return "$rc"
}

facemae_finish() {  # facemae_finish <status>: exit, or requeue the job after a checkpoint-and-stop
  local rc=$1 restarts=${SLURM_RESTART_COUNT:-0}
  if [ "$rc" = 0 ]; then
    facemae_log "finished"
    exit 0
  fi
  # 75: ranks checkpointed on a signal. A rank killed by a USR1 it could not handle yet (still starting):
  # requeue too, it resumes from the last periodic checkpoint.
  if [ "$rc" != "$FACEMAE_EXIT_PREEMPTED" ] && [ "$FACEMAE_SIGNAL" != USR1 ]; then
    facemae_log "step failed with status $rc"
    exit "$rc"
  fi
  if [ "$FACEMAE_SIGNAL" = TERM ]; then # cancelled, at the time limit, or preempted: Slurm decides
    facemae_log "stopped by SIGTERM with a checkpoint (status $rc): not requeueing"
    exit "$rc"
  fi
  if [ "$restarts" -ge "${FACEMAE_MAX_REQUEUES:-20}" ]; then
    facemae_log "checkpointed, but requeued $restarts times already (FACEMAE_MAX_REQUEUES): stopping"
    exit "$rc"
  fi
  if [ -n "${SLURM_JOB_ID:-}" ] && scontrol requeue "$SLURM_JOB_ID"; then
    facemae_log "checkpointed; requeued job $SLURM_JOB_ID (attempt $((restarts + 2))): it resumes from there"
    exit 0
  fi
  facemae_log "checkpointed, but the job could not be requeued: submit it again with the same run.out_dir"
  exit "$rc"
}

facemae_launch() {  # facemae_launch CMD...: run CMD on every task of the allocation, then finish/requeue
  local rc=0
  if [ -n "$FACEMAE_SIGNAL" ]; then # stopped before it started: nothing to checkpoint
    facemae_finish "$FACEMAE_EXIT_PREEMPTED"
  fi
  facemae_srun "$@" || rc=$?
  facemae_finish "$rc"
}

facemae_link_log() {  # facemae_link_log <run dir>: the batch log, found from the run directory
  local log
  log=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'StdOut=[^ ]*' | cut -d= -f2-) || true
  if [ -n "$log" ] && [ -f "$log" ]; then ln -sfn "$(realpath "$log")" "$1/slurm-$SLURM_JOB_ID.out" || true; fi
}

facemae_check_config() {  # facemae_check_config CONFIG: exists (relative paths: to the repository root)
  [ -f "$1" ] || facemae_die "config $1 not found (paths are relative to $FACEMAE_HOME)"
}

facemae_preflight() {  # facemae_preflight STAGE ARGS...: the stage's own checks for this job size
  # (config keys and values, paths, batch vs ranks) before the job waits in the queue; a login node
  # that cannot see the compute nodes' paths: FACEMAE_SKIP_PREFLIGHT=1
  [ "${FACEMAE_SKIP_PREFLIGHT:-0}" = 1 ] && return 0
  local py=python3
  [ -x .venv/bin/python ] && [ -z "${VIRTUAL_ENV:-}" ] && py=.venv/bin/python
  local -a size=(--nodes "${NODES:-1}")
  [ -n "${GPUS_PER_NODE:-}" ] && size+=(--gpus-per-node "$GPUS_PER_NODE")
  facemae_log "checking the $1 arguments before sbatch (FACEMAE_SKIP_PREFLIGHT=1 skips this)"
  DS_ACCELERATOR=cpu "$py" -m facemae_dist.submit --check "${size[@]}" "$@" >&2 || exit 2
}

facemae_self_submit() {  # facemae_self_submit STAGE <config to check, or ""> ARGS...: outside Slurm, sbatch
  local script stage=$1 config=$2 # the script that called it, sized from the environment
  shift 2
  script=$(realpath "$0")
  FACEMAE_HOME=$(facemae_home)
  export FACEMAE_HOME
  cd "$FACEMAE_HOME" || exit 2
  if [ -n "$config" ]; then # before anything is built or submitted
    facemae_check_config "$config"
    facemae_preflight "$stage" --config "$@"
  else
    facemae_preflight "$stage" "$@"
  fi
  local -a flags=(--output="${FACEMAE_RUNS:-runs}/logs/%x-%j.out")
  [ -n "${NODES:-}" ] && flags+=(--nodes="$NODES")
  [ -n "${GPUS_PER_NODE:-}" ] && flags+=(--gpus-per-node="$GPUS_PER_NODE" --ntasks-per-node="$GPUS_PER_NODE")
  [ -n "${CPUS_PER_TASK:-}" ] && flags+=(--cpus-per-task="$CPUS_PER_TASK")
  [ -n "${PARTITION:-}" ] && flags+=(--partition="$PARTITION")
  [ -n "${TIME_LIMIT:-}" ] && flags+=(--time="$TIME_LIMIT")
  [ -n "${ACCOUNT:-}" ] && flags+=(--account="$ACCOUNT")
  if [ "${FACEMAE_DRY_RUN:-0}" = 1 ]; then # one shell-quoted line: it can be pasted as it is
    local line
    printf -v line '%q ' sbatch "${flags[@]}" "$script" "$@"
    echo "${line% }"
    exit 0
  fi
  command -v sbatch >/dev/null || facemae_die "no sbatch here: on one machine use torchrun (see docs/cluster.md)"
  mkdir -p "${FACEMAE_RUNS:-runs}/logs"
  exec sbatch "${flags[@]}" "$script" "$@"
}

facemae_stage() {  # facemae_stage <stage> <python module> ARGS...: `python -m MODULE ARGS` on every task
  local stage=$1 module=$2
  shift 2
  [ -n "${SLURM_JOB_ID:-}" ] || facemae_self_submit "${module#facemae_dist.}" "" "$@"
  facemae_traps
  facemae_setup
  _facemae_run "$stage" "$module" "" "$@"
}

facemae_trainer() {  # facemae_trainer <stage> <python module> CONFIG [key=value ...]: a trainer, its run dir
  local stage=$1 module=$2
  shift 2
  [ "${1:-}" = --config ] && shift
  [ $# -ge 1 ] || facemae_die "usage: sbatch [sbatch flags] slurm/<script>.sh CONFIG [key=value ...]"
  [ -n "${SLURM_JOB_ID:-}" ] || facemae_self_submit "${module#facemae_dist.}" "$1" "$@"
  facemae_traps
  facemae_setup
  local config=$1 key=${FACEMAE_OUT_KEY-run.out_dir} out="" arg
  shift
  facemae_check_config "$config"
  local -a args=(--config "$config" "$@")
  if [ -n "$key" ]; then # the run directory: KEY=... if given, else runs/<stage>-<job id> (same on requeue)
    for arg in "$@"; do case "$arg" in "$key="*) out=${arg#"$key="} ;; esac; done
    [ -n "$out" ] || { out=${FACEMAE_RUNS:-runs}/$stage-$SLURM_JOB_ID && args+=("$key=$out"); }
    mkdir -p "$out"
    facemae_link_log "$out"
  fi
  _facemae_run "$stage" "$module" "$out" "${args[@]}"
}

_facemae_run() {  # _facemae_run <stage> <module> <run dir or ""> ARGS...
  local stage=$1 module=$2 out=$3
  shift 3
  facemae_log "job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)): $stage," \
    "${SLURM_JOB_NUM_NODES:-1} node(s) × ${SLURM_NTASKS_PER_NODE:-1} task(s), $FACEMAE_BACKEND," \
    "master ${MASTER_ADDR:-?}:${MASTER_PORT:-?}${out:+, run dir $out}"
  facemae_launch python -u -m "$module" "$@"
}

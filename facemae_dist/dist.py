"""The one place that knows launchers: torchrun, accelerate launch, srun (Slurm) and a plain process.

torchrun and `accelerate launch` export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; under `srun` we derive
them from SLURM_* (MASTER_ADDR = first node of the allocation); a plain `python` run is rank 0 of 1.
NCCL on GPUs, gloo without.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

# Rendezvous ports, all below Linux's ephemeral range (32768-60999, where the kernel picks the
# source ports of outgoing connections: a rendezvous port there can be taken by any socket).
# A Slurm job J's attempt R (SLURM_RESTART_COUNT) listens on job_port(J, R) in [15000, 29000]:
# each job owns a block of JOB_PORT_STRIDE ports, one per attempt, so the attempts of a job and of
# its neighbours (the next 436 job ids) never share a port. slurm/common.sh computes the same.
# A lone process without a launcher or a job id takes any free port (two runs side by side must not
# collide; only it connects to its own store, at once); a multi-process one DEFAULT_PORT.
JOB_PORT_BASE, JOB_PORT_SPAN, JOB_PORT_STRIDE = 15000, 14001, 32
DEFAULT_PORT = 29511


def job_port(job_id: str | int, restart: int = 0) -> int:
    """MASTER_PORT of Slurm job `job_id`'s attempt `restart` (the same formula as slurm/common.sh)."""
    digits = int(re.sub(r"\D", "", str(job_id)) or 0)
    return JOB_PORT_BASE + (digits * JOB_PORT_STRIDE + restart) % JOB_PORT_SPAN


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # torchrun | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
        )
        return out.stdout.split()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return nodelist.split(",")[0]


def detect() -> DistInfo:
    """Rank/world/local rank from the environment the launcher left (no process group needed)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        local = int(env.get("LOCAL_RANK", 0))
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), local, "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        return DistInfo(rank, world, int(env.get("SLURM_LOCALID", 0)), "slurm")
    return DistInfo(0, 1, 0, "single")


def _export_env(info: DistInfo) -> None:
    """Make every launcher look like torchrun to torch.distributed's env:// rendezvous."""
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _first_slurm_host() if info.launcher == "slurm" else "127.0.0.1"
    if "MASTER_PORT" not in os.environ:  # torchrun, accelerate and slurm/common.sh set it
        job = os.environ.get("SLURM_JOB_ID", "")
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if job.isdigit():
            port = job_port(job, restart)
        else:
            port = _free_port() if info.world_size == 1 else DEFAULT_PORT
        os.environ["MASTER_PORT"] = str(port)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device(info: DistInfo) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init(timeout_s: int | None = None, use_deepspeed: bool = True) -> DistInfo:
    """Start the process group (also for a single process when DeepSpeed will need one).

    `timeout_s` (default FACEMAE_DIST_TIMEOUT or 600) bounds how long a collective waits for a
    rank that died or hangs before the job fails instead of hanging.
    """
    timeout_s = timeout_s or int(os.environ.get("FACEMAE_DIST_TIMEOUT", "600"))
    info = detect()
    _export_env(info)
    if torch_dist.is_initialized():
        return info
    if not use_deepspeed:  # inference stages: plain torch.distributed, no DeepSpeed import
        torch_dist.init_process_group(backend(), timeout=timedelta(seconds=timeout_s))
        return info
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    if not torch.cuda.is_available():
        # DeepSpeed would JIT-compile a shared-memory comm op (~100 s) on the first CPU init
        deepspeed.ops.__compatible_ops__ = {}
    deepspeed.init_distributed(
        dist_backend=backend(),
        auto_mpi_discovery=False,
        timeout=timedelta(seconds=timeout_s),
        verbose=False,
    )
    return info


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def all_true(flag: bool) -> bool:
    """True only if `flag` is true on every rank (a MIN all-reduce)."""
    if not torch_dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MIN)
    return bool(t.item())


def from_main(value: float) -> float:
    """Rank 0's `value` on every rank, for decisions all ranks must take together."""
    if not torch_dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    torch_dist.broadcast(t, src=0)
    return float(t.item())


def any_true(flag: bool) -> bool:
    return not all_true(not flag)


def _comm_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if backend() == "nccl"
        else torch.device("cpu")
    )


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


# What gloo and NCCL say when a collective's peer died or stopped answering. gloo raises a plain
# RuntimeError naming its transport (e.g. "[.../gloo/transport/tcp/pair.cc:545] Read error ...:
# Connection reset by peer", or "... Timed out waiting 600000ms for recv"); NCCL's errors are
# torch.distributed.DistError. A rank's own error (a CUDA fault, "timed out" in a user message)
# must not pass for a lost peer: only messages from the collectives' own code count.
_PEER_LOST = ("gloo/transport", "NCCL communicator was aborted", "ProcessGroupGloo")


def lost_peer(exc: BaseException) -> bool:
    """True if ``exc`` is what a collective raises when another rank died or hung."""
    if isinstance(exc, torch_dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _PEER_LOST)


def lost_peer_message(exc: BaseException, rank: int, checkpoint: str | None = None) -> str:
    """One line for a rank that lost a peer: what happened, what is safe, what to do."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # drop gloo's source-file prefix
    first = first.split(". ")[0][:160]  # its first sentence says it; the rest is generic advice
    kept = (
        f" Nothing after the last complete checkpoint ({checkpoint}) is kept:" if checkpoint else ""
    )
    return (
        f"rank {rank} lost contact with another rank, which most likely died or hung ({first})."
        f"{kept} find the first failing rank's own error in the job's log (torchrun lists it as "
        "the root cause), fix it and run the same command again to resume"
    )

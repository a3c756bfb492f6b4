"""A real Slurm on this machine for the Slurm tests: 2 emulated nodes brought up by ci-slurm.sh.

(A helper module, not a conftest.py: other test files import names from tests/conftest.py as `conftest`,
which a second conftest.py would shadow.)

The session fixture built on :func:`running_slurm` installs (Debian packages; root and apt-get needed) and starts slurmctld + one slurmd per
emulated node, and always tears them down at the end, failed tests or not. Where Slurm cannot be started the
Slurm tests are skipped with the reason (shown by `pytest -ra`); FACEMAE_REQUIRE_SLURM=1 makes that a failure.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CI_SLURM = Path(__file__).with_name("ci-slurm.sh")
STATE_DIR = Path("/tmp/facemae-ci-slurm")
LOCK = Path("/tmp/facemae-ci-slurm.lock")
NODES = 2


def job_env(**extra: str) -> dict[str, str]:
    """Environment for sbatch (exported into the job): small CPU runs, the venv's python first."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        **extra,
    }


def _unavailable() -> str | None:
    """Why this machine cannot run a throwaway Slurm, or None."""
    if not sys.platform.startswith("linux"):
        return f"Slurm tests need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "Slurm tests need root (they install slurmctld/slurmd/munge and write /etc/slurm)"
    if not (shutil.which("apt-get") or shutil.which("slurmctld")):
        return "Slurm is not installed and there is no apt-get to install it"
    return None


def _skip(reason: str) -> None:
    if os.environ.get("FACEMAE_REQUIRE_SLURM") == "1":
        pytest.fail(f"FACEMAE_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def _ci_slurm(action: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "SLURM_CI_DIR": str(STATE_DIR), "SLURM_CI_NODES": str(NODES)}
    return subprocess.run(
        ["bash", str(CI_SLURM), action],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _take_lock(wait_s: float = 300) -> object | None:
    """One pytest session at a time owns the machine's Slurm (it is system-wide)."""
    try:
        handle = open(LOCK, "a")  # noqa: SIM115  (held for the whole session)
    except OSError:
        return None
    end = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > end:
                handle.close()
                return None
            time.sleep(1)


@dataclass
class Slurm:
    """The running test cluster, with helpers to submit and follow jobs."""

    nodes: int
    jobs: list[str] = field(default_factory=list)

    def sbatch(
        self, args: list[str], env: dict[str, str] | None = None
    ) -> tuple[str, subprocess.Popen]:
        """`sbatch --wait --parsable ARGS` from the repository root; returns (job id, the waiting sbatch)."""
        proc = subprocess.Popen(
            ["sbatch", "--wait", "--parsable", *args],
            cwd=REPO,
            env=env or job_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = proc.stdout.readline().strip()
        if not line:
            proc.wait(timeout=30)
            pytest.fail(f"sbatch refused the job: {proc.stderr.read()}")
        job_id = line.split(";")[0]
        self.jobs.append(job_id)
        return job_id, proc

    def wait(self, job_id: str, proc: subprocess.Popen, timeout: float, log: Path) -> int:
        """The job's exit status (sbatch --wait's); cancels it and fails the test past `timeout`."""
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            subprocess.run(["scancel", job_id], check=False)
            proc.wait(timeout=60)
            pytest.fail(f"job {job_id} still running after {timeout:.0f} s:\n{tail(log)}")

    def cancel_all(self) -> None:
        if self.jobs:
            subprocess.run(["scancel", *self.jobs], capture_output=True, check=False)


def tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def metric_steps(run_dir: Path) -> list[int]:
    """Steps logged so far in a run's metrics.jsonl (empty while it does not exist)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue  # a line being written
    return steps


def wait_until(condition, timeout: float, what: str, poll: float = 0.2) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def running_slurm() -> Iterator[Slurm]:
    """A running 2-node Slurm until the generator is closed, whatever happened (the `slurm` fixture)."""
    reason = _unavailable()
    if reason:
        _skip(reason)
    lock = _take_lock()
    if lock is None:
        _skip(f"cannot take {LOCK}: another test session has held the local Slurm for 5 minutes")
    cluster = Slurm(nodes=NODES)
    try:
        _ci_slurm("down", timeout=120)  # leftovers of a killed session
        started = _ci_slurm("up", timeout=900)
        if started.returncode != 0:
            _skip(f"could not start a local Slurm (ci-slurm.sh up: {started.returncode}): "
                  f"{started.stderr.strip()[-1500:]}")  # fmt: skip
        yield cluster
    finally:
        cluster.cancel_all()
        _ci_slurm("down", timeout=300)
        lock.close()


def make_shards(root: Path) -> Path:
    """A tiny train split: 24 identities × 8 synthetic faces in 7 shards."""
    from facemae_dist.data.shards import ShardOptions, shard_dataset
    from facemae_dist.data.synthetic import SyntheticSource

    opts = ShardOptions(samples_per_shard=30, progress=False)
    shard_dataset(SyntheticSource.from_spec("24x8:3"), root, opts)
    return root / "train"

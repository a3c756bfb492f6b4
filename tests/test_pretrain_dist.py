"""FaceMAE pretraining for real: 2 processes (gloo) under torchrun and accelerate, DeepSpeed ZeRO-2/3.

Grouped so the whole file starts few process pairs (each costs ~15 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import save_file

from facemae_dist.data.shards import ShardOptions, shard_dataset
from facemae_dist.data.synthetic import SyntheticSource
from facemae_dist.engine.pretrain import load_facemae
from facemae_dist.models.backbones import build_backbone

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = REPO / "configs/mae/tiny_cpu.yaml"
pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain")
    source = SyntheticSource.from_spec("24x8:3")
    shard_dataset(source, root / "shards", ShardOptions(samples_per_shard=30, progress=False))
    teacher = build_backbone("tiny", 512)
    save_file(
        {k: v.contiguous() for k, v in teacher.state_dict().items()},
        str(root / "teacher.safetensors"),
    )
    return root


def env() -> dict[str, str]:
    return {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "FACEMAE_DIST_TIMEOUT": "90",
    }


def torchrun(out: Path, workdir: Path, *overrides: str) -> list[str]:
    return [
        str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(29600 + os.getpid() % 300),
        "-m", "facemae_dist.pretrain", "--config", str(CONFIG),
        f"data.train={workdir / 'shards/train'}", f"run.out_dir={out}", "run.log_every=1",
        f"irm.teacher={workdir / 'teacher.safetensors'}", "irm.weight=1.0", *overrides,
    ]  # fmt: skip


def errors(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if "rror" in line][:8]


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and its workers (torchrun starts workers in their own sessions)."""
    parent = psutil.Process(pid)
    for p in [*parent.children(recursive=True), parent]:
        p.send_signal(signal.SIGKILL)


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_zero2_irm_sigkill_resume_matches_uninterrupted(workdir):
    steps = ["run.max_steps=8", "run.ckpt_every=2"]
    ref = workdir / "ref"
    done = subprocess.run(torchrun(ref, workdir, *steps), env=env(), capture_output=True, text=True)
    assert done.returncode == 0, errors(done)
    ref_loss = losses(ref)
    assert set(ref_loss) == set(range(1, 9)) and all(v > 0 for v in ref_loss.values())
    assert json.loads((ref / "export.json").read_text())["max_abs_diff"] < 1e-5
    assert (ref / "images" / "step-00000008.png").is_file()
    assert (ref / "curves.png").is_file()

    run = workdir / "killed"
    proc = subprocess.Popen(torchrun(run, workdir, *steps), env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    kill_tree(proc.pid)  # the whole job, mid-run, no chance to clean up
    proc.wait()
    killed_at = latest.read_text().strip()
    assert killed_at != "step-00000008", "the run finished before it could be killed"
    again = subprocess.run(
        torchrun(run, workdir, *steps), env=env(), capture_output=True, text=True
    )
    assert again.returncode == 0, errors(again)
    assert f"resumed from {run / 'checkpoints' / killed_at}" in again.stdout
    assert losses(run)[8] == pytest.approx(ref_loss[8], rel=1e-5, abs=1e-6)

    model = load_facemae(ref)  # the export loads into a plain model
    out = model(torch.zeros(2, 3, 112, 112), mask_ratio=0.75)
    assert torch.isfinite(out.loss)


def test_dying_rank_ends_the_job_in_one_line_and_the_run_resumes(workdir):
    """SIGKILL rank 1 mid-run: rank 0 fails in its next collective and says so in one line naming
    the last complete checkpoint; the same command then resumes from it."""
    steps = ["run.max_steps=8", "run.ckpt_every=2"]
    run = workdir / "dying"
    cmd = torchrun(run, workdir, *steps)
    cmd[1:1] = ["--monitor-interval", "3"]  # torchrun's SIGTERM to rank 0 must not race its error
    proc = subprocess.Popen(cmd, env=env(), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    workers = psutil.Process(proc.pid).children(recursive=True)
    victim = next(p for p in workers if p.environ().get("RANK") == "1")
    victim.send_signal(signal.SIGKILL)
    killed = time.time()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - killed < 60
    saved = latest.read_text().strip()
    assert saved != "step-00000008", "the run finished before rank 1 could be killed"
    lines = [line for line in stderr.splitlines() if "lost contact with another rank" in line]
    assert len(lines) == 1, errors(subprocess.CompletedProcess(cmd, 1, "", stderr))
    assert "facemae pretrain: error: rank 0 lost contact" in lines[0]
    assert str(run / "checkpoints") in lines[0] and "Traceback" not in stderr.split(lines[0])[0]
    again = subprocess.run(
        torchrun(run, workdir, *steps), env=env(), capture_output=True, text=True
    )
    assert again.returncode == 0, errors(again)
    assert "resumed from" in again.stdout


def test_ctrl_c_stops_a_lone_run_with_a_checkpoint(workdir):
    """A plain `python -m facemae_dist.pretrain` (one process, loader workers): the first Ctrl-C
    finishes the step, checkpoints and exits 75 like Slurm's warning signal; the workers outlive it."""
    run = workdir / "ctrl_c"
    cmd = [
        sys.executable, "-m", "facemae_dist.pretrain", "--config", str(CONFIG),
        f"data.train={workdir / 'shards/train'}", f"run.out_dir={run}", "run.log_every=1",
        "irm.weight=0", "run.max_steps=500", "run.num_workers=2", "data.global_batch=8",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    for line in proc.stdout:  # training has started: interrupt it
        if line.startswith("step 3/"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "interrupted: stopping with a checkpoint" in err and "Traceback" not in err
    step = int(out.split("stop signal: checkpoint at step ")[1].split(";")[0])
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{step:08d}"


def test_zero3_through_accelerate_learns(workdir):
    out = workdir / "z3"
    cmd = [
        str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "configs/accelerate/cpu_2proc.yaml"),
        "--main_process_port", str(29950 + os.getpid() % 40),
        "-m", "facemae_dist.pretrain", "--config", str(CONFIG),
        f"data.train={workdir / 'shards/train'}", f"run.out_dir={out}", "run.log_every=1",
        "engine.zero_stage=3", "run.max_steps=14", "optim.base_lr=5e-3", "irm.weight=0",
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, errors(done)
    assert "world size 2" in done.stdout  # two real processes, not two rank-0s
    loss = losses(out)
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (12, 13, 14)) / 3
    assert last < first * 0.95, loss
    assert json.loads((out / "export.json").read_text())["max_abs_diff"] < 1e-5


def test_bad_configs_fail_before_any_process_group(workdir, tmp_path):
    cases = {
        "model.mask_ratio=1.0": "mask_ratio must be in",
        "model.image_size=100": "not a multiple of patch_size",
        "data.global_batch=15": "not divisible by ranks",
        "irm.weight=1.0": "IRM needs a teacher",
        "model.foo=1": "unknown config key model.foo",
        "model.kwargs.decoder_dpth=2": "model.kwargs: FaceMAE.__init__() got an unexpected keyword",
    }
    for override, message in cases.items():
        cmd = [str(BIN / "facemae"), "pretrain", "--config", str(CONFIG), f"data.train={workdir / 'shards/train'}",
               f"run.out_dir={tmp_path}", override]  # fmt: skip
        extra = {"RANK": "0", "WORLD_SIZE": "2"} if "global_batch" in override else {}
        done = subprocess.run(
            cmd, env={**env(), **extra}, capture_output=True, text=True, timeout=120
        )
        assert done.returncode != 0 and message in done.stderr, (override, done.stderr[-2000:])
        assert "Traceback" not in done.stderr, override

"""Multi-node on a real Slurm: slurm/*.sh and `facemae submit` (submitit) on 2 emulated nodes, CPU/gloo.

Every job trains a few steps of a tiny config, so the `slurm` tests take ~3 minutes on 2 cores. The tests
without the mark (argument handling, dry runs, the scripts' headers) need no Slurm.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from slurm_cluster import (
    REPO,
    Slurm,
    job_env,
    make_shards,
    metric_steps,
    running_slurm,
    tail,
    wait_until,
)

from facemae_dist import submit
from facemae_dist.errors import FacemaeError

MAE_CONFIG = REPO / "configs/mae/tiny_cpu.yaml"
RECOG_CONFIG = REPO / "configs/recog/tiny_cpu.yaml"
HAS_RECOG = importlib.util.find_spec("facemae_dist.train") is not None and RECOG_CONFIG.is_file()
STEPS = 40  # ~0.2 s each: long enough to interrupt twice, short enough for CI
NODES_2x1 = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=15"]
SCRIPTS = ["train_mae.sh", "train_recog.sh", "reconstruct.sh"]


@pytest.fixture(scope="session")
def slurm() -> Iterator[Slurm]:
    """A 2-node Slurm on this machine for the session; skipped, with the reason, where it cannot start."""
    yield from running_slurm()


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("slurm-shards"))


def mae_job(log: Path, run_dir: Path, shards: Path, steps: int = STEPS) -> list[str]:
    return [
        *NODES_2x1, f"--output={log}", "slurm/train_mae.sh", str(MAE_CONFIG), f"data.train={shards}",
        f"run.out_dir={run_dir}", f"run.max_steps={steps}", "run.log_every=1", "run.ckpt_every=100",
    ]  # fmt: skip


def losses(run_dir: Path) -> dict[int, float]:
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints/latest").read_text().strip()


@pytest.fixture(scope="module")
def mae_reference(slurm, shards, tmp_path_factory) -> SimpleNamespace:
    """An uninterrupted 2-node pretraining job: the first test's subject, the resume test's reference."""
    root = tmp_path_factory.mktemp("mae-ref")
    log, run_dir = root / "job.out", root / "run"
    start = time.monotonic()
    job, proc = slurm.sbatch(mae_job(log, run_dir, shards))
    rc = slurm.wait(job, proc, timeout=240, log=log)
    return SimpleNamespace(job=job, rc=rc, log=log, run=run_dir, seconds=time.monotonic() - start)


@pytest.mark.slurm
def test_sbatch_pretrain_two_nodes_gloo(mae_reference):
    ref = mae_reference
    assert ref.rc == 0, tail(ref.log)
    text = ref.log.read_text()
    assert "facemae pretrain: world size 2 (slurm), cpu" in text
    assert "2 node(s) × 1 task(s), gloo, master node1:" in text
    assert latest(ref.run) == f"step-{STEPS:08d}"
    assert metric_steps(ref.run) == list(range(1, STEPS + 1))
    assert (ref.run / "facemae.safetensors").is_file()
    assert (
        ref.run / f"slurm-{ref.job}.out"
    ).resolve() == ref.log.resolve()  # log found from the run


@pytest.mark.slurm
def test_usr1_then_scontrol_requeue_resume_to_the_uninterrupted_end(
    slurm, shards, mae_reference, tmp_path
):
    """USR1 to the batch shell (as --signal=B:USR1@300 sends before the time limit): forwarded, every rank
    checkpoints, the script requeues the job. Then `scontrol requeue` (an admin, a preemption): SIGTERM,
    checkpoint, Slurm starts it again. The run ends where an uninterrupted one does, with the same losses."""
    assert mae_reference.rc == 0, "the reference run failed: see the test above"
    log, run_dir = tmp_path / "job.out", tmp_path / "run"
    job, proc = slurm.sbatch(mae_job(log, run_dir, shards))
    wait_until(lambda: len(metric_steps(run_dir)) >= 3, 180, "the first 3 steps")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_until(lambda: "resumed from" in log.read_text(), 120, f"a resumed attempt:\n{tail(log)}")
    first = int(re.search(r"stop signal: checkpoint at step (\d+)", log.read_text())[1])
    wait_until(lambda: max(metric_steps(run_dir)) >= first + 3, 120, "steps of attempt 2")
    subprocess.run(["scontrol", "requeue", job], check=True)
    rc = slurm.wait(job, proc, timeout=240, log=log)
    text = log.read_text()
    assert rc == 0, tail(log)
    assert "got SIGUSR1: forwarding it to the step" in text
    assert f"requeued job {job} (attempt 2)" in text
    assert f"resumed from {run_dir}/checkpoints/step-{first:08d} (step {first})" in text
    assert "got SIGTERM" in text and "attempt 3" in text, tail(log, 80)
    second = [int(s) for s in re.findall(r"stop signal: checkpoint at step (\d+)", text)]
    assert len(second) == 2 and second[1] > first
    assert f"(step {second[1]})" in text
    assert latest(run_dir) == f"step-{STEPS:08d}"
    assert metric_steps(run_dir) == list(
        range(1, STEPS + 1)
    )  # each step once: resumes trim the log
    got, ref = losses(run_dir), losses(mae_reference.run)
    assert got == pytest.approx(ref, rel=1e-4), "resumed losses differ from the uninterrupted run"


@pytest.mark.slurm
def test_term_to_the_batch_shell_alone_still_checkpoints(slurm, shards, tmp_path):
    """`scancel --batch --signal=TERM` reaches the batch shell only. Passed on as TERM, srun would
    force the step's termination (SIGKILL to every task, no checkpoint): the script passes USR1,
    which srun forwards as it is; TERM still means "do not requeue"."""
    log, run_dir = tmp_path / "job.out", tmp_path / "run"
    job, proc = slurm.sbatch(mae_job(log, run_dir, shards))
    wait_until(lambda: len(metric_steps(run_dir)) >= 3, 180, "the first 3 steps")
    subprocess.run(["scancel", "--signal=TERM", "--batch", job], check=True)
    rc = slurm.wait(job, proc, timeout=120, log=log)
    text = log.read_text()
    assert "got SIGTERM" in text and "not requeueing" in text, tail(log, 60)
    step = int(re.search(r"stop signal: checkpoint at step (\d+)", text)[1])
    assert latest(run_dir) == f"step-{step:08d}" and rc != 0


@pytest.mark.slurm
def test_submitit_job_preempted_requeues_and_returns_its_result(
    slurm, shards, tmp_path, monkeypatch
):
    """`facemae submit` to the same Slurm; submitit's preemption signal (USR2) mid-run: every rank
    checkpoints, rank 0 requeues, the job resumes and returns the stage's result dict.
    Recognition (facemae_dist.train) when it exists, else pretraining: the same path through submitit."""
    stage, config, steps = (
        ("train", RECOG_CONFIG, 60) if HAS_RECOG else ("pretrain", MAE_CONFIG, STEPS)
    )
    run_dir = tmp_path / "run"
    for key, value in job_env().items():
        monkeypatch.setenv(key, value)
    args = submit.parse([
        stage, "--cluster", "slurm", "--nodes", "2", "--cpus-per-task", "1", "--time", "60",
        "--config", str(config), f"data.train={shards}", f"run.out_dir={run_dir}",
        f"run.max_steps={steps}", "run.log_every=1", "run.ckpt_every=100",
    ])  # fmt: skip
    job = submit.submit(args)
    slurm.jobs.append(job.job_id)
    stdout = Path(job.paths.stdout)
    wait_until(lambda: len(metric_steps(run_dir)) >= 3, 180, "the first 3 steps")
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    # no accounting here: a job that dies without a result would make job.result() wait forever
    wait_until(lambda: job.paths.result_pickle.exists(), 240, f"the result:\n{tail(stdout)}", 1)
    result = job.results()[0]
    text = stdout.read_text()
    assert result["step"] == steps, text[-3000:]
    assert Path(result["run_dir"]) == run_dir
    assert f"facemae {'train' if HAS_RECOG else 'pretrain'}" in text or "world size 2" in text
    assert "Requeued job" in text and "resumed from" in text, text[-3000:]
    assert latest(run_dir) == f"step-{steps:08d}"


@pytest.mark.slurm
def test_rank_crash_ends_the_job_in_bounded_time(slurm, tmp_path):
    """Rank 1 dies while rank 0 would wait (in a collective, or here in a sleep) for 5 minutes:
    `srun --kill-on-bad-exit=1` in common.sh ends the step and the job fails at once."""
    script, log = tmp_path / "crash.sh", tmp_path / "job.out"
    script.write_text(
        "#!/usr/bin/env bash\nset -euo pipefail\n"
        'source "$FACEMAE_HOME/slurm/common.sh"\nfacemae_traps\nfacemae_setup\n'
        "facemae_launch python -c 'import os, sys, time\n"
        'rank = int(os.environ["SLURM_PROCID"])\nprint(f"rank {rank} up", flush=True)\n'
        "time.sleep(1)\nsys.exit(3) if rank == 1 else time.sleep(300)'\n"
    )
    start = time.monotonic()
    env = job_env(FACEMAE_HOME=str(REPO))
    job, proc = slurm.sbatch([*NODES_2x1, f"--output={log}", str(script)], env=env)
    rc = slurm.wait(job, proc, timeout=120, log=log)
    seconds = time.monotonic() - start
    text = log.read_text()
    assert "rank 0 up" in text and "rank 1 up" in text, text
    assert rc != 0 and "step failed with status" in text, text
    assert seconds < 60, f"the job took {seconds:.0f} s to notice a dead rank"


@pytest.mark.slurm
@pytest.mark.skipif(not HAS_RECOG, reason="facemae_dist.train (recognition) does not exist yet")
def test_sbatch_train_recog_default_run_dir(slurm, shards, tmp_path):
    """slurm/train_recog.sh without run.out_dir: the run directory is runs/recog-<job id>."""
    log = tmp_path / "job.out"
    args = [
        *NODES_2x1, f"--output={log}", "slurm/train_recog.sh", str(RECOG_CONFIG),
        f"data.train={shards}", "run.max_steps=3", "export_onnx=false",
    ]  # fmt: skip
    job, proc = slurm.sbatch(args, env=job_env(FACEMAE_RUNS=str(tmp_path / "runs")))
    rc = slurm.wait(job, proc, timeout=180, log=log)
    assert rc == 0, tail(log)
    run_dir = tmp_path / "runs" / f"recog-{job}"
    assert f"run dir {run_dir}" in log.read_text()
    assert latest(run_dir) == "step-00000003"


@pytest.mark.slurm
def test_sbatch_reconstruct_split_over_two_nodes(slurm, shards, tmp_path):
    """slurm/reconstruct.sh passes the stage's own arguments; ranks share the shards (blur: no model)."""
    log, out = tmp_path / "job.out", tmp_path / "released"
    args = [
        *NODES_2x1, f"--output={log}", "slurm/reconstruct.sh", str(shards), str(out),
        "--method", "blur", "--no-progress",
    ]  # fmt: skip
    job, proc = slurm.sbatch(args)
    rc = slurm.wait(job, proc, timeout=180, log=log)
    assert rc == 0, tail(log)
    assert (out / "manifest.json").is_file()
    assert len(list(out.glob("*.tar"))) == len(list(shards.glob("*.tar")))


# ---------------------------------------------------------------- without Slurm


def clean_env(**extra: str) -> dict[str, str]:
    """No SLURM_* (the tests may themselves run inside a Slurm job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, **extra}


def test_scripts_outside_slurm_check_then_submit_themselves_sized_from_env(shards):
    """`bash slurm/train_mae.sh CONFIG ...` on a login node: the stage's own checks for the job's
    size run before sbatch (a typo must not wait in the queue), then sbatch with flags from env."""

    def self_submit(*overrides: str) -> subprocess.CompletedProcess:
        cmd = ["bash", "slurm/train_mae.sh", "--config", str(MAE_CONFIG), *overrides]
        env = clean_env(FACEMAE_DRY_RUN="1", NODES="4", GPUS_PER_NODE="8", TIME_LIMIT="2-00:00:00")
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)

    args = [f"data.train={shards}", "data.global_batch=64", "run.max_steps=5"]
    done = self_submit(*args)
    assert done.returncode == 0, done.stderr
    assert "arguments check out for 4 node(s) x 8 task(s)" in done.stderr
    words = done.stdout.split()
    assert words[0] == "sbatch" and "--nodes=4" in words and "--time=2-00:00:00" in words
    assert "--gpus-per-node=8" in words and "--ntasks-per-node=8" in words
    assert words[-3:] == [str(MAE_CONFIG), *args][-3:]
    assert words[-5] == str(REPO / "slurm/train_mae.sh")
    for bad, message in [
        ("optim.lrr=1", "unknown config key optim.lrr"),
        ("data.global_batch=48", "not divisible by ranks"),  # 48 faces over 32 ranks
    ]:
        done = self_submit(*args, bad)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and not done.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_headers_run_anywhere(name):
    """No GPU request in the defaults (a Slurm without GRES rejects it); signal before the limit;
    requeue; the shared logic sourced from slurm/common.sh."""
    text = (REPO / "slurm" / name).read_text()
    sbatch = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert not [line for line in sbatch if "gpu" in line or "gres" in line]
    assert "#SBATCH --requeue" in sbatch and "#SBATCH --ntasks-per-node=1" in sbatch
    assert any(re.fullmatch(r"#SBATCH --signal=B:USR1@\d+", line) for line in sbatch)
    assert 'source "$FACEMAE_HOME/slurm/common.sh"' in text
    assert os.access(REPO / "slurm" / name, os.X_OK)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("signal,srun_body,expected", [
    ("TERM", "trap 'exit 75' USR1; trap 'exit 99' TERM; sleep 5 & wait", "rc=75 signal=TERM"),
    ("USR1", "trap 'exit 75' USR1; sleep 5 & wait", "rc=75 signal=USR1"),
    ("USR1", "trap '' USR1; sleep 1; kill -KILL $$", "rc=137 signal=USR1"),
])  # fmt: skip
def test_batch_shell_passes_usr1_and_reports_sruns_own_status(
    tmp_path, signal, srun_body, expected
):
    """facemae_srun (slurm/common.sh) with a stand-in srun: a TERM or USR1 to the batch shell
    reaches the step as USR1 (srun kills every task on a TERM), and the status is srun's."""
    fake = tmp_path / "srun"
    fake.write_text(f"#!/usr/bin/env bash\n{srun_body}\n")
    fake.chmod(0o755)
    script = (
        f"source {REPO}/slurm/common.sh; (sleep 0.5; kill -{signal} $$) & "
        'rc=0; facemae_srun run; rc=$?; echo "rc=$rc signal=$FACEMAE_SIGNAL"'
    )
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    env.pop("SLURM_CPUS_PER_TASK", None)
    done = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.stdout.strip().splitlines()[-1] == expected, (done.stdout, done.stderr)


def test_shell_scripts_pass_shellcheck():
    files = [*(REPO / "slurm").glob("*.sh"), Path(__file__).with_name("ci-slurm.sh")]
    done = subprocess.run(
        ["shellcheck", "-x", *map(str, files)], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout


def test_submit_splits_its_options_from_the_stage_arguments():
    args = submit.parse([
        "reconstruct", "in", "out", "--model", "runs/mae-1", "--nodes", "2", "--gpus-per-node=8",
        "--batch-size", "4", "--wait", "--", "--nodes", "3",
    ])  # fmt: skip
    assert (args.stage, args.nodes, args.gpus_per_node, args.wait) == ("reconstruct", 2, 8, True)
    assert args.stage_args == [
        "in",
        "out",
        "--model",
        "runs/mae-1",
        "--batch-size",
        "4",
        "--nodes",
        "3",
    ]
    assert submit.config_of(["--config", "a.yaml"]) == "a.yaml"
    assert submit.config_of(["--config=b.yaml"]) == "b.yaml"


def test_submit_refuses_unknown_stages_and_missing_configs(tmp_path):
    with pytest.raises(FacemaeError, match="unknown stage"):
        submit.stage_main("nosuch")
    with pytest.raises(FacemaeError, match="cannot submit"):
        submit.stage_main("submit")
    args = submit.parse(["pretrain", "--config", str(tmp_path / "none.yaml"), "--cluster", "debug"])
    with pytest.raises(FacemaeError, match="not found"):
        submit.submit(args)


def test_stage_job_is_checkpointable_with_the_same_arguments(tmp_path):
    job = submit.StageJob("pretrain", ["--config", "c.yaml", "data.train=x"], tmp_path)
    assert job.arguments("77")[-1] == f"run.out_dir={tmp_path}/pretrain-77"
    given = submit.StageJob("pretrain", ["--config", "c.yaml", "run.out_dir=r"], tmp_path)
    assert given.arguments("77") == ["--config", "c.yaml", "run.out_dir=r"]
    plain = submit.StageJob("reconstruct", ["in", "out"], tmp_path, run_dir=False)
    assert plain.arguments("77") == ["in", "out"]
    again = job.checkpoint()
    assert isinstance(again.function, submit.StageJob) and again.function is not job
    assert again.function.arguments("77") == job.arguments("77")


def test_dist_variables_from_a_job_environment():
    env = SimpleNamespace(
        num_nodes=2, num_tasks=16, global_rank=9, local_rank=1, job_id="1234",
        hostnames=["gpu-a", "gpu-b"],
    )  # fmt: skip
    values = submit.dist_variables(env)
    assert values["RANK"] == "9" and values["WORLD_SIZE"] == "16" and values["LOCAL_RANK"] == "1"
    assert values["MASTER_ADDR"] == "gpu-a" and values["LOCAL_WORLD_SIZE"] == "8"
    assert values["MASTER_PORT"] == str(submit.master_port("1234"))
    single = submit.dist_variables(SimpleNamespace(**{**vars(env), "num_nodes": 1}))
    assert single["MASTER_ADDR"] == "127.0.0.1"
    with submit.exported({"FACEMAE_TEST_VAR": "1"}):
        assert os.environ["FACEMAE_TEST_VAR"] == "1"
    assert "FACEMAE_TEST_VAR" not in os.environ

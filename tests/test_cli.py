"""The command line: every command explains itself, and user errors are one clear line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from facemae_dist.cli import build_parser, main

BIN = Path(sys.executable).parent


def commands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(sub.choices)


@pytest.mark.parametrize("command", commands())
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.count(f"facemae {command} ") >= 2, text  # the usage line and at least one example


def test_top_level_help_lists_every_stage(capsys):
    main([])
    text = capsys.readouterr().out
    assert all(
        name in text for name in ("shard", "pretrain", "train", "reconstruct", "audit", "demo")
    )


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    cases = [
        ["shard", str(tmp_path / "missing"), str(tmp_path / "out")],
        ["shard", "12x", str(tmp_path / "out"), "--format", "synthetic"],
        ["pretrain", "--config", str(tmp_path / "nope.yaml")],
        [
            "eval",
            "--model",
            str(tmp_path / "nothing.safetensors"),
            "--pairs",
            str(tmp_path / "x.bin"),
        ],
        ["eval", "--model", str(tmp_path), "--pairs", str(tmp_path / "x.bin"), "--device", "tpu"],
    ]
    for args in cases:
        done = subprocess.run(
            [str(BIN / "facemae"), *args], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr and "error:" in done.stderr, (args, done.stderr)


def test_shard_tool_script_is_the_same_command(tmp_path):
    tool = Path(__file__).resolve().parents[1] / "tools/shard_dataset.py"
    done = subprocess.run(
        [sys.executable, str(tool), "6x3:1", str(tmp_path / "s"), "--format", "synthetic", "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "train: 18 images, 6 identities" in done.stdout


# ---------------------------------------------------------------- submitting: checks before the queue

MAE_CONFIG = str(Path(__file__).resolve().parents[1] / "configs/mae/tiny_cpu.yaml")


def test_submit_prints_stage_help_and_checks_the_config_before_submitting(
    tmp_path, monkeypatch, capsys, sharded_split
):
    """`facemae submit STAGE --help` is answered here; config errors appear at submit time, and a
    job is only built once the stage's own validation passed."""
    from types import SimpleNamespace

    from facemae_dist import submit

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    submitted = []

    def fake_executor(args, folder):
        job = SimpleNamespace(
            job_id="7", paths=SimpleNamespace(folder=folder), results=lambda: [{}]
        )
        return SimpleNamespace(submit=lambda fn: submitted.append(fn) or job)

    monkeypatch.setattr(submit, "make_executor", fake_executor)
    with pytest.raises(SystemExit) as done:
        main(["submit", "pretrain", "--help"])
    assert done.value.code == 0 and "usage: facemae pretrain" in capsys.readouterr().out
    data = f"data.train={sharded_split}"
    bad = {
        ("optim.epochs=10", data): "unknown config key optim.epochs",
        (data, "irm.direction=sideways"): "irm.direction must be one of",
        (
            data,
            "irm.weight=1",
            "irm.teacher=none.safetensors",
        ): "irm.teacher none.safetensors not found",
        ("data.train=nowhere",): "nowhere does not exist (a typo?",
        (data, "--nodes", "3"): "not divisible by ranks",  # 16 images over 3 ranks
    }
    for extra, message in bad.items():
        argv = ["submit", "pretrain", "--config", MAE_CONFIG, "--cluster", "slurm", *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)
    recon = ["submit", "reconstruct", str(sharded_split)]
    assert main([*recon, "out", "--model", "no-run"]) == 2
    assert "--model no-run: no such folder" in capsys.readouterr().err
    assert main([*recon, "out", "--method", "blur", "--copies", "0"]) == 2
    assert "--copies must be ≥ 1" in capsys.readouterr().err
    assert main([*recon, str(sharded_split), "--method", "blur"]) == 2  # over its own input
    assert "is the input split" in capsys.readouterr().err
    assert not submitted and not list(work.iterdir())  # nothing built, nothing written
    assert main(["submit", "pretrain", "--config", MAE_CONFIG, "--cluster", "slurm", data]) == 0
    assert len(submitted) == 1 and "submitted pretrain as job 7" in capsys.readouterr().out
    # submitit's local runner cannot create a folder named after the job: the run gets a time stamp
    assert main(["submit", "pretrain", "--config", MAE_CONFIG, "--cluster", "local", data]) == 0
    out_dir = [a for a in submitted[-1].argv if a.startswith("run.out_dir=")]
    assert len(out_dir) == 1 and "%j" not in out_dir[0] and "runs/pretrain-" in out_dir[0]
    assert f"logs in {out_dir[0].split('=', 1)[1]}/submitit" in capsys.readouterr().out


def _fake_slurm(folder: Path, sbatch: str | None) -> str:
    """A PATH holding a fake `srun` and, unless None, an `sbatch` running this shell body."""
    folder.mkdir()
    tools = {"srun": "exit 0", **({"sbatch": sbatch} if sbatch is not None else {})}
    for name, body in tools.items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return str(folder)


def test_submit_explains_a_failed_sbatch_in_one_line_and_leaves_nothing(
    tmp_path, monkeypatch, capsys, sharded_split
):
    """sbatch failing (no Slurm configuration here) or missing: one line, exit 2, and no pickle or
    batch script left in the runs root; a good submission leaves submitit's files only in
    <run dir>/submitit."""
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    argv = ["submit", "reconstruct", str(sharded_split), "rel", "--method", "blur"]
    argv += ["--cluster", "slurm", "--runs", str(runs)]
    fatal = "echo 'sbatch: fatal: Could not establish a configuration source' >&2; exit 1"
    monkeypatch.setenv("PATH", _fake_slurm(tmp_path / "broken", fatal))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "sbatch failed (sbatch: fatal: Could not establish a configuration source)" in err
    assert "--cluster local" in err and not runs.exists()
    runs.mkdir()  # an existing runs root is kept, and stays clean
    monkeypatch.setenv("PATH", _fake_slurm(tmp_path / "missing", None))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("facemae submit: error: sbatch not found on PATH") and err.count("\n") == 1
    )
    assert not list(runs.iterdir())
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun: submitit's own check, a traceback before
    assert main(argv) == 2
    assert "srun not found on PATH" in capsys.readouterr().err
    monkeypatch.setenv("PATH", _fake_slurm(tmp_path / "ok", "echo 'Submitted batch job 4242'"))
    assert main(argv) == 0
    assert "submitted reconstruct as job 4242" in capsys.readouterr().out
    assert [p.name for p in runs.iterdir()] == ["reconstruct-4242"]  # no stray symlink either
    files = sorted(p.name for p in (runs / "reconstruct-4242/submitit").iterdir())
    assert files == ["4242_submission.sh", "4242_submitted.pkl"]


def test_submit_reconstruct_locally_without_log_dir_summarizes_the_result(
    tmp_path, monkeypatch, capsys, sharded_split
):
    """reconstruct takes no run directory: on the local runner its submitit files still get a
    folder (no %j), and the printed result is a summary, not the whole manifest."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "rel"
    argv = ["submit", "reconstruct", str(sharded_split), str(out), "--method", "blur"]
    assert main([*argv, "--no-progress", "--cluster", "local"]) == 0
    text = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 28
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("reconstruct-") and "%j" not in run.name
    assert f"logs in {run}/submitit" in text
    finished = next(line for line in text.splitlines() if line.startswith("job "))
    assert "num_samples=28" in finished and "label_map=<7 items>" in finished
    assert repr(manifest["label_map"][-1]) not in finished and len(finished) < 400
    assert f"full result: {out}/manifest.json, {run}/submitit/" in text


def test_submitted_stage_sees_the_command_line_of_a_direct_run(
    tmp_path, monkeypatch, capsys, sharded_split
):
    """What a stage records as its command (sys.argv) is `facemae STAGE ARGS`, as when run directly,
    not submitit's `python -m submitit.core._submit FOLDER`; sys.argv is restored afterwards."""
    from facemae_dist import submit

    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(submit, "stage_main", lambda stage: lambda argv: seen.append(sys.argv[:]))
    stage_args = [str(sharded_split), "rel", "--method", "blur", "--copies", "2"]
    argv_before = sys.argv[:]
    assert main(["submit", "reconstruct", *stage_args, "--cluster", "debug"]) == 0
    assert seen == [["facemae", "reconstruct", *stage_args]] and sys.argv == argv_before


# ---------------------------------------------------------------- slurm/common.sh without a Slurm


def _no_slurm_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, **extra}


def test_slurm_self_submit_checks_the_config_first_and_quotes_the_dry_run():
    repo = Path(__file__).resolve().parents[1]
    script = ["bash", "slurm/train_mae.sh"]
    env = _no_slurm_env(FACEMAE_DRY_RUN="1")
    run = {"cwd": repo, "env": env, "capture_output": True, "text": True, "timeout": 30}
    done = subprocess.run([*script, "configs/mae/nope.yaml", "x=1"], **run)
    assert done.returncode == 2 and not done.stdout
    assert "config configs/mae/nope.yaml not found" in done.stderr
    # the quoting of odd arguments (the stage's own checks would refuse x=...: tested elsewhere)
    run["env"] = {**env, "FACEMAE_SKIP_PREFLIGHT": "1"}
    done = subprocess.run([*script, MAE_CONFIG, "run.out_dir=runs/a b", "x=it's"], **run)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("sbatch --output=runs/logs/%x-%j.out ")
    assert done.stdout.rstrip("\n").endswith(f"{MAE_CONFIG} run.out_dir=runs/a\\ b x=it\\'s")


def test_rendezvous_ports_agree_and_keep_out_of_the_ephemeral_range():
    """slurm/common.sh, submitit jobs and dist.py pick the same port; below 32768; a job's attempts
    (up to FACEMAE_MAX_REQUEUES=20 requeues) never share a port with a neighbouring job's."""
    from facemae_dist import dist, submit

    repo = Path(__file__).resolve().parents[1]
    jobs = [(1, 0), (1234, 3), (98765432, 20), (4242, 7)]
    line = "; ".join(f"facemae_master_port {j} {r}" for j, r in jobs)
    done = subprocess.run(
        ["bash", "-c", f"source slurm/common.sh; {line}"],
        cwd=repo, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [int(p) for p in done.stdout.split()] == [dist.job_port(j, r) for j, r in jobs]
    assert submit.master_port("1234", 3) == dist.job_port(1234, 3)
    for start in (1, 777_777):
        ports = {}
        for job in range(start, start + 437):
            for restart in range(21):
                port = dist.job_port(job, restart)
                assert 15000 <= port <= 29000 and port != dist.DEFAULT_PORT
                assert ports.setdefault(port, job) == job, (job, restart, ports[port])


def test_two_lone_runs_side_by_side_do_not_fight_over_a_port() -> None:
    """A plain `facemae train` and `facemae pretrain` at once (no launcher, no job): each starts its
    own one-process group; a fixed default port made the second fail with EADDRINUSE."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "SLURM_"))}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    code = (
        "import os, time; from facemae_dist import dist; dist.init(use_deepspeed=False); "
        "time.sleep(3); print(os.environ['MASTER_PORT']); dist.shutdown()"
    )
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outs = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-500:] for _, err in outs]
    assert outs[0][0] != outs[1][0]


@pytest.mark.parametrize(
    ("body", "code", "printed"),
    [
        ("print('written')", 0, "written"),
        ("sys.exit(75)", 75, ""),  # a stop signal's checkpoint-and-exit code reaches the launcher
        ("raise FacemaeError('bad input')", 2, "facemae x: error: bad input"),
    ],
)
def test_module_entry_points_exit_with_the_stages_code_and_flushed_output(body, code, printed):
    """run_entry leaves through os._exit (exit-time C++ destructors aborted finished runs): the
    exit code and everything printed must still arrive."""
    script = (
        "import sys\nfrom facemae_dist.cli import run_entry\n"
        "from facemae_dist.errors import FacemaeError\n"
        f"def stage():\n    {body}\n"
        "run_entry('x', stage)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == code, done.stderr
    assert printed in done.stdout + done.stderr


def test_cli_owned_options_all_have_help_and_show_their_defaults():
    """Every option of the commands this parser builds says what it does; key defaults show."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in ("synth", "shard", "demo", "sweep", "make-pairs", "eval"):
        for action in sub.choices[name]._actions:
            assert action.help, (
                f"facemae {name}: {action.option_strings or action.dest} has no help"
            )
    shard = sub.choices["shard"].format_help()
    assert "default: 1000" in shard and "default: 112" in shard
    assert "multiple of 20" in sub.choices["make-pairs"].format_help()
    assert "default: 6000" in sub.choices["make-pairs"].format_help()
    assert "about 1.5 minutes on 2 cores" in sub.choices["demo"].format_help()


def test_cli_strict_shard_rerun_after_fixing_the_input(tmp_path):
    """`shard --strict` stops at a bad input before any shard is finished; after the fix, the same
    command runs (no --resume dead end)."""
    from facemae_dist.data.synthetic import SyntheticSource, write_folder

    faces = tmp_path / "faces"
    write_folder(SyntheticSource.from_spec("4x3").cfg, faces, progress=False)
    victim = sorted(faces.rglob("*.jpg"))[0]
    good = victim.read_bytes()
    victim.write_bytes(good[:200])
    cmd = [str(BIN / "facemae"), "shard", str(faces), str(tmp_path / "sh"), "--strict"]
    done = subprocess.run([*cmd, "--no-progress"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and victim.parent.name in done.stderr, done.stderr
    assert "run the same command again" in done.stderr
    victim.write_bytes(good)
    done = subprocess.run([*cmd, "--no-progress"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "12 images" in done.stdout


def test_reconstruct_audit_and_submit_options_all_have_help_and_show_their_defaults():
    """The stages' own parsers too: every option says what it does, and its default where it has
    a value worth knowing."""
    from facemae_dist import submit
    from facemae_dist.engine import reconstruct
    from facemae_dist.eval import privacy

    parsers = {
        "reconstruct": reconstruct.parser(),
        "audit": privacy.parser(),
        "submit": submit.parser(),
    }
    for name, p in parsers.items():
        for action in p._actions:
            assert action.help, (
                f"facemae {name}: {action.option_strings or action.dest} has no help"
            )
    shown = {
        "reconstruct": [
            "--method", "--mask-ratio", "--jpeg-quality", "--blur-sigma", "--noise-std",
            "--batch-size", "--seed",
        ],
        "audit": ["--batch-size"],
        "submit": ["--cluster", "--nodes", "--cpus-per-task", "--partition", "--account"],
    }  # fmt: skip
    for name, options in shown.items():
        helps = {o: a.help for a in parsers[name]._actions for o in a.option_strings}
        for option in options:
            assert "default" in helps[option], f"facemae {name} {option}: default not shown"
    text = " ".join(parsers["reconstruct"].format_help().split())
    assert "(default: 0.75)" in text and "(default: 95)" in text and "(default: facemae)" in text
    assert "(default: 128)" in parsers["audit"].format_help()
    text = " ".join(parsers["submit"].format_help().split())
    assert "(default: auto)" in text and "(default: 8)" in text


def test_curves_command_draws_runs_and_names_a_folder_that_is_not_one(tmp_path, capsys) -> None:
    run = tmp_path / "mae"
    run.mkdir()
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["curves", str(run)]) == 0
    assert (run / "curves.png").is_file()  # one run: its own folder
    assert main(["curves", str(run), str(run), "--out", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").is_file()
    capsys.readouterr()
    assert main(["curves", str(run), "--out", str(tmp_path / "named")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "named.png")  # the file it wrote
    assert main(["curves", str(run), "--out", str(tmp_path / "x.foo")]) == 2
    assert "cannot draw a .foo picture; use one of" in capsys.readouterr().err
    assert main(["curves", str(tmp_path)]) == 2
    assert f"{tmp_path}: no metrics.jsonl rows" in capsys.readouterr().err


def test_preview_draws_one_identity_per_row(tmp_path, capsys) -> None:
    from PIL import Image

    from facemae_dist.data.shards import ShardOptions, shard_dataset
    from facemae_dist.data.synthetic import SyntheticSource

    opts = ShardOptions(samples_per_shard=7, shuffle=True, progress=False)
    shard_dataset(SyntheticSource.from_spec("6x5:3"), tmp_path / "s", opts)
    out = tmp_path / "p.png"
    assert main(["preview", str(tmp_path / "s/train"), "--out", str(out), "--rows", "3"]) == 0
    assert "train: 30 faces, 6 identities, 5 shards, 0 rejected" in capsys.readouterr().out
    # 3 rows of 8 slots (5 faces + 3 blank), a 110 px label column, 2 px gaps
    assert Image.open(out).size == (110 + 8 * 114, 3 * 114)
    from facemae_dist.data.shards import load_manifest
    from facemae_dist.data.stream import decode_face, read_shard

    cls_of = {  # every face's pixels -> its class
        decode_face(x).permute(1, 2, 0).numpy().tobytes(): int(x["cls"])
        for url in load_manifest(tmp_path / "s/train")["urls"]
        for x in read_shard(url)
    }
    grid = np.asarray(Image.open(out).convert("RGB"))
    rows = []
    for r in range(3):
        cells = [
            grid[r * 114 : r * 114 + 112, 110 + c * 114 : 110 + c * 114 + 112] for c in range(5)
        ]
        rows.append({cls_of[cell.tobytes()] for cell in cells})
    assert all(len(row) == 1 for row in rows) and len(set.union(*rows)) == 3  # one identity a row
    assert main(["preview", str(tmp_path / "s/train"), "--rows", "0"]) == 2
    assert "--rows and --per-row must be ≥ 1" in capsys.readouterr().err


def test_shard_command_mixes_identities_unless_told_not_to(tmp_path) -> None:
    """Identity-sorted shards give IRM batches of few identities (the README's demo notes): the
    command shuffles by default."""
    from facemae_dist.data.shards import load_manifest
    from facemae_dist.data.stream import read_shard

    def classes(out) -> list[int]:
        return [int(s["cls"]) for u in load_manifest(out / "train")["urls"] for s in read_shard(u)]

    args = ["12x4:1", "--format", "synthetic", "--no-progress"]
    assert main(["shard", args[0], str(tmp_path / "a"), *args[1:]]) == 0
    assert main(["shard", args[0], str(tmp_path / "b"), *args[1:], "--no-shuffle"]) == 0
    assert load_manifest(tmp_path / "a/train")["options"]["shuffle"] is True
    assert classes(tmp_path / "b") == sorted(classes(tmp_path / "b"))
    assert classes(tmp_path / "a") != sorted(classes(tmp_path / "a"))


def test_make_pairs_prints_a_summary_line(sharded_split, tmp_path, capsys) -> None:
    """`facemae make-pairs` ends with one readable line (what, how many, where), as `shard` and
    `preview` do, not a JSON dump."""
    out = tmp_path / "pairs.bin"
    assert main(["make-pairs", str(sharded_split), str(out), "--pairs", "40", "--seed", "3"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.count("\n") == 0 and not printed.startswith("{")
    assert printed.startswith(f"{sharded_split}: 40 pairs (20 same identity, 20 different)")
    assert "7 identities, 10 folds" in printed and printed.endswith(f"→ {out}")
    assert out.is_file()


def test_make_setup_says_what_it_installs_before_the_quiet_installs() -> None:
    """`make setup` runs pip -q for about a minute: a line first says what is happening and how
    long it takes (make -n only prints the recipe; nothing is installed)."""
    import shutil

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        ["make", "-n", "-B", "-C", str(root), ".venv/bin/facemae"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [line for line in done.stdout.splitlines() if not line.startswith("make")]
    pip = next(i for i, line in enumerate(lines) if "pip install" in line)
    said = [line for line in lines[:pip] if line.startswith("echo ")]
    assert said and "installing" in said[0] and "minute" in said[0], lines

"""The command line: every command explains itself, and user errors are one clear line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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

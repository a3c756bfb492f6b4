"""What the command line prints for errors that are not the toolkit's own checks: one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

FACEMAE = str(Path(sys.executable).parent / "facemae")


def facemae(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run([FACEMAE, *args], env=env, capture_output=True, text=True, timeout=300)


def test_a_loader_worker_error_is_its_own_single_line(sharded_split, tmp_path):
    """DataLoader workers re-raise an error wrapped in their traceback text: the CLI prints the
    original line (the configs read shards with 8 workers per rank)."""
    from safetensors.torch import save_file

    from facemae_dist.models.backbones import build_backbone

    run = tmp_path / "recog"
    run.mkdir()
    save_file(build_backbone("tiny", 128).state_dict(), run / "backbone.safetensors")
    meta = {"backbone": "tiny", "embedding_size": 128, "kwargs": {}}
    (run / "model.json").write_text(json.dumps(meta))
    shard = sharded_split / "faces-000003.tar"
    shard.write_bytes(shard.read_bytes()[:4000])
    done = facemae("audit", str(sharded_split), str(sharded_split), "--model", str(run),
                   "--workers", "2", "--no-progress")  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "faces-000003.tar" in lines[0] and "facemae shard --resume" in lines[0]


def test_a_file_where_a_folder_belongs_is_one_line(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    done = facemae("synth", "2x2", str(blocker / "faces"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert str(blocker) in done.stderr and "Not a directory" in done.stderr


def test_eval_checks_its_out_file_before_the_work(tmp_path):
    done = facemae(
        "eval", "--model", str(tmp_path / "none"), "--pairs", "x.bin", "--out", str(tmp_path)
    )
    assert done.returncode == 2 and "is a folder: give a file name" in done.stderr, done.stderr


def test_tables_in_logs_keep_their_headers():
    """A log (not a terminal) gets the demo's whole table: rich laid it out for 80 columns and cut
    the headers ("verif…", "leaka…")."""
    from facemae_dist.report import _COLUMNS

    code = (
        "from facemae_dist.report import print_demo_table, _COLUMNS\n"
        "print_demo_table([{k: 0.5 for k, _, _ in _COLUMNS} | {'method': 'facemae-irm'}], 't')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for _, header, _ in _COLUMNS:
        assert header in done.stderr

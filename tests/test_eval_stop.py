"""A stop signal during a verification eval: the eval gives way between batches, every rank at the
same batch, and the run checkpoints and exits 75 at once instead of after the whole eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import jpeg_bytes

from facemae_dist import dist
from facemae_dist.data.shards import ShardOptions, shard_dataset
from facemae_dist.data.sources import PairSet, write_pair_set
from facemae_dist.data.synthetic import SyntheticSource
from facemae_dist.engine.loop import StopRequested
from facemae_dist.engine.recognize import RecogConfig, RecogTask
from facemae_dist.eval import verification
from facemae_dist.eval.verification import VerificationStopped, embed_pairs, verify_pair_set
from facemae_dist.models.backbones import build_backbone

REPO = Path(__file__).resolve().parents[1]


class CountingModel(torch.nn.Module):
    """The tiny backbone, counting its forward calls (one per embedded batch)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = build_backbone("tiny", embedding_size=16)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x)


def pair_set(num_pairs: int = 10) -> PairSet:
    images = [jpeg_bytes(i) for i in range(2 * num_pairs)]
    return PairSet(images, np.arange(num_pairs) % 2 == 0, "toy")


def test_embedding_gives_way_to_should_stop_between_batches() -> None:
    model = CountingModel()
    asked: list[int] = []

    def should_stop() -> bool:  # becomes true once the first batch is embedded
        asked.append(model.calls)
        return model.calls >= 1

    with pytest.raises(VerificationStopped):
        embed_pairs(model, pair_set().images, batch_size=4, should_stop=should_stop)
    assert model.calls == 1 and asked == [0, 1]  # 1 of 5 batches, asked before each
    assert model.training  # its mode is restored on the way out

    model.calls = 0
    with pytest.raises(VerificationStopped):
        verify_pair_set(model, pair_set(), batch_size=4, should_stop=lambda: model.calls >= 2)
    assert model.calls == 2
    model.calls = 0
    result = verify_pair_set(model, pair_set(), batch_size=4, should_stop=lambda: False)
    assert model.calls == 5 and result.num_pairs == 10


def test_a_stop_on_another_rank_ends_this_ranks_eval_at_the_same_batch(tmp_path, monkeypatch):
    """Each rank embeds every batch itself; the per-batch check is agreed over all ranks, so a
    signal that reached only another rank (or reached it earlier) ends the eval here too."""
    write_pair_set(tmp_path / "toy.bin", pair_set().images, pair_set().issame)
    cfg = RecogConfig()
    cfg.eval.pairs, cfg.eval.batch_size, cfg.engine.zero_stage = [str(tmp_path / "toy.bin")], 4, 0
    cfg.run.out_dir = str(tmp_path / "run")
    model = CountingModel()
    task = RecogTask(cfg, None, None, torch.device("cpu"))
    task.engine = SimpleNamespace(module=model)
    task.should_stop = lambda: False  # this rank got no signal
    polls: list[bool] = []

    def any_true(flag: bool) -> bool:  # the all-reduce: another rank got the signal mid-eval
        polls.append(flag)
        return len(polls) > 2

    monkeypatch.setattr(dist, "any_true", any_true)
    with pytest.raises(StopRequested):
        task.verify(step=7)
    assert model.calls == 2 and polls == [False, False, False]
    assert task.history == [] and task.best == -1.0  # no partial accuracy recorded
    assert not (tmp_path / "run" / "best.safetensors").exists()

    monkeypatch.setattr(dist, "any_true", lambda flag: flag)  # no stop anywhere: the eval runs
    model.calls = 0
    record = task.verify(step=8)
    assert model.calls == 5 and record["step"] == 8 and task.history == [record]


# ---------------------------------------------------------------- a real (1-process) run

# `facemae train` whose eval sends SIGUSR1 (Slurm's warning) to rank SIGNAL_RANK in its first batch
TRAIN = """
import os, signal, sys
from facemae_dist.engine import recognize
from facemae_dist.eval import verification

embed, calls = verification._embed_batch, [0]

def counting(model, batch, device):
    calls[0] += 1
    rank = os.environ.get("RANK", "0")
    print(f"rank {rank} eval batch {calls[0]}", flush=True)
    if calls[0] == 1 and rank == os.environ.get("SIGNAL_RANK"):
        os.kill(os.getpid(), signal.SIGUSR1)
    return embed(model, batch, device)

verification._embed_batch = counting
recognize.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval-stop")
    shard_dataset(SyntheticSource.from_spec("8x8:1"), root / "s", ShardOptions(progress=False))
    verification.make_pairs(str(root / "s/train"), str(root / "pairs.bin"), 40, 0)
    return root


def train(data: Path, out: Path, signal_in_eval: bool, *overrides: str, ranks: int = 1):
    """One process (python -c), or `ranks` under torchrun with the signal reaching rank 1 only."""
    script = data / "train_signal.py"
    script.write_text(TRAIN)
    launch = [sys.executable, str(script)]
    if ranks > 1:
        port = str(29500 + os.getpid() % 200)
        launch = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(ranks),
                  "--master_port", port, str(script)]  # fmt: skip
    cmd = [
        *launch, "--config", str(REPO / "configs/recog/tiny_cpu.yaml"),
        f"data.train={data / 's/train'}", f"run.out_dir={out}", "data.global_batch=8",
        f"eval.pairs=[{data / 'pairs.bin'}]", "eval.batch_size=8", "run.ckpt_every=0",
        "run.log_every=1", "export_onnx=false", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env["FACEMAE_DIST_TIMEOUT"] = "60"  # a rank left waiting fails the test instead of hanging
    env.pop("SIGNAL_RANK", None)
    if signal_in_eval:
        env["SIGNAL_RANK"] = "1" if ranks > 1 else "0"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    latest = out / "checkpoints" / "latest"
    return done, latest.read_text().strip() if latest.is_file() else None


def test_a_signal_during_periodic_verification_checkpoints_that_step(data):
    """Without giving way, the eval would run all 10 batches and the stop would come a step later."""
    out = data / "periodic"
    done, latest = train(data, out, True, "run.max_steps=4", "eval.every=2")
    assert done.returncode == 75, done.stderr[-3000:]
    assert done.stdout.count("eval batch") == 1 and "verify " not in done.stdout
    assert "verification at step 2 skipped: stop signal" in done.stdout
    assert "stop signal: checkpoint at step 2" in done.stdout and latest == "step-00000002"
    assert not (out / "result.json").exists()

    again, latest = train(data, out, False, "run.max_steps=4", "eval.every=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "done: 4 steps" in again.stdout
    assert json.loads((out / "result.json").read_text())["verification"]["step"] == 4


def test_a_signal_during_the_final_verification_exits_75_and_a_rerun_finishes(data):
    out = data / "final"
    done, latest = train(data, out, True, "run.max_steps=2")
    assert done.returncode == 75, done.stderr[-3000:]
    assert done.stdout.count("eval batch") == 1
    assert "verification at step 2 skipped: stop signal" in done.stdout
    assert latest == "step-00000002" and not (out / "result.json").exists()

    again, _ = train(data, out, False, "run.max_steps=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and again.stdout.count("eval batch") == 10
    result = json.loads((out / "result.json").read_text())
    assert result["step"] == 2 and 0.0 <= result["verification"]["pairs"]["acc"] <= 1.0


@pytest.mark.dist
def test_a_signal_on_one_rank_during_verification_stops_both_ranks_at_the_same_batch(data):
    """Each rank embeds every batch; the per-batch check is agreed, so rank 0, which got no signal,
    leaves the eval with rank 1 (no rank waits in a collective the other never reaches)."""
    out = data / "two-ranks"
    done, latest = train(data, out, True, "run.max_steps=4", "eval.every=2", ranks=2)
    assert "exitcode  : 75" in done.stderr, done.stderr[-3000:]  # torchrun itself returns 1
    assert "rank 0 eval batch 1" in done.stdout and "rank 1 eval batch 1" in done.stdout
    assert "eval batch 2" not in done.stdout
    assert "verification at step 2 skipped: stop signal" in done.stdout
    assert latest == "step-00000002"
    assert {p.name for p in (out / "checkpoints" / latest).glob("rank*.pt")} == {
        "rank00000.pt",
        "rank00001.pt",
    }

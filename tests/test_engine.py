"""Shared engine pieces: configs, the LR schedule, and the NaN guard of a real (1-process) run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from facemae_dist.config import apply_overrides, from_dict, load_config
from facemae_dist.data.shards import ShardOptions, shard_dataset
from facemae_dist.data.synthetic import SyntheticSource
from facemae_dist.engine.loop import OptimConfig, lr_lambda, param_groups
from facemae_dist.engine.pretrain import PretrainConfig
from facemae_dist.errors import FacemaeError

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    lr: float = 0.1
    steps: int = 10
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    flag: bool = False


def test_config_overrides_types_and_unknown_keys(tmp_path):
    cfg = from_dict(
        Outer, apply_overrides({}, ["inner.lr=5e-3", "inner.names=[a, b]", "flag=true"])
    )
    assert cfg.inner.lr == 0.005 and cfg.inner.names == ["a", "b"] and cfg.flag is True
    with pytest.raises(
        FacemaeError, match=r"unknown config key inner.lrr; valid keys here: lr, names, steps"
    ):
        from_dict(Outer, {"inner": {"lrr": 1}})
    with pytest.raises(FacemaeError, match="inner.steps: expected int"):
        from_dict(Outer, {"inner": {"steps": "ten"}})
    with pytest.raises(FacemaeError, match="expected section.key=value"):
        apply_overrides({}, ["nonsense"])
    child = tmp_path / "child.yaml"
    (tmp_path / "base.yaml").write_text("run:\n  seed: 3\n  epochs: 2.0\n")
    child.write_text("base: base.yaml\nrun:\n  epochs: 5.0\n")
    cfg = load_config(PretrainConfig, child, ["run.max_steps=7"])
    assert (cfg.run.seed, cfg.run.epochs, cfg.run.max_steps) == (3, 5.0, 7)


def test_warmup_then_cosine_and_no_decay_on_norms():
    f = lr_lambda(OptimConfig(schedule="cosine"), total_steps=110, warmup=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.05)
    assert (
        len(decay["params"]) == 1 and len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0
    )


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    shard_dataset(SyntheticSource.from_spec("8x8:1"), tmp_path / "s", ShardOptions(progress=False))
    out = tmp_path / "run"
    cmd = [
        str(Path(sys.executable).parent / "facemae"), "pretrain", "--config", str(REPO / "configs/mae/tiny_cpu.yaml"),
        f"data.train={tmp_path / 's/train'}", f"run.out_dir={out}", "optim.base_lr=1.0e+30",
        "optim.warmup_steps=0", "run.ckpt_every=1", "run.max_steps=10", "data.global_batch=8",
    ]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "loss is nan" in done.stderr or "loss is inf" in done.stderr
    good = (out / "checkpoints" / "latest").read_text().strip()
    assert f"Last good checkpoint: {out / 'checkpoints' / good}" in done.stderr
    assert not (out / "facemae.safetensors").exists()  # no export of a broken model


def test_bf16_runs_for_both_trainers(tmp_path):
    """bf16 on the CPU: DeepSpeed casts weights, the toolkit casts inputs and buffers to match."""
    from facemae_dist.eval.verification import make_pairs

    shard_dataset(SyntheticSource.from_spec("8x8:1"), tmp_path / "s", ShardOptions(progress=False))
    make_pairs(str(tmp_path / "s/train"), str(tmp_path / "pairs.bin"), 40, 0)
    facemae = str(Path(sys.executable).parent / "facemae")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    common = [
        f"data.train={tmp_path / 's/train'}",
        "engine.precision=bf16",
        "run.max_steps=3",
        "data.global_batch=8",
    ]
    runs = {
        "train": [
            REPO / "configs/recog/tiny_cpu.yaml",
            f"eval.pairs=[{tmp_path / 'pairs.bin'}]",
            "export_onnx=false",
        ],
        "pretrain": [REPO / "configs/mae/tiny_cpu.yaml"],
    }
    for stage, (config, *extra) in runs.items():
        out = tmp_path / stage
        cmd = [facemae, stage, "--config", str(config), f"run.out_dir={out}", *common, *extra]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (stage, done.stderr[-2000:])
        assert "done: 3 steps" in done.stdout
    verification = json.loads((tmp_path / "train/result.json").read_text())["verification"]
    assert 0.0 <= verification["pairs"]["acc"] <= 1.0  # verification ran on the bf16 backbone

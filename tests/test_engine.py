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
    # elements follow their declared types; fixed tuples have their length; bools are not numbers
    cfg = load_config(
        PretrainConfig, REPO / "configs/mae/tiny_cpu.yaml", ["optim.betas=[0.9, 1e-3]"]
    )
    assert cfg.optim.betas == (0.9, 0.001)
    bad = {
        "optim.betas=[0.9]": "optim.betas: expected 2 values",
        "optim.betas=[0.9, x]": r"optim.betas\[1\]: expected a number",
        "run.max_steps=true": "run.max_steps: expected int, got True",
        "optim.base_lr=false": "optim.base_lr: expected float, got False",
        "model.kwargs=3": "model.kwargs: expected a mapping",
    }
    for override, message in bad.items():
        with pytest.raises(FacemaeError, match=message):
            load_config(PretrainConfig, REPO / "configs/mae/tiny_cpu.yaml", [override])
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


def test_drop_path_model_exports_and_draws_its_grid(tmp_path):
    """With drop-path the engine's model must be compared with its reload in eval mode (in training
    mode each forward drops other paths: the export check failed every such run at its very end)."""
    shard_dataset(SyntheticSource.from_spec("8x8:1"), tmp_path / "s", ShardOptions(progress=False))
    out = tmp_path / "run"
    cmd = [
        str(Path(sys.executable).parent / "facemae"), "pretrain", "--config", str(REPO / "configs/mae/tiny_cpu.yaml"),
        f"data.train={tmp_path / 's/train'}", f"run.out_dir={out}", "run.max_steps=2",
        "data.global_batch=8", "model.kwargs.drop_path_rate=0.5", "run.image_every=1",
    ]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "export.json").read_text())["max_abs_diff"] < 1e-5


def test_a_run_folder_keeps_its_record_when_a_resume_changes_settings(tmp_path):
    """Resuming with other steps or clipping goes on and keeps the old config on record; another
    architecture, or (recognition) data with other classes, is refused in one line and leaves the
    folder's config.yaml as it was."""
    shard_dataset(SyntheticSource.from_spec("8x8:1"), tmp_path / "s", ShardOptions(progress=False))
    shard_dataset(SyntheticSource.from_spec("6x8:2"), tmp_path / "t", ShardOptions(progress=False))
    facemae = str(Path(sys.executable).parent / "facemae")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}

    def run(stage: str, config: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
        cmd = [facemae, stage, "--config", str(REPO / config), f"run.out_dir={out}",
               "data.global_batch=8", *extra]  # fmt: skip
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    mae, data = tmp_path / "mae", f"data.train={tmp_path / 's/train'}"
    assert (
        run("pretrain", "configs/mae/tiny_cpu.yaml", mae, data, "run.max_steps=2").returncode == 0
    )
    done = run("pretrain", "configs/mae/tiny_cpu.yaml", mae, data, "run.max_steps=3",
               "optim.grad_clip=0.5")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming with changed settings: optim.grad_clip 0.0 -> 0.5; run.max_steps 2 -> 3" in (
        done.stdout
    )
    assert "max_steps: 2" in (mae / "config.until-step-00000002.yaml").read_text()
    before = (mae / "config.yaml").read_text()
    done = run("pretrain", "configs/mae/tiny_cpu.yaml", mae, data, "model.kwargs.decoder_depth=1")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "model.kwargs.decoder_depth" in done.stderr and "run.resume=false" in done.stderr
    assert (mae / "config.yaml").read_text() == before

    recog = tmp_path / "recog"
    common = ("run.max_steps=2", "eval.pairs=[]", "export_onnx=false")
    assert run("train", "configs/recog/tiny_cpu.yaml", recog, data, *common).returncode == 0
    other = f"data.train={tmp_path / 't/train'}"
    done = run("train", "configs/recog/tiny_cpu.yaml", recog, other, *common)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "cannot resume from" in done.stderr and "choose another run.out_dir" in done.stderr


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


def test_shared_settings_are_checked_by_both_trainers():
    """Names and counts the loop relies on fail in validate(), before any process group."""
    from facemae_dist.engine import pretrain, recognize

    cases = {
        "optim.schedule=cosin": "optim.schedule 'cosin' is unknown: use one of cosine, poly, constant",
        "optim.optimizer=SGD": "optim.optimizer 'SGD' is unknown: use one of adamw, sgd",
        "run.log_every=0": r"run.log_every must be >= 1",
        "run.keep_last=0": r"run.keep_last must be >= 1",
        "run.ckpt_every=-1": r"run.ckpt_every must be >= 0 \(0: only the final checkpoint\)",
        "engine.grad_accum=0": r"engine.grad_accum must be >= 1",
        "engine.precision=fp16": "engine.precision must be fp32 or bf16",
        "engine.deepspeed_config=configs/deepspeed/zero9.json": (
            "engine.deepspeed_config configs/deepspeed/zero9.json not found"
        ),
    }
    for module, cls, config in [
        (pretrain, pretrain.PretrainConfig, "configs/mae/tiny_cpu.yaml"),
        (recognize, recognize.RecogConfig, "configs/recog/tiny_cpu.yaml"),
    ]:
        for override, message in cases.items():
            cfg = load_config(cls, REPO / config, [override, "data.train=/nonexistent"])
            with pytest.raises(FacemaeError, match=message):
                module.validate(cfg, 1)
        cfg = load_config(cls, REPO / config, ["data.train=''"])
        with pytest.raises(FacemaeError, match="data.train is not set: pass data.train="):
            module.validate(cfg, 1)


def test_base_cycles_and_the_override_example(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nrun:\n  seed: 1\n")
    (tmp_path / "b.yaml").write_text("base: ./a.yaml\n")
    with pytest.raises(FacemaeError, match=r"cycle \(.*a.yaml → .*b.yaml → .*a.yaml\)"):
        load_config(PretrainConfig, tmp_path / "a.yaml")
    with pytest.raises(FacemaeError, match="e.g. run.epochs=10") as err:
        apply_overrides({}, ["epochs"])
    example = str(err.value).rsplit("e.g. ", 1)[1]
    assert (
        load_config(PretrainConfig, REPO / "configs/mae/tiny_cpu.yaml", [example]).run.epochs == 10
    )


def test_deepspeed_config_is_found_from_any_working_directory(tmp_path, monkeypatch):
    """Relative paths: the working directory first, then the repository root (configs/deepspeed)."""
    from facemae_dist.engine.loop import EngineConfig, deepspeed_config, validate_common

    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        PretrainConfig,
        REPO / "configs/mae/tiny_cpu.yaml",
        ["engine.deepspeed_config=configs/deepspeed/zero2.json"],
    )
    validate_common(cfg)
    repo_fragment = json.loads((REPO / "configs/deepspeed/zero2.json").read_text())
    merged = deepspeed_config(cfg.engine, 8, 1, cfg.optim)
    assert merged["zero_optimization"]["stage"] == 2
    assert all(merged[k] == v for k, v in repo_fragment.items() if k != "zero_optimization")
    (tmp_path / "configs/deepspeed").mkdir(parents=True)
    (tmp_path / "configs/deepspeed/zero2.json").write_text('{"wall_clock_breakdown": true}')
    merged = deepspeed_config(cfg.engine, 8, 1, cfg.optim)  # the working directory's copy wins
    assert merged["wall_clock_breakdown"] is True
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(FacemaeError, match="broken.json is not valid JSON"):
        validate_common(
            load_config(
                PretrainConfig,
                REPO / "configs/mae/tiny_cpu.yaml",
                ["engine.deepspeed_config=broken.json"],
            )
        )
    assert EngineConfig().deepspeed_config is None
    # keys the toolkit derives itself are refused with the config key to use instead
    (tmp_path / "clips.json").write_text('{"gradient_clipping": 1.0, "bf16": {"enabled": true}}')
    with pytest.raises(FacemaeError, match=r"bf16, gradient_clipping.*gradient_clipping → optim"):
        deepspeed_config(EngineConfig(deepspeed_config="clips.json"), 8, 1, cfg.optim)
    # no unused gradient norm at ZeRO-2, unless a fragment offloads the optimizer (DeepSpeed needs it)
    (tmp_path / "offload.json").write_text('{"zero_optimization": {"offload_optimizer": {}}}')
    for fragment, skips in (("offload.json", False), (None, True)):
        engine = EngineConfig(zero_stage=2, deepspeed_config=fragment)
        zero = deepspeed_config(engine, 8, 1, OptimConfig(grad_clip=0.0))["zero_optimization"]
        assert zero.get("compute_grad_norm", True) is not skips


def _resume_with_other_clipping(rank: int, world: int, root: str) -> list[float]:
    """Save a ZeRO-2 engine with clipping 1.0 / 0, load each into an engine with the other."""
    from facemae_dist.engine import checkpoint
    from facemae_dist.engine.loop import EngineConfig, build_engine

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # for DeepSpeed
    clips = []
    for saved, resumed in ((1.0, 0.0), (0.0, 1.0)):
        engines = []
        for clip in (saved, resumed):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
            optim = OptimConfig(grad_clip=clip, warmup_steps=1)
            engines.append(build_engine(model, optim, EngineConfig(zero_stage=2), 2, 4, 4))
        folder = checkpoint.save(engines[0], Path(root) / f"clip{saved}", 1, {}, keep_last=1)
        checkpoint.load(engines[1], folder)
        clips.append(engines[1].optimizer.clip_grad)
    return clips


def test_resume_uses_this_runs_grad_clip_not_the_checkpoints(tmp_path):
    """DeepSpeed restores the saved clipping and refuses a clipped checkpoint in a run that skips
    the gradient norm; "set optim.grad_clip, then resume" (the NaN error's advice) must work."""
    from distributed import run_ranks

    (clips,) = run_ranks(_resume_with_other_clipping, str(tmp_path), world=1)
    assert clips == [0.0, 1.0]


# ---------------------------------------------------------------- the fit loop on fakes


class FakeEngine:
    """What fit() uses of a DeepSpeed engine: one weight, SGD every `accum` calls of step(), LambdaLR."""

    def __init__(self, accum: int = 1, warmup: int = 4) -> None:
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.opt = torch.optim.SGD([self.w], lr=0.1)
        factor = lambda s: min(1.0, (s + 1) / warmup)  # noqa: E731
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)
        self.accum, self.micro, self.applied = accum, 0, 0
        self.module = torch.nn.ParameterList([self.w])
        self.optimizer = self.opt

    def gradient_clipping(self) -> float:
        return 0.0

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accum == 0:  # DeepSpeed applies the update on the boundary only
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad()
            self.applied += 1

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.opt.param_groups]

    def save_checkpoint(self, root: str, tag: str, save_latest: bool) -> None:
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        state = {"w": self.w.detach().clone(), "sched": self.sched.state_dict()}
        torch.save(state, Path(root) / tag / "engine.pt")

    def load_checkpoint(self, root: str, tag: str, **_) -> tuple[str, dict]:
        state = torch.load(Path(root) / tag / "engine.pt", weights_only=False)
        self.w.data.copy_(state["w"])
        self.sched.load_state_dict(state["sched"])
        self.opt.param_groups[0]["lr"] = self.sched.get_last_lr()[0]
        return root, {}


class FakeStream:
    batch_size, world_size, num_samples, batches_per_epoch = 1, 1, 100, 100

    def set_epoch(self, epoch: int, skip: int) -> None:
        self.skip = skip

    def __iter__(self):
        for i in range(self.skip, self.batches_per_epoch):
            yield {"x": torch.tensor(float(i))}


class FakeTask:
    def __init__(self, flag, nan_at: int = 0, stop_at: int = 0) -> None:
        self.flag, self.nan_at, self.stop_at = flag, nan_at, stop_at
        self.calls, self.lrs = 0, []

    def losses(self, engine, batch):
        self.calls += 1
        if self.calls == self.stop_at:
            self.flag.signum = 10  # SIGUSR1 (Slurm's warning before the time limit)
        loss = (engine.w - 1.0) ** 2 * (float("nan") if self.calls == self.nan_at else 1.0)
        return {"loss": loss, "one": torch.tensor(1.0)}

    def after_step(self, step: int, lr: float) -> None:
        self.lrs.append(lr)

    def rank_state(self):
        return {}

    def load_rank_states(self, states) -> None:
        pass

    def visualize(self, engine, batch, path) -> None:
        pass


@pytest.fixture
def fake_fit(monkeypatch, tmp_path):
    """fit(FakeEngine, FakeTask, ...) in this process: no DeepSpeed, no signal handlers."""
    from types import SimpleNamespace

    from facemae_dist.engine import loop

    flag = SimpleNamespace(signum=None, release_interrupt=lambda: None)
    monkeypatch.setattr(loop, "StopFlag", lambda: flag)
    monkeypatch.setattr(loop, "make_loader", lambda stream, workers: iter(stream))

    def run(engine, task_kw=(), accum=1, **run_kw):
        cfg = loop.RunConfig(**{"out_dir": str(tmp_path), "ckpt_every": 0, **run_kw})
        task = FakeTask(flag, **dict(task_kw))
        flag.signum = None
        return loop.fit(engine, task, FakeStream(), cfg, accum), task

    return run


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_nan_in_an_early_micro_batch_is_never_applied(fake_fit, tmp_path):
    engine = FakeEngine(accum=2)
    with pytest.raises(FacemaeError, match="loss is nan at step 2") as err:
        fake_fit(engine, {"nan_at": 3}, accum=2, max_steps=4, ckpt_every=1)  # 1st micro of step 2
    assert engine.applied == 1 and torch.isfinite(engine.w)
    good = tmp_path / "checkpoints" / "step-00000001"
    assert f"Last good checkpoint: {good}" in str(err.value)
    assert (tmp_path / "checkpoints" / "latest").read_text() == good.name
    assert torch.isfinite(torch.load(good / "engine.pt", weights_only=False)["w"])


def test_non_finite_weights_after_a_finite_loss_are_never_checkpointed(fake_fit, tmp_path):
    """A finite loss can still have a non-finite gradient; no per-step check runs in bf16 (see
    deepspeed_config), so the checkpoint is where such weights are stopped."""

    class BlowsUp(FakeEngine):
        def step(self) -> None:
            super().step()
            if self.applied == 2:
                self.w.data.fill_(float("inf"))

    with pytest.raises(FacemaeError, match="weights are not finite after step 2") as err:
        fake_fit(BlowsUp(), max_steps=4, ckpt_every=1)
    good = tmp_path / "checkpoints" / "step-00000001"
    assert f"Last good checkpoint: {good}" in str(err.value)
    assert (tmp_path / "checkpoints" / "latest").read_text() == good.name
    assert not (tmp_path / "checkpoints" / "step-00000002").exists()


def test_head_gets_the_lr_of_the_step_and_logs_average_what_was_summed(fake_fit, tmp_path):
    _, task = fake_fit(FakeEngine(), max_steps=3, log_every=2)
    assert task.lrs == pytest.approx([0.025, 0.05, 0.075])  # warmup 1/4, 2/4, 3/4 of lr 0.1
    assert [m["lr"] for m in metrics(tmp_path)] == pytest.approx([0.05])  # step 2's own lr
    # resumed at step 3 (the final checkpoint): step 4 logs the one step summed since
    state, task = fake_fit(FakeEngine(), max_steps=6, log_every=2)
    assert state.step == 6 and task.lrs == pytest.approx([0.1, 0.1, 0.1])
    assert [(m["step"], m["one"]) for m in metrics(tmp_path)] == [(2, 1.0), (4, 1.0), (6, 1.0)]


def test_first_metrics_line_has_a_rate_and_an_eta(fake_fit, tmp_path, monkeypatch, capsys):
    """The first line already measures the run (from the loop's start): docs/cluster.md sizes
    --time from it. Each fake step takes 0.5 s of a fake clock, 1 image per step."""
    from types import SimpleNamespace

    from facemae_dist.engine import loop

    clock = [100.0]
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    class TimedEngine(FakeEngine):
        def step(self) -> None:
            clock[0] += 0.5
            super().step()

    fake_fit(TimedEngine(), max_steps=122, log_every=2)
    first = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("step"))
    assert first.startswith("step 2/122 ") and first.endswith("| 2.0 img/s | eta 1.0 min"), first
    assert [m["img_per_s"] for m in metrics(tmp_path)[:3]] == pytest.approx([2.0, 2.0, 2.0])


def test_stop_signal_on_a_checkpoint_step_saves_once(fake_fit, tmp_path, monkeypatch):
    from facemae_dist.engine import checkpoint

    saved, real_save = [], checkpoint.save
    monkeypatch.setattr(
        checkpoint,
        "save",
        lambda e, root, step, *a: saved.append(step) or real_save(e, root, step, *a),
    )
    with pytest.raises(SystemExit) as stop:
        fake_fit(FakeEngine(), {"stop_at": 2}, max_steps=6, ckpt_every=2)
    assert stop.value.code == 75 and saved == [2]
    # a fresh run (resume=false) in that folder still saves its own final step 2
    fake_fit(FakeEngine(), max_steps=2, resume=False)
    assert saved == [2, 2]


# ---------------------------------------------------------------- checkpoints


def test_checkpoints_keep_the_newest_and_resave_atomically(tmp_path, monkeypatch):
    import shutil

    from facemae_dist.engine import checkpoint

    root = tmp_path / "checkpoints"
    for stale in ("step-00000010", "step-00000011"):  # left by an older run in the same folder
        (root / stale).mkdir(parents=True)
    engine = FakeEngine()

    def names() -> list[str]:
        return sorted(p.name for p in root.iterdir())

    checkpoint.save(engine, root, 2, {}, keep_last=1)
    assert names() == ["latest", "step-00000002"]
    checkpoint.save(engine, root, 4, {}, keep_last=2)
    assert names() == ["latest", "step-00000002", "step-00000004"]

    # saving step 4 again never deletes the folder `latest` names before `latest` has moved
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        assert Path(path) != checkpoint.latest(root), f"deleting {path}, which latest names"
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    engine.w.data.fill_(5.0)
    checkpoint.save(engine, root, 4, {}, keep_last=2)
    assert names() == ["latest", "step-00000002", "step-00000004"]
    assert torch.load(root / "step-00000004/engine.pt", weights_only=False)["w"] == 5.0
    # a kill between the two renames of a re-save: `latest` finds the old copy set aside
    (root / "step-00000004").rename(root / ".old-step-00000004")
    assert checkpoint.latest(root) == root / ".old-step-00000004"


def test_checkpoint_data_reaches_the_disk_before_latest_names_it(tmp_path, monkeypatch):
    """A node crash (not just a killed process) right after `latest` moved must not leave it naming
    data that was still in the page cache: every file is fsynced before the renames."""
    from facemae_dist.engine import checkpoint

    root, events = tmp_path / "checkpoints", []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os,
        "fsync",
        lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd),
    )
    monkeypatch.setattr(
        os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b)
    )
    checkpoint.save(FakeEngine(), root, 2, {"x": 1}, keep_last=1)
    synced = {Path(p).name for kind, p in events if kind == "fsync"}
    assert {"engine.pt", "rank00000.pt", "latest.tmp"} <= synced
    moved = [
        i for i, (kind, p) in enumerate(events) if kind == "replace" and p.endswith("step-00000002")
    ]
    last_data_sync = max(
        i for i, (kind, p) in enumerate(events) if kind == "fsync" and p.endswith(".pt")
    )
    assert moved and last_data_sync < moved[0]


def test_export_mismatch_fails_on_every_rank(monkeypatch, tmp_path):
    """Rank 0's verdict reaches the others (they would otherwise wait for it until the timeout)."""
    from types import SimpleNamespace

    from facemae_dist import dist
    from facemae_dist.engine import pretrain

    cfg = load_config(PretrainConfig, REPO / "configs/mae/tiny_cpu.yaml")
    engine = SimpleNamespace(module=pretrain.build_model(cfg.model))
    monkeypatch.setattr(dist, "detect", lambda: dist.DistInfo(1, 2, 1, "torchrun"))  # rank 1
    for rank0_diff in (1.0, float("nan")):
        monkeypatch.setattr(dist, "from_main", lambda value, d=rank0_diff: d)
        with pytest.raises(FacemaeError, match="exported weights do not reproduce"):
            pretrain.verify_export(engine, tmp_path, cfg, torch.device("cpu"))


def test_recognition_resume_continues_the_head_sampling(tmp_path):
    """head.sample_rate < 1: the negatives drawn after a resume are those of an uninterrupted run."""
    from facemae_dist.engine.recognize import RecogConfig, RecogTask, build_head

    cfg = RecogConfig()
    cfg.head.sample_rate = 0.25

    def task() -> RecogTask:
        head, opt = build_head(cfg.head, 8, 64, torch.device("cpu"), seed=0)
        return RecogTask(cfg, head, opt, torch.device("cpu"))

    emb, labels = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    run = task()
    run.head(emb, labels)
    torch.save(run.rank_state(), tmp_path / "rank00000.pt")  # a checkpoint after step 1
    run.head(emb, labels)
    resumed = task()
    resumed.load_rank_states([torch.load(tmp_path / "rank00000.pt", weights_only=True)])
    resumed.head(emb, labels)
    assert torch.equal(resumed.head.weight_index, run.head.weight_index)


def test_a_resumed_log_drops_what_the_killed_run_wrote_after_the_checkpoint(tmp_path):
    from facemae_dist.engine.loop import Logger

    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 6, "lo')  # cut by a kill
    logger = Logger(tmp_path, 10, enabled=True)
    logger.begin(3, 30)  # resumed from the checkpoint of step 3
    logger.log(4, 40, {"loss": 0.5})
    logger.close()
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4]


def test_config_file_mistakes_are_one_line_that_names_the_file(tmp_path):
    """Empty files, bad YAML, a missing base:, a folder and the other trainer's config each get
    one line naming the file and the fix (not "no shard manifest" or PyYAML's multi-line text)."""
    from facemae_dist.engine.recognize import RecogConfig

    def error(*args) -> str:
        with pytest.raises(FacemaeError) as err:
            load_config(*args)
        assert "\n" not in str(err.value)
        return str(err.value)

    empty, comments = tmp_path / "empty.yaml", tmp_path / "comments.yaml"
    empty.write_text("")
    comments.write_text("# nothing yet\n")
    assert "empty.yaml is empty (data.train is not set)" in error(RecogConfig, empty)
    assert "configs/mae/" in error(PretrainConfig, comments)
    assert load_config(RecogConfig, empty, ["data.train=x"]).data.train == "x"  # defaults + key
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  epochs: 1\n  seed: [1,\n")
    assert error(PretrainConfig, bad).startswith(f"{bad}: invalid YAML at line 4, column 1: ")
    child = tmp_path / "child.yaml"
    child.write_text("base: nothere.yaml\n")
    message = error(PretrainConfig, child)
    assert message.startswith(f"{child}: base: {tmp_path / 'nothere.yaml'} not found")
    assert "base: line" in message
    assert "is a folder, not a file: pass a .yaml file" in error(PretrainConfig, tmp_path)
    mae, recog = REPO / "configs/mae/tiny_cpu.yaml", REPO / "configs/recog/tiny_cpu.yaml"
    assert "irm (this looks like a `facemae pretrain` config)" in error(RecogConfig, mae)
    assert "backbone (this looks like a `facemae train` config)" in error(PretrainConfig, recog)
    assert "looks like" not in error(PretrainConfig, mae, ["nonsense.key=1"])


def test_missing_eval_pairs_offer_to_skip_verification(sharded_split):
    from facemae_dist.engine import recognize

    config = REPO / "configs/recog/tiny_cpu.yaml"
    cfg = load_config(
        recognize.RecogConfig, config, [f"data.train={sharded_split}", "eval.pairs=[nope.bin]"]
    )
    with pytest.raises(FacemaeError, match=r"nope.bin not found: make one .*eval.pairs=\[\]"):
        recognize.validate(cfg, 1)
    cfg.eval.pairs = []
    recognize.validate(cfg, 1)  # the fix it offers works


def test_lost_peer_errors_are_told_apart_from_other_failures() -> None:
    from facemae_dist import dist

    gloo = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [10.0.0.2]:16021: "
        "Connection reset by peer. This is typically caused by a remote worker hanging"
    )
    assert dist.lost_peer(gloo) and dist.lost_peer(torch.distributed.DistBackendError("NCCL"))
    assert not dist.lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not dist.lost_peer(ValueError("Connection reset by peer"))  # not from a collective
    gloo_timeout = "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting"
    assert dist.lost_peer(RuntimeError(gloo_timeout))
    for own_error in (  # a rank's own failures keep their message and traceback
        "CUDA error: the launch timed out and was terminated",
        "DataLoader timed out after 30 seconds",
        "Broken pipe",
    ):
        assert not dist.lost_peer(RuntimeError(own_error))
    line = dist.lost_peer_message(gloo, 3, "run/checkpoints/step-00000040")
    assert line.startswith("rank 3 lost contact with another rank")
    assert "(Read error [10.0.0.2]:16021: Connection reset by peer)" in line
    assert "run/checkpoints/step-00000040" in line and "\n" not in line


def test_training_curves_draw_losses_lr_and_verification(tmp_path) -> None:
    from PIL import Image

    from facemae_dist.report import training_curves

    mae, recog = tmp_path / "mae", tmp_path / "recog"
    for run in (mae, recog):
        run.mkdir()
    rows = [{"step": s, "samples": 32 * s, "img_per_s": 9.0, "loss": 1 / s, "mse": 0.5 / s,
             "irm": 0.5 / s, "lr": 1e-3} for s in range(1, 6)]  # fmt: skip
    (mae / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + '\n{"step": 6, "lo')
    (recog / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0, "lr": 0.1}) + "\n")
    two = training_curves([mae, recog], tmp_path / "two.png")
    (recog / "verification.jsonl").write_text(json.dumps({"step": 1, "lfw": {"acc": 0.9}}) + "\n")
    three = training_curves([mae, recog], tmp_path / "three.png", "title")
    # a third panel (verification accuracy) only where a run verified
    assert Image.open(three).width > Image.open(two).width * 1.3
    with pytest.raises(FacemaeError, match="no metrics.jsonl rows"):
        training_curves([tmp_path], tmp_path / "none.png")


def test_verification_log_keeps_one_row_per_step(tmp_path) -> None:
    """A finished run started again checks its last step again: the row is replaced, not added;
    a fresh start (step 0) in an old run folder starts both logs again."""
    from facemae_dist.engine.loop import Logger, log_verification

    def steps(name: str) -> list[int]:
        return [json.loads(line)["step"] for line in (tmp_path / name).open()]

    for step in (2, 4, 4):
        log_verification(tmp_path, {"step": step, "pairs": {"acc": 0.5 + step / 100}})
    assert steps("verification.jsonl") == [2, 4]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    logger = Logger(tmp_path, total_steps=4, enabled=True)
    logger.begin(0, 0)
    logger.close()
    assert steps("verification.jsonl") == [] and steps("metrics.jsonl") == []

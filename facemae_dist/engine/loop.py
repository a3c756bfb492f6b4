"""What both trainers share: DeepSpeed setup, LR schedule, the fit loop, logging, signals, NaN guard.

A trainer supplies a :class:`Task` (its model and how a batch becomes a dict of losses) and a
:class:`~facemae_dist.data.stream.FaceStream`; :func:`fit` does the rest: exact resume from the
newest checkpoint (model, optimizer, scheduler, RNG, data position), periodic and final checkpoints,
rank-0 logging (rich line, metrics.jsonl, TensorBoard), checkpoint-and-exit on SIGTERM/SIGUSR1 and
a clear stop on a non-finite loss.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from facemae_dist import dist
from facemae_dist.config import read_json, write_text_atomic
from facemae_dist.data.stream import FaceStream, make_loader
from facemae_dist.engine import checkpoint
from facemae_dist.errors import FacemaeError
from facemae_dist.models.cpu_kernels import KERNEL_KWARGS

# the repository root (the folder holding configs/): repository paths in configs resolve against it
REPO_ROOT = Path(__file__).resolve().parents[2]
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written, run again (or requeue) to continue
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "poly", "constant")


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4  # lr = base_lr × global_batch / 256
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    optimizer: str = "adamw"  # one of OPTIMIZERS
    momentum: float = 0.9
    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    schedule: str = "cosine"  # one of SCHEDULES
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0


@dataclass
class EngineConfig:
    zero_stage: int = 2
    precision: str = "fp32"  # fp32 | bf16 (bf16 is the default on GPUs in the realistic configs)
    grad_accum: int = 1
    # extra DeepSpeed JSON merged over the generated one; a relative path is looked up in the
    # working directory, then in the repository root (e.g. configs/deepspeed/zero2.json)
    deepspeed_config: str | None = None


@dataclass
class RunConfig:
    out_dir: str = "runs/run"
    seed: int = 0
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    log_every: int = 10  # >= 1
    ckpt_every: int = 100  # 0: only the final checkpoint (and one on a stop signal)
    keep_last: int = 3  # >= 1: checkpoints kept on disk
    image_every: int = 0  # PNG grids every N steps (0: only at the end)
    num_workers: int = 0
    resume: bool = True


@dataclass
class DataConfig:
    train: str = (
        ""  # split folder written by `facemae shard` / `facemae reconstruct` (manifest.json)
    )
    global_batch: int = 256  # images per optimizer step over all ranks
    shuffle_buffer: int = 1000
    flip: bool = True
    skip_bad_shards: bool = False


@dataclass
class FitState:
    step: int = 0
    samples_seen: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    """What a trainer plugs into :func:`fit`.

    Optional: a ``should_stop`` attribute, which :func:`fit` sets to a cheap check of this rank's
    stop signal; ``after_step`` may then raise :class:`StopRequested` (on every rank alike).
    """

    def losses(self, engine, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Loss parts of one micro-batch; key 'loss' is what gets backpropagated."""

    def after_step(self, step: int, lr: float) -> dict[str, Any] | None:
        """After each optimizer step, with the lr that step used (e.g. a model-parallel head's own
        optimizer). May return a verification record ({"step": N, SET: {"acc": ...}, ...}) for
        rank 0 to log to verification.jsonl and TensorBoard."""

    def rank_state(self) -> dict[str, Any]:
        """Extra per-rank state to checkpoint."""

    def load_rank_states(self, states: list[dict[str, Any]]) -> None:
        """Restore from every saved rank's state (may re-shard to a new world size)."""

    def visualize(self, engine, batch: dict[str, Any], path: Path) -> None:
        """Write a picture of the current model on `batch` (all ranks call, rank 0 writes)."""


# ---------------------------------------------------------------- setup


def validate_common(cfg: Any) -> None:
    """Checks of the sections every trainer shares (run, optim, engine), before any process group."""
    run, optim, engine = cfg.run, cfg.optim, cfg.engine
    choices = {
        "optim.optimizer": (optim.optimizer, OPTIMIZERS),
        "optim.schedule": (optim.schedule, SCHEDULES),
    }
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise FacemaeError(f"{key} {value!r} is unknown: use one of {', '.join(valid)}")
    limits = {  # key: (value, its minimum, what that means)
        "run.log_every": (run.log_every, 1, "steps per metrics line"),
        "run.keep_last": (run.keep_last, 1, "checkpoints kept on disk, the newest always"),
        "run.ckpt_every": (run.ckpt_every, 0, "0: only the final checkpoint"),
        "run.image_every": (run.image_every, 0, "0: only at the end"),
        "engine.grad_accum": (engine.grad_accum, 1, "micro-batches per optimizer step"),
    }
    for key, (value, low, meaning) in limits.items():
        if value < low:
            raise FacemaeError(f"{key} must be >= {low} ({meaning}), got {value}")
    if engine.zero_stage not in (0, 1, 2, 3):
        raise FacemaeError(f"engine.zero_stage must be 0, 1, 2 or 3, got {engine.zero_stage}")
    if engine.precision not in ("fp32", "bf16"):
        raise FacemaeError(
            f"engine.precision must be fp32 or bf16 (fp16 is not supported), got {engine.precision}"
        )
    if engine.deepspeed_config:
        deepspeed_fragment(engine.deepspeed_config)  # missing or not JSON: fail before start-up
    if not cfg.data.train:
        raise FacemaeError("data.train is not set: pass data.train=SHARDS/train (a split folder)")


def deepspeed_fragment(value: str) -> dict[str, Any]:
    """The DeepSpeed JSON `engine.deepspeed_config` names: the path as given (absolute, or relative
    to the working directory), else relative to the repository root, where configs/deepspeed/ is."""
    path = Path(value)
    found = next((p for p in (path, REPO_ROOT / path) if p.is_file()), None)
    if found is None:
        where = "" if path.is_absolute() else f" (looked in {Path.cwd()} and {REPO_ROOT})"
        raise FacemaeError(
            f"engine.deepspeed_config {value} not found{where}: name a DeepSpeed JSON such as "
            "configs/deepspeed/zero2.json, or remove the key"
        )
    extra = read_json(found, "engine.deepspeed_config", "fix the file or remove the key")
    if not isinstance(extra, dict):
        raise FacemaeError(f"engine.deepspeed_config {found}: expected a JSON object {{...}}")
    owned = sorted(set(extra) & set(_OWNED_BY_CONFIG))
    if owned:
        fixes = "; ".join(f"{key} → {_OWNED_BY_CONFIG[key]}" for key in owned)
        raise FacemaeError(
            f"engine.deepspeed_config {found} sets {', '.join(owned)}, which the toolkit derives "
            f"from its own config: remove them from the JSON and set instead {fixes}"
        )
    return extra


# DeepSpeed keys the toolkit writes itself, and the config key that sets each
_OWNED_BY_CONFIG = {
    "train_micro_batch_size_per_gpu": "data.global_batch",
    "gradient_accumulation_steps": "engine.grad_accum",
    "optimizer": "optim.optimizer",
    "scheduler": "optim.schedule",
    "gradient_clipping": "optim.grad_clip",
    "fp16": "engine.precision",
    "bf16": "engine.precision",
    "amp": "engine.precision",
}


def micro_batch(data: DataConfig, engine: EngineConfig, world_size: int) -> int:
    """Per-rank micro-batch; the global batch must split evenly over ranks × accumulation."""
    per_step = world_size * engine.grad_accum
    if data.global_batch % per_step:
        raise FacemaeError(
            f"data.global_batch {data.global_batch} is not divisible by ranks × engine.grad_accum "
            f"= {world_size} × {engine.grad_accum}: choose a multiple of {per_step}"
        )
    return data.global_batch // per_step


@dataclass
class Run:
    """What a trainer needs once the process group is up."""

    info: dist.DistInfo
    device: torch.device
    run_dir: Path
    stream: FaceStream
    engine: Any


def start_run(cfg: Any, model: torch.nn.Module, micro: int, banner: str) -> Run:
    """Process group, run folder (+ resolved config), training stream and DeepSpeed engine.

    `cfg` has the sections run, data (:class:`DataConfig`), optim and engine.
    """
    from facemae_dist.config import save_config

    run_dir = Path(cfg.run.out_dir)
    changed = resume_changes(cfg, run_dir)  # every rank, before any of them can write config.yaml
    info = dist.init()
    device = dist.device(info)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if changed:  # the config the checkpoints so far were trained with stays on record
            kept = run_dir / f"config.until-{checkpoint.latest(run_dir / 'checkpoints').name}.yaml"
            if not kept.exists():  # a resume that saved nothing must not overwrite the record
                (run_dir / "config.yaml").replace(kept)
            print(f"resuming with changed settings: {'; '.join(changed)} (was: {kept})", flush=True)
        save_config(cfg, run_dir / "config.yaml")
        print(f"{banner}: world size {info.world_size} ({info.launcher}), {device}", flush=True)
    data = cfg.data
    stream = FaceStream(
        data.train, micro, rank=info.rank, world_size=info.world_size, seed=cfg.run.seed,
        shuffle_buffer=data.shuffle_buffer, flip=data.flip, normalize=False,
        skip_bad_shards=data.skip_bad_shards,
    )  # fmt: skip
    steps_per_epoch = max(1, stream.batches_per_epoch // cfg.engine.grad_accum)
    total = total_steps_for(cfg.run, steps_per_epoch)
    engine = build_engine(model, cfg.optim, cfg.engine, micro, total, steps_per_epoch)
    return Run(info, device, run_dir, stream, engine)


# what a checkpoint is tied to: resuming it under other values would load mismatched weights
RUN_IDENTITY = ("model", "backbone", "engine.zero_stage", "engine.precision")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; an empty section is no key (like an unset one)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_changes(cfg: Any, run_dir: Path) -> list[str]:
    """Settings this run changes against the run folder's config.yaml when it will resume there
    ("key old -> new"). Raises :class:`FacemaeError` for a change the checkpoints cannot follow
    (architecture, ZeRO stage, precision), before anything is written."""
    import yaml

    from facemae_dist.config import to_dict

    old_file = run_dir / "config.yaml"
    if not (cfg.run.resume and old_file.is_file() and checkpoint.latest(run_dir / "checkpoints")):
        return []
    try:
        old = _flat(yaml.safe_load(old_file.read_text()) or {})
    except yaml.YAMLError:
        return ["config.yaml was unreadable"]
    new = _flat(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))  # as written: tuples are lists
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    fixed = [
        k
        for k in keys
        if any(k == p or k.startswith(p + ".") for p in RUN_IDENTITY)
        and k.rsplit(".", 1)[-1] not in KERNEL_KWARGS  # the same weights on other kernels
    ]
    if fixed:
        detail = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in fixed[:3])
        raise FacemaeError(
            f"{run_dir} holds checkpoints of a run with other settings ({detail}): choose another "
            "run.out_dir, or set run.resume=false to train from scratch there"
        )
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys]


def scaled_lr(optim: OptimConfig, global_batch: int) -> float:
    return optim.base_lr * global_batch / 256


def lr_lambda(optim: OptimConfig, total_steps: int, warmup: int):
    """Multiplier of the peak lr at each optimizer step: linear warmup then cosine/poly decay."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if optim.schedule == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * progress))
        elif optim.schedule == "poly":
            decay = (1 - progress) ** 2
        else:
            decay = 1.0
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * decay

    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases, tokens and position embeddings (1-D params)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith((".bias", "token")) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def deepspeed_config(
    engine: EngineConfig, micro_batch: int, world: int, optim: OptimConfig
) -> dict:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": engine.grad_accum,
        "train_batch_size": micro_batch * engine.grad_accum * world,
        "zero_optimization": {"stage": engine.zero_stage},
        # bf16 has fp32's exponent range, so no per-tensor overflow check (DeepSpeed runs none in
        # fp32 either): on an H200 it cost ~7 kernel launches per parameter tensor per step (a
        # third of a ViT-B/16 step at micro-batch 128). The fit loop stops on a non-finite loss
        # before the update and checkpoints only finite weights.
        "bf16": {"enabled": engine.precision == "bf16", "check_grad_overflow": False},
        # always written: DeepSpeed's own default clips at 1.0 (0 disables)
        "gradient_clipping": optim.grad_clip,
        # DeepSpeed casts parameters to bf16 but not buffers (BatchNorm statistics, fixed position
        # embeddings): mixed-dtype ops then fail, so buffers follow the parameters
        **({"data_types": {"buffer_dtype": "bf16"}} if engine.precision == "bf16" else {}),
        "steps_per_print": 1 << 30,
        "zero_allow_untested_optimizer": True,
    }
    if engine.deepspeed_config:
        extra = deepspeed_fragment(engine.deepspeed_config)
        extra.pop("train_batch_size", None)  # always derived from the run's batch and world size
        cfg = {
            **cfg,
            **extra,
            "zero_optimization": {**cfg["zero_optimization"], **extra.get("zero_optimization", {})},
        }
    zero = cfg["zero_optimization"]
    if optim.grad_clip == 0 and engine.zero_stage == 2 and "offload_optimizer" not in zero:
        # nothing clips, so the global gradient norm (one more pass over every tensor) is unused;
        # DeepSpeed allows skipping it at stage 2 without optimizer offload (at stage 1 not with
        # bf16 weights). checkpoint.load lets such a run resume a checkpoint saved with clipping.
        zero.setdefault("compute_grad_norm", False)
    return cfg


def build_engine(
    model,
    optim: OptimConfig,
    engine_cfg: EngineConfig,
    micro_batch: int,
    total_steps: int,
    steps_per_epoch: int,
):
    """DeepSpeed engine with a torch optimizer (no JIT-built fused ops) and a LambdaLR schedule."""
    import deepspeed

    world = dist.detect().world_size
    global_batch = micro_batch * engine_cfg.grad_accum * world
    lr = scaled_lr(optim, global_batch)
    groups = param_groups(model, optim.weight_decay)
    if optim.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=optim.momentum)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas))
    warmup = optim.warmup_steps or int(optim.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim, total_steps, warmup))
    ds_cfg = deepspeed_config(engine_cfg, micro_batch, world, optim)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg
    )
    return engine


# ---------------------------------------------------------------- signals


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (what Slurm sends before preemption or the time limit) and by a
    first Ctrl-C (SIGINT) while training; a second Ctrl-C quits at once, without a checkpoint."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)
        self._sigint = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        if signum == signal.SIGINT:
            if self.signum == signal.SIGINT:
                raise KeyboardInterrupt
            print(
                "interrupted: stopping with a checkpoint after this step (Ctrl-C again to quit "
                "without one)",
                file=sys.stderr,
                flush=True,
            )
        self.signum = signum

    def release_interrupt(self) -> None:
        """Ctrl-C as before (a KeyboardInterrupt) once the training loop is over."""
        signal.signal(signal.SIGINT, self._sigint)


def exit_preempted(step: int) -> None:
    """Leave after a stop signal, once step ``step`` is checkpointed: exit 75, "run again"."""
    if dist.detect().is_main:
        print(f"stop signal: checkpoint at step {step}; run again to resume", flush=True)
    sys.exit(EXIT_PREEMPTED)


class StopRequested(Exception):
    """A task hook gave way to a stop signal (on every rank alike): :func:`fit` checkpoints and
    exits as on any stop signal."""


# ---------------------------------------------------------------- logging


METRICS_LOG, VERIFY_LOG = "metrics.jsonl", "verification.jsonl"


def _keep_rows_up_to(path: Path, step: int) -> None:
    """Rewrite a .jsonl log without the rows after ``step`` (and a line cut by a kill)."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))


class Logger:
    """Rank 0: a console line, metrics.jsonl and TensorBoard scalars.

    img/s is measured over the steps since the previous line (for the first line: since the loop
    started, see :meth:`begin`), the eta from the average step time since the loop started, so the
    first line already tells how long the run will take.
    """

    def __init__(self, run_dir: Path, total_steps: int, enabled: bool) -> None:
        self.enabled, self.total, self.run_dir = enabled, total_steps, run_dir
        self.jsonl, self.tb = None, None
        self.start = self.last = time.perf_counter()
        self.start_step, self.last_samples = 0, 0

    def begin(self, step: int, samples: int) -> None:
        """The loop starts (or resumes) at `step` with `samples` seen: the clock starts here, and
        the logs lose what a killed run wrote after that step (those steps are trained again)."""
        self.start = self.last = time.perf_counter()
        self.start_step, self.last_samples = step, samples
        if self.enabled and self.jsonl is None:
            path = self.run_dir / METRICS_LOG
            for log in (path, self.run_dir / VERIFY_LOG):
                if log.is_file():  # step 0: a fresh start in an old folder starts the logs again
                    _keep_rows_up_to(log, step)
            self.jsonl = open(path, "a")  # noqa: SIM115
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: TensorBoard hides the killed run's events from that step on
                tb_dir = str(self.run_dir / "tensorboard")
                self.tb = SummaryWriter(tb_dir, purge_step=step + 1)
            except ImportError:
                self.tb = None

    def log(self, step: int, samples: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = (samples - self.last_samples) / max(now - self.last, 1e-9)
        per_step = (now - self.start) / max(1, step - self.start_step)
        eta = max(0, self.total - step) * per_step
        self.last, self.last_samples = now, samples
        record = {"step": step, "samples": samples, "img_per_s": rate, **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
        parts = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(
            f"step {step}/{self.total} {parts} | {rate:.1f} img/s | eta {eta / 60:.1f} min",
            flush=True,
        )

    def log_eval(self, record: dict[str, Any]) -> None:
        if self.enabled:
            log_verification(self.run_dir, record, self.tb)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def log_verification(run_dir: Path, record: dict[str, Any], tb: Any = None) -> None:
    """Rank 0: append a verification record to RUN/verification.jsonl and its accuracies to
    TensorBoard (``tb``, or a writer opened for this record: the final check comes after fit).
    A row of the same step or later is replaced (a finished run started again checks again)."""
    path = run_dir / VERIFY_LOG
    if path.is_file():
        _keep_rows_up_to(path, record["step"] - 1)
    with open(path, "a") as f:  # rare (one line per check): no handle kept
        f.write(json.dumps(record) + "\n")
    own = tb is None
    if own:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        tb = SummaryWriter(str(run_dir / "tensorboard"))
    for name, result in record.items():
        if isinstance(result, dict):
            for key, value in result.items():
                tb.add_scalar(f"verify/{name}/{key}", value, record["step"])
    if own:
        tb.close()


# ---------------------------------------------------------------- the loop


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` in eval mode inside the block (no dropout or drop-path, BatchNorm on its running
    statistics), back in its previous mode after it."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _rank_state(state: FitState, task: Task) -> dict[str, Any]:
    return {
        "step": state.step,
        "samples_seen": state.samples_seen,
        "rng": checkpoint.rng_state(),
        "task": task.rank_state(),
    }


def _resume(engine, task: Task, ckpt_root: Path, seed: int) -> FitState:
    path = checkpoint.latest(ckpt_root)
    if path is None:
        torch.manual_seed(seed + dist.detect().rank)
        return FitState()
    states = checkpoint.load(engine, path)
    info = dist.detect()
    saved = states[info.rank % len(states)]  # step and position are the same on every rank
    if len(states) == info.world_size:  # RNG streams are per rank: only restorable 1:1
        checkpoint.set_rng_state(saved["rng"])
    else:  # fresh per-rank streams (else every rank would draw the same dropout/drop-path masks)
        torch.manual_seed(seed + info.rank + 100_003 * saved["step"])
    try:
        task.load_rank_states([s["task"] for s in states])
    except FacemaeError as err:  # e.g. a margin head for other classes than this run's data
        raise checkpoint.other_settings(path, err) from None
    if dist.detect().is_main:
        print(f"resumed from {path} (step {saved['step']})", flush=True)
    return FitState(step=saved["step"], samples_seen=saved["samples_seen"])


def total_steps_for(run: RunConfig, steps_per_epoch: int) -> int:
    return run.max_steps if run.max_steps > 0 else max(1, int(run.epochs * steps_per_epoch))


class _Fit:
    """One training run's moving parts; :func:`fit` is the public entry."""

    def __init__(
        self, engine, task: Task, stream: FaceStream, run: RunConfig, grad_accum: int
    ) -> None:
        self.engine, self.task, self.stream, self.run = engine, task, stream, run
        self.grad_accum = grad_accum
        self.info = dist.detect()
        self.run_dir = Path(run.out_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.micro_per_epoch = stream.batches_per_epoch
        if self.micro_per_epoch < grad_accum:
            raise FacemaeError(
                f"{stream.num_samples} samples give {self.micro_per_epoch} batches per rank per epoch, "
                f"fewer than engine.grad_accum={grad_accum}: lower the batch size or accumulation"
            )
        self.total = total_steps_for(run, self.micro_per_epoch // grad_accum)
        self.flag = StopFlag()
        self.logger = Logger(self.run_dir, self.total, self.info.is_main)
        self.sums: dict[str, float] = {}
        self.summed = 0  # micro-batches in sums (fewer than log_every × grad_accum after a resume)
        self.bad_loss: float | None = None  # this rank's first non-finite loss of the current step
        self.step_lr = 0.0  # the lr the last optimizer step used
        self.saved_step: int | None = None  # step of the checkpoint this run wrote or resumed from
        self.state = FitState()

    def stop_requested(self) -> bool:
        """Whether this rank got a stop signal: no collective, cheap to poll."""
        return self.flag.signum is not None

    def checkpoint(self) -> None:
        if self.saved_step == self.state.step:  # e.g. a stop signal on a checkpoint step
            return
        if not self.weights_finite():
            raise self.diverged(f"weights are not finite after step {self.state.step}")
        rank_state = _rank_state(self.state, self.task)
        checkpoint.save(
            self.engine, self.ckpt_root, self.state.step, rank_state, self.run.keep_last
        )
        self.saved_step = self.state.step

    def micro_step(self, batch: dict[str, Any], boundary: bool) -> bool:
        """Forward, backward and engine.step() (an update on the boundary); True on a stop signal."""
        losses = self.task.losses(self.engine, batch)
        values = {k: float(v.detach()) for k, v in losses.items()}  # the one host sync per batch
        if self.bad_loss is None and not math.isfinite(values["loss"]):
            self.bad_loss = values["loss"]
        self.engine.backward(losses["loss"])
        stop = False
        if boundary:
            # before engine.step() applies the update: a non-finite loss of any micro-batch must
            # reach neither the weights nor a checkpoint
            stop = self.check_finite(losses["loss"].device)
            self.step_lr = self.engine.get_lr()[0]  # step() moves the scheduler on to the next lr
        self.engine.step()
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.summed += 1
        self.state.samples_seen += self.stream.batch_size * self.stream.world_size
        return stop

    def check_finite(self, device: torch.device) -> bool:
        """Raise if any rank saw a non-finite loss in this step; True if any rank got a stop signal.

        One all-reduce, so every rank takes the same decision.
        """
        t = torch.tensor([float(self.bad_loss is not None), float(self.flag.signum is not None)])
        if torch.distributed.is_initialized():
            t = t.to(device)
            torch.distributed.all_reduce(t)
        if t[0].item() > 0:
            loss = "not finite on another rank" if self.bad_loss is None else self.bad_loss
            raise self.diverged(f"loss is {loss} at step {self.state.step + 1}")
        return t[1].item() > 0

    def weights_finite(self) -> bool:
        """Whether every rank's weights (its ZeRO-3 partition) are finite: a finite loss can still
        have non-finite gradients, and no check runs per step (see deepspeed_config)."""
        params = [getattr(p, "ds_tensor", p).detach() for p in self.engine.module.parameters()]
        checks = [torch.isfinite(p).all() for p in params if p.numel()]  # ZeRO-3: may be none
        ok = torch.stack(checks).all().float() if checks else torch.ones(())
        # the rank's own device for the collective (ZeRO-3 offload keeps partitions on the CPU)
        ok = ok.to(getattr(self.engine, "device", ok.device))
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        return bool(ok.item() > 0)

    def diverged(self, what: str) -> FacemaeError:
        return FacemaeError(
            f"{what}: training stopped. Last good checkpoint: "
            f"{checkpoint.latest(self.ckpt_root) or 'none'}. Lower optim.base_lr, set "
            "optim.grad_clip or check the data, then run again to resume"
        )

    def optimizer_step_done(self, batch: dict[str, Any], stop: bool) -> None:
        self.state.step += 1
        record = None
        try:
            record = self.task.after_step(self.state.step, self.step_lr)
        except StopRequested:  # e.g. a verification abandoned; raised on every rank alike
            stop = True
        if record:
            self.logger.log_eval(record)
        self.periodic(batch)
        if stop:
            self.checkpoint()
            self.logger.close()
            exit_preempted(self.state.step)

    def periodic(self, batch: dict[str, Any]) -> None:
        step, run = self.state.step, self.run
        if step % run.log_every == 0:
            metrics = {k: v / self.summed for k, v in self.sums.items()}
            metrics["lr"] = self.step_lr
            self.logger.log(step, self.state.samples_seen, metrics)
            self.sums.clear()
            self.summed = 0
        if run.image_every and step % run.image_every == 0:
            self.task.visualize(
                self.engine, batch, self.run_dir / "images" / f"step-{step:08d}.png"
            )
        if run.ckpt_every and step % run.ckpt_every == 0:
            self.checkpoint()

    def epoch(self) -> dict[str, Any] | None:
        """Train from the current position to the end of its epoch (or to the last step).

        Position is derived from the step alone: epoch = step // steps_per_epoch, so a resumed run
        skips exactly the micro-batches it already trained on.
        """
        steps_per_epoch = self.micro_per_epoch // self.grad_accum
        epoch, in_epoch = divmod(self.state.step, steps_per_epoch)
        self.stream.set_epoch(epoch, in_epoch * self.grad_accum)
        todo = min(steps_per_epoch - in_epoch, self.total - self.state.step) * self.grad_accum
        batch = None
        for micro, batch in enumerate(make_loader(self.stream, self.run.num_workers), start=1):
            boundary = micro % self.grad_accum == 0
            stop = self.micro_step(batch, boundary)
            if boundary:
                self.optimizer_step_done(batch, stop)
            if micro >= todo:
                break
        return batch


def fit(engine, task: Task, stream: FaceStream, run: RunConfig, grad_accum: int = 1) -> FitState:
    """Train to the configured step count; returns the final state. Exits 75 on a stop signal."""
    loop = _Fit(engine, task, stream, run, grad_accum)
    if hasattr(task, "should_stop"):  # lets a long eval in a task hook give way to a stop signal
        task.should_stop = loop.stop_requested
    if run.resume:
        loop.state = _resume(engine, task, loop.ckpt_root, run.seed)
        loop.saved_step = loop.state.step or None  # that checkpoint is on disk already
    else:
        torch.manual_seed(run.seed + loop.info.rank)
    loop.logger.begin(loop.state.step, loop.state.samples_seen)
    last_batch = None
    try:
        while loop.state.step < loop.total:
            last_batch = loop.epoch() or last_batch
        loop.checkpoint()  # skipped when this step was saved already
        if last_batch is not None:
            path = loop.run_dir / "images" / f"step-{loop.state.step:08d}.png"
            task.visualize(engine, last_batch, path)
    except Exception as exc:
        # a rank that died takes the others down inside a collective: say so in one line (its
        # own error is the one to read) instead of each survivor's gloo/NCCL traceback
        if loop.info.world_size > 1 and dist.lost_peer(exc):
            saved = checkpoint.latest(loop.ckpt_root)
            where = str(saved) if saved else "none yet"
            raise FacemaeError(dist.lost_peer_message(exc, loop.info.rank, where)) from exc
        raise
    finally:
        loop.flag.release_interrupt()
        loop.logger.close()
    return loop.state

"""Recognition training: a data-parallel backbone under DeepSpeed ZeRO and a model-parallel
partial-FC margin head beside it, on the shared loop (checkpoints, resume, signals, NaN guard).

The recognizer trained here is what users train on released faces, and also the IRM teacher and
the privacy auditor. Outputs in RUN: backbone.safetensors + model.json (+ backbone.onnx), best.*
when pair sets are configured, checkpoints/ with every head shard and its class range.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from facemae_dist import dist
from facemae_dist.config import load_config, model_json_kind, read_json
from facemae_dist.data.shards import load_manifest
from facemae_dist.data.stream import check_image_size, to_model_input
from facemae_dist.engine import checkpoint
from facemae_dist.engine.loop import (
    OPTIMIZERS,
    DataConfig,
    EngineConfig,
    OptimConfig,
    RunConfig,
    StopRequested,
    eval_mode,
    exit_preempted,
    fit,
    log_verification,
    micro_batch,
    start_run,
    validate_common,
)
from facemae_dist.errors import FacemaeError
from facemae_dist.models.backbones import IMAGE_SIZE
from facemae_dist.models.cpu_kernels import architecture_kwargs
from facemae_dist.report import draw_run_curves


@dataclass
class RecogDataConfig(DataConfig):
    global_batch: int = 512
    shuffle_buffer: int = 2000
    num_classes: int = 0  # 0: from the manifest; otherwise it must match the manifest


@dataclass
class BackboneConfig:
    name: str = "iresnet50"  # see facemae_dist.models.backbones.list_backbones()
    embedding_size: int = 512
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class HeadConfig:
    sample_rate: float = (
        1.0  # partial FC: share of negative class centres per step (0.1–0.3 at 1M+)
    )
    margin: str = "arcface"  # arcface | cosface | combined | softmax
    scale: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    optimizer: str = "sgd"  # sgd | adamw: the head's own, never synchronised across ranks
    lr_scale: float = 1.0  # head lr = backbone lr × lr_scale (follows the same schedule)
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass
class EvalConfig:
    pairs: list[str] = field(
        default_factory=list
    )  # .bin pair sets (lfw.bin, cfp_fp.bin, own pairs)
    every: int = 0  # verify every N steps (0: only at the end)
    batch_size: int = 64


@dataclass
class RecogConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: RecogDataConfig = field(default_factory=RecogDataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            base_lr=0.05, optimizer="sgd", weight_decay=5e-4, schedule="poly"
        )
    )
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export_onnx: bool = True


# ---------------------------------------------------------------- validation and building


def validate(cfg: RecogConfig, world_size: int) -> tuple[int, int]:
    """Fail before any process group starts; returns (micro-batch per rank, num_classes)."""
    validate_common(cfg)
    micro = micro_batch(cfg.data, cfg.engine, world_size)
    manifest = load_manifest(cfg.data.train)
    check_image_size(cfg.data.train, IMAGE_SIZE, f"backbone {cfg.backbone.name}")
    classes = manifest["num_classes"]
    if cfg.data.num_classes and cfg.data.num_classes != classes:
        raise FacemaeError(
            f"data.num_classes={cfg.data.num_classes} but {cfg.data.train} holds {classes} identities: "
            "remove data.num_classes (it is read from the manifest) or point data.train elsewhere"
        )
    for path in cfg.eval.pairs:
        if not Path(path).is_file():
            raise FacemaeError(
                f"eval.pairs: {path} not found: make one with `facemae make-pairs`, "
                "or set eval.pairs=[] to skip verification"
            )
    if not 0.0 < cfg.head.sample_rate <= 1.0:
        raise FacemaeError(f"head.sample_rate must be in (0, 1], got {cfg.head.sample_rate}")
    if cfg.head.optimizer not in OPTIMIZERS:
        raise FacemaeError(
            f"head.optimizer {cfg.head.optimizer!r} is unknown: use one of {', '.join(OPTIMIZERS)}"
        )
    return micro, classes


def build_head(
    cfg: HeadConfig, embedding_size: int, num_classes: int, device: torch.device, seed: int
):
    from facemae_dist.losses.partial_fc import PartialFC, PartialFCOptimizer

    head = PartialFC(
        embedding_size, num_classes, cfg.sample_rate, cfg.margin, cfg.scale, cfg.m1, cfg.m2, cfg.m3,
        compensate_dp_mean=True, seed=seed,
    ).to(device)  # fmt: skip
    opt = PartialFCOptimizer(
        head, cfg.optimizer, lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    return head, opt


class RecogTask:
    """Backbone embeddings → partial-FC loss; the head steps itself after each optimizer step."""

    def __init__(self, cfg: RecogConfig, head, head_opt, device: torch.device) -> None:
        self.cfg, self.head, self.head_opt, self.device = cfg, head, head_opt, device
        self.dtype = torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32
        self.engine = None  # set by run_recognition (verification needs the backbone)
        self.pair_sets = None
        self.best = -1.0
        self.history: list[dict[str, Any]] = []
        self.should_stop: Callable[[], bool] = lambda: False  # fit() sets it to its stop check

    def losses(self, engine, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = to_model_input(batch["image"], self.device, self.dtype)
        embeddings = engine(images)
        loss = self.head(embeddings, batch["label"].to(self.device))
        return {"loss": loss}

    def after_step(self, step: int, lr: float) -> dict[str, Any] | None:
        for group in self.head_opt.param_groups:
            group["lr"] = lr * self.cfg.head.lr_scale
        self.head_opt.step()
        self.head_opt.zero_grad()
        if self.cfg.eval.every and step % self.cfg.eval.every == 0:
            return self.verify(step)  # fit logs it
        return None

    def rank_state(self) -> dict[str, Any]:
        return {
            "head": self.head.local_state_dict(),
            "sampler": self.head.sampler_state(),
            "best": self.best,
        }

    def load_rank_states(self, states: list[dict[str, Any]]) -> None:
        self.head.load_sharded([s["head"] for s in states])  # re-shards if the world size changed
        self.best = max(s.get("best", -1.0) for s in states)
        # negative sampling is drawn per rank, so its stream continues only on as many ranks as
        # saved it; on another world size each rank's stream starts again from its seed (the run
        # stays valid, it just is not bit-identical to an uninterrupted one)
        if len(states) == self.head.world_size and "sampler" in states[self.head.rank]:
            self.head.load_sampler_state(states[self.head.rank]["sampler"])

    def visualize(self, engine, batch: dict[str, Any], path: Path) -> None:
        pass  # nothing to draw for a recognizer; verification goes to verification.jsonl

    def verify(self, step: int) -> dict[str, Any] | None:
        """Verification on the configured pair sets; keeps the best backbone (by mean accuracy)."""
        if not self.cfg.eval.pairs:
            return None
        from facemae_dist.data.sources import load_pair_set
        from facemae_dist.eval.verification import VerificationStopped, verify_pair_set

        self.pair_sets = self.pair_sets or [load_pair_set(p) for p in self.cfg.eval.pairs]
        gathered = checkpoint.gathered(self.engine, self.cfg.engine.zero_stage)
        try:
            with gathered, eval_mode(self.engine.module) as module:
                results = [
                    verify_pair_set(
                        module, ps, self.cfg.eval.batch_size, self.device, should_stop=self._stop
                    )
                    for ps in self.pair_sets
                ]
        except VerificationStopped:
            if dist.detect().is_main:
                print(f"verification at step {step} skipped: stop signal", flush=True)
            raise StopRequested(f"verification at step {step}") from None
        record = {
            "step": step,
            **{r.name: {"acc": r.accuracy, "std": r.std, "tar@far": r.tar_at_far} for r in results},
        }
        self.history.append(record)
        # BatchNorm statistics differ per rank, so rank 0's verdict decides for everyone
        mean = dist.from_main(sum(r.accuracy for r in results) / len(results))
        if dist.detect().is_main:
            print(
                "verify " + " ".join(f"{r.name} {r.accuracy:.4f}±{r.std:.4f}" for r in results),
                flush=True,
            )
        if mean > self.best:
            self.best = mean
            export_backbone(self.engine, self.cfg, Path(self.cfg.run.out_dir) / "best.safetensors")
        return record

    def _stop(self) -> bool:
        """Asked before each eval batch. One tiny all-reduce: every rank embeds the same batches,
        so all leave the eval at the same batch even when the signal reaches them at different
        moments (a rank leaving alone would reach the checkpoint's collectives while the others
        wait in from_main: a hang or a gloo/NCCL error)."""
        return dist.any_true(self.should_stop())


# ---------------------------------------------------------------- export


def export_backbone(engine, cfg: RecogConfig, path: Path) -> Path:
    """Consolidated backbone weights (+ model.json describing the architecture) from any ZeRO stage."""
    checkpoint.export_module(engine, path, cfg.engine.zero_stage)
    if dist.detect().is_main:
        meta = {
            "backbone": cfg.backbone.name,
            "embedding_size": cfg.backbone.embedding_size,
            "kwargs": architecture_kwargs(cfg.backbone.kwargs),  # not the kernel choice
        }
        (path.parent / "model.json").write_text(json.dumps(meta, indent=1))
    return path


def load_recognizer(path: str | Path, flag: str = "--model") -> torch.nn.Module:
    """A plain backbone (eval mode) from a `facemae train` export (.safetensors with model.json
    beside it, or their folder). What is not one (a FaceMAE run, a bad model.json, weights that do
    not fit it) is a FacemaeError naming ``flag`` and the fix."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from facemae_dist.models.backbones import build_backbone

    fix = "pass the backbone.safetensors (or its folder) written by `facemae train`"
    weights = Path(path)
    if weights.is_dir():
        weights = weights / "backbone.safetensors"
    meta_file = weights.parent / "model.json"
    meta = read_json(meta_file, f"{flag} {path}", fix) if meta_file.is_file() else None
    kind = model_json_kind(meta)
    if kind == "facemae":
        raise FacemaeError(
            f"{flag} {path}: this is a FaceMAE export (from `facemae pretrain`), not a "
            f"recognizer; {fix}"
        )
    if kind is None or not weights.is_file():
        raise FacemaeError(f"{flag} {path}: no recognizer export here; {fix}")
    try:
        kwargs = architecture_kwargs(meta.get("kwargs") or {})
        model = build_backbone(meta["backbone"], meta["embedding_size"], **kwargs)
        model.load_state_dict(load_file(str(weights)))
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise FacemaeError(
            f"{flag} {path}: cannot load the recognizer ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}); {fix}"
        ) from None
    return model.eval()


# ---------------------------------------------------------------- entry


def run_recognition(cfg: RecogConfig) -> dict[str, Any]:
    from facemae_dist.models.backbones import build_backbone

    micro, num_classes = validate(cfg, dist.detect().world_size)
    torch.manual_seed(cfg.run.seed)
    backbone = build_backbone(cfg.backbone.name, cfg.backbone.embedding_size, **cfg.backbone.kwargs)
    run = start_run(cfg, backbone, micro, f"facemae train ({num_classes} classes)")
    info, device, run_dir, engine = run.info, run.device, run.run_dir, run.engine
    head, head_opt = build_head(
        cfg.head, cfg.backbone.embedding_size, num_classes, device, cfg.run.seed
    )
    task = RecogTask(cfg, head, head_opt, device)
    task.engine = engine
    state = fit(engine, task, run.stream, cfg.run, cfg.engine.grad_accum)
    done = task.history[-1] if task.history and task.history[-1]["step"] == state.step else None
    try:
        final = done or task.verify(state.step)  # the last periodic check may have been this step
    except StopRequested:  # fit saved this step: a run again resumes there, verifies and exports
        exit_preempted(state.step)
    if info.is_main and final is not None and final is not done:
        log_verification(run_dir, final)
    weights = export_backbone(engine, cfg, run_dir / "backbone.safetensors")
    result = {
        "step": state.step,
        "weights": str(weights),
        "run_dir": str(run_dir),
        "verification": final,
    }
    if info.is_main:
        if cfg.export_onnx:
            result["onnx_max_rel_diff"] = _export_onnx(weights)
        (run_dir / "result.json").write_text(json.dumps(result, indent=1))
        draw_run_curves(run_dir)
        print(f"done: {state.step} steps; weights {weights}", flush=True)
    dist.barrier()
    return result


def _export_onnx(weights: Path) -> float | None:
    from facemae_dist.models.backbones import export_onnx

    try:
        return export_onnx(load_recognizer(weights), weights.with_suffix(".onnx"))
    except FacemaeError as exc:  # onnx/onnxruntime missing: the safetensors export still stands
        print(f"ONNX export skipped: {exc}", flush=True)
        return None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="facemae train",
        description="Train a face recognizer (backbone + partial-FC margin head) on face shards.",
        epilog="examples:\n  facemae train --config configs/recog/tiny_cpu.yaml data.train=shards/train\n  torchrun --nproc_per_node 8 -m facemae_dist.train "
        "--config configs/recog/r50_casia.yaml run.out_dir=runs/r50",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML under configs/recog/")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. head.sample_rate=0.2")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def preflight(argv: Sequence[str], world_size: int) -> None:
    """What `facemae submit` checks before a job waits in the queue: the arguments, the config
    (file, keys, overrides) and :func:`validate` for `world_size` ranks. No process group."""
    args = parser().parse_args(argv)
    validate(load_config(RecogConfig, args.config, args.overrides), world_size)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    return run_recognition(load_config(RecogConfig, args.config, args.overrides))

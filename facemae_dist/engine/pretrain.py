"""FaceMAE pretraining: MAE reconstruction + instance relation matching (IRM), on DeepSpeed ZeRO.

`build_*` functions plus the shared :func:`facemae_dist.engine.loop.fit`. The config is validated
before any process group starts, so a run that cannot work fails in seconds, not after a queue wait.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from facemae_dist import dist
from facemae_dist.config import load_config, model_json_kind, read_json
from facemae_dist.data.stream import check_image_size, to_model_input
from facemae_dist.engine import checkpoint
from facemae_dist.engine.loop import (
    DataConfig,
    EngineConfig,
    OptimConfig,
    RunConfig,
    eval_mode,
    fit,
    micro_batch,
    start_run,
    validate_common,
)
from facemae_dist.errors import FacemaeError
from facemae_dist.losses.irm import MIN_IRM_BATCH
from facemae_dist.losses.irm import _check_options as _check_irm_options
from facemae_dist.models.cpu_kernels import architecture_kwargs
from facemae_dist.report import draw_run_curves


@dataclass
class ModelConfig:
    name: str = "facemae_vit_base_patch8_112"  # any `timm.list_models("facemae*")`
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    image_size: int = 112
    kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. decoder_dim, decoder_depth


# The teacher assumed for unset irm.teacher_arch / irm.teacher_embedding when no model.json says
# otherwise (a teacher exported elsewhere, or none named yet, as in a cost table): a MobileFaceNet, the
# light teacher the shipped configs pair with (its cost over the MAE's is IRM's whole overhead).
FALLBACK_TEACHER = ("mobilefacenet", 512)


@dataclass
class IRMConfig:
    weight: float = 1.0  # w_irm; 0 = MSE-only ablation (no teacher needed)
    w_mse: float = 1.0
    teacher: str | None = None  # .safetensors of a recognizer trained with `facemae train`
    # the teacher's backbone, embedding size and backbone options; None (unset): read from the
    # model.json `facemae train` writes beside the teacher (a teacher without one: FALLBACK_TEACHER).
    # Set, they must agree with that model.json.
    teacher_arch: str | None = None
    teacher_embedding: int | None = None
    teacher_kwargs: dict[str, Any] | None = None
    temperature: float = 0.1
    similarity: str = "cosine"  # cosine | dot
    direction: str = "forward"  # forward KL(orig||recon) | reverse | symmetric
    paste_visible: bool = True  # IRM sees reconstructions with the visible patches pasted back
    # fp32 | bf16 (autocast) | bf16-weights (weights cast once: fewer kernels per step on GPUs);
    # None: engine.precision
    teacher_precision: str | None = None
    # torch.compile the teacher: auto = on GPUs (H200, ViT-B/8: IRM overhead 1.30x -> 1.15x),
    # not on CPUs (slower there); true / false to force
    teacher_compile: str | bool = "auto"


@dataclass
class PretrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    irm: IRMConfig = field(default_factory=IRMConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


# ---------------------------------------------------------------- building


def build_model(cfg: ModelConfig) -> torch.nn.Module:
    import timm

    import facemae_dist.models.mae  # noqa: F401  (registers the facemae_* presets)

    names = timm.list_models("facemae*")
    if cfg.name not in names:
        raise FacemaeError(
            f"model.name {cfg.name!r} is not a FaceMAE preset; choose one of {', '.join(names)}"
        )
    kwargs = {"img_size": cfg.image_size, "norm_pix_loss": cfg.norm_pix_loss, **cfg.kwargs}
    return timm.create_model(cfg.name, **kwargs)


def validate(cfg: PretrainConfig, world_size: int) -> int:
    """Fail before any process group starts; returns the per-rank micro-batch size. Fills in the
    IRM teacher's unset architecture fields (:func:`resolve_teacher`)."""
    validate_common(cfg)
    if not 0.0 < cfg.model.mask_ratio < 1.0:
        raise FacemaeError(f"model.mask_ratio must be in (0, 1), got {cfg.model.mask_ratio}")
    try:
        with torch.device("meta"):  # no memory, no init: model settings fail here, not in the job
            build_model(cfg.model)
    except TypeError as err:  # an argument FaceMAE does not take
        raise FacemaeError(
            f"model.kwargs: {err}; see FaceMAE's arguments in facemae_dist/models/mae.py"
        ) from None
    micro = micro_batch(cfg.data, cfg.engine, world_size)
    irm = cfg.irm
    _check_irm_options(irm.temperature, irm.similarity, irm.direction)
    if irm.weight > 0:
        if not irm.teacher:
            raise FacemaeError(
                "IRM needs a teacher: set irm.teacher to a recognizer's .safetensors "
                "(train one with `facemae train`), or irm.weight=0 for the MSE-only ablation"
            )
        if not teacher_file(irm.teacher).is_file():
            raise FacemaeError(
                f"irm.teacher {irm.teacher} not found: train a recognizer with `facemae train` first"
            )
        resolve_teacher(irm)  # unset architecture fields from the teacher's model.json
        if micro < MIN_IRM_BATCH:
            raise FacemaeError(
                f"IRM relates the faces of a micro-batch, but each rank gets {micro} "
                f"(data.global_batch / ranks / engine.grad_accum): with fewer than {MIN_IRM_BATCH} "
                "IRM is always 0; raise data.global_batch or lower engine.grad_accum"
            )
    if cfg.irm.teacher_precision not in (None, "fp32", "bf16", "bf16-weights"):
        raise FacemaeError(
            "irm.teacher_precision must be fp32, bf16, bf16-weights or null, got "
            f"{cfg.irm.teacher_precision!r}"
        )
    if cfg.irm.teacher_compile not in ("auto", True, False):
        raise FacemaeError(
            f"irm.teacher_compile must be auto, true or false, got {cfg.irm.teacher_compile!r}"
        )
    check_image_size(cfg.data.train, cfg.model.image_size, "model.image_size")
    return micro


def teacher_file(teacher: str) -> Path:
    """The weights irm.teacher names: a file as given, or in a finished `facemae train` run's
    folder its backbone.safetensors (a run folder is what load_recognizer accepts too)."""
    path = Path(teacher)
    if not path.is_dir():
        return path
    if not (path / "backbone.safetensors").is_file():
        raise FacemaeError(
            f"irm.teacher {teacher} is a folder without backbone.safetensors: pass the "
            "backbone.safetensors of a finished `facemae train` run"
        )
    return path / "backbone.safetensors"


def _teacher_meta(irm: IRMConfig) -> tuple[tuple[str, int, dict[str, Any]], Path | None]:
    """(backbone, embedding size, backbone options) the model.json beside irm.teacher names
    (written by `facemae train`) and that file; :data:`FALLBACK_TEACHER` (no options) and None for
    a teacher without one."""
    meta_file = teacher_file(irm.teacher).parent / "model.json" if irm.teacher else None
    if meta_file is None or not meta_file.is_file():
        # a teacher exported elsewhere: the state dict is checked when it is loaded
        return (*FALLBACK_TEACHER, {}), None
    fix = "pass the .safetensors of a recognizer trained with `facemae train`"
    meta = read_json(meta_file, f"irm.teacher {irm.teacher}", fix)
    if model_json_kind(meta) != "recognizer":
        raise FacemaeError(f"irm.teacher {irm.teacher}: {meta_file} is no recognizer's; {fix}")
    return (meta["backbone"], meta["embedding_size"], meta.get("kwargs") or {}), meta_file


def teacher_backbone(irm: IRMConfig) -> tuple[str, int, dict[str, Any]]:
    """(backbone, embedding size, backbone options) of the IRM teacher: the values the config sets,
    the unset ones from the model.json beside irm.teacher, else :data:`FALLBACK_TEACHER` (no
    options). Checks nothing: :func:`resolve_teacher` does, before a run."""
    known, _ = _teacher_meta(irm)
    given = (irm.teacher_arch, irm.teacher_embedding, irm.teacher_kwargs)
    arch, size, kwargs = (k if g is None else g for g, k in zip(given, known, strict=True))
    return arch, size, kwargs


def resolve_teacher(irm: IRMConfig) -> None:
    """Fill in the unset irm.teacher_arch, irm.teacher_embedding and irm.teacher_kwargs from the
    teacher's model.json (written by `facemae train` beside its export; without one, from
    :data:`FALLBACK_TEACHER`), so the run's config.yaml records the teacher it used. Values the
    config sets must agree with that model.json (else loading the teacher fails later)."""
    (arch, size, kwargs), meta_file = _teacher_meta(irm)
    if meta_file is not None:
        given = {
            "teacher_arch": (irm.teacher_arch, arch),
            "teacher_embedding": (irm.teacher_embedding, size),
        }
        wrong = [f"irm.{k}={v}" for k, (v, right) in given.items() if v is not None and v != right]
        if wrong:
            raise FacemaeError(
                f"irm.teacher {irm.teacher} is a {arch} recognizer with {size}-d embeddings "
                f"({meta_file}), but the config sets {' '.join(wrong)}: "
                f"set irm.teacher_arch={arch} irm.teacher_embedding={size}, or null to read them "
                "from model.json"
            )
        if irm.teacher_kwargs is not None and kwargs != irm.teacher_kwargs:
            raise FacemaeError(
                f"irm.teacher {irm.teacher} was built with backbone options {kwargs} "
                f"({meta_file}), but irm.teacher_kwargs is {irm.teacher_kwargs}: set "
                "irm.teacher_kwargs to the same, or null to read them from model.json"
            )
    irm.teacher_arch = arch if irm.teacher_arch is None else irm.teacher_arch
    irm.teacher_embedding = size if irm.teacher_embedding is None else irm.teacher_embedding
    irm.teacher_kwargs = kwargs if irm.teacher_kwargs is None else irm.teacher_kwargs


def build_irm(cfg: IRMConfig, device: torch.device, engine_precision: str = "fp32"):
    if cfg.weight <= 0:
        return None
    from facemae_dist.losses.irm import IRMLoss, load_teacher
    from facemae_dist.models.backbones import build_backbone

    arch, size, kwargs = teacher_backbone(cfg)
    teacher = load_teacher(teacher_file(cfg.teacher), lambda: build_backbone(arch, size, **kwargs))
    precision = cfg.teacher_precision or engine_precision
    return IRMLoss(
        teacher.to(device),
        cfg.temperature,
        cfg.similarity,
        cfg.direction,
        autocast_dtype=torch.bfloat16 if precision == "bf16" else None,
        compile_teacher=compile_teacher(cfg.teacher_compile, device),
        teacher_dtype=torch.bfloat16 if precision == "bf16-weights" else None,
    )


def compile_teacher(setting: str | bool, device: torch.device) -> bool:
    """irm.teacher_compile resolved: auto compiles on GPUs only."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


# ---------------------------------------------------------------- the task


class MAETask:
    """MAE + IRM losses of a batch; masks drawn from a per-rank generator that is checkpointed."""

    def __init__(self, cfg: PretrainConfig, irm, device: torch.device, rank: int) -> None:
        self.cfg, self.irm, self.device = cfg, irm, device
        self.dtype = torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(cfg.run.seed * 1000 + rank)

    def losses(self, engine, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = to_model_input(batch["image"], self.device, self.dtype)
        out = engine(images, self.cfg.model.mask_ratio, generator=self.generator)
        mse = out.loss.float()
        if self.irm is None:
            return {"loss": self.cfg.irm.w_mse * mse, "mse": mse.detach()}
        recon = engine.module.images_from_pred(
            images, out.pred, out.mask, self.cfg.irm.paste_visible
        )
        irm = self.irm(images.float(), recon.float())
        loss = self.cfg.irm.w_mse * mse + self.cfg.irm.weight * irm
        return {"loss": loss, "mse": mse.detach(), "irm": irm.detach()}

    def after_step(self, step: int, lr: float) -> None:
        pass  # nothing to verify: the export check and image grids come at the end

    def rank_state(self) -> dict[str, Any]:
        return {"mask_generator": self.generator.get_state()}

    def load_rank_states(self, states: list[dict[str, Any]]) -> None:
        rank = dist.detect().rank
        if rank < len(states):
            self.generator.set_state(states[rank]["mask_generator"])

    def visualize(self, engine, batch: dict[str, Any], path: Path) -> None:
        from facemae_dist.report import save_grid

        images = to_model_input(batch["image"][:8], self.device, self.dtype)
        gen = torch.Generator(device=self.device).manual_seed(0)
        with torch.no_grad(), eval_mode(engine.module) as module:
            recon, mask = module.reconstruct(images, self.cfg.model.mask_ratio, gen)
            masked = module.masked_images(images, mask)
        if dist.detect().is_main:
            rows = [images.float(), masked.float(), recon.float()]
            save_grid(rows, path, ["original", "masked", "reconstructed"])


# ---------------------------------------------------------------- entry


def run_pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    micro = validate(cfg, dist.detect().world_size)
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank and in every run
    model = build_model(cfg.model)
    run = start_run(cfg, model, micro, "facemae pretrain")
    info, device, run_dir, engine = run.info, run.device, run.run_dir, run.engine
    task = MAETask(cfg, build_irm(cfg.irm, device, cfg.engine.precision), device, info.rank)
    state = fit(engine, task, run.stream, cfg.run, cfg.engine.grad_accum)
    weights = run_dir / "facemae.safetensors"
    checkpoint.export_module(engine, weights, cfg.engine.zero_stage)
    if info.is_main:
        kwargs = {"img_size": cfg.model.image_size, "norm_pix_loss": cfg.model.norm_pix_loss}
        kwargs = architecture_kwargs({**kwargs, **cfg.model.kwargs})  # not the kernel choice
        meta = {"name": cfg.model.name, "kwargs": kwargs}
        (run_dir / "model.json").write_text(json.dumps(meta, indent=1))
    diff = verify_export(engine, run_dir, cfg, device)
    if info.is_main:
        draw_run_curves(run_dir)
        print(
            f"done: {state.step} steps; weights {weights} (reload max |diff| {diff:.2e})",
            flush=True,
        )
    return {"step": state.step, "weights": str(weights), "run_dir": str(run_dir)}


def verify_export(engine, run_dir: Path, cfg: PretrainConfig, device: torch.device) -> float:
    """Reload the exported weights into a plain model and compare outputs with the engine's.

    All ranks run the engine forward (ZeRO-3 gathers parameters collectively); rank 0 compares and
    records the largest difference in export.json. A mismatch is an error (the export is unusable),
    raised on every rank.
    """
    size = cfg.model.image_size
    probe = torch.linspace(-1, 1, 2 * 3 * size * size).reshape(2, 3, size, size)
    gen = torch.Generator().manual_seed(0)
    masking = engine.module.random_masking(2, cfg.model.mask_ratio, gen)
    dtype = next(engine.module.parameters()).dtype
    gathered = checkpoint.gathered(engine, cfg.engine.zero_stage)
    with torch.no_grad(), gathered, eval_mode(engine.module) as module:  # as the reload (drop-path)
        ref = module(probe.to(device, dtype), masking=masking).pred.float().cpu()
    diff = 0.0
    if dist.detect().is_main:
        plain = load_facemae(run_dir)
        with torch.no_grad():  # the plain model is on the CPU, the engine's mask maybe not
            got = plain(probe, masking=masking.to("cpu")).pred
        diff = float((got - ref).abs().max())
        (run_dir / "export.json").write_text(
            json.dumps({"max_abs_diff": diff, "dtype": str(dtype)})
        )
    # every rank takes rank 0's verdict: a raise on rank 0 alone would leave the others waiting
    diff = dist.from_main(diff)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    if not diff <= tol:  # NaN fails too
        raise FacemaeError(
            f"exported weights do not reproduce the trained model (max |diff| {diff}): "
            f"{run_dir / 'facemae.safetensors'} is unusable"
        )
    return diff


def load_facemae(run_dir: str | Path) -> torch.nn.Module:
    """A plain (non-DeepSpeed) FaceMAE with a run's exported weights."""
    import timm
    from safetensors.torch import load_file

    import facemae_dist.models.mae  # noqa: F401

    run_dir = Path(run_dir)
    meta_file = run_dir / "model.json"
    if not meta_file.is_file():
        raise FacemaeError(
            f"{run_dir} has no model.json: pass the folder of a finished `facemae pretrain` run"
        )
    meta = json.loads(meta_file.read_text())
    state = load_file(str(run_dir / "facemae.safetensors"))
    # runs exported before the cls token became optional carry one (the MAE layout)
    kwargs = {"cls_token": "cls_token" in state, **architecture_kwargs(meta["kwargs"])}
    model = timm.create_model(meta["name"], **kwargs)
    model.load_state_dict(state)
    return model.eval()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="facemae pretrain",
        description="Pretrain FaceMAE (MAE + IRM) on face shards with DeepSpeed ZeRO.",
        epilog="examples:\n  facemae pretrain --config configs/mae/tiny_cpu.yaml data.train=shards/train run.max_steps=50\n  torchrun --nproc_per_node 8 -m facemae_dist.pretrain "
        "--config configs/mae/vit_b8_casia.yaml run.out_dir=runs/mae-b8 run.epochs=400",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML under configs/mae/")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.global_batch=512")
    p.add_argument(
        "--local_rank", type=int, default=None, help=argparse.SUPPRESS
    )  # deepspeed launcher
    return p


def preflight(argv: Sequence[str], world_size: int) -> None:
    """What `facemae submit` checks before a job waits in the queue: the arguments, the config
    (file, keys, overrides) and :func:`validate` for `world_size` ranks. No process group."""
    args = parser().parse_args(argv)
    validate(load_config(PretrainConfig, args.config, args.overrides), world_size)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    return run_pretrain(cfg)

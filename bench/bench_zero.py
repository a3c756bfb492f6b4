"""Pretraining throughput under DeepSpeed ZeRO: images/s per device and model FLOPs utilisation.

Each model runs the real training step (``MAETask.losses`` → ``engine.backward`` → ``engine.step``,
the code ``facemae pretrain`` runs) on a DeepSpeed engine built by ``build_engine``, with random
112 px images already on the device: the number is the model's step rate, not the loader's (see
``bench_loader.py`` for that). Optionally with IRM through a randomly initialised teacher (speed does
not depend on its weights), which also gives the IRM overhead at that size.

FLOPs per image are counted once with ``torch.utils.flop_counter`` on a forward+backward of the plain
model (attention through the math kernel so that its matmuls are counted; masked tokens skip the
encoder, so this is what the model really computes at the mask ratio). MFU = achieved FLOP/s / the
device's dense bf16 peak (a table of common GPUs; ``--peak-tflops`` for others or for the CPU).

GPU: ``python bench/bench_zero.py`` (ViT-B/8 and ViT-B/16, ZeRO-2, bf16). Multi-GPU:
``torchrun --nproc_per_node 8 bench/bench_zero.py``; every rank runs its micro-batch, rank 0 prints.
CPU smoke run (what the tests run): ``python bench/bench_zero.py --model facemae_vit_micro_patch16_112
--micro-batch 2 --steps 2 --warmup 1``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed

from facemae_dist import dist  # noqa: E402
from facemae_dist.engine.loop import EngineConfig, OptimConfig, build_engine  # noqa: E402
from facemae_dist.engine.pretrain import (  # noqa: E402
    FALLBACK_TEACHER,
    IRMConfig,
    MAETask,
    ModelConfig,
    PretrainConfig,
    build_model,
    compile_teacher,
)

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched as
# substrings of torch.cuda.get_device_name(); the first match wins, so longer names come first.
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,
    "H200": 989.4,
    "GH200": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def peak_tflops(name: str, precision: str, override: float | None) -> float | None:
    """The device's peak for ``precision``: ``override`` if given, else the bf16 table (GPUs only)."""
    if override:
        return override
    if precision != "bf16":
        return None
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def flops_per_image(
    name: str, kwargs: dict[str, Any], mask_ratio: float, irm_arch: str | None
) -> float:
    """Forward+backward FLOPs per image of the plain model at ``mask_ratio`` (CPU, fp32, batch 2),
    plus, with IRM, the teacher's: a forward on the originals, a forward and an input-gradient
    backward on the reconstructions."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, kwargs=kwargs))
    images = torch.randn(2, 3, 112, 112)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        out = model(images, mask_ratio)
        loss = out.loss
        if irm_arch:
            recon = model.images_from_pred(images, out.pred, out.mask)
            loss = loss + _irm_loss(irm_arch, None)(images, recon)
        loss.backward()
    return counter.get_total_flops() / 2


def _irm_loss(
    arch: str,
    dtype: torch.dtype | None,
    compiled: bool = False,
    weights: torch.dtype | None = None,
) -> torch.nn.Module:
    """IRM through a randomly initialised, frozen teacher (speed does not depend on its weights)."""
    from facemae_dist.losses.irm import IRMLoss, freeze
    from facemae_dist.models.backbones import build_backbone

    teacher = freeze(build_backbone(arch, FALLBACK_TEACHER[1]))
    return IRMLoss(teacher, autocast_dtype=dtype, compile_teacher=compiled, teacher_dtype=weights)


def bench_model(args: argparse.Namespace, name: str, info: dist.DistInfo) -> dict[str, Any]:
    """Time ``args.steps`` training steps of one model after ``args.warmup`` untimed ones."""
    device = dist.device(info)
    kwargs = json.loads(args.model_kwargs)
    cfg = PretrainConfig(
        model=ModelConfig(name=name, mask_ratio=args.mask_ratio, kwargs=kwargs),
        irm=IRMConfig(weight=1.0 if args.irm else 0.0, teacher_arch=args.irm or "mobilefacenet"),
        optim=OptimConfig(warmup_steps=1),
        engine=EngineConfig(
            zero_stage=args.zero, precision=args.precision, deepspeed_config=args.deepspeed_config
        ),
    )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    total = args.warmup + args.steps
    engine = build_engine(model, cfg.optim, cfg.engine, args.micro_batch, total, total)
    if args.compile:  # compiled in the warm-up steps; the toolkit's trainers run eager
        engine.compile()
    irm = None
    if args.irm:
        bf16 = torch.bfloat16 if args.precision == "bf16" else None
        compiled = compile_teacher(_SETTING[args.irm_compile], device)  # as the trainers decide
        weights = torch.bfloat16 if args.irm_weights == "bf16" else None  # irm.teacher_precision
        irm = _irm_loss(args.irm, bf16, compiled, weights).to(device)
    task = MAETask(cfg, irm, device, info.rank)
    gen = torch.Generator(device=device).manual_seed(info.rank)
    batch = {"image": torch.randn(args.micro_batch, 3, 112, 112, generator=gen, device=device)}

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def train_step(task=task, engine=engine) -> dict[str, torch.Tensor]:
        losses = task.losses(engine, batch)
        engine.backward(losses["loss"])
        engine.step()
        return losses

    seconds, losses = timed_steps(train_step, args.warmup, args.steps, device)
    if args.profile:
        tag = f"{name}_irm_{args.irm}" if args.irm else name
        profile_steps(train_step, device, args.profile / f"profile_{tag}.txt", info.is_main)
    loss = float(losses["loss"].detach().float())
    if not torch.isfinite(torch.tensor(loss)):
        raise RuntimeError(f"{name}: non-finite loss {loss} in the benchmark")
    flops = flops_per_image(name, kwargs, args.mask_ratio, args.irm)
    img_s = args.micro_batch * args.steps / seconds
    dev_name = device_name(device)
    peak = peak_tflops(dev_name, args.precision, args.peak_tflops)
    result = {
        "model": name,
        "device": dev_name,
        "world_size": info.world_size,
        "zero_stage": args.zero,
        "deepspeed_config": args.deepspeed_config,
        "precision": args.precision,
        "irm_teacher": args.irm,
        "micro_batch": args.micro_batch,
        "steps": args.steps,
        "images_per_s_per_device": img_s,
        "gflop_per_image": flops / 1e9,
        "achieved_tflops": img_s * flops / 1e12,
        "peak_tflops": peak,
        "mfu": img_s * flops / (peak * 1e12) if peak else None,
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        ),
        "compiled": args.compile,
        "irm_compile": bool(args.irm and compile_teacher(_SETTING[args.irm_compile], device)),
        "irm_weights": args.irm_weights,
        "last_loss": loss,
    }
    if args.baseline:
        plain = plain_torch_rate(args, cfg, name, irm, device)
        result["plain_torch_images_per_s"] = plain
        result["deepspeed_vs_plain"] = img_s / plain
    del engine, task, model, irm, train_step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


_SETTING = {"auto": "auto", "true": True, "false": False}


class _PlainEngine(torch.nn.Module):
    """The slice of a DeepSpeed engine that ``MAETask.losses`` uses, over a plain module."""

    def __init__(self, module: torch.nn.Module, autocast: torch.dtype | None) -> None:
        super().__init__()
        self.module, self.autocast = module, autocast

    def forward(self, *args, **kwargs):
        device_type = next(self.module.parameters()).device.type
        with torch.autocast(device_type, self.autocast, enabled=self.autocast is not None):
            return self.module(*args, **kwargs)


def plain_torch_rate(
    args: argparse.Namespace, cfg: PretrainConfig, name: str, irm, device: torch.device
) -> float:
    """Baseline in the same run: the same model and losses in plain PyTorch (fp32 weights, bf16
    autocast, fused AdamW on GPUs): what a user gets without DeepSpeed on one device."""
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    bf16 = torch.bfloat16 if args.precision == "bf16" else None
    engine = _PlainEngine(model, bf16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    task = MAETask(cfg, irm, device, 0)
    batch = {"image": torch.randn(args.micro_batch, 3, 112, 112, device=device)}

    def train_step() -> None:
        task.losses(engine, batch)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds, _ = timed_steps(train_step, args.warmup, args.steps, device)
    return args.micro_batch * args.steps / seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step: Callable[[], Any], warmup: int, steps: int, device: torch.device):
    """(seconds for ``steps`` calls of ``step`` after ``warmup`` untimed ones, the last result);
    every rank starts the clock together."""
    for _ in range(warmup):
        step()
    sync(device)
    dist.barrier()
    start, result = time.perf_counter(), None
    for _ in range(steps):
        result = step()
    sync(device)
    return time.perf_counter() - start, result


def profile_steps(step, device: torch.device, path: Path, write: bool, steps: int = 5) -> None:
    """torch.profiler over ``steps`` training steps: where the step's time goes, host and device.
    Every rank profiles (the steps are collective); only ``write`` ranks write the table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    if not write:
        return
    table = prof.key_averages()
    sections = [("self CPU time", "self_cpu_time_total")]
    if device.type == "cuda":
        sections.append(("device time", "self_device_time_total"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for title, key in sections:
            f.write(f"== {steps} steps, top operators by {title}\n")
            f.write(table.table(sort_by=key, row_limit=30, max_name_column_width=60) + "\n")
    print(f"profile: {path}", flush=True)


def parser() -> argparse.ArgumentParser:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        action="append",
        help="timm preset (repeatable; default facemae_vit_base_patch8_112 and _patch16_112)",
    )
    p.add_argument("--model-kwargs", default="{}", help="JSON, e.g. '{\"decoder_depth\": 4}'")
    p.add_argument("--micro-batch", type=int, default=128 if gpu else 4, help="per device")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3), help="ZeRO stage")
    p.add_argument(
        "--deepspeed-config",
        metavar="JSON",
        help="DeepSpeed fragment (default: the configs' configs/deepspeed/zero<stage>.json)",
    )
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16" if gpu else "fp32")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--irm", metavar="ARCH", help="also run IRM through a teacher of this backbone")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: GPU table)")
    p.add_argument("--json", type=Path, help="write the results here (rank 0)")
    p.add_argument(
        "--baseline", action="store_true", help="also time the model in plain PyTorch (one device)"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (DeepSpeed's engine.compile): fewer kernel launches where the "
        "step is bound by the host; not used by the trainers (unmeasured on GPUs so far)",
    )
    p.add_argument(
        "--irm-compile",
        choices=("auto", "true", "false"),
        default="auto",
        help="torch.compile the IRM teacher, as irm.teacher_compile: auto = on GPUs (default: auto)",
    )
    p.add_argument(
        "--irm-weights",
        choices=("fp32", "bf16"),
        default="fp32",
        help="the teacher's weights: fp32 under bf16 autocast, or cast to bf16 once "
        "(irm.teacher_precision=bf16-weights: no weight casts per step) (default: %(default)s)",
    )
    p.add_argument("--profile", type=Path, metavar="DIR", help="write torch.profiler tables here")
    p.add_argument("--quick", action="store_true", help="micro model, 3 steps (a smoke run)")
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parser().parse_args(argv)
    if args.quick:
        args.model = args.model or ["facemae_vit_micro_patch16_112"]
        args.micro_batch, args.steps, args.warmup = min(args.micro_batch, 4), 3, 1
    if args.deepspeed_config is None and args.zero > 0:
        args.deepspeed_config = f"configs/deepspeed/zero{args.zero}.json"  # what the configs use
    models = args.model or ["facemae_vit_base_patch8_112", "facemae_vit_base_patch16_112"]
    info = dist.init()
    results = []
    for name in models:
        r = bench_model(args, name, info)
        results.append(r)
        if info.is_main:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no peak known)"
            if "deepspeed_vs_plain" in r:
                print(
                    f"  plain PyTorch, same model and losses: {r['plain_torch_images_per_s']:.1f} "
                    f"img/s; DeepSpeed/plain = {r['deepspeed_vs_plain']:.2f}x",
                    flush=True,
                )
            mem = f", peak memory {r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] else ""
            irm = f" + IRM ({r['irm_teacher']})" if r["irm_teacher"] else ""
            irm += ", compiled" if r["compiled"] else ""
            irm += ", teacher compiled" if r["irm_compile"] else ""
            irm += ", teacher bf16 weights" if r["irm_weights"] == "bf16" else ""
            print(
                f"{name}{irm}: {r['images_per_s_per_device']:.1f} img/s per device on "
                f"{r['world_size']} x {r['device']} (ZeRO-{r['zero_stage']}, {r['precision']}, "
                f"micro-batch {r['micro_batch']}); {r['gflop_per_image']:.1f} GFLOP/img fwd+bwd, "
                f"{r['achieved_tflops']:.1f} TFLOP/s, MFU {mfu}{mem}",
                flush=True,
            )
            if args.json:  # after each model: a later one running out of memory loses nothing
                args.json.write_text(json.dumps(results, indent=1))
    dist.shutdown()
    return results


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

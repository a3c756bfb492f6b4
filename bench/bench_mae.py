"""Benchmarks for the pretraining model and loss, each against a baseline measured in the same run.

1. MAE forward+backward images/s: ``FaceMAE`` (facemae_dist.models.mae) vs a straightforward reference
   layout written here after the structure of facebookresearch/mae (conv patch embedding over all
   patches, position embedding added before masking, ``torch.gather`` with an index expanded over the
   width, mask tokens concatenated then unshuffled with another expanded gather, loss over all patches
   weighted by the mask). Same dimensions, same timm blocks, same weights, same masks. FaceMAE's
   gain has two parts, printed apart: its layout, and its linears on oneDNN where PyTorch's MKL
   matmul is slow (``cpu_linear``, facemae_dist.models.cpu_kernels); the reference runs PyTorch's
   default kernels, and once more with the same oneDNN linears.
2. IRM overhead: step time of MAE + IRM vs MSE only, same batch, with the toolkit's teacher
   backbones; and the FLOP ratio of the (MAE, teacher) pairs that configs/mae/ use.

Run: ``python bench/bench_mae.py`` (about 1.5 minutes; ``--quick``: fewer steps, no ViT-Base rows).
By default it uses one torch thread and times each step in process CPU seconds: on a small machine
shared with other jobs, wall time (and multi-threaded runs, whose threads wait on each other while
descheduled) swings by several times, while one thread's CPU seconds stay steady. ``--threads 0
--clock wall`` measures the usual way on an idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from facemae_dist.losses.irm import IRMLoss
from facemae_dist.models.cpu_kernels import (
    cpu_vendor,
    onednn_linear_available,
    onednn_matmul,
    resolve_cpu_linear,
    use_onednn_linears,
)
from facemae_dist.models.mae import FaceMAE, patchify, sincos_pos_embed_2d


class ReferenceMAE(nn.Module):
    """The reference MAE layout, at the dimensions of a given ``FaceMAE`` and with its weights."""

    def __init__(self, fast: FaceMAE, num_heads: int, decoder_heads: int) -> None:
        super().__init__()
        d, dd, p = fast.embed_dim, fast.decoder_dim, fast.patch_size
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.p, self.norm_pix_loss = p, fast.norm_pix_loss
        self.patch_embed = nn.Conv2d(3, d, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(d, fast.grid_size)[None], False)
        self.blocks = nn.ModuleList(
            Block(d, num_heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in fast.blocks
        )
        self.norm = norm(d)
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed_2d(dd, fast.grid_size)[None], False)
        self.decoder_blocks = nn.ModuleList(
            Block(dd, decoder_heads, 4.0, qkv_bias=True, norm_layer=norm)
            for _ in fast.decoder_blocks
        )
        self.decoder_norm = norm(dd)
        self.decoder_pred = nn.Linear(dd, p * p * 3)
        self.copy_from(fast)

    @torch.no_grad()
    def copy_from(self, fast: FaceMAE) -> None:
        """Take the fast model's weights (the linear patch embedding reshaped into a conv kernel)."""
        own = dict(self.named_parameters())
        for name, value in fast.named_parameters():
            if name == "patch_embed.weight":
                kernel = value.reshape(-1, self.p, self.p, 3).permute(0, 3, 1, 2)
                own[name].copy_(kernel)
            else:
                own[name].copy_(value)

    def random_masking(self, x: Tensor, ratio: float, noise: Tensor) -> tuple[Tensor, ...]:
        n, length, d = x.shape
        keep = int(length * (1 - ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_masked, mask, ids_restore

    def forward(self, imgs: Tensor, ratio: float, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, ratio, noise)
        cls = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
        target = patchify(imgs, self.p)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum(), pred, mask


CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}
_clock = CLOCK["cpu"]


def interleaved(steps: dict[str, Callable[[], None]], iters: int) -> dict[str, float]:
    """Median seconds per call of each step: one warm-up each, then ``iters`` alternating calls.

    Alternating single calls keeps a shared machine's load changes from favouring one side.
    """
    times: dict[str, list[float]] = {k: [] for k in steps}
    for step in steps.values():
        step()
    for _ in range(iters):
        for name, step in steps.items():
            t0 = _clock()
            step()
            times[name].append(_clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def count_macs(module: nn.Module, *inputs: Tensor) -> float:
    """Multiply-accumulates per sample in ``module``'s linear and conv layers (attention excluded)."""
    total = [0]

    def hook(m: nn.Module, _inp: tuple, out: Tensor) -> None:
        if isinstance(m, nn.Linear):
            total[0] += out.numel() * m.in_features
        else:
            k = m.weight[0].numel()
            total[0] += out.numel() * k

    handles = [
        m.register_forward_hook(hook)
        for m in module.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    with torch.no_grad():
        module(*inputs)
    for h in handles:
        h.remove()
    return total[0] / inputs[0].shape[0]


def bench_mae_pair(label: str, cfg: dict, batch: int, iters: int) -> tuple:
    """Forward+backward img/s of the reference layout, of FaceMAE with the same layout (cls token
    kept: identical computation, so the loss must match), of FaceMAE's layout on PyTorch's default
    CPU matmul (``cpu_linear="aten"``, the layout's own gain), and of FaceMAE as configured by default
    (no cls token, oneDNN linears where MKL is slow), on the same inputs. The reference is also timed
    with oneDNN linears, so the last ratio separates the layout's share from the kernels'."""
    torch.manual_seed(0)
    same = FaceMAE(**cfg, cls_token=True, cpu_linear="aten")
    ref = ReferenceMAE(same, cfg["num_heads"], cfg["decoder_heads"])
    ref_onednn = ReferenceMAE(same, cfg["num_heads"], cfg["decoder_heads"])
    layout = FaceMAE(**cfg, cpu_linear="aten")
    fast = FaceMAE(**cfg)
    for model in (layout, fast):
        model.load_state_dict(
            {k: v for k, v in same.state_dict().items() if k != "cls_token"}, strict=True
        )
    kernels = resolve_cpu_linear("auto")
    if kernels == "onednn":
        use_onednn_linears(ref_onednn)
    imgs = torch.randn(batch, 3, 112, 112)
    # same masks: FaceMAE draws torch.rand(B, L) from its generator, like the noise given to ref
    noise = torch.rand(batch, same.num_patches, generator=torch.Generator().manual_seed(1))
    with _autocast():
        l_ref = ref(imgs, 0.75, noise)[0]
        l_same = same(imgs, 0.75, generator=torch.Generator().manual_seed(1)).loss
    diff = abs(l_ref.item() - l_same.item())

    def step(model: nn.Module, reference: bool = False) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            with _autocast():
                if reference:
                    loss = model(imgs, 0.75, torch.rand(batch, same.num_patches))[0]
                else:
                    loss = model(imgs, 0.75).loss
            loss.backward()

        return run

    steps = {"ref": step(ref, True), "same": step(same), "layout": step(layout), "ours": step(fast)}
    if kernels == "onednn":
        steps["ref_onednn"] = step(ref_onednn, True)
    t = interleaved(steps, iters)
    # the layout model does the default model's math on kernels the FLOP counter sees
    flops_ref, flops_ours = step_flops(step(ref, True)), step_flops(step(layout))
    return MAERow(
        label,
        batch,
        batch / t["ref"],
        t["ref"] / t["same"],
        t["ref"] / t["layout"],
        batch / t["ours"],
        t["ref"] / t["ours"],
        t.get("ref_onednn", t["ref"]) / t["ours"],
        diff,
        flops_ref / t["ref"],
        flops_ours / t["layout"],
        flops_ours / t["ours"],
        flops_ours / flops_ref,
    )


class MAERow(NamedTuple):
    """One row of the MAE table (rates in img/s or FLOP/s, ratios as speed-ups over the reference)."""

    label: str
    batch: int
    ref: float
    same_layout: float
    layout: float
    ours: float
    ratio: float
    ratio_same_kernels: float
    loss_diff: float
    ref_flops: float
    layout_flops: float
    ours_flops: float
    flop_ratio: float


def step_flops(step: Callable[[], None]) -> float:
    """FLOPs of one forward+backward step (attention through the math kernel so it is counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        step()
    return counter.get_total_flops()


def matmul_rate(n: int = 1024, iters: int = 8, onednn: bool = False) -> float:
    """FLOP/s of an n×n×n matmul at this precision and thread count (PyTorch's default kernel, or
    oneDNN's): the ceiling for a model whose linears run on that kernel."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    product = partial(onednn_matmul, a, b.t(), None) if onednn else partial(torch.mm, a, b)
    with _autocast():
        product()
        t0 = _clock()
        for _ in range(iters):
            product()
    return 2 * n**3 * iters / (_clock() - t0)


_precision = "fp32"


def _autocast() -> contextlib.AbstractContextManager:
    """bf16 autocast on the CPU for ``--precision bf16`` (both sides alike), else nothing."""
    if _precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


IRM_VARIANTS = {
    "MSE + IRM (NCHW)": dict(channels_last=False),
    "MSE + IRM (default: channels-last)": {},
    "MSE + IRM (channels-last, bf16 teacher)": dict(autocast_dtype=torch.bfloat16),
}


def teacher(arch: str) -> nn.Module:
    """A toolkit backbone as the IRM teacher, randomly initialised (speed does not depend on the
    weights; BatchNorm statistics are folded like a trained teacher's)."""
    from facemae_dist.models.backbones import build_backbone

    return build_backbone(arch, 128 if arch == "tiny" else 512)


def bench_irm(
    cfg: dict, arch: str, batch: int, iters: int, variants: list[str]
) -> dict[str, float]:
    """Seconds per step (forward+backward) of MSE only and of MSE + IRM in the named settings."""
    torch.manual_seed(0)
    model = FaceMAE(**cfg)
    net = teacher(arch)
    imgs = torch.randn(batch, 3, 112, 112)

    def step_mse() -> None:
        model.zero_grad(set_to_none=True)
        with _autocast():
            loss = model(imgs).loss
        loss.backward()

    def step_irm(irm: IRMLoss) -> Callable[[], None]:
        def step() -> None:
            model.zero_grad(set_to_none=True)
            with _autocast():
                out = model(imgs)
                recon = model.images_from_pred(imgs, out.pred, out.mask)
                loss = out.loss + irm(imgs, recon)
            loss.backward()

        return step

    steps = {"MSE only": step_mse}
    steps |= {k: step_irm(IRMLoss(net, **IRM_VARIANTS[k])) for k in variants}
    return interleaved(steps, iters)


TINY = dict(embed_dim=192, depth=12, num_heads=3, decoder_dim=128, decoder_depth=4, decoder_heads=4)
BASE = dict(
    embed_dim=768, depth=12, num_heads=12, decoder_dim=512, decoder_depth=8, decoder_heads=16
)


def print_mae(iters: int, with_base: bool) -> None:
    """The MAE table."""
    rows = [bench_mae_pair("tiny p16 (192x12, dec 128x4)", TINY, 32, iters)]
    rows.append(bench_mae_pair("tiny p8 (192x12, dec 128x4)", {**TINY, "patch_size": 8}, 16, iters))
    if with_base:
        rows.append(bench_mae_pair("base p16 (768x12, dec 512x8)", BASE, 8, 2))
    no_blocks = {**TINY, "depth": 0, "decoder_depth": 0}
    rows.append(bench_mae_pair("  path only: tiny p16, 0 blocks", no_blocks, 32, iters))
    rows.append(
        bench_mae_pair("  path only: tiny p8, 0 blocks", {**no_blocks, "patch_size": 8}, 32, iters)
    )
    kernels = resolve_cpu_linear("auto")
    print(f"FaceMAE's CPU linears here: {kernels} (cpu_linear=auto; CPU vendor {cpu_vendor()!r})")
    print(
        f"{'model':34s} {'batch':>5s} {'ref img/s':>9s} {'same layout':>11s} {'layout':>7s} "
        f"{'ours img/s':>10s} {'ratio':>6s} {'same kernels':>12s}  |dloss|"
    )
    for r in rows:
        print(
            f"{r.label:34s} {r.batch:5d} {r.ref:9.1f} {r.same_layout:10.2f}x {r.layout:6.2f}x "
            f"{r.ours:10.1f} {r.ratio:5.2f}x {r.ratio_same_kernels:11.2f}x  {r.loss_diff:.1e}"
        )
    print(
        "(same layout: FaceMAE with MAE's cls token, the reference's exact computation; layout: "
        "the default FaceMAE on PyTorch's default matmul; ours / ratio: the default FaceMAE, no cls "
        "token, linears as cpu_linear=auto picks; same kernels: ours vs the reference with the same "
        "linears)"
    )
    peak = matmul_rate()
    print(
        f"\nWhere the time goes: both steps are matmul-bound. A 1024^3 matmul runs at "
        f"{peak / 1e9:.1f} GFLOP/s through PyTorch's default kernel here ({_precision}, "
        f"{torch.get_num_threads()} thread(s))"
        + (
            f", {matmul_rate(onednn=True) / 1e9:.1f} GFLOP/s through oneDNN."
            if onednn_linear_available() and _precision == "fp32"
            else "."
        )
    )
    print(
        f"{'model':34s} {'ref GFLOP/s':>11s} {'layout GFLOP/s':>14s} {'ours GFLOP/s':>12s} "
        f"{'ours/ref FLOPs':>14s}"
    )
    for r in rows[:-2]:
        print(
            f"{r.label:34s} {r.ref_flops / 1e9:5.1f} ({r.ref_flops / peak:4.0%}) "
            f"{r.layout_flops / 1e9:7.1f} ({r.layout_flops / peak:4.0%}) "
            f"{r.ours_flops / 1e9:5.1f} ({r.ours_flops / peak:4.0%}) {r.flop_ratio:13.3f}"
        )
    print("(percentages: of PyTorch's default 1024^3 matmul rate)")


MICRO = dict(embed_dim=128, depth=4, num_heads=4, decoder_dim=128, decoder_depth=2, decoder_heads=4)


def config_pairs() -> list[tuple[str, str, dict, str]]:
    """(label, MAE preset, model kwargs, teacher backbone) of every configs/mae/*.yaml, each followed
    by the same MAE with an iResNet-50 teacher (the heavier alternative) where it uses another."""
    from pathlib import Path

    from facemae_dist.config import load_config
    from facemae_dist.engine.pretrain import PretrainConfig, teacher_backbone

    pairs = []
    for path in sorted((Path(__file__).resolve().parents[1] / "configs" / "mae").glob("*.yaml")):
        if path.name.startswith("_"):
            continue
        cfg = load_config(PretrainConfig, path, [])
        model = (cfg.model.name, cfg.model.kwargs)
        arch = teacher_backbone(cfg.irm)[0]  # unset: the teacher's model.json, else MobileFaceNet
        pairs.append((path.name, *model, arch))
        if arch not in ("iresnet50", "tiny"):
            pairs.append(("  same, iResNet-50 teacher", *model, "iresnet50"))
    return pairs


def print_irm(iters: int, with_base: bool) -> None:
    """The IRM overhead tables: measured steps, then the FLOP ratio of the configs' pairings."""
    x = torch.randn(2, 3, 112, 112)
    print("\nIRM overhead: the teacher runs on the originals (forward) and on the reconstructions")
    print("(forward + input-gradient backward); its cost over the MAE's is IRM's whole overhead.")
    header = f"{'MAE (MACs/img fwd) + teacher, batch':44s} {'step (fwd+bwd)':40s}"
    print(f"{header} {'s/step':>7s} {'vs MSE':>7s}")
    runs = [
        ("micro p16", MICRO, "tiny", 32, iters, list(IRM_VARIANTS)),
        ("tiny p16", TINY, "tiny", 32, iters, list(IRM_VARIANTS)),
    ]
    if with_base:
        default = ["MSE + IRM (default: channels-last)"]
        runs += [
            ("base p16", BASE, "mobilefacenet", 8, 2, default),
            ("base p16", BASE, "iresnet50", 4, 1, default),
        ]
    for label, cfg, arch, batch, n, variants in runs:
        macs = count_macs(FaceMAE(**cfg), x)
        t_macs = count_macs(teacher(arch).eval(), x)
        times = bench_irm(cfg, arch, batch, n, variants)
        for name, t in times.items():
            row = f"{label} ({macs / 1e6:.0f}M) + {arch} ({t_macs / 1e6:.0f}M), {batch}"
            print(f"{row:44s} {name:40s} {t:7.3f} {t / times['MSE only']:6.2f}x")
    if not with_base:
        return
    from bench_zero import flops_per_image

    print("\nFLOPs per image (fwd+bwd) of the configs' pairings: the overhead a device running")
    print("both at the same efficiency would see")
    print(
        f"{'config':28s} {'MAE':30s} {'teacher':14s} {'MAE GFLOP':>9s} {'+IRM':>8s} {'ratio':>6s}"
    )
    for cfg_name, preset, kwargs, arch in config_pairs():
        mae = flops_per_image(preset, kwargs, 0.75, None)
        both = flops_per_image(preset, kwargs, 0.75, arch)
        print(
            f"{cfg_name:28s} {preset:30s} {arch:14s} {mae / 1e9:9.2f} {both / 1e9:8.2f} "
            f"{both / mae:5.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations, no ViT-Base row")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCK),
        default="cpu",
        help="cpu: process CPU seconds; wall: elapsed",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: CPU autocast on both sides of every comparison",
    )
    args = parser.parse_args()
    global _clock, _precision
    _clock, _precision = CLOCK[args.clock], args.precision
    if args.threads:
        torch.set_num_threads(args.threads)
    iters = 3 if args.quick else 6
    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load avg {load:.1f} at start; {args.clock} clock; {args.precision}, mask 0.75, "
        f"median of {iters} alternating steps"
    )
    print_mae(iters, with_base=not args.quick)
    print_irm(iters, with_base=not args.quick)
    print(f"(load avg {os.getloadavg()[0]:.1f} at end)")


if __name__ == "__main__":
    main()

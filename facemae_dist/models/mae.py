"""FaceMAE: a masked autoencoder for aligned 112x112 faces, built from timm ViT blocks.

Layout (as in MAE, He et al. 2021, and FaceMAE, arXiv 2205.11090):

* images ``(B, 3, 112, 112)`` normalised as ``(x/255 - 0.5)/0.5`` are cut into ``L`` patches of
  ``p x p`` pixels (``p`` = 8 or 16); each sample keeps ``K = int(L * (1 - mask_ratio))`` patches chosen by
  argsort of uniform noise (optionally drawn from a ``torch.Generator``);
* the encoder (timm ``Block``, fused attention) sees the ``K`` visible patches only;
* the decoder sees the ``K`` encoded patches and ``L - K`` shared mask tokens, each with fixed 2-D
  sin-cos position embeddings (non-trainable buffers), and predicts every patch's pixels;
* no cls token by default: MAE carries one for classification fine-tuning, but FaceMAE's loss and
  its reconstructions never read it, and it costs one more token in every block (~8% of a p16
  encoder's work). ``cls_token=True`` restores the exact MAE layout (tested equal to it);
* the loss is the MSE over *masked* patches only, optionally against per-patch normalised pixels
  (``norm_pix_loss``).

Fast path (see ``bench/bench_mae.py`` for the comparison with the reference layout): patches are cut once;
the patch embedding is one linear layer over the *visible* patch pixels only (equivalent to the usual
strided convolution, with its weight in the patch's ``(p, q, c)`` pixel order); position embeddings are
added to visible tokens only; every gather is an ``index_select`` on the flattened batch (no
``expand``-ed index tensors); the decoder input is written with one ``index_copy`` into a buffer that
already holds mask token + position; the loss touches masked rows only. On CPUs where PyTorch's MKL
matmul is slow (AMD), the linear layers run on oneDNN (``cpu_linear``, see
:mod:`facemae_dist.models.cpu_kernels`): the same fp32 math, 1.5-2x faster training steps.

Patch pixel order everywhere is ``(p, q, c)`` (row inside the patch, column, channel), patches in
raster order -- the order of :func:`patchify`.

Presets are registered in timm's model registry when this module is imported::

    import facemae_dist.models.mae  # noqa: F401
    model = timm.create_model("facemae_vit_base_patch16_112", decoder_dim=512, norm_pix_loss=True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.models import register_model
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from facemae_dist.errors import FacemaeError
from facemae_dist.models.cpu_kernels import resolve_cpu_linear, use_onednn_linears

__all__ = [
    "ENCODER_PRESETS",
    "FaceMAE",
    "MAEOutput",
    "Masking",
    "masked_images",
    "patchify",
    "random_masking",
    "sincos_pos_embed_2d",
    "unpatchify",
]

#: encoder presets: name -> (width, depth, heads)
ENCODER_PRESETS: dict[str, tuple[int, int, int]] = {
    "micro": (128, 4, 4),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}

_NORM_PIX_EPS = 1e-6


# --------------------------------------------------------------------------- position embeddings


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """Sin-cos embedding of positions ``pos`` (N,) into ``dim`` channels (half sin, half cos)."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int, cls_token: bool = True) -> Tensor:
    """Fixed 2-D sin-cos position embeddings, shape ``(cls_token + grid_size**2, dim)``, float32.

    Half of the channels encode the row, half the column; the cls slot (first row) is zeros.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb = torch.cat(
        [_sincos_1d(dim // 2, rows.reshape(-1)), _sincos_1d(dim // 2, cols.reshape(-1))], 1
    )
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


# --------------------------------------------------------------------------- patches and masks


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, L, p*p*C)`` with pixels in ``(p, q, c)`` order, patches in raster order."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, channels: int = 3) -> Tensor:
    """Inverse of :func:`patchify` for square images: ``(B, L, p*p*C)`` -> ``(B, C, H, W)``."""
    b, n, _ = patches.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{n} patches do not form a square grid")
    p = patch_size
    x = patches.reshape(b, g, g, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, g * p, g * p)


@dataclass
class Masking:
    """One random masking of a batch.

    ``ids_keep`` (B, K) and ``ids_masked`` (B, L-K) are patch indices (int64); ``mask`` (B, L) is 1 for
    masked patches and 0 for visible ones (float, as in MAE).
    """

    ids_keep: Tensor
    ids_masked: Tensor
    mask: Tensor

    @property
    def num_patches(self) -> int:
        """``L``: patches per image."""
        return self.mask.shape[1]

    def to(self, device: torch.device | str) -> Masking:
        """The same masking with its tensors on ``device``."""
        return Masking(self.ids_keep.to(device), self.ids_masked.to(device), self.mask.to(device))

    def flat(self, ids: Tensor, per_row: int | None = None) -> Tensor:
        """Indices into the batch flattened to ``B * per_row`` rows (``per_row`` defaults to ``L``)."""
        per_row = self.num_patches if per_row is None else per_row
        offsets = torch.arange(ids.shape[0], device=ids.device) * per_row
        return (ids + offsets[:, None]).reshape(-1)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches each sample keeps: ``int(L * (1 - mask_ratio))``."""
    if not 0.0 <= mask_ratio < 1.0:
        raise FacemaeError(f"mask_ratio must be in [0, 1), got {mask_ratio}: set mae.mask_ratio")
    keep = int(num_patches * (1.0 - mask_ratio))
    if keep == 0:
        raise FacemaeError(
            f"mask ratio {mask_ratio} leaves no visible patch of {num_patches}: use at most "
            f"{1 - 1 / num_patches:.4f}"
        )
    return keep


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Masking:
    """Per-sample random masking by argsort of uniform noise; the ``K`` lowest-noise patches stay visible.

    With a ``generator`` the masks are reproducible; the noise is drawn on the generator's device.
    """
    keep = num_visible(num_patches, mask_ratio)
    gen_device = generator.device if generator is not None else device
    noise = torch.rand(batch, num_patches, generator=generator, device=gen_device)
    ids_shuffle = torch.argsort(noise, dim=1)
    if device is not None:
        ids_shuffle = ids_shuffle.to(device)
    ids_keep, ids_masked = ids_shuffle[:, :keep], ids_shuffle[:, keep:]
    mask = torch.ones(batch, num_patches, device=ids_shuffle.device)
    mask.scatter_(1, ids_keep, 0.0)
    return Masking(ids_keep=ids_keep, ids_masked=ids_masked, mask=mask)


def masked_images(
    images: Tensor, mask: Tensor, patch_size: int, fill: float | Tensor = 0.0
) -> Tensor:
    """Images with masked patches (``mask`` 1) replaced by ``fill`` (0 = mid-grey in normalised space)."""
    patches = patchify(images, patch_size)
    keep = mask[..., None] < 0.5
    fill_t = torch.as_tensor(fill, dtype=patches.dtype, device=patches.device)
    return unpatchify(torch.where(keep, patches, fill_t), patch_size, images.shape[1])


def patch_stats(patches: Tensor) -> tuple[Tensor, Tensor]:
    """Per-patch mean and unbiased variance over the pixel axis (the norm-pix-loss statistics)."""
    return patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)


class MAEOutput(NamedTuple):
    """``loss``: scalar MSE over masked patches; ``pred``: (B, L, p*p*C) predicted patches (in the
    normalised-patch space when ``norm_pix_loss``); ``mask``: (B, L), 1 = masked."""

    loss: Tensor
    pred: Tensor
    mask: Tensor


# --------------------------------------------------------------------------- model


class FaceMAE(nn.Module):
    """Masked autoencoder (ViT encoder + lightweight ViT decoder) for square faces."""

    def __init__(
        self,
        img_size: int = 112,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mlp_ratio: float = 4.0,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        drop_path_rate: float = 0.0,
        cls_token: bool = False,
        cpu_linear: str = "auto",
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise FacemaeError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = img_size // patch_size
        num_visible(self.grid_size**2, mask_ratio)  # validates the ratio
        self.num_patches = self.grid_size**2
        self.patch_dim = patch_size * patch_size * in_chans
        self.embed_dim, self.decoder_dim = embed_dim, decoder_dim
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        norm = partial(nn.LayerNorm, eps=1e-6)

        self.patch_embed = nn.Linear(self.patch_dim, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, self.grid_size), False)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm, drop_path=r)
            for r in dpr
        )
        self.norm = norm(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed_2d(decoder_dim, self.grid_size), False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_dim)
        self.init_weights()
        if resolve_cpu_linear(cpu_linear) == "onednn":
            use_onednn_linears(self)

    def init_weights(self) -> None:
        """MAE initialisation: xavier-uniform linears, zero biases, unit LayerNorms, N(0, .02) tokens."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    # ---------------------------------------------------------------- helpers

    @property
    def num_prefix(self) -> int:
        """Tokens before the patches in every sequence: 1 with a cls token, else 0."""
        return int(self.cls_token is not None)

    def patchify(self, images: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, L, p*p*C)``."""
        return patchify(images, self.patch_size)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """``(B, L, p*p*C)`` -> ``(B, C, H, W)``."""
        return unpatchify(patches, self.patch_size, self.in_chans)

    def masked_images(self, images: Tensor, mask: Tensor, fill: float | Tensor = 0.0) -> Tensor:
        """Images with masked patches blanked (the 'masked only' privacy baseline, image grids)."""
        return masked_images(images, mask, self.patch_size, fill)

    def random_masking(
        self, batch: int, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> Masking:
        """A fresh :class:`Masking` for ``batch`` images on this model's device."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        return random_masking(batch, self.num_patches, ratio, generator, self.pos_embed.device)

    # ---------------------------------------------------------------- encoder / decoder

    def forward_encoder(self, patches: Tensor, masking: Masking) -> Tensor:
        """Encode the visible patches: ``(B, L, p*p*C)`` patches -> ``(B, prefix + K, D)`` latent."""
        b, keep = masking.ids_keep.shape
        flat_keep = masking.flat(masking.ids_keep)
        visible = patches.reshape(-1, self.patch_dim).index_select(0, flat_keep)
        pos = self.pos_embed.index_select(0, masking.ids_keep.reshape(-1) + 1)
        x = (self.patch_embed(visible) + pos).view(b, keep, -1)
        if self.cls_token is not None:
            cls = (self.cls_token + self.pos_embed[:1]).expand(b, 1, -1)
            x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, latent: Tensor, masking: Masking) -> Tensor:
        """Decode ``(B, prefix + K, D)`` latent to ``(B, L, p*p*C)`` predicted patches."""
        b, keep = masking.ids_keep.shape
        c = self.num_prefix
        n = self.num_patches + c
        x = self.decoder_embed(latent)
        # rows of the position table (0 = cls, 1 + patch index) of the tokens in x
        rows = masking.ids_keep + 1
        if c:
            rows = torch.cat([rows.new_zeros(b, 1), rows], dim=1)
        x = x.reshape(b * (keep + c), -1) + self.decoder_pos_embed.index_select(0, rows.reshape(-1))
        # one buffer of mask token + position for every slot; visible tokens (and cls) written over it
        base = (self.mask_token[0] + self.decoder_pos_embed[1 - c :]).repeat(b, 1)
        x = base.index_copy_(0, masking.flat(rows - (1 - c), n), x).view(b, n, -1)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x[:, c:])
        return self.decoder_pred(x)

    def forward_loss(self, patches: Tensor, pred: Tensor, masking: Masking) -> Tensor:
        """MSE over masked patches only (against per-patch normalised pixels if ``norm_pix_loss``)."""
        if masking.ids_masked.numel() == 0:
            return pred.sum() * 0.0
        flat = masking.flat(masking.ids_masked)
        target = patches.reshape(-1, self.patch_dim).index_select(0, flat)
        if self.norm_pix_loss:
            mean, var = patch_stats(target)
            target = (target - mean) / (var + _NORM_PIX_EPS).sqrt()
        return F.mse_loss(pred.reshape(-1, self.patch_dim).index_select(0, flat), target)

    def forward(
        self,
        images: Tensor,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
        masking: Masking | None = None,
    ) -> MAEOutput:
        """Mask, encode, decode: returns :class:`MAEOutput` ``(loss, pred, mask)``.

        ``masking`` (optional) reuses a given mask instead of drawing one.
        """
        if masking is None:
            masking = self.random_masking(images.shape[0], mask_ratio, generator)
        patches = self.patchify(images)
        pred = self.forward_decoder(self.forward_encoder(patches, masking), masking)
        return MAEOutput(self.forward_loss(patches, pred, masking), pred, masking.mask)

    # ---------------------------------------------------------------- deployment

    def pred_to_pixels(self, pred: Tensor, patches: Tensor, mask: Tensor) -> Tensor:
        """Map predictions to the images' normalised pixel space.

        Without ``norm_pix_loss`` predictions already are pixels. With it they are per-patch normalised;
        a masked patch's own mean/variance is unknown at deployment, so every masked patch is
        de-normalised with the *average* per-patch mean and variance of that image's *visible* patches,
        and every visible patch with its own statistics (both are known from the masked input).
        """
        if not self.norm_pix_loss:
            return pred
        mean, var = patch_stats(patches)
        vis = (1.0 - mask)[..., None]
        count = vis.sum(dim=1, keepdim=True).clamp_min(1.0)
        img_mean = (mean * vis).sum(dim=1, keepdim=True) / count
        img_var = (var * vis).sum(dim=1, keepdim=True) / count
        masked = mask[..., None] > 0.5
        mean, var = torch.where(masked, img_mean, mean), torch.where(masked, img_var, var)
        return pred * (var + _NORM_PIX_EPS).sqrt() + mean

    def reconstruct(
        self,
        images: Tensor,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
        paste_visible: bool = True,
        masking: Masking | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Mask and reconstruct faces; differentiable (IRM backpropagates through it).

        Returns ``(images, mask)``: ``(B, C, H, W)`` reconstructions in the input's normalised space and the
        ``(B, L)`` mask (1 = masked). With ``paste_visible`` the visible patches are the input's own pixels,
        exactly; otherwise every patch is the model's prediction.
        """
        if masking is None:
            masking = self.random_masking(images.shape[0], mask_ratio, generator)
        pred = self.forward_decoder(self.forward_encoder(self.patchify(images), masking), masking)
        return self.images_from_pred(images, pred, masking.mask, paste_visible), masking.mask

    def images_from_pred(
        self, images: Tensor, pred: Tensor, mask: Tensor, paste_visible: bool = True
    ) -> Tensor:
        """Reconstructed images from a forward pass's ``pred`` and ``mask`` (differentiable).

        Training with IRM uses this on :meth:`forward`'s output, so the MAE runs once per step.
        """
        patches = self.patchify(images)
        pixels = self.pred_to_pixels(pred, patches, mask)
        if paste_visible:
            pixels = torch.where(mask[..., None] > 0.5, pixels, patches)
        return self.unpatchify(pixels)


# --------------------------------------------------------------------------- registry


def _create(preset: str, patch_size: int, pretrained: bool, **kwargs: Any) -> FaceMAE:
    """Build a preset; keyword arguments override any :class:`FaceMAE` argument."""
    if pretrained:
        raise FacemaeError(
            "no pretrained FaceMAE weights are published: train one with `facemae pretrain`"
        )
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    width, depth, heads = ENCODER_PRESETS[preset]
    defaults: dict[str, Any] = dict(embed_dim=width, depth=depth, num_heads=heads)
    if preset == "micro":
        defaults.update(decoder_dim=128, decoder_depth=2, decoder_heads=4)
    model = FaceMAE(patch_size=patch_size, **{**defaults, **kwargs})
    return model.to(device=device, dtype=dtype) if device or dtype else model


@register_model
def facemae_vit_micro_patch16_112(pretrained: bool = False, **kwargs: Any) -> FaceMAE:
    """Micro (128 x 4, decoder 128 x 2): CPU tests and the demo."""
    return _create("micro", 16, pretrained, **kwargs)


@register_model
def facemae_vit_tiny_patch16_112(pretrained: bool = False, **kwargs: Any) -> FaceMAE:
    """ViT-Tiny encoder (192 x 12, 3 heads), patch 16."""
    return _create("tiny", 16, pretrained, **kwargs)


@register_model
def facemae_vit_tiny_patch8_112(pretrained: bool = False, **kwargs: Any) -> FaceMAE:
    """ViT-Tiny encoder (192 x 12, 3 heads), patch 8."""
    return _create("tiny", 8, pretrained, **kwargs)


@register_model
def facemae_vit_small_patch16_112(pretrained: bool = False, **kwargs: Any) -> FaceMAE:
    """ViT-Small encoder (384 x 12, 6 heads), patch 16."""
    return _create("small", 16, pretrained, **kwargs)


@register_model
def facemae_vit_small_patch8_112(pretrained: bool = False, **kwargs: Any) -> FaceMAE:
    """ViT-Small encoder (384 x 12, 6 heads), patch 8."""
    return _create("small", 8, pretrained, **kwargs)


@register_model
def facemae_vit_base_patch16_112(pretrained: bool = False, **kwargs: Any) -> FaceMAE:
    """ViT-Base encoder (768 x 12, 12 heads), patch 16."""
    return _create("base", 16, pretrained, **kwargs)


@register_model
def facemae_vit_base_patch8_112(pretrained: bool = False, **kwargs: Any) -> FaceMAE:
    """ViT-Base encoder (768 x 12, 12 heads), patch 8."""
    return _create("base", 8, pretrained, **kwargs)


@register_model
def facemae_vit_large_patch16_112(pretrained: bool = False, **kwargs: Any) -> FaceMAE:
    """ViT-Large encoder (1024 x 24, 16 heads), patch 16."""
    return _create("large", 16, pretrained, **kwargs)


@register_model
def facemae_vit_large_patch8_112(pretrained: bool = False, **kwargs: Any) -> FaceMAE:
    """ViT-Large encoder (1024 x 24, 16 heads), patch 8."""
    return _create("large", 8, pretrained, **kwargs)

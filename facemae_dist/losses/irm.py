"""Instance relation matching (IRM), the FaceMAE loss that keeps reconstructed faces useful.

A frozen face-recognition *teacher* embeds the original faces and their reconstructions. For each side
the *relation graph* of the batch is the matrix of pairwise similarities between its embeddings, self
pairs excluded; each row becomes a distribution over the other ``B - 1`` faces through a softmax with a
temperature. IRM is the KL divergence between the original rows (the target, detached) and the
reconstructed rows, averaged over rows. Gradients flow through the teacher into the reconstructions
(and on into the MAE decoder), never into the teacher's weights.

The FaceMAE paper (arXiv 2205.11090) describes IRM in words, not as an exact formula, so the following
choices are ours. Each is an argument of :class:`IRMLoss` / :func:`relation_kl`, so the config's
``irm`` section can change it:

* ``similarity="cosine"``: face recognisers are trained and compared on the unit sphere, so cosine is the
  relation they define; ``"dot"`` keeps the embedding norms (then scale the temperature to the norms).
* ``temperature=0.1``: trained face embeddings have cosines near 0 (+-0.1) between different identities
  and 0.4-0.8 within one; at 0.1 a same-identity pair outweighs an unrelated one by e^4-e^8 in its row,
  so the rows carry the batch's identity structure without being one-hot. 0.1 is also inside the range
  used by contrastive and relational distillation losses (about 0.05-0.2). At 1.0 rows are nearly
  uniform and the signal fades; much lower values keep only the nearest neighbour of each face.
  Measured in the CPU demo (micro MAE, tiny teacher, weight 1): at 0.5 the reconstructions and their
  leakage are those of MSE-only; at 0.1 leakage drops four-fold at the same verification accuracy,
  and the teacher's gradient paints teacher-specific patterns into the masked patches (blurring the
  teacher's input, sigma 1.5 px, turned them into coarser patterns, not into faces).
* ``direction="forward"``: ``KL(P_orig || P_recon)``, mass-covering: every relation the original batch
  has must be present in the reconstructions. ``"reverse"`` is ``KL(P_recon || P_orig)``, ``"symmetric"``
  the mean of both, ``"js"`` the Jensen-Shannon divergence (bounded by log 2).
* the weight of IRM against the MSE is the caller's (:func:`total_loss`, config ``irm.weight``).
* a batch of fewer than 2 faces has no relations: IRM is 0 there (with a graph, so ``backward`` works).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facemae_dist.errors import FacemaeError

__all__ = [
    "DIRECTIONS",
    "SIMILARITIES",
    "IRMLoss",
    "fold_batchnorm",
    "load_teacher",
    "relation_kl",
    "total_loss",
]

SIMILARITIES = ("cosine", "dot")
DIRECTIONS = ("forward", "reverse", "symmetric", "js")

_NO_TEACHER = (
    "IRM needs a teacher: train a recognizer with `facemae train` and pass its .safetensors as "
    "irm.teacher"
)

MIN_IRM_BATCH = 3  # faces per micro-batch for a relation graph (self-pairs excluded)


def _check_options(temperature: float, similarity: str, direction: str) -> None:
    if not temperature > 0:
        raise FacemaeError(f"irm.temperature must be > 0, got {temperature}")
    if similarity not in SIMILARITIES:
        raise FacemaeError(f"irm.similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if direction not in DIRECTIONS:
        raise FacemaeError(f"irm.direction must be one of {DIRECTIONS}, got {direction!r}")


def relation_logits(emb: Tensor, temperature: float, similarity: str = "cosine") -> Tensor:
    """Off-diagonal similarity logits ``(B, B - 1)``: row i holds sim(i, j) / temperature for j != i."""
    emb = emb.float().flatten(1)
    if similarity == "cosine":
        emb = F.normalize(emb, dim=1)
    sim = emb @ emb.t()
    b = sim.shape[0]
    # drop the diagonal: the flattened matrix minus its first entry, read as (B-1, B+1), loses column 0
    off = sim.flatten()[1:].view(b - 1, b + 1)[:, :-1].reshape(b, b - 1)
    return off / temperature


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Mean over rows of KL(P || Q) given log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


def relation_kl(
    emb_orig: Tensor,
    emb_recon: Tensor,
    temperature: float = 0.1,
    similarity: str = "cosine",
    direction: str = "forward",
) -> Tensor:
    """IRM on embeddings ``(B, D)``: divergence between the rows of the two relation graphs.

    ``emb_orig`` is the target and is detached. Returns a scalar; 0 when ``B < 3`` (with self-pairs
    excluded a row needs two others to form a distribution: with one its softmax is 1 whatever the
    embeddings).
    """
    _check_options(temperature, similarity, direction)
    if emb_orig.shape[0] != emb_recon.shape[0]:
        raise ValueError(f"batch sizes differ: {emb_orig.shape[0]} vs {emb_recon.shape[0]}")
    if emb_recon.shape[0] < MIN_IRM_BATCH:
        return emb_recon.sum() * 0.0
    log_p = F.log_softmax(relation_logits(emb_orig.detach(), temperature, similarity), dim=1)
    log_q = F.log_softmax(relation_logits(emb_recon, temperature, similarity), dim=1)
    if direction == "forward":
        return _kl(log_p, log_q)
    if direction == "reverse":
        return _kl(log_q, log_p)
    if direction == "symmetric":
        return 0.5 * (_kl(log_p, log_q) + _kl(log_q, log_p))
    log_m = torch.logaddexp(log_p, log_q) - torch.log(torch.tensor(2.0, device=log_p.device))
    return 0.5 * (_kl(log_p, log_m) + _kl(log_q, log_m))


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode with ``requires_grad`` off on all its parameters."""
    module.eval()
    module.requires_grad_(False)
    return module


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm that directly follows a conv or linear layer in an
    ``nn.Sequential`` into that layer's weights (in place; the BatchNorm becomes ``Identity``).

    Exact up to float rounding for a frozen network, and it removes the BatchNorm forward and backward
    passes from every IRM step (~15% of a small teacher's time). Other layouts are left as they are.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:], strict=False):
            layer, bn = seq._modules[first], seq._modules[second]
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
                continue  # no running statistics: it normalises by each batch, even in eval
            if not bn.affine:  # the fusers expect a scale and shift: the identity ones
                bn = _with_unit_affine(bn)
            if isinstance(layer, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                fused = fuse_conv_bn_eval(layer, bn)
            elif isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
                fused = fuse_linear_bn_eval(layer, bn)
            else:
                continue
            seq._modules[first], seq._modules[second] = fused.requires_grad_(False), nn.Identity()
    return module


def _with_unit_affine(bn: nn.Module) -> nn.Module:
    """A copy of a BatchNorm without affine parameters, with weight 1 and bias 0 (same output)."""
    copy = type(bn)(bn.num_features, bn.eps, bn.momentum, affine=True).eval()
    copy.load_state_dict({**bn.state_dict(), "weight": torch.ones(bn.num_features),
                          "bias": torch.zeros(bn.num_features)})  # fmt: skip
    return copy.to(bn.running_mean.device)


class IRMLoss(nn.Module):
    """Instance relation matching through a frozen recognition teacher (see the module docstring).

    ``forward(original, reconstructed)`` takes images in the model-normalised space
    ``(x/255 - 0.5)/0.5``, shape ``(B, 3, H, W)``; the teacher maps them to ``(B, D)`` embeddings.
    The teacher stays in eval mode (also after ``.train()``) and its weights never get gradients.

    Speed options (the teacher's cost is IRM's whole overhead): ``channels_last`` passes the images in
    channels-last memory layout (same values; oneDNN/cuDNN convolutions run faster on it; the teacher's
    weights are left as they are); ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the teacher under
    autocast, the relation graphs are still computed in float32; ``compile_teacher`` runs the teacher
    through torch.compile (on an H200 it fuses MobileFaceNet's many small kernels: IRM's overhead at
    ViT-B/8 went from 1.30x to 1.15x; on a CPU it was slower); ``teacher_dtype`` (e.g. bfloat16)
    casts the frozen teacher's weights once and its inputs on each call, instead of autocast
    (fewer kernels per step: at ViT-B/16 on an H200 1.35x -> 1.13x eager, 1.06x compiled).
    """

    def __init__(
        self,
        teacher: nn.Module,
        temperature: float = 0.1,
        similarity: str = "cosine",
        direction: str = "forward",
        channels_last: bool = True,
        autocast_dtype: torch.dtype | None = None,
        compile_teacher: bool = False,
        teacher_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_options(temperature, similarity, direction)
        self.teacher = fold_batchnorm(freeze(teacher))
        self.teacher_dtype = teacher_dtype
        if teacher_dtype is not None:  # weights cast once, not by autocast on every forward
            self.teacher.to(teacher_dtype)
            autocast_dtype = None
        if compile_teacher:  # compiled on the first batch (and again if the batch size changes)
            self.teacher = torch.compile(self.teacher)
        self.temperature, self.similarity, self.direction = temperature, similarity, direction
        self.channels_last, self.autocast_dtype = channels_last, autocast_dtype

    def train(self, mode: bool = True) -> IRMLoss:
        """Switch this module's mode; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def embed(self, images: Tensor) -> Tensor:
        """Teacher embeddings ``(B, D)`` of a batch (gradients flow to ``images``, never to weights)."""
        if self.teacher_dtype is not None:
            images = images.to(self.teacher_dtype)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.autocast_dtype is None:
            return self.teacher(images)
        with torch.autocast(images.device.type, dtype=self.autocast_dtype):
            return self.teacher(images)

    def forward(
        self, original: Tensor | None, reconstructed: Tensor, emb_original: Tensor | None = None
    ) -> Tensor:
        """Scalar IRM between the batch of originals and their reconstructions.

        ``emb_original`` (optional): the teacher's embeddings of the originals, when the caller already
        has them (then ``original`` may be None); this saves a third of IRM's teacher work.
        """
        if reconstructed.shape[0] < 2:
            return reconstructed.sum() * 0.0
        if emb_original is not None:
            emb_orig = emb_original.detach()
        elif original is None:
            raise ValueError("IRMLoss needs the original images or their embeddings")
        else:
            with torch.no_grad():
                emb_orig = self.embed(original)
        emb_recon = self.embed(reconstructed)
        return relation_kl(emb_orig, emb_recon, self.temperature, self.similarity, self.direction)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, similarity={self.similarity}, "
            f"direction={self.direction}, channels_last={self.channels_last}, "
            f"autocast_dtype={self.autocast_dtype}"
        )


def total_loss(mse: Tensor, irm: Tensor | None, w_mse: float = 1.0, w_irm: float = 1.0) -> Tensor:
    """``w_mse * mse + w_irm * irm`` (IRM skipped when ``irm`` is None or ``w_irm`` is 0)."""
    if irm is None or w_irm == 0:
        return w_mse * mse
    return w_mse * mse + w_irm * irm


def _state_mismatch(expected: dict, found: dict) -> str:
    """One line on how two state dicts differ: missing/unexpected keys, then shape mismatches."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    shapes = [k for k in expected if k in found and expected[k].shape != found[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    if shapes:
        k = shapes[0]
        parts.append(
            f"{len(shapes)} of other shape, e.g. {k} {tuple(found[k].shape)} vs "
            f"{tuple(expected[k].shape)} expected"
        )
    return "; ".join(parts) or "values differ"


def load_teacher(path: str | Path, build_fn: Callable[[], nn.Module]) -> nn.Module:
    """Build the teacher with ``build_fn()`` and load the safetensors state dict at ``path`` (read-only).

    Returns the module frozen (eval mode, no gradients). Raises :class:`FacemaeError` when the file is
    missing, unreadable, or does not match the architecture.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path)
    if not file.is_file():
        raise FacemaeError(f"{_NO_TEACHER} (no file at {file})")
    try:
        state = load_file(str(file), device="cpu")
    except (SafetensorError, OSError) as err:
        raise FacemaeError(
            f"cannot read IRM teacher {file}: {err}; pass a .safetensors file"
        ) from err
    model = build_fn()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise FacemaeError(
            f"IRM teacher {file} does not match the architecture built for it "
            f"({_state_mismatch(model.state_dict(), state)}): set irm.teacher_arch and "
            "irm.teacher_embedding to the recognizer that wrote the file (unset, they are read from "
            "the model.json `facemae train` writes beside it; without one: mobilefacenet, 512)"
        ) from None
    return freeze(model)

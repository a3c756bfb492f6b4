"""Recognition backbones: aligned 112x112 faces -> an ``embedding_size``-d identity embedding.

Input: ``(B, 3, 112, 112)`` RGB normalised as ``(x/255 - 0.5)/0.5``. Output: ``(B, embedding_size)``
(not L2-normalised: the margin head and the verification protocol normalise).

* ``iresnet18/34/50/100``: the ArcFace iResNet layout (Deng et al. 2019, insightface
  ``arcface_torch``). Stem conv3x3(3->64, stride 1) + BN + PReLU; four stages of pre-activation
  ``IBasicBlock`` (BN, conv3x3, BN, PReLU, conv3x3 with the stride, BN; plus the shortcut) with
  widths 64/128/256/512, the first block of each stage strided -> 56, 28, 14, 7 pixels; head:
  BN2d, dropout, flatten, FC(512*7*7 -> E), BN1d whose scale is frozen at 1 (the "features" layer).
* ``mobilefacenet``: MobileFaceNet (Chen et al. 2018): inverted residual bottlenecks
  (expand 1x1, depthwise 3x3, linear project 1x1) and a global depthwise convolution (GDC) head,
  7x7 depthwise over the final map instead of global average pooling, which would weigh every face
  region equally.
* ``vit_{t,s,b}_p{8,16}``: timm ``VisionTransformer`` built for 112 px with the classifier resized to
  ``embedding_size`` (the class token is the embedding).
* ``tiny``: four strided conv layers and a GDC-style head, sized for the CPU (tests, demo).

Every model exports to ONNX with a dynamic batch (:func:`export_onnx`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from facemae_dist.errors import FacemaeError
from facemae_dist.models.cpu_kernels import Conv2d, PReLU, resolve_cpu_linear, use_onednn_linears

__all__ = [
    "IResNet",
    "MobileFaceNet",
    "TinyFaceNet",
    "build_backbone",
    "export_onnx",
    "list_backbones",
]

IMAGE_SIZE = 112

# --------------------------------------------------------------------------------------- iResNet


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation residual block of iResNet; the stride sits on the second convolution."""

    def __init__(self, cin: int, cout: int, stride: int = 1, eps: float = 1e-5) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=eps)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=eps)
        self.prelu = PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=eps)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout, eps=eps)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """ArcFace iResNet: 112 px in, 7x7x512 before the FC embedding layer."""

    def __init__(
        self,
        layers: Sequence[int],
        embedding_size: int = 512,
        dropout: float = 0.0,
        widths: Sequence[int] = (64, 128, 256, 512),
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.prelu = PReLU(widths[0])
        stages, cin = [], widths[0]
        for depth, width in zip(layers, widths, strict=True):
            blocks = [IBasicBlock(cin, width, stride=2)]
            blocks += [IBasicBlock(width, width) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(cin)
        self.dropout = nn.Dropout(dropout)
        side = IMAGE_SIZE // 16
        self.fc = nn.Linear(cin * side * side, embedding_size)
        self.features = _frozen_scale_bn1d(embedding_size)
        _init_weights(self)
        if zero_init_residual:  # each block starts as the identity: steadier start for deep nets
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.zeros_(m.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x))
        return self.features(self.fc(torch.flatten(x, 1)))


def _frozen_scale_bn1d(dim: int) -> nn.BatchNorm1d:
    """BN1d on the embedding with its scale fixed at 1 (ArcFace): only the shift is learnt, so the
    layer standardises features without an extra learnable gain the margin loss could exploit."""
    bn = nn.BatchNorm1d(dim, eps=1e-5)
    nn.init.ones_(bn.weight)
    bn.weight.requires_grad_(False)
    return bn


def _init_weights(model: nn.Module) -> None:
    """He init for convolutions (fan-out), unit/zero BN, small normal for linear layers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------- MobileFaceNet


class ConvBN(nn.Sequential):
    """Conv + BN, followed by PReLU unless ``act`` is False (linear bottleneck outputs)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
        padding: int | None = None,
    ) -> None:
        pad = kernel // 2 if padding is None else padding
        mods: list[nn.Module] = [
            Conv2d(cin, cout, kernel, stride, pad, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act:
            mods.append(PReLU(cout))
        super().__init__(*mods)


class Bottleneck(nn.Module):
    """Inverted residual: expand 1x1, depthwise 3x3 (stride), linear project 1x1."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.body = nn.Sequential(
            ConvBN(cin, hidden),
            ConvBN(hidden, hidden, 3, stride, groups=hidden),
            ConvBN(hidden, cout, act=False),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return out + x if self.residual else out


class GDCHead(nn.Sequential):
    """Global depthwise conv over the last (k x k) map, then linear projection + BN1d."""

    def __init__(self, channels: int, embedding_size: int, kernel: int = 7) -> None:
        super().__init__(
            ConvBN(channels, channels, kernel, groups=channels, act=False, padding=0),
            nn.Flatten(1),
            nn.Linear(channels, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )


#: (expansion, out channels, blocks, stride of the first block), from the MobileFaceNet paper
MOBILEFACENET_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)


class MobileFaceNet(nn.Module):
    """MobileFaceNet: 112 -> 56 (stem) -> 28 -> 14 -> 7, 1x1 to 512, GDC head. ~1M parameters
    plus the head; ``width`` scales every channel count (1.0 = the paper)."""

    def __init__(self, embedding_size: int = 512, width: float = 1.0) -> None:
        super().__init__()
        c0 = int(64 * width)
        layers: list[nn.Module] = [ConvBN(3, c0, 3, 2), ConvBN(c0, c0, 3, 1, groups=c0)]
        cin = c0
        for expansion, cout, n, stride in MOBILEFACENET_STAGES:
            cout = int(cout * width)
            for i in range(n):
                layers.append(Bottleneck(cin, cout, stride if i == 0 else 1, expansion))
                cin = cout
        layers.append(ConvBN(cin, 512, 1))
        self.body = nn.Sequential(*layers)
        self.head = GDCHead(512, embedding_size)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


# ------------------------------------------------------------------------------------------ tiny


class TinyFaceNet(nn.Module):
    """A small CPU net for tests and the demo, ~30 MFLOP per face.

    4x4/4 patch stem (112 -> 28), 3x3 convolutions (28 -> 14 -> 7; ``(width, stride)`` pairs in
    ``stages``), GDC head. Choices measured on a 2-core CPU, where they make it several times
    faster than strided 3x3 stems: the patch stem is one small matmul instead of a convolution
    over the full 112 px image; ReLU instead of PReLU (PReLU's backward costs more than the
    convolutions here); channels-last activations (BatchNorm runs ~10x faster on them).
    """

    def __init__(
        self,
        embedding_size: int = 512,
        stem: int = 32,
        stages: Sequence[tuple[int, int]] = ((64, 2), (64, 1), (128, 2)),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu(3, stem, 4, 4, 0)]
        cin, side = stem, IMAGE_SIZE // 4
        for width, stride in stages:
            layers.append(_conv_bn_relu(cin, width, 3, stride, 1))
            cin, side = width, side // stride
        self.body = nn.Sequential(*layers)
        self.head = GDCHead(cin, embedding_size, kernel=side)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x.contiguous(memory_format=torch.channels_last)))


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int, padding: int) -> nn.Sequential:
    return nn.Sequential(
        Conv2d(cin, cout, kernel, stride, padding, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


# ------------------------------------------------------------------------------------------- ViT

_VIT_PRESETS = {
    "t": "vit_tiny_patch16_224",
    "s": "vit_small_patch16_224",
    "b": "vit_base_patch16_224",
}


def _vit(size: str, patch: int) -> Callable[..., nn.Module]:
    def build(embedding_size: int = 512, cpu_linear: str = "auto", **kw: Any) -> nn.Module:
        import timm  # imported here: timm pulls torchvision, not needed by the conv nets

        kw.setdefault("img_size", IMAGE_SIZE)
        kw.setdefault("patch_size", patch)
        model = timm.create_model(_VIT_PRESETS[size], num_classes=embedding_size, **kw)
        if resolve_cpu_linear(cpu_linear) == "onednn":  # as FaceMAE: fast fp32 linears on AMD CPUs
            use_onednn_linears(model)
        return model

    build.__doc__ = f"timm ViT-{size.upper()}/{patch} at 112 px (pretrained=False by default)."
    return build


# -------------------------------------------------------------------------------------- registry


def _iresnet(layers: Sequence[int]) -> Callable[..., nn.Module]:
    def build(embedding_size: int = 512, **kw: Any) -> nn.Module:
        return IResNet(layers, embedding_size, **kw)

    return build


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "iresnet18": _iresnet((2, 2, 2, 2)),
    "iresnet34": _iresnet((3, 4, 6, 3)),
    "iresnet50": _iresnet((3, 4, 14, 3)),
    "iresnet100": _iresnet((3, 13, 30, 3)),
    "mobilefacenet": MobileFaceNet,
    "tiny": TinyFaceNet,
    **{f"vit_{s}_p{p}": _vit(s, p) for s in _VIT_PRESETS for p in (8, 16)},
}


def list_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone`."""
    return list(_REGISTRY)


def build_backbone(name: str, embedding_size: int = 512, **kw: Any) -> nn.Module:
    """Build a recognition backbone by name; ``kw`` go to the model's constructor."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise FacemaeError(
            f"unknown backbone {name!r}; choose one of: {', '.join(_REGISTRY)}"
        ) from None
    if embedding_size < 1:
        raise FacemaeError(f"embedding_size must be positive, got {embedding_size}")
    return factory(embedding_size=embedding_size, **kw)


# ------------------------------------------------------------------------------------------ ONNX


def _torchscript_export(model: nn.Module, dummy: Tensor, path: str, opset: int) -> None:
    with warnings.catch_warnings():
        # the TorchScript exporter is chosen on purpose; trace-time constants (timm's attention
        # mask checks) are harmless, and export_onnx checks the file at another batch size
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (dummy,),
            path,
            input_names=["images"],
            output_names=["embedding"],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}},
        )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    image_size: int = IMAGE_SIZE,
    opset: int = 17,
    atol: float = 1e-4,
) -> float:
    """Export ``model`` (in eval mode) to ONNX with a dynamic batch axis and check it.

    Uses the TorchScript exporter (``dynamo=False``): the dynamo exporter, the default on recent
    torch, needs ``onnxscript``, which the toolkit does not require. The file is then run with
    onnxruntime on a batch of 3 (not the traced batch of 2, to prove the batch axis is dynamic).
    Returns the max abs difference to PyTorch relative to the largest PyTorch output,
    ``max|onnx - torch| / max|torch|``, and raises FacemaeError above ``atol``. Relative, because
    embeddings are compared after L2 normalisation and their raw scale varies by 1e8 between an
    untrained MobileFaceNet (~1e-7) and an iResNet (~50), where fp32 rounding alone gives 1e-4.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise FacemaeError(
            "ONNX export needs onnxruntime to check the exported file: pip install onnx onnxruntime"
        ) from None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        dummy = torch.randn(2, 3, image_size, image_size, device=device)
        _torchscript_export(model, dummy, os.fspath(path), opset)
        check = torch.randn(
            3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)
        )
        with torch.inference_mode():
            expected = model(check.to(device)).float().cpu().numpy()
    finally:
        model.train(was_training)
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": check.numpy()})[0]
    diff = float(abs(got - expected).max()) / max(float(abs(expected).max()), 1e-30)
    if not diff <= atol:
        raise FacemaeError(
            f"ONNX export {path} differs from PyTorch by {diff:.3g} of the output scale (> {atol}); "
            "the model uses an operator the exporter does not translate faithfully"
        )
    return diff

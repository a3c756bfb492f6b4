"""Three CPU training kernels that PyTorch runs far below the machine's speed, replaced.

**Linear layers through oneDNN on CPUs where PyTorch's MKL matmul runs a slow code path.**

PyTorch's fp32 ``addmm`` on x86 goes to MKL, and MKL chooses its fast kernels by CPU *vendor*: on
AMD CPUs it runs at AVX2 speed even where the core has full AVX-512 (``MKL_ENABLE_INSTRUCTIONS``
and ``MKL_DEBUG_CPU_TYPE`` do not change that in the MKL PyTorch bundles). oneDNN (also bundled with
PyTorch; it already runs every CPU convolution and bf16 matmul) picks kernels by instruction set. On
the AMD EPYC (Zen 5) machine this toolkit is tested on, one fp32 thread does ~110 GFLOP/s through
MKL and ~240 GFLOP/s through oneDNN for the MAE's matrix shapes, and a FaceMAE training step runs
1.5-2x faster (``bench/bench_mae.py``). Same precision: both are fp32 with fp32 accumulation; only
the order of the sums differs (relative differences ~1e-6).

:class:`OneDNNLinear` is an ``nn.Linear`` (same parameters, same state dict, so checkpoints,
DeepSpeed and timm see no difference) whose forward and backward call oneDNN for fp32 CPU tensors
and ``F.linear`` for anything else (CUDA, bf16, autocast, ``torch.compile``, export tracing, dispatch modes such as
``FlopCounterMode``).

**PReLU's backward.** ATen's CPU ``_prelu_kernel_backward`` computes the input and slope gradients
in one pass at ~5 ns per element, 60x its forward; in an IRM step it was 43% of a frozen
MobileFaceNet teacher's time. :class:`PReLU` (an ``nn.PReLU``, same state dict) keeps ATen's
forward and writes the backward as a few vectorised passes (the slope gradient only when the slope
trains): ~6x faster, equal up to the last bit of the slope blend.

**1x1 convolutions of small batches.** ATen sends a 1x1, stride-1 fp32 convolution to its slow
im2col path, not oneDNN, when the batch is under 16 on one thread (the case of a rank's IRM
teacher under torchrun, which sets one thread per process): 55% of a MobileFaceNet teacher's time at
batch 8. On a channels-last input such a convolution is exactly a matmul over the channels, and
:class:`Conv2d` runs it as one (through oneDNN where :func:`resolve_cpu_linear` picks it).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode

from facemae_dist.errors import FacemaeError

__all__ = [
    "CPU_LINEAR_CHOICES",
    "KERNEL_KWARGS",
    "Conv2d",
    "OneDNNLinear",
    "PReLU",
    "architecture_kwargs",
    "onednn_matmul",
    "resolve_cpu_linear",
    "use_onednn_linears",
]

#: ``auto``: oneDNN on non-Intel x86 CPUs (where MKL is slow), PyTorch's default elsewhere;
#: ``onednn``: always oneDNN on the CPU; ``aten``: always PyTorch's default (MKL on x86).
CPU_LINEAR_CHOICES = ("auto", "onednn", "aten")


def onednn_matmul(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` by oneDNN; takes strided (transposed) operands without copying."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this PyTorch build has the oneDNN linear kernel and it agrees with ``F.linear``.

    The probe names its device and dtype and leaves any dispatch mode: the first call may come while
    a model is built under ``torch.device("meta")`` (config validation) or another default dtype,
    and its answer is kept for the process.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with _disable_current_modes():
            x, w, b = (torch.randn(*s, device="cpu", dtype=torch.float32) for s in _PROBE)
            return torch.allclose(onednn_matmul(x, w, b), F.linear(x, w, b), atol=1e-5)
    except (AttributeError, RuntimeError):
        return False


_PROBE = ((5, 7), (3, 7), (3,))

#: model keyword arguments that pick kernels for this machine, not the architecture: left out of the
#: model.json an export carries, and free to change when a run resumes
KERNEL_KWARGS = ("cpu_linear",)


def architecture_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` without :data:`KERNEL_KWARGS` (what an exported model.json records)."""
    return {k: v for k, v in kwargs.items() if k not in KERNEL_KWARGS}


@functools.cache
def cpu_vendor() -> str:
    """The CPU vendor string from /proc/cpuinfo (``AuthenticAMD``, ``GenuineIntel``), or ``""``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def resolve_cpu_linear(choice: str) -> str:
    """``onednn`` or ``aten`` for a :data:`CPU_LINEAR_CHOICES` value on this machine."""
    if choice not in CPU_LINEAR_CHOICES:
        raise FacemaeError(
            f"cpu_linear={choice!r} is not one of {', '.join(CPU_LINEAR_CHOICES)}: "
            "set model.kwargs.cpu_linear"
        )
    if choice == "auto":
        # MKL's own kernels are tuned for Intel CPUs; elsewhere (AMD) oneDNN is the fast path
        vendor = cpu_vendor()
        return (
            "onednn"
            if vendor and vendor != "GenuineIntel" and onednn_linear_available()
            else "aten"
        )
    if choice == "onednn" and not onednn_linear_available():
        raise FacemaeError(
            "cpu_linear=onednn: this PyTorch build has no usable oneDNN linear kernel; "
            "set model.kwargs.cpu_linear=auto"
        )
    return choice


class _OneDNNLinearFunction(torch.autograd.Function):
    """``F.linear`` with oneDNN matmuls in the forward and in both backward products."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_matmul(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second-order use fails loudly
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = onednn_matmul(grad_out, weight.t(), None) if need_x else None
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_w = onednn_matmul(rows.t(), x.reshape(-1, x.shape[-1]).t(), None) if need_w else None
        grad_b = rows.sum(0) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b


def _eager_fp32_cpu(x: Tensor, weight: Tensor) -> bool:
    """Whether a replacement kernel may run: fp32 CPU tensors in plain eager mode (not autocast,
    ``torch.compile``, ONNX/TorchScript tracing, or a dispatch mode such as a FLOP counter, all of
    which expect ATen's own ops), and a non-empty input."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and _get_current_dispatch_mode() is None
        and x.numel() > 0  # oneDNN has no primitive for an empty weight-gradient product
    )


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The Function on 2-D rows, reshaped outside it: oneDNN returns N-D results as views, and a
    custom Function's view output could not be modified in place (an in-place ReLU after it)."""
    rows = _OneDNNLinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return rows.reshape(*x.shape[:-1], weight.shape[0])


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose fp32 CPU products run on oneDNN (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        if _eager_fp32_cpu(x, self.weight):
            return _onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_onednn_linears(module: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` in ``module`` into a :class:`OneDNNLinear`, in place.

    Parameters, buffers and state-dict keys are unchanged. Returns how many layers were converted.
    """
    count = 0
    for layer in module.modules():
        if type(layer) is nn.Linear:
            layer.__class__ = OneDNNLinear
            count += 1
    return count


class _PReLUFunction(torch.autograd.Function):
    """PReLU with ATen's forward and a backward of vectorised passes (no ``torch.where``, which is as
    slow as the kernel it would replace on the CPU)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        return torch._prelu_kernel(x, _per_channel(weight, x))

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        slope = _per_channel(weight, x)
        positive = x > 0
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # d/dx = 1 where x > 0, else the slope
            grad_x = positive.to(x.dtype).mul_(1.0 - slope).add_(slope).mul_(grad_out)
        if ctx.needs_input_grad[1]:  # d/dslope = x where x <= 0 (a fill, not a product: inf * 0)
            per_element = (grad_out * x).masked_fill_(positive, 0.0)
            dims = [d for d in range(x.dim()) if d != 1 or weight.numel() == 1]
            grad_w = per_element.sum(dims).reshape(weight.shape)
        return grad_x, grad_w


def _per_channel(weight: Tensor, x: Tensor) -> Tensor:
    """The slope shaped to broadcast over ``x`` (channels on axis 1), as ``F.prelu`` does."""
    if weight.numel() == 1:
        return weight.reshape(())
    return weight.reshape(1, -1, *([1] * (x.dim() - 2)))


class PReLU(nn.PReLU):
    """``nn.PReLU`` whose CPU backward is ~6x faster (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        if _eager_fp32_cpu(x, self.weight) and x.dim() >= 2:
            return _PReLUFunction.apply(x, self.weight)
        return F.prelu(x, self.weight)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that runs a 1x1, stride-1 convolution of a channels-last fp32 CPU input as a
    matmul over the channels (see the module docstring); every other case is ``nn.Conv2d``'s."""

    def _pointwise(self) -> bool:
        return (
            self.kernel_size == (1, 1)
            and self.stride == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.padding in ((0, 0), "valid")
        )

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and self._pointwise()
            and _eager_fp32_cpu(x, self.weight)
        ):
            pixels = x.permute(0, 2, 3, 1)  # (N, H, W, C), contiguous: no copy
            weight = self.weight.flatten(1)
            if resolve_cpu_linear("auto") == "onednn":
                out = _onednn_linear(pixels, weight, self.bias)
            else:
                out = F.linear(pixels, weight, self.bias)
            return out.permute(0, 3, 1, 2)  # channels-last NCHW, as the convolution returns
        return super().forward(x)

"""oneDNN linear layers: the same values and gradients as nn.Linear, and the fallbacks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from facemae_dist.errors import FacemaeError
from facemae_dist.models import cpu_kernels
from facemae_dist.models.cpu_kernels import (
    Conv2d,
    OneDNNLinear,
    PReLU,
    onednn_linear_available,
    resolve_cpu_linear,
    use_onednn_linears,
)
from facemae_dist.models.mae import FaceMAE

needs_onednn = pytest.mark.skipif(
    not onednn_linear_available(), reason="no oneDNN linear kernel in this build"
)
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mae" / "tiny_cpu.yaml"
MICRO = dict(embed_dim=64, depth=2, num_heads=4, decoder_dim=32, decoder_depth=1, decoder_heads=4)


def _pair(bias: bool) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    plain = nn.Linear(48, 80, bias=bias)
    fast = nn.Linear(48, 80, bias=bias)
    fast.load_state_dict(plain.state_dict())
    assert use_onednn_linears(fast) == 1
    return plain, fast


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(6, 48), (3, 5, 48)])
def test_values_and_all_gradients_match_nn_linear(bias: bool, shape: tuple[int, ...]) -> None:
    plain, fast = _pair(bias)
    assert isinstance(fast, OneDNNLinear)
    x = torch.randn(*shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    grad = torch.randn(*shape[:-1], 80)
    y, y2 = plain(x), fast(x2)
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)
    y.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    for p, q in zip(plain.parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_input_without_grad_and_frozen_weight() -> None:
    _, fast = _pair(True)
    fast.weight.requires_grad_(False)
    x = torch.randn(4, 48)
    fast(x).sum().backward()
    assert fast.weight.grad is None and fast.bias.grad is not None


@needs_onednn
def test_falls_back_for_autocast_bf16_and_empty_batches() -> None:
    plain, fast = _pair(True)
    x = torch.randn(4, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(x).dtype == torch.bfloat16
    assert fast(torch.randn(0, 48, requires_grad=True)).shape == (0, 80)
    fast.to(torch.bfloat16)
    assert fast(x.bfloat16()).dtype == torch.bfloat16


def test_state_dict_is_the_same_as_nn_linear() -> None:
    plain, fast = _pair(True)
    assert list(fast.state_dict()) == list(plain.state_dict())


def test_resolve_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_cpu_linear("aten") == "aten"
    with pytest.raises(FacemaeError, match="model.kwargs.cpu_linear"):
        resolve_cpu_linear("mkl")
    monkeypatch.setattr(cpu_kernels, "cpu_vendor", lambda: "GenuineIntel")
    assert resolve_cpu_linear("auto") == "aten"
    monkeypatch.setattr(cpu_kernels, "cpu_vendor", lambda: "AuthenticAMD")
    assert resolve_cpu_linear("auto") == ("onednn" if onednn_linear_available() else "aten")


@needs_onednn
def test_facemae_with_onednn_linears_trains_like_the_default_kernels() -> None:
    torch.manual_seed(0)
    aten = FaceMAE(**MICRO, cpu_linear="aten")
    fast = FaceMAE(**MICRO, cpu_linear="onednn")
    fast.load_state_dict(aten.state_dict())
    assert not any(isinstance(m, OneDNNLinear) for m in aten.modules())
    converted = sum(isinstance(m, OneDNNLinear) for m in fast.modules())
    assert converted == sum(type(m) is nn.Linear for m in aten.modules()) > 0
    images = torch.randn(4, 3, 112, 112)
    out_a = aten(images, generator=torch.Generator().manual_seed(3))
    out_f = fast(images, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out_f.loss, out_a.loss, rtol=1e-5, atol=1e-6)
    out_a.loss.backward()
    out_f.loss.backward()
    for (name, p), q in zip(aten.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@needs_onednn
def test_vit_backbone_takes_the_same_choice() -> None:
    from facemae_dist.models.backbones import build_backbone

    torch.manual_seed(0)
    aten = build_backbone("vit_t_p16", 64, cpu_linear="aten").eval()
    fast = build_backbone("vit_t_p16", 64, cpu_linear="onednn").eval()
    fast.load_state_dict(aten.state_dict())
    assert any(isinstance(m, OneDNNLinear) for m in fast.modules())
    x = torch.randn(2, 3, 112, 112)
    torch.testing.assert_close(fast(x), aten(x), rtol=1e-4, atol=1e-5)


@needs_onednn
def test_flop_counter_sees_the_same_flops() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    def flops(model: nn.Module) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            model(
                torch.randn(2, 3, 112, 112), generator=torch.Generator().manual_seed(0)
            ).loss.backward()
        return counter.get_total_flops()

    torch.manual_seed(0)
    assert (
        flops(FaceMAE(**MICRO, cpu_linear="onednn"))
        == flops(FaceMAE(**MICRO, cpu_linear="aten"))
        > 0
    )


@pytest.mark.parametrize(
    ("channels", "shape", "channels_last"),
    [
        (6, (4, 6, 5, 7), False),
        (6, (4, 6, 5, 7), True),
        (1, (4, 6, 5, 7), False),
        (6, (9, 6), False),
    ],
)
@pytest.mark.parametrize("train_slope", [True, False])
def test_prelu_matches_nn_prelu(
    channels: int, shape: tuple[int, ...], channels_last: bool, train_slope: bool
) -> None:
    torch.manual_seed(0)
    plain, fast = nn.PReLU(channels), PReLU(channels)
    with torch.no_grad():  # slopes of both signs and above 1, as a trained PReLU may have
        plain.weight.copy_(torch.linspace(-0.5, 1.5, channels))
    fast.load_state_dict(plain.state_dict())
    for m in (plain, fast):
        m.weight.requires_grad_(train_slope)
    x = torch.randn(*shape)
    x[0, 0] = 0.0  # the kink: both give the slope's side
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    grad = torch.randn(*shape)
    ya, yb = plain(xa), fast(xb)
    torch.testing.assert_close(yb, ya, rtol=0, atol=0)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-6, atol=1e-7)
    if train_slope:
        torch.testing.assert_close(fast.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
    else:
        assert fast.weight.grad is None


def test_backbones_use_the_fast_prelu_and_conv() -> None:
    from facemae_dist.models.backbones import build_backbone

    for name in ("mobilefacenet", "iresnet18", "tiny"):
        modules = list(build_backbone(name).modules())
        prelus = [m for m in modules if isinstance(m, nn.PReLU)]
        assert all(type(m) is PReLU for m in prelus) and (prelus or name == "tiny")
        assert all(type(m) is Conv2d for m in modules if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("batch", [2, 20])  # ATen's slow path below 16 on one thread, oneDNN above
@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv_matches_nn_conv2d(batch: int, bias: bool) -> None:
    torch.manual_seed(0)
    plain, fast = nn.Conv2d(24, 40, 1, bias=bias), Conv2d(24, 40, 1, bias=bias)
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(batch, 24, 6, 5).contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = plain(xa), fast(xb)
    assert yb.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)
    for p, q in zip(plain.parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-4)


def test_other_convs_are_nn_conv2d(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(nn.Conv2d, "forward", lambda self, x: calls.append(1) or x)
    x_cl = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    Conv2d(8, 8, 3, padding=1)(x_cl)  # 3x3
    Conv2d(8, 8, 1, stride=2)(x_cl)  # strided
    Conv2d(8, 8, 1, groups=2)(x_cl)  # grouped
    Conv2d(8, 8, 1)(torch.randn(2, 8, 6, 6))  # NCHW input
    assert len(calls) == 4
    Conv2d(8, 8, 1)(x_cl)
    assert len(calls) == 4  # the pointwise channels-last case is the matmul


def test_availability_probe_ignores_a_meta_default_device_and_dtype() -> None:
    # validate() builds the model under torch.device("meta") first; that answer is kept
    expected = onednn_linear_available()
    onednn_linear_available.cache_clear()
    try:
        with torch.device("meta"):
            assert onednn_linear_available() == expected
        onednn_linear_available.cache_clear()
        torch.set_default_dtype(torch.float64)
        assert onednn_linear_available() == expected
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.device("meta"):
        built = FaceMAE(**MICRO)
    assert any(isinstance(m, OneDNNLinear) for m in built.modules()) == (
        resolve_cpu_linear("auto") == "onednn"
    )


@needs_onednn
def test_outputs_can_be_modified_in_place() -> None:
    _, fast = _pair(True)
    x = torch.randn(2, 3, 48, requires_grad=True)
    fast(x).relu_().sum().backward()  # 3-D: oneDNN's result is a view
    conv = Conv2d(8, 8, 1)
    y = conv(torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last))
    torch.relu_(y).sum().backward()
    assert x.grad is not None and conv.weight.grad is not None


@needs_onednn
def test_second_order_gradients_fail_loudly() -> None:
    _, fast = _pair(True)
    x = torch.randn(4, 48, requires_grad=True)
    (grad,) = torch.autograd.grad(fast(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_prelu_slope_gradient_is_finite_where_x_is_infinite() -> None:
    fast = PReLU(1)
    x = torch.tensor([[float("inf"), -1.0, 2.0]])
    fast(x).sum().backward()
    assert fast.weight.grad.tolist() == [-1.0]


def test_kernel_choice_is_no_architecture(tmp_path) -> None:
    from facemae_dist.config import load_config, save_config
    from facemae_dist.engine.loop import resume_changes
    from facemae_dist.engine.pretrain import PretrainConfig
    from facemae_dist.models.cpu_kernels import architecture_kwargs

    assert architecture_kwargs({"cpu_linear": "onednn", "decoder_dim": 64}) == {"decoder_dim": 64}
    (tmp_path / "checkpoints/step-00000010").mkdir(parents=True)
    (tmp_path / "checkpoints/latest").write_text("step-00000010")
    base = ["data.train=x", f"run.out_dir={tmp_path}", "irm.weight=0"]
    save_config(load_config(PretrainConfig, CONFIG, base), tmp_path / "config.yaml")
    kernels = load_config(PretrainConfig, CONFIG, [*base, "model.kwargs.cpu_linear=aten"])
    assert resume_changes(kernels, tmp_path) == ["model.kwargs.cpu_linear None -> 'aten'"]

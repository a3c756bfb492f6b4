"""Recognition backbones: registry, shapes, the iResNet layout, ONNX export."""

from __future__ import annotations

import sys

import pytest
import torch

from facemae_dist.errors import FacemaeError
from facemae_dist.models.backbones import build_backbone, export_onnx, list_backbones

#: cheap enough to run forward + backward at batch 2 on a 2-core CPU
FORWARD = {"tiny", "mobilefacenet", "iresnet18", "vit_t_p8", "vit_t_p16"}

#: parameter counts in millions (ArcFace publishes r18 24.0, r34 34.1, r50 43.6, r100 65.2;
#: MobileFaceNet ~1.0 plus the 512-d head)
PARAMS_M = {
    "iresnet18": 24.0,
    "iresnet34": 34.1,
    "iresnet50": 43.6,
    "iresnet100": 65.2,
    "mobilefacenet": 1.2,
}


def test_registry_names() -> None:
    names = list_backbones()
    for expected in (
        "iresnet18",
        "iresnet50",
        "iresnet100",
        "mobilefacenet",
        "vit_t_p8",
        "vit_s_p16",
        "vit_b_p16",
        "tiny",
    ):
        assert expected in names


@pytest.mark.parametrize("name", list_backbones())
def test_build_every_backbone(name: str) -> None:
    if (
        name not in FORWARD
    ):  # big nets: check the layout only, built on the meta device (no init cost)
        with torch.device("meta"):
            model = build_backbone(name)
    else:
        torch.manual_seed(0)
        model = build_backbone(name)
    params = sum(p.numel() for p in model.parameters())
    assert params > 0
    if name in PARAMS_M:
        assert params / 1e6 == pytest.approx(PARAMS_M[name], abs=0.15)
    if name not in FORWARD:
        return
    x = torch.randn(2, 3, 112, 112, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 512)
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    model.eval()
    with torch.inference_mode():
        assert model(x.detach()).shape == (2, 512)


@pytest.mark.parametrize("name", ["tiny", "mobilefacenet", "iresnet18", "vit_t_p16"])
def test_embedding_size(name: str) -> None:
    with torch.device("meta"):
        model = build_backbone(name, embedding_size=128)
        assert model(torch.zeros(2, 3, 112, 112)).shape == (2, 128)


def test_iresnet_reaches_7x7_with_512_channels() -> None:
    model = build_backbone("iresnet18").eval()
    seen = {}
    model.bn2.register_forward_hook(lambda m, i, o: seen.update(map=o.shape))
    with torch.inference_mode():
        model(torch.zeros(1, 3, 112, 112))
    assert seen["map"] == (1, 512, 7, 7)
    assert model.fc.in_features == 512 * 7 * 7
    assert not model.features.weight.requires_grad  # ArcFace: BN1d scale frozen at 1


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(FacemaeError, match="unknown backbone 'resnet9000'.*iresnet50.*tiny"):
        build_backbone("resnet9000")


def test_kwargs_reach_the_model() -> None:
    model = build_backbone("iresnet18", embedding_size=64, dropout=0.2)
    assert model.dropout.p == 0.2 and model.features.num_features == 64


@pytest.mark.parametrize("name", ["tiny", "mobilefacenet", "vit_t_p16"])
def test_onnx_export_matches_pytorch(name: str, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = build_backbone(name)
    # move BN statistics away from (0, 1) so the check covers them
    with torch.no_grad():
        model.train()
        model(torch.randn(8, 3, 112, 112) * 0.5)
    diff = export_onnx(model, tmp_path / f"{name}.onnx")  # checked at batch 3, traced at 2
    assert diff <= 1e-4
    assert model.training  # mode restored
    assert (tmp_path / f"{name}.onnx").stat().st_size > 0


def test_onnx_export_without_onnxruntime(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(FacemaeError, match="pip install onnx onnxruntime"):
        export_onnx(build_backbone("tiny"), tmp_path / "x.onnx")

"""FaceMAE model: masking, patches, loss, reconstruction, registry, and the fast path's equivalence."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from facemae_dist.errors import FacemaeError
from facemae_dist.models.mae import (
    ENCODER_PRESETS,
    FaceMAE,
    Masking,
    patchify,
    random_masking,
    unpatchify,
)

MICRO = dict(embed_dim=32, depth=2, num_heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2)


def small_model(**kwargs) -> FaceMAE:
    torch.manual_seed(0)
    return FaceMAE(**{**MICRO, **kwargs}).eval()


def images(b: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, 112, 112, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- masking


@pytest.mark.parametrize("num_patches", [49, 196])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_exact_visible_count_per_sample(num_patches: int, ratio: float) -> None:
    m = random_masking(8, num_patches, ratio, gen())
    keep = int(num_patches * (1 - ratio))
    assert m.ids_keep.shape == (8, keep) and m.ids_masked.shape == (8, num_patches - keep)
    assert ((1 - m.mask).sum(1) == keep).all()
    for row in range(8):
        ids = torch.cat([m.ids_keep[row], m.ids_masked[row]]).sort().values
        assert torch.equal(ids, torch.arange(num_patches))
        assert (m.mask[row, m.ids_keep[row]] == 0).all() and (
            m.mask[row, m.ids_masked[row]] == 1
        ).all()


def test_masks_independent_per_sample() -> None:
    m = random_masking(16, 49, 0.75, gen())
    assert len({tuple(r.tolist()) for r in m.mask}) == 16


def test_masks_reproducible_from_generator_seed() -> None:
    model = small_model()
    x = images()
    a, b, c = (model(x, generator=gen(s)) for s in (3, 3, 4))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.pred, b.pred) and a.loss == b.loss
    assert not torch.equal(a.mask, c.mask)
    _, mask = model.reconstruct(x, generator=gen(3))
    assert torch.equal(mask, a.mask)


def test_a_mask_ratio_that_leaves_no_patch_is_named() -> None:
    model = FaceMAE(embed_dim=32, depth=1, num_heads=2, decoder_dim=32, decoder_depth=1,
                    decoder_heads=2, patch_size=16)  # fmt: skip
    with pytest.raises(FacemaeError, match="leaves no visible patch of 49: use at most 0.9796"):
        model(torch.randn(2, 3, 112, 112), 0.99)
    assert model(torch.randn(2, 3, 112, 112), 0.979).loss.isfinite()  # one patch visible


def test_invalid_mask_ratio() -> None:
    with pytest.raises(FacemaeError, match="mask_ratio"):
        random_masking(2, 49, 1.0)
    with pytest.raises(FacemaeError, match="mask_ratio"):
        FaceMAE(**MICRO, mask_ratio=-0.1)


# ----------------------------------------------------------------------------- patches


@pytest.mark.parametrize("p", [8, 16])
def test_patchify_round_trip_and_order(p: int) -> None:
    x = images(2)
    patches = patchify(x, p)
    assert patches.shape == (2, (112 // p) ** 2, p * p * 3)
    assert torch.equal(unpatchify(patches, p), x)
    # patch 1 is the second patch of the first row, pixels in (row, column, channel) order
    assert torch.equal(patches[1, 1], x[1, :, :p, p : 2 * p].permute(1, 2, 0).reshape(-1))


def test_masked_images_blanks_masked_patches_only() -> None:
    model, x = small_model(), images()
    m = model.random_masking(4, generator=gen())
    out = model.patchify(model.masked_images(x, m.mask, fill=0.5))
    vis = m.mask[..., None] < 0.5
    assert torch.equal(out, torch.where(vis, model.patchify(x), torch.full_like(out, 0.5)))


# ----------------------------------------------------------------------------- loss


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_depends_on_masked_targets_only(norm_pix: bool) -> None:
    """With the prediction fixed, the loss ignores the targets of visible patches and equals the MAE
    formula ``sum(mean_pix((pred - target)^2) * mask) / sum(mask)``. (Through ``forward`` visible pixels
    also feed the encoder, so the end-to-end loss does change with them; that is not the claim.)"""
    model, x = small_model(norm_pix_loss=norm_pix), images()
    m = model.random_masking(4, generator=gen())
    patches = model.patchify(x)
    pred = torch.randn_like(patches, requires_grad=True)
    loss = model.forward_loss(patches, pred, m)
    vis = (m.mask < 0.5)[..., None]
    changed_vis = torch.where(vis, torch.randn_like(patches), patches)
    assert torch.equal(model.forward_loss(changed_vis, pred, m), loss)
    changed_masked = torch.where(vis, patches, torch.randn_like(patches))
    assert model.forward_loss(changed_masked, pred, m) != loss
    target = patches
    if norm_pix:
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
        target = (patches - mean) / (var + 1e-6) ** 0.5
    manual = (((pred - target) ** 2).mean(-1) * m.mask).sum() / m.mask.sum()
    torch.testing.assert_close(loss, manual, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert (pred.grad[vis.expand_as(pred)] == 0).all()


def test_gradients_flow_to_every_parameter() -> None:
    model = small_model().train()
    model(images(), generator=gen()).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    names = {n for n, _ in model.named_parameters()}
    assert "pos_embed" not in names and "decoder_pos_embed" not in names
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


# ----------------------------------------------------------------------------- reconstruction


@pytest.mark.parametrize("norm_pix", [False, True])
def test_reconstruct_keeps_visible_patches_exactly(norm_pix: bool) -> None:
    model, x = small_model(norm_pix_loss=norm_pix), images()
    recon, mask = model.reconstruct(x, 0.75, generator=gen())
    assert recon.shape == x.shape and mask.shape == (4, 49)
    vis = (mask < 0.5)[..., None].expand(-1, -1, model.patch_dim)
    assert torch.equal(model.patchify(recon)[vis], model.patchify(x)[vis])
    raw, _ = model.reconstruct(x, 0.75, generator=gen(), paste_visible=False)
    assert not torch.equal(model.patchify(raw)[vis], model.patchify(x)[vis])
    assert torch.equal(model.patchify(raw)[~vis], model.patchify(recon)[~vis])


def test_reconstruct_matches_forward_pred() -> None:
    model, x = small_model(), images()
    out = model(x, generator=gen())
    recon, _ = model.reconstruct(x, generator=gen(), paste_visible=False)
    torch.testing.assert_close(recon, model.unpatchify(out.pred))
    torch.testing.assert_close(
        model.images_from_pred(x, out.pred, out.mask), model.reconstruct(x, generator=gen())[0]
    )


def test_norm_pix_denormalises_masked_patches_with_visible_statistics() -> None:
    """A masked patch predicted as 0 (its normalised mean) comes out as the average mean of the visible
    patches of that image; a visible patch predicted as 0 comes out as its own mean."""
    model, x = small_model(norm_pix_loss=True), images()
    m = model.random_masking(4, generator=gen())
    patches = model.patchify(x)
    pixels = model.pred_to_pixels(torch.zeros_like(patches), patches, m.mask)
    means = patches.mean(-1)
    vis = m.mask < 0.5
    for b in range(4):
        expected = means[b][vis[b]].mean()
        torch.testing.assert_close(
            pixels[b][~vis[b]], expected.expand(int((~vis[b]).sum()), model.patch_dim)
        )
        torch.testing.assert_close(
            pixels[b][vis[b]], means[b][vis[b]][:, None].expand(-1, model.patch_dim)
        )


def test_reconstruct_is_differentiable() -> None:
    model = small_model().train()
    recon, mask = model.reconstruct(images(), generator=gen())
    (recon * (1 + torch.arange(3.0)[:, None, None])).square().mean().backward()
    assert model.decoder_pred.weight.grad.abs().sum() > 0
    assert model.patch_embed.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- equivalence


def slow_forward(model: FaceMAE, x: torch.Tensor, m: Masking) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward MAE computation with the model's weights and the same mask."""
    p, d = model.patch_size, model.embed_dim
    kernel = model.patch_embed.weight.reshape(d, p, p, 3).permute(0, 3, 1, 2)
    tokens = F.conv2d(x, kernel, model.patch_embed.bias, stride=p).flatten(2).transpose(1, 2)
    tokens = tokens + model.pos_embed[1:]
    idx = m.ids_keep[..., None].expand(-1, -1, d)
    h = torch.gather(tokens, 1, idx)
    c = model.num_prefix
    if c:
        cls = (model.cls_token + model.pos_embed[:1]).expand(x.shape[0], -1, -1)
        h = torch.cat([cls, h], 1)
    for blk in model.blocks:
        h = blk(h)
    h = model.decoder_embed(model.norm(h))
    ids_shuffle = torch.cat([m.ids_keep, m.ids_masked], 1)
    ids_restore = torch.argsort(ids_shuffle, 1)
    masked = model.mask_token.expand(x.shape[0], m.ids_masked.shape[1], -1)
    seq = torch.cat([h[:, c:], masked], 1)
    seq = torch.gather(seq, 1, ids_restore[..., None].expand(-1, -1, h.shape[2]))
    h = torch.cat([h[:, :c], seq], 1) + model.decoder_pos_embed[1 - c :]
    for blk in model.decoder_blocks:
        h = blk(h)
    pred = model.decoder_pred(model.decoder_norm(h))[:, c:]
    target = patchify(x, p)
    if model.norm_pix_loss:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    loss = (((pred - target) ** 2).mean(-1) * m.mask).sum() / m.mask.sum()
    return loss, pred


@pytest.mark.parametrize("cls_token", [False, True])
@pytest.mark.parametrize("patch", [8, 16])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_fast_path_equals_straightforward_computation(
    patch: int, norm_pix: bool, cls_token: bool
) -> None:
    model = small_model(patch_size=patch, norm_pix_loss=norm_pix, cls_token=cls_token)
    x = images()
    m = model.random_masking(4, generator=gen(7))
    out = model(x, masking=m)
    loss, pred = slow_forward(model, x, m)
    torch.testing.assert_close(out.pred, pred, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss, loss, rtol=0, atol=1e-5)
    assert torch.equal(out.mask, m.mask)


# ----------------------------------------------------------------------------- registry

NAMES = [
    "facemae_vit_micro_patch16_112",
    "facemae_vit_tiny_patch16_112",
    "facemae_vit_tiny_patch8_112",
    "facemae_vit_small_patch16_112",
    "facemae_vit_small_patch8_112",
    "facemae_vit_base_patch16_112",
    "facemae_vit_base_patch8_112",
    "facemae_vit_large_patch16_112",
    "facemae_vit_large_patch8_112",
]


def test_registry_lists_presets() -> None:
    assert sorted(timm.list_models("facemae*")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_create_model_builds_each_preset(name: str) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost for the large presets
        model = timm.create_model(name, decoder_dim=256, decoder_depth=3, decoder_heads=8)
    preset = name.split("_")[2]
    width, depth, heads = ENCODER_PRESETS[preset]
    assert isinstance(model, FaceMAE) and model.embed_dim == width and len(model.blocks) == depth
    assert model.blocks[0].attn.num_heads == heads
    assert model.patch_size == int(name.split("patch")[1].split("_")[0])
    assert model.decoder_dim == 256 and len(model.decoder_blocks) == 3


def test_create_model_micro_runs() -> None:
    model = timm.create_model("facemae_vit_micro_patch16_112", norm_pix_loss=True, mask_ratio=0.5)
    assert model.embed_dim == 128 and len(model.blocks) == 4 and model.decoder_dim == 128
    out = model(images(2), generator=gen())
    assert out.pred.shape == (2, 49, 768) and out.mask.sum() == 2 * (49 - 24)
    assert torch.isfinite(out.loss)
    with pytest.raises(FacemaeError, match="pretrained"):
        timm.create_model("facemae_vit_micro_patch16_112", pretrained=True)


@pytest.mark.parametrize("cls_token", [False, True])
def test_exports_with_and_without_cls_token_load(tmp_path, cls_token: bool) -> None:
    """Runs exported before the cls token became optional carry one; load_facemae detects it."""
    import json

    from safetensors.torch import save_file

    from facemae_dist.engine.pretrain import load_facemae

    model = timm.create_model("facemae_vit_micro_patch16_112", cls_token=cls_token)
    save_file(model.state_dict(), str(tmp_path / "facemae.safetensors"))
    meta = {"name": "facemae_vit_micro_patch16_112", "kwargs": {"img_size": 112}}
    (tmp_path / "model.json").write_text(json.dumps(meta))
    loaded = load_facemae(tmp_path)
    assert (loaded.cls_token is not None) == cls_token
    x, m = images(2), model.random_masking(2, generator=gen(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, masking=m).pred, model.eval()(x, masking=m).pred)

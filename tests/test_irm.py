"""Instance relation matching: values, gradients, frozen teacher, options, teacher loading."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from facemae_dist.errors import FacemaeError
from facemae_dist.losses.irm import IRMLoss, load_teacher, relation_kl, total_loss
from facemae_dist.models.mae import FaceMAE

MICRO = dict(embed_dim=32, depth=2, num_heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2)


def teacher(seed: int = 0) -> nn.Module:
    """A tiny conv net (with BatchNorm, so eval mode matters) mapping faces to 16-d embeddings."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=4),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 16),
    )


def faces(b: int = 6, seed: int = 0) -> torch.Tensor:
    """Smooth random images (4x4 blocks upsampled) in [-1, 1]: their embeddings differ clearly."""
    coarse = torch.rand(b, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return nn.functional.interpolate(coarse, size=112, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("direction", ["forward", "reverse", "symmetric", "js"])
def test_zero_when_reconstruction_equals_original(direction: str) -> None:
    irm = IRMLoss(teacher(), direction=direction)
    x = faces()
    assert irm(x, x.clone()).abs().item() < 1e-6


@pytest.mark.parametrize("direction", ["forward", "reverse", "symmetric", "js"])
def test_positive_when_reconstruction_differs(direction: str) -> None:
    irm = IRMLoss(teacher(), direction=direction)
    x = faces()
    assert irm(x, faces(seed=1)).item() > 1e-4


def test_gradient_reaches_reconstruction_not_teacher() -> None:
    t = teacher()
    irm = IRMLoss(t).train()
    assert not t.training  # stays in eval mode through .train()
    x, rec = faces(), faces(seed=1).requires_grad_(True)
    irm(x, rec).backward()
    assert rec.grad is not None and rec.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in t.parameters())
    assert not t.training


def test_gradient_reaches_mae_decoder_through_reconstruct() -> None:
    torch.manual_seed(0)
    mae = FaceMAE(**MICRO).train()
    t = teacher()
    irm = IRMLoss(t)
    x = faces()
    recon, _ = mae.reconstruct(x, generator=torch.Generator().manual_seed(0))
    irm(x, recon).backward()
    for name, p in mae.named_parameters():
        if name.startswith("decoder"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in t.parameters())
    assert not t.training


def manual_irm(orig: list[list[float]], recon: list[list[float]], tau: float) -> float:
    """Forward KL between off-diagonal cosine-softmax rows, written out with Python floats."""

    def cos(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    def rows(e: list[list[float]]) -> list[list[float]]:
        out = []
        for i in range(len(e)):
            logits = [cos(e[i], e[j]) / tau for j in range(len(e)) if j != i]
            z = sum(math.exp(v) for v in logits)
            out.append([math.exp(v) / z for v in logits])
        return out

    p_rows, q_rows = rows(orig), rows(recon)
    kls = [
        sum(p * math.log(p / q) for p, q in zip(pr, qr, strict=True))
        for pr, qr in zip(p_rows, q_rows, strict=True)
    ]
    return sum(kls) / len(kls)


def test_matches_hand_computation_with_diagonal_excluded() -> None:
    orig = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.2]]
    recon = [[1.0, 0.1], [0.0, 1.0], [0.7, 0.7], [-0.5, -0.5]]
    got = relation_kl(torch.tensor(orig), torch.tensor(recon), temperature=0.5)
    assert got.item() == pytest.approx(manual_irm(orig, recon, 0.5), rel=1e-5)
    # with self pairs kept (cos = 1 on the diagonal) the value would differ
    full = torch.tensor(orig), torch.tensor(recon)
    p = torch.log_softmax(
        nn.functional.cosine_similarity(full[0][:, None], full[0][None], -1) / 0.5, 1
    )
    q = torch.log_softmax(
        nn.functional.cosine_similarity(full[1][:, None], full[1][None], -1) / 0.5, 1
    )
    with_diag = (p.exp() * (p - q)).sum(1).mean()
    assert abs(with_diag.item() - got.item()) > 1e-3


def test_direction_options() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    fwd = relation_kl(a, b, direction="forward")
    rev = relation_kl(a, b, direction="reverse")
    sym = relation_kl(a, b, direction="symmetric")
    js = relation_kl(a, b, direction="js")
    assert fwd.item() > 0 and rev.item() > 0 and abs(fwd.item() - rev.item()) > 1e-4
    assert sym.item() == pytest.approx(0.5 * (fwd.item() + rev.item()), rel=1e-5)
    assert 0 < js.item() < math.log(2)
    assert relation_kl(b, a, direction="reverse").item() == pytest.approx(fwd.item(), rel=1e-5)
    assert relation_kl(b, a, direction="js").item() == pytest.approx(js.item(), rel=1e-5)


def test_original_side_is_detached() -> None:
    a, b = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    relation_kl(a, b).backward()
    assert a.grad is None and b.grad is not None


def test_similarity_options() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    scale = torch.linspace(0.5, 3.0, 6)[:, None]
    cos = relation_kl(a, b, similarity="cosine")
    assert relation_kl(a * scale, b, similarity="cosine").item() == pytest.approx(
        cos.item(), rel=1e-5
    )
    assert relation_kl(a * scale, b, similarity="dot").item() != pytest.approx(
        relation_kl(a, b, similarity="dot").item(), rel=1e-3
    )


@pytest.mark.parametrize("batch", [1, 2])
def test_batches_without_relations_are_zero_and_backward_works(batch: int) -> None:
    """Self-pairs excluded, a row of 2 faces holds one logit: its softmax is 1 whatever the faces."""
    irm = IRMLoss(teacher())
    rec = faces(batch).requires_grad_(True)
    loss = irm(faces(batch), rec)
    assert loss.item() == 0.0
    loss.backward()
    assert relation_kl(torch.randn(3, 8), torch.randn(3, 8)).item() > 0  # 3 faces relate


def test_invalid_options() -> None:
    with pytest.raises(FacemaeError, match="similarity"):
        IRMLoss(teacher(), similarity="l2")
    with pytest.raises(FacemaeError, match="direction"):
        relation_kl(torch.randn(3, 4), torch.randn(3, 4), direction="sideways")
    with pytest.raises(FacemaeError, match="temperature"):
        IRMLoss(teacher(), temperature=0.0)


def test_total_loss() -> None:
    mse, irm = torch.tensor(2.0), torch.tensor(3.0)
    assert total_loss(mse, irm, 1.0, 0.5).item() == pytest.approx(3.5)
    assert total_loss(mse, None, 2.0, 1.0).item() == pytest.approx(4.0)
    assert total_loss(mse, irm, 1.0, 0.0).item() == pytest.approx(2.0)


def test_load_teacher(tmp_path) -> None:
    with pytest.raises(FacemaeError, match="IRM needs a teacher"):
        load_teacher(tmp_path / "missing.safetensors", teacher)
    src = teacher(seed=3)
    path = tmp_path / "recog.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    before = path.read_bytes()
    loaded = load_teacher(str(path), teacher)
    for (k, v), w in zip(src.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert path.read_bytes() == before
    with pytest.raises(FacemaeError, match="does not match") as err:
        load_teacher(path, lambda: nn.Linear(4, 4))
    assert "missing, e.g. bias" in str(err.value) and "\n" not in str(err.value)
    wider = lambda: nn.Sequential(*list(teacher())[:-1], nn.Linear(32, 17))  # noqa: E731
    with pytest.raises(
        FacemaeError, match=r"2 of other shape, e.g. 5.weight \(16, 32\) vs \(17, 32\)"
    ):
        load_teacher(path, wider)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FacemaeError, match="cannot read"):
        load_teacher(tmp_path / "junk.safetensors", teacher)


def test_speed_options_keep_the_value() -> None:
    """Channels-last input is the same computation; a bf16 teacher is close, and still frozen."""
    x, rec = faces(), faces(seed=1)
    plain = IRMLoss(teacher(), channels_last=False)(x, rec)
    fast = IRMLoss(teacher())(x, rec)
    assert fast.item() == pytest.approx(plain.item(), rel=1e-4)
    t = teacher()
    rec.requires_grad_(True)
    bf16 = IRMLoss(t, autocast_dtype=torch.bfloat16)(x, rec)
    assert bf16.dtype == torch.float32 and bf16.item() == pytest.approx(plain.item(), rel=0.1)
    bf16.backward()
    assert rec.grad is not None and all(p.grad is None for p in t.parameters())


def test_teacher_weights_cast_once_keep_the_value_and_the_gradient_path() -> None:
    x, rec = faces(), faces(seed=1).requires_grad_(True)
    t = teacher()
    plain = IRMLoss(teacher())(x, rec.detach())
    cast = IRMLoss(t, teacher_dtype=torch.bfloat16)
    value = cast(x, rec)  # float32 images in, as MAETask hands them
    assert value.dtype == torch.float32 and value.item() == pytest.approx(plain.item(), rel=0.1)
    value.backward()
    assert rec.grad is not None and rec.grad.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in t.parameters())


def test_precomputed_original_embeddings() -> None:
    t = teacher()
    irm = IRMLoss(t)
    x, rec = faces(), faces(seed=1)
    with torch.no_grad():
        emb = irm.embed(x)
    assert irm(None, rec, emb_original=emb).item() == pytest.approx(irm(x, rec).item(), rel=1e-6)


@pytest.mark.parametrize("arch", ["tiny", "mobilefacenet"])
def test_batchnorm_folding_keeps_the_teacher_output(arch: str) -> None:
    from facemae_dist.losses.irm import fold_batchnorm, freeze
    from facemae_dist.models.backbones import build_backbone

    torch.manual_seed(0)
    net = build_backbone(arch, 64)
    for m in net.modules():  # non-trivial running statistics, as after training
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    net = freeze(net)
    x = faces(4)
    with torch.no_grad():
        before = net(x)
        bns = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        after = fold_batchnorm(net)(x)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) < bns
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert all(not p.requires_grad for p in net.parameters())


def test_teacher_precision_follows_the_engine_or_the_config(tmp_path) -> None:
    from safetensors.torch import save_file

    from facemae_dist.engine.pretrain import IRMConfig, PretrainConfig, build_irm, validate
    from facemae_dist.models.backbones import build_backbone

    path = tmp_path / "teacher.safetensors"
    save_file(build_backbone("tiny", 32).state_dict(), str(path))
    cfg = IRMConfig(teacher=str(path), teacher_arch="tiny", teacher_embedding=32)
    assert build_irm(cfg, torch.device("cpu"), "fp32").autocast_dtype is None
    assert build_irm(cfg, torch.device("cpu"), "bf16").autocast_dtype == torch.bfloat16
    cfg.teacher_precision = "bf16"
    assert build_irm(cfg, torch.device("cpu"), "fp32").autocast_dtype == torch.bfloat16
    cfg.teacher_precision = "bf16-weights"  # cast once, no autocast
    irm = build_irm(cfg, torch.device("cpu"), "fp32")
    assert irm.autocast_dtype is None and irm.teacher_dtype == torch.bfloat16
    bad = PretrainConfig()
    bad.data.train = "/nonexistent"  # checked after the IRM options
    bad.irm = IRMConfig(weight=0.0, teacher_precision="fp16")
    with pytest.raises(FacemaeError, match="irm.teacher_precision must be"):
        validate(bad, 1)


def test_compiled_teacher_gives_the_eager_loss_and_gradient(tmp_path) -> None:
    """irm.teacher_compile (auto = on GPUs, where it cut IRM's overhead): the same IRM value and
    gradient to the reconstruction, still nothing for the teacher's weights."""
    import copy

    from facemae_dist.engine.pretrain import IRMConfig, PretrainConfig, compile_teacher, validate

    t = teacher()
    x, rec = faces(), faces(seed=1)
    rec_eager, rec_compiled = rec.clone().requires_grad_(), rec.clone().requires_grad_()
    eager = IRMLoss(t)(x, rec_eager)
    compiled = IRMLoss(copy.deepcopy(t), compile_teacher=True)
    value = compiled(x, rec_compiled)
    eager.backward()
    value.backward()
    assert value.item() == pytest.approx(eager.item(), rel=1e-5)
    torch.testing.assert_close(rec_compiled.grad, rec_eager.grad, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in compiled.teacher.parameters())
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert [compile_teacher("auto", cpu), compile_teacher("auto", gpu)] == [False, True]
    assert [compile_teacher(True, cpu), compile_teacher(False, gpu)] == [True, False]
    bad = PretrainConfig()
    bad.data.train = "/nonexistent"  # checked after the IRM options
    bad.irm = IRMConfig(weight=0.0, teacher_compile="yes")
    with pytest.raises(FacemaeError, match="irm.teacher_compile must be auto, true or false"):
        validate(bad, 1)


def test_pretrain_checks_irm_options_and_the_teacher_architecture_before_start(tmp_path) -> None:
    """validate() (before any process group) rejects bad IRM options, and a teacher whose
    model.json (written by `facemae train`) disagrees with the irm.teacher_arch/teacher_embedding
    the config sets, in one line that gives the right overrides."""
    import json
    from pathlib import Path

    from facemae_dist.config import load_config
    from facemae_dist.engine.pretrain import PretrainConfig, validate

    config = Path(__file__).resolve().parents[1] / "configs/mae/tiny_cpu.yaml"
    data = f"data.train={tmp_path / 'no-shards'}"  # every check below comes before the shards'
    bad = {
        "irm.direction=sideways": "irm.direction must be one of",
        "irm.similarity=l2": "irm.similarity must be one of",
        "irm.temperature=0": "irm.temperature must be > 0",
    }
    for override, message in bad.items():
        with pytest.raises(FacemaeError, match=message):
            validate(load_config(PretrainConfig, config, [data, override]), 1)
    run = tmp_path / "recog-tiny"  # what `facemae train` exports (the weights are not read here)
    run.mkdir()
    (run / "backbone.safetensors").write_bytes(b"")
    meta = {"backbone": "tiny", "embedding_size": 128, "kwargs": {}}
    (run / "model.json").write_text(json.dumps(meta))
    irm = ["irm.weight=1", f"irm.teacher={run / 'backbone.safetensors'}"]
    with pytest.raises(FacemaeError) as err:
        validate(load_config(PretrainConfig, config, [data, *irm, "irm.teacher_embedding=512"]), 1)
    assert "set irm.teacher_arch=tiny irm.teacher_embedding=128" in str(err.value)
    assert "irm.teacher_embedding=512" in str(err.value) and "\n" not in str(err.value)
    assert "irm.teacher_arch=tiny:" not in str(err.value)  # names only what disagrees
    with pytest.raises(FacemaeError, match="sets irm.teacher_arch=iresnet50: set irm.teacher_arch"):
        validate(load_config(PretrainConfig, config, [data, *irm, "irm.teacher_arch=iresnet50"]), 1)
    right = [*irm, "irm.teacher_embedding=128"]
    with pytest.raises(FacemaeError, match="no shard manifest"):  # the teacher passed
        validate(load_config(PretrainConfig, config, [data, *right]), 1)
    meta["kwargs"] = {"width": 8}  # a teacher trained with backbone options
    (run / "model.json").write_text(json.dumps(meta))
    with pytest.raises(FacemaeError, match=r"backbone options \{'width': 8\}.*irm.teacher_kwargs"):
        validate(load_config(PretrainConfig, config, [data, *right, "irm.teacher_kwargs={}"]), 1)
    with pytest.raises(FacemaeError, match="no shard manifest"):
        validate(
            load_config(PretrainConfig, config, [data, *right, "irm.teacher_kwargs={width: 8}"]), 1
        )
    with pytest.raises(FacemaeError, match="no shard manifest"):  # unset: read from model.json
        validate(load_config(PretrainConfig, config, [data, *right]), 1)
    with pytest.raises(FacemaeError, match="each rank gets 2 .* IRM is always 0"):
        validate(load_config(PretrainConfig, config, [data, *right]), 8)  # 16 faces / 8 ranks


def test_unset_teacher_architecture_is_read_from_the_teachers_model_json(tmp_path) -> None:
    """irm.teacher_arch / teacher_embedding / teacher_kwargs left unset (the defaults, and null in
    configs/mae/_base_mae.yaml) come from the teacher's model.json: validate() fills them in, so the
    run's config.yaml records them; without a model.json the documented fallback applies."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from facemae_dist.config import load_config
    from facemae_dist.engine.pretrain import (
        FALLBACK_TEACHER,
        IRMConfig,
        PretrainConfig,
        build_irm,
        teacher_backbone,
        validate,
    )
    from facemae_dist.models.backbones import build_backbone

    assert (IRMConfig().teacher_arch, IRMConfig().teacher_embedding) == (None, None)
    run = tmp_path / "recog"
    run.mkdir()
    save_file(build_backbone("tiny", 48, stem=16).state_dict(), str(run / "backbone.safetensors"))
    meta = {"backbone": "tiny", "embedding_size": 48, "kwargs": {"stem": 16}}
    (run / "model.json").write_text(json.dumps(meta))
    config = Path(__file__).resolve().parents[1] / "configs/mae/vit_b8_casia.yaml"  # a base: chain
    over = [f"data.train={tmp_path / 'no-shards'}", "irm.weight=1", f"irm.teacher={run}"]
    cfg = load_config(PretrainConfig, config, over)
    assert cfg.irm.teacher_arch is None and cfg.irm.teacher_kwargs is None
    assert teacher_backbone(cfg.irm) == ("tiny", 48, {"stem": 16})
    with pytest.raises(FacemaeError, match="no shard manifest"):  # the teacher passed
        validate(cfg, 1)
    assert (cfg.irm.teacher_arch, cfg.irm.teacher_embedding, cfg.irm.teacher_kwargs) == (
        "tiny",
        48,
        {"stem": 16},
    )
    assert build_irm(IRMConfig(teacher=str(run)), torch.device("cpu")) is not None  # loads
    # no model.json (a teacher exported elsewhere, or none named: a cost table): the fallback
    assert teacher_backbone(IRMConfig()) == (*FALLBACK_TEACHER, {})
    (run / "model.json").unlink()
    assert teacher_backbone(IRMConfig(teacher=str(run))) == (*FALLBACK_TEACHER, {})
    assert teacher_backbone(IRMConfig(teacher=str(run), teacher_arch="tiny")) == (
        "tiny",
        FALLBACK_TEACHER[1],
        {},
    )


def test_folding_skips_batch_statistics_and_handles_plain_batchnorm() -> None:
    from facemae_dist.losses.irm import fold_batchnorm

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False),  # no scale/shift: folds as 1 and 0
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),  # batch stats: kept
        nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.BatchNorm1d(5, affine=False),
    )  # fmt: skip
    net.train()
    for _ in range(3):
        net(torch.randn(6, 3, 8, 8))  # running statistics that are not 0/1
    net.eval()
    x = torch.randn(6, 3, 8, 8)
    before = net(x)
    fold_batchnorm(net)
    assert isinstance(net[1], nn.Identity) and isinstance(net[6], nn.Identity)
    assert isinstance(net[3], nn.BatchNorm2d)
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)


def test_irm_teacher_may_be_a_train_run_folder(tmp_path) -> None:
    """irm.teacher=RUN (a finished `facemae train` folder) means RUN/backbone.safetensors; a folder
    without it says which file to pass."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from facemae_dist.config import load_config
    from facemae_dist.engine.pretrain import IRMConfig, PretrainConfig, build_irm, validate
    from facemae_dist.models.backbones import build_backbone

    run = tmp_path / "recog"
    run.mkdir()
    save_file(build_backbone("tiny", 32).state_dict(), str(run / "backbone.safetensors"))
    (run / "model.json").write_text(
        json.dumps({"backbone": "tiny", "embedding_size": 32, "kwargs": {}})
    )
    config = Path(__file__).resolve().parents[1] / "configs/mae/tiny_cpu.yaml"
    data = f"data.train={tmp_path / 'no-shards'}"
    irm = ["irm.weight=1", f"irm.teacher={run}", "irm.teacher_arch=tiny"]
    with pytest.raises(FacemaeError, match="irm.teacher_embedding=32"):  # model.json was read
        validate(load_config(PretrainConfig, config, [data, *irm, "irm.teacher_embedding=64"]), 1)
    with pytest.raises(FacemaeError, match="no shard manifest"):  # the teacher passed
        validate(load_config(PretrainConfig, config, [data, *irm, "irm.teacher_embedding=32"]), 1)
    cfg = IRMConfig(teacher=str(run), teacher_arch="tiny", teacher_embedding=32)
    assert build_irm(cfg, torch.device("cpu")) is not None
    (run / "backbone.safetensors").unlink()
    with pytest.raises(FacemaeError) as err:
        validate(load_config(PretrainConfig, config, [data, *irm]), 1)
    assert "is a folder without backbone.safetensors: pass the backbone.safetensors" in str(
        err.value
    )

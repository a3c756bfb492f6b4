"""PartialFC on one process: exact vs a dense margin softmax; sampling, optimizer, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facemae_dist.errors import FacemaeError
from facemae_dist.losses.partial_fc import (
    PartialFC,
    PartialFCOptimizer,
    _margin_target,
    resolve_margin,
    shard_range,
)

TOL = dict(rtol=1e-5, atol=1e-5)


def reference_loss(
    emb: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margins: tuple[float, float, float] = (1.0, 0.5, 0.0),
    scale: float = 64.0,
) -> torch.Tensor:
    """Dense full-softmax margin loss written the plain autograd way (the ground truth)."""
    m1, m2, m3 = margins
    cos = F.linear(F.normalize(emb.float()), F.normalize(weight)).clamp(-1, 1)
    target = cos.gather(1, labels[:, None]).squeeze(1)
    theta = torch.acos(target.clamp(-1 + 1e-7, 1 - 1e-7))
    angle = m1 * theta + m2
    fallback = target - math.cos((math.pi - m2) / m1) - 1.0  # linear continuation past pi
    margin_target = torch.where(angle > math.pi, fallback, torch.cos(angle)) - m3
    logits = cos.scatter(1, labels[:, None], margin_target[:, None]) * scale
    return F.cross_entropy(logits, labels)


def make_head(d: int, c: int, **kw) -> PartialFC:
    """A head whose centres have unit-scale norms, so gradients are O(1) and 1e-5 is meaningful."""
    head = PartialFC(d, c, **kw)
    head.weight = torch.randn(head.num_local, d)
    return head


@pytest.mark.parametrize("classes", [1, 2, 7, 100, 1001])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_tile_the_classes(classes: int, world: int) -> None:
    ranges = [shard_range(classes, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == classes
    for r, (start, end) in enumerate(ranges):
        assert end - start == classes // world + (r < classes % world)
        if r:
            assert start == ranges[r - 1][1]
    head = PartialFC(4, classes, rank=world - 1, world_size=world)
    assert head.class_range == ranges[-1] and head.weight.shape == (head.num_local, 4)


@pytest.mark.parametrize("margins", [(1.0, 0.5, 0.0), (1.0, 0.3, 0.2), (1.2, 0.3, 0.0)])
def test_margin_target_never_pushes_a_sample_from_its_centre(margins) -> None:
    """Past m1*theta + m2 = pi the true derivative of cos(.) changes sign; the target continues so
    that raising the cosine to the own centre always raises the target logit."""
    cos = torch.cos(torch.linspace(0.01, math.pi - 0.01, 2000, dtype=torch.float64))
    target, grad = _margin_target(cos, margins)
    assert (grad >= 0).all()
    assert (target.diff() <= 1e-12).all()  # cos falls along the grid: so must the target
    hard = torch.tensor([math.cos(math.radians(170.0))], dtype=torch.float64)
    value, slope = _margin_target(hard, (1.0, 0.5, 0.0))
    assert slope.item() == 1.0 and value.item() == pytest.approx(hard.item() + math.cos(0.5) - 1)


def test_margin_presets() -> None:
    assert resolve_margin("arcface") == (1.0, 0.5, 0.0)
    assert resolve_margin("cosface") == (1.0, 0.0, 0.4)
    assert resolve_margin("cosface", m3=0.35) == (1.0, 0.0, 0.35)
    assert resolve_margin("combined", 0.9, 0.4, 0.15) == (0.9, 0.4, 0.15)
    assert resolve_margin((1.0, 0.3, 0.2)) == (1.0, 0.3, 0.2)


@pytest.mark.parametrize(
    "margin", ["arcface", "cosface", "softmax", (0.9, 0.4, 0.15), (1.0, 0.5, 0.0)]
)
def test_full_softmax_is_exact(margin) -> None:
    torch.manual_seed(0)
    head = make_head(32, 53, margin=margin)
    emb = torch.randn(12, 32, requires_grad=True)
    labels = torch.randint(0, 53, (12,))
    loss = head(emb, labels)
    loss.backward()

    weight = head.weight.clone().requires_grad_(True)
    ref_emb = emb.detach().clone().requires_grad_(True)
    ref = reference_loss(ref_emb, weight, labels, head.margins)
    ref.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(emb.grad, ref_emb.grad, **TOL)
    torch.testing.assert_close(head.sub_weight.grad, weight.grad, **TOL)
    assert head.weight_index is None  # sample_rate 1: the leaf aliases the shard, no copy


def test_bf16_embeddings_use_fp32_math() -> None:
    torch.manual_seed(1)
    head = make_head(16, 40)
    emb = torch.randn(8, 16).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 40, (8,))
    loss = head(emb, labels)
    loss.backward()
    ref_emb = emb.detach().float().requires_grad_(True)
    ref = reference_loss(ref_emb, head.weight, labels)
    ref.backward()
    assert loss.dtype == torch.float32 and emb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(emb.grad, ref_emb.grad.bfloat16())


def test_sampling_keeps_positives_and_is_exact_on_sampled_classes() -> None:
    torch.manual_seed(2)
    head = make_head(16, 200, sample_rate=0.1)
    emb = torch.randn(8, 16, requires_grad=True)
    labels = torch.randint(0, 200, (8,))
    loss = head(emb, labels)
    loss.backward()

    index = head.weight_index
    assert index.numel() == 20 and bool((index[1:] > index[:-1]).all())
    assert set(labels.tolist()) <= set(index.tolist())
    sub = head.weight[index].clone().requires_grad_(True)
    ref_emb = emb.detach().clone().requires_grad_(True)
    ref = reference_loss(ref_emb, sub, torch.searchsorted(index, labels))
    ref.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(emb.grad, ref_emb.grad, **TOL)
    torch.testing.assert_close(head.sub_weight.grad, sub.grad, **TOL)


def test_positives_beyond_the_sample_size_are_all_kept() -> None:
    head = make_head(8, 100, sample_rate=0.05)  # 5 sampled rows, 16 distinct positives
    labels = torch.arange(0, 96, 6)
    head(torch.randn(16, 8), labels)
    assert head.weight_index.tolist() == labels.tolist()


def _run_steps(head, opt, ref_w, ref_opt, steps: int = 3) -> None:
    for step in range(steps):
        torch.manual_seed(100 + step)
        emb, labels = (
            torch.randn(10, head.embedding_size),
            torch.randint(0, head.num_classes, (10,)),
        )
        opt.zero_grad()
        head(emb, labels).backward()
        opt.step()
        ref_opt.zero_grad()
        reference_loss(emb, ref_w, labels).backward()
        ref_opt.step()


def test_sgd_matches_torch_sgd_at_rate_1() -> None:
    torch.manual_seed(3)
    head = make_head(16, 30)
    ref_w = torch.nn.Parameter(head.weight.clone())
    opt = PartialFCOptimizer(head, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    ref_opt = torch.optim.SGD([ref_w], lr=0.1, momentum=0.9, weight_decay=5e-4)
    _run_steps(head, opt, ref_w, ref_opt)
    torch.testing.assert_close(head.weight, ref_w.detach(), **TOL)
    momentum = ref_opt.state[ref_w]["momentum_buffer"]
    torch.testing.assert_close(head.state_rows["momentum_buffer"], momentum, **TOL)


def test_adamw_matches_torch_adamw_at_rate_1() -> None:
    torch.manual_seed(4)
    head = make_head(16, 30)
    ref_w = torch.nn.Parameter(head.weight.clone())
    opt = PartialFCOptimizer(head, "adamw", lr=1e-2, weight_decay=0.05, betas=(0.9, 0.95))
    ref_opt = torch.optim.AdamW([ref_w], lr=1e-2, weight_decay=0.05, betas=(0.9, 0.95))
    _run_steps(head, opt, ref_w, ref_opt)
    torch.testing.assert_close(head.weight, ref_w.detach(), **TOL)
    assert head.state_rows["step"].tolist() == [3] * 30


def test_lr_scheduler_drives_the_head_optimizer() -> None:
    head = make_head(8, 10)
    opt = PartialFCOptimizer(head, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    head(torch.randn(4, 8), torch.arange(4)).backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_sparse_step_touches_only_sampled_rows(kind: str) -> None:
    torch.manual_seed(5)
    head = make_head(8, 100, sample_rate=0.2)
    opt = PartialFCOptimizer(head, kind, lr=0.1, weight_decay=0.1)
    before = head.weight.clone()
    head(torch.randn(6, 8), torch.randint(0, 100, (6,))).backward()
    index, grad = head.weight_index, head.sub_weight.grad.clone()
    opt.step()
    untouched = torch.ones(100, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(head.weight[untouched], before[untouched])
    for name, rows in head.state_rows.items():
        assert not rows[untouched].any(), name
    if kind == "sgd":  # first step: buf = g + wd*w, w -= lr*buf
        expected = before[index] - 0.1 * (grad + 0.1 * before[index])
    else:  # first AdamW step: bias-corrected m / sqrt(v) = g / |g|
        expected = before[index] * (1 - 0.1 * 0.1) - 0.1 * grad / (grad.abs() + 1e-8)
    torch.testing.assert_close(head.weight[index], expected, **TOL)


def test_buffers_are_reused_across_steps() -> None:
    """Sampled rows and their gradient live in buffers kept between steps (no page faults)."""
    torch.manual_seed(9)
    head = make_head(8, 400, sample_rate=0.1)
    opt = PartialFCOptimizer(head)
    pointers = []
    for _ in range(3):
        head(torch.randn(6, 8), torch.randint(0, 400, (6,))).backward()
        pointers.append((head.sub_weight.data_ptr(), head.sub_weight.grad.data_ptr()))
        opt.step()
    assert pointers[1] == pointers[2]


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_a_validation_pass_under_inference_mode_leaves_training_working(rate: float) -> None:
    """Buffers made under torch.inference_mode cannot be written by a training step: they are not
    kept for reuse (a larger validation batch used to replace the training buffers and crash)."""
    torch.manual_seed(3)
    head = make_head(8, 20, sample_rate=rate)
    opt = PartialFCOptimizer(head)
    head(torch.randn(4, 8), torch.randint(0, 20, (4,))).backward()
    opt.step()
    with torch.inference_mode():
        head.eval()(torch.randn(16, 8), torch.randint(0, 20, (16,)))
    loss = head.train()(torch.randn(4, 8), torch.randint(0, 20, (4,)))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_eval_mode_freezes_centres_not_embeddings() -> None:
    head = make_head(8, 20).eval()
    emb = torch.randn(4, 8, requires_grad=True)
    head(emb, torch.arange(4)).backward()
    assert emb.grad is not None and not head.sub_weight.requires_grad
    assert head.pop_update() is None


def test_gradient_accumulation_merges_sampled_rows() -> None:
    torch.manual_seed(6)
    head = make_head(8, 60, sample_rate=0.25)
    opt = PartialFCOptimizer(head, "sgd", lr=0.5, momentum=0.0, weight_decay=0.0)
    before = head.weight.clone()
    expected = before.clone()
    for _ in range(2):
        head(torch.randn(5, 8), torch.randint(0, 60, (5,))).backward()
        expected.index_add_(0, head.weight_index, head.sub_weight.grad, alpha=-0.5)
    opt.step()
    torch.testing.assert_close(head.weight, expected, **TOL)


def test_two_forwards_one_backward_steps_both() -> None:
    """e.g. two crops per image: loss1 + loss2, one backward; each forward samples its own rows."""
    torch.manual_seed(10)
    head = make_head(8, 60, sample_rate=0.25)
    opt = PartialFCOptimizer(head, "sgd", lr=0.5, momentum=0.0, weight_decay=0.0)
    expected = head.weight.clone()
    leaves = []
    total = 0
    for _ in range(2):
        total = total + head(torch.randn(5, 8), torch.randint(0, 60, (5,)))
        leaves.append((head.weight_index, head.sub_weight))
    total.backward()
    for index, leaf in leaves:
        expected.index_add_(0, index, leaf.grad, alpha=-0.5)
    opt.step()
    torch.testing.assert_close(head.weight, expected, **TOL)


def test_forwards_without_backward_leave_nothing_to_step() -> None:
    head = make_head(8, 20)
    opt = PartialFCOptimizer(head)
    with torch.no_grad():
        head(torch.randn(4, 8), torch.arange(4))
    head(torch.randn(4, 8), torch.arange(4))  # grad mode, never backpropagated
    before = head.weight.clone()
    loss = head(torch.randn(4, 8), torch.arange(4))
    opt.zero_grad()  # between forward and backward: must not drop this step
    loss.backward()
    opt.step()
    assert not torch.equal(head.weight, before)
    before = head.weight.clone()
    opt.step()  # nothing pending
    assert torch.equal(head.weight, before)


def _stepped_head(classes: int, rank: int = 0, world: int = 1) -> PartialFC:
    head = make_head(8, classes, rank=rank, world_size=world)
    opt = PartialFCOptimizer(head, "adamw", lr=0.01)
    head(torch.randn(4, 8), torch.randint(*head.class_range, (4,))).backward()
    opt.step()
    return head


def test_reshard_offline_1_to_3_to_1() -> None:
    torch.manual_seed(7)
    one = _stepped_head(23)
    state = one.local_state_dict()
    assert (state["class_start"], state["class_end"], state["num_classes"]) == (0, 23, 23)
    three = [PartialFC(8, 23, rank=r, world_size=3) for r in range(3)]
    for head in three:
        head.load_sharded([state])
    assert [h.num_local for h in three] == [8, 8, 7]
    torch.testing.assert_close(torch.cat([h.weight for h in three]), one.weight, rtol=0, atol=0)
    for name, rows in one.state_rows.items():
        torch.testing.assert_close(torch.cat([h.state_rows[name] for h in three]), rows)
    back = PartialFC(8, 23)
    back.load_sharded([h.local_state_dict() for h in reversed(three)])  # order does not matter
    assert torch.equal(back.weight, one.weight)
    assert back.weight.data_ptr() != one.weight.data_ptr()


def test_module_state_dict_round_trip() -> None:
    torch.manual_seed(8)
    head = _stepped_head(15)
    saved = head.state_dict()
    assert set(saved) == {"_extra_state"}
    same = PartialFC(8, 15)
    same.load_state_dict(saved)
    assert torch.equal(same.weight, head.weight)
    same.double()  # dtype casts leave the fp32 shard and its optimizer rows alone
    assert same.weight.dtype == torch.float32 and set(same.state_rows) == set(head.state_rows)
    second_half = PartialFC(8, 15, rank=1, world_size=2)  # a full shard covers any rank's range
    second_half.load_state_dict(saved)
    assert torch.equal(second_half.weight, head.weight[8:])
    second_half.weight.add_(1.0)  # loading never aliases the source
    assert not torch.equal(second_half.weight, head.weight[8:])


def test_sampler_state_continues_the_negative_sampling() -> None:
    emb, labels = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    head = PartialFC(8, 100, sample_rate=0.2, seed=3)
    head(emb, labels)
    saved = head.sampler_state()
    head(emb, labels)
    resumed = PartialFC(8, 100, sample_rate=0.2, seed=3)
    resumed.load_sampler_state(saved)
    resumed(emb, labels)
    assert torch.equal(resumed.weight_index, head.weight_index)
    fresh = PartialFC(8, 100, sample_rate=0.2, seed=3)  # without the state: the first draw again
    fresh.load_sampler_state({**saved, "device": "cuda"})  # another device's layout: left seeded
    fresh(emb, labels)
    assert not torch.equal(fresh.weight_index, head.weight_index)


def test_reshard_errors_name_the_gap() -> None:
    halves = [PartialFC(8, 20, rank=r, world_size=2).local_state_dict() for r in range(2)]
    with pytest.raises(FacemaeError, match=r"\[10, 20\)"):
        PartialFC(8, 20).load_sharded(halves[:1])
    with pytest.raises(FacemaeError, match="wrong checkpoint"):
        PartialFC(8, 21).load_sharded(halves)
    with pytest.raises(FacemaeError, match="load_sharded"):
        PartialFC(8, 20, rank=0, world_size=2).load_local_state_dict(halves[1])


def test_user_errors_are_facemae_errors() -> None:
    with pytest.raises(FacemaeError, match="sample_rate"):
        PartialFC(8, 10, sample_rate=0.0)
    with pytest.raises(FacemaeError, match="unknown margin"):
        PartialFC(8, 10, margin="sphereface")
    head = PartialFC(8, 10)
    with pytest.raises(FacemaeError, match="num_classes"):
        head(torch.randn(2, 8), torch.tensor([3, 10]))
    with pytest.raises(FacemaeError, match=r"\(batch, 8\)"):
        head(torch.randn(2, 9), torch.tensor([3, 4]))
    with pytest.raises(FacemaeError, match="no process group"):
        PartialFC(8, 10, rank=0, world_size=2)(torch.randn(2, 8), torch.tensor([1, 2]))
    with pytest.raises(FacemaeError, match="kind"):
        PartialFCOptimizer(head, "lamb")

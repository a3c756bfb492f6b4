"""PartialFC on 2 gloo ranks against a single-process dense reference; all checks in ONE launch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from test_partial_fc import reference_loss

from facemae_dist.losses.partial_fc import PartialFC, PartialFCOptimizer

D, B = 16, 6  # embedding size, per-rank batch


def _global_batch(seed: int, classes: int):
    """The same global batch on every rank (same seed); each rank feeds its own slice."""
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(2 * B, D, generator=gen)
    labels = torch.randint(0, classes, (2 * B,), generator=gen)
    weight = torch.randn(classes, D, generator=gen)
    return emb, labels, weight


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max error relative to the reference's scale (floor 1), for a 1e-5 bound."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def _exact_full_softmax(rank: int, classes: int, margin, scale_dp: bool) -> dict[str, float]:
    emb, labels, weight = _global_batch(classes, classes)
    head = PartialFC(D, classes, margin=margin, compensate_dp_mean=scale_dp)
    start, end = head.class_range
    head.weight = weight[start:end].clone()
    mine = slice(rank * B, (rank + 1) * B)
    local = emb[mine].clone().requires_grad_(True)
    loss = head(local, labels[mine])
    loss.backward()
    ref_w, ref_e = weight.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    ref = reference_loss(ref_e, ref_w, labels, head.margins)
    ref.backward()
    factor = 2.0 if scale_dp else 1.0
    return {
        "loss": _err(loss, ref),
        "emb_grad": _err(local.grad, ref_e.grad[mine] * factor),
        "weight_grad": _err(head.sub_weight.grad, ref_w.grad[start:end]),
    }


def _sampled(rank: int) -> dict[str, float]:
    """rate 0.3: local positives always sampled; loss exact over the union of sampled classes."""
    classes = 101
    emb, labels, weight = _global_batch(7, classes)
    head = PartialFC(D, classes, sample_rate=0.3)
    start, end = head.class_range
    head.weight = weight[start:end].clone()
    mine = slice(rank * B, (rank + 1) * B)
    local = emb[mine].clone().requires_grad_(True)
    loss = head(local, labels[mine])
    loss.backward()
    sampled = head.weight_index + start
    positives = {c for c in labels.tolist() if start <= c < end}
    union = [None, None]
    dist.all_gather_object(union, sampled)
    union = torch.cat(union)
    ref_w, ref_e = weight[union].clone().requires_grad_(True), emb.clone().requires_grad_(True)
    ref = reference_loss(ref_e, ref_w, torch.searchsorted(union, labels))
    ref.backward()
    mask = (union >= start) & (union < end)
    return {
        "positives_missing": float(len(positives - set(sampled.tolist()))),
        "sample_size": float(sampled.numel() - max(int(0.3 * head.num_local), len(positives))),
        "loss": _err(loss, ref),
        "emb_grad": _err(local.grad, ref_e.grad[mine]),
        "weight_grad": _err(head.sub_weight.grad, ref_w.grad[mask]),
    }


def _sgd_then_reshard(rank: int) -> dict[str, float]:
    """2 SGD steps on 2 ranks == torch SGD on the dense weight; then resume 2 -> 1 and 1 -> 2."""
    classes = 29
    _, _, weight = _global_batch(11, classes)
    head = PartialFC(D, classes)
    start, end = head.class_range
    head.weight = weight[start:end].clone()
    opt = PartialFCOptimizer(head, lr=0.2, momentum=0.9, weight_decay=5e-4)
    ref_w = torch.nn.Parameter(weight.clone())
    ref_opt = torch.optim.SGD([ref_w], lr=0.2, momentum=0.9, weight_decay=5e-4)
    mine = slice(rank * B, (rank + 1) * B)
    for step in range(2):
        emb, labels, _ = _global_batch(100 + step, classes)
        head(emb[mine], labels[mine]).backward()
        opt.step()
        ref_opt.zero_grad()
        reference_loss(emb, ref_w, labels).backward()
        ref_opt.step()
    out = {"sgd_weight": _err(head.weight, ref_w[start:end])}

    shards = [None, None]
    dist.all_gather_object(shards, head.local_state_dict())
    single = PartialFC(D, classes, rank=0, world_size=1)  # resume on 1 rank: no collectives
    single.load_sharded(shards)
    out["momentum_2to1"] = _err(
        single.state_rows["momentum_buffer"], ref_opt.state[ref_w]["momentum_buffer"]
    )
    emb, labels, _ = _global_batch(200, classes)
    loss_two = head(emb[mine], labels[mine])
    out["loss_2to1"] = _err(single(emb, labels), loss_two)

    again = PartialFC(D, classes)  # and back: the 1-rank shard resumed on 2 ranks
    again.load_sharded([single.local_state_dict()])
    out["loss_1to2"] = _err(again(emb[mine], labels[mine]), loss_two)
    return out


def _empty_shard(rank: int) -> dict[str, float]:
    """1 class on 2 ranks: rank 1 holds nothing and must still take part in the collectives."""
    head = PartialFC(D, 1, sample_rate=0.5)
    opt = PartialFCOptimizer(head)
    emb, _, weight = _global_batch(3, 1)
    head.weight = weight[: head.num_local].clone()
    loss = head(emb[rank * B : (rank + 1) * B], torch.zeros(B, dtype=torch.long))
    loss.backward()
    opt.step()
    ref = reference_loss(emb, weight, torch.zeros(2 * B, dtype=torch.long))
    return {"loss": _err(loss, ref), "num_local": float(head.num_local)}


def _all_checks(rank: int, world: int) -> dict[str, dict[str, float]]:
    torch.set_num_threads(1)
    return {
        "arcface_11": _exact_full_softmax(rank, 11, "arcface", False),
        "combined_1001": _exact_full_softmax(rank, 1001, (0.9, 0.4, 0.15), False),
        "cosface_dp_mean": _exact_full_softmax(rank, 64, "cosface", True),
        "sampled": _sampled(rank),
        "sgd_reshard": _sgd_then_reshard(rank),
        "empty_shard": _empty_shard(rank),
    }


@pytest.mark.dist
def test_partial_fc_on_two_ranks() -> None:
    results = run_ranks(_all_checks)
    for rank, checks in enumerate(results):
        for name, errors in checks.items():
            for key, value in errors.items():
                if key == "num_local":
                    assert value == (1.0 if rank == 0 else 0.0)
                elif key in ("positives_missing", "sample_size"):
                    assert value == 0.0, (rank, name, key)
                else:
                    assert value < 1e-5, (rank, name, key, value)

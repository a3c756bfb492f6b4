"""Sharded partial-FC margin softmax (ArcFace / CosFace / combined) for million-identity heads.

Layout (same as insightface arcface_torch partial FC v2): rank r of W holds the contiguous class
range ``shard_range(C, r, W)`` (``C // W + (r < C % W)`` classes). Each step the embeddings and
labels of the whole global batch are all-gathered; each rank scores them against its own (sampled)
class centres and the softmax cross-entropy is finished with two small all-reduces (row max; row sum
+ target logit), so no rank ever holds more than ``B_global x num_sampled_local`` logits.

What differs from arcface_torch, and why:

* The local centres are a plain fp32 tensor, not a ``Parameter``. Each step the sampled rows are
  copied into a small leaf ``sub_weight``; autograd fills only ``sub_weight.grad`` (k x d) and
  :class:`PartialFCOptimizer` writes the update back into the sampled rows. arcface_torch indexes a
  ``Parameter``, so every step allocates a full (C_local x d) gradient even at sample_rate 0.1.
* Cosine logits, margin and cross-entropy are one autograd function with a hand-written backward:
  the normalised weight is never materialised and the logits buffer is reused for the softmax and
  its gradient.
* Checkpoints carry their class range, so :meth:`PartialFC.reshard` moves a run to another world
  size.
* Math is fp32 whatever the embedding dtype (bf16 embeddings get a bf16 gradient back).
* The margin's gradient is the true derivative of cos(m1*theta + m2) - m3; arcface_torch's
  CombinedMarginLoss applies the ArcFace margin under no_grad (gradient 1 through arccos/cos).
  Where m1*theta + m2 passes pi that derivative changes sign and would push the hardest samples away
  from their own centre, so there the target continues linearly with gradient 1 from its value at
  the turning point (-1 - m3), like insightface ArcFace's cos(theta) - m*sin(m) but continuous.

Sparse-update semantics (documented choice): rows that are not sampled in a step are left exactly as
they are, weight and optimizer state alike (no weight decay, no momentum decay, no momentum-driven
movement) -- "lazy" updates, as in ``torch.optim.SparseAdam``. arcface_torch instead runs a dense
``torch.optim.SGD`` on a gradient that is zero for non-sampled rows, so those rows keep moving with
their decaying momentum and shrink by weight decay every step. With sample_rate 1 every row is
sampled and both agree with plain SGD / AdamW.

Usage::

    head = PartialFC(512, num_classes, sample_rate=0.1)        # rank/world from torch.distributed
    opt = PartialFCOptimizer(head, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss = head(backbone(images), labels)                     # same value on every rank
    loss.backward(); opt.step(); opt.zero_grad()              # the head's own, unsynchronised step
    shard = head.local_state_dict()                           # save one per rank ...
    head.load_sharded(all_saved_shards)                       # ... resume on any world size

``head.sub_weight`` (and its ``.grad``) live in buffers that are reused from the next forward on;
the optimizer consumes the gradient.

Data-parallel note: the gradient that flows back into each rank's local embeddings is the exact
gradient of the global-mean loss. A DDP / DeepSpeed backbone then *averages* its gradients over
ranks, i.e. scales them by 1/W; pass ``compensate_dp_mean=True`` to multiply the embedding gradient
by W (what arcface_torch does).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from facemae_dist.errors import FacemaeError

STATE_FORMAT = "facemae_dist.partial_fc/1"
_NORM_EPS = 1e-12  # as torch.nn.functional.normalize
_ACOS_EPS = 1e-7  # keeps d/dc acos(c) finite at c = +-1
_MARGIN_PRESETS = ("arcface", "cosface", "combined", "softmax")


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the classes held by `rank`: the first C % W ranks get one extra class."""
    base, extra = divmod(num_classes, world_size)
    start = base * rank + min(rank, extra)
    return start, start + base + int(rank < extra)


def resolve_margin(
    margin: str | Sequence[float], m1: float = 1.0, m2: float = 0.5, m3: float = 0.0
) -> tuple[float, float, float]:
    """(m1, m2, m3) of the combined margin cos(m1*theta + m2) - m3 on the target logit.

    Presets take only their own margin: "arcface" uses m2 (default 0.5), "cosface" uses m3 (0.4 when
    left at 0), "combined" uses all three, "softmax" none. A 3-sequence gives (m1, m2, m3) directly.
    """
    if isinstance(margin, str):
        name = margin.lower()
        if name == "arcface":
            return 1.0, float(m2), 0.0
        if name == "cosface":
            return 1.0, 0.0, float(m3) if m3 != 0.0 else 0.4
        if name == "combined":
            return float(m1), float(m2), float(m3)
        if name == "softmax":
            return 1.0, 0.0, 0.0
        raise FacemaeError(
            f"unknown margin {margin!r}: use one of {_MARGIN_PRESETS} or (m1, m2, m3)"
        )
    values = tuple(float(v) for v in margin)
    if len(values) != 3:
        raise FacemaeError(f"margin {margin!r} must be a name or a (m1, m2, m3) triple")
    return values  # type: ignore[return-value]


def _margin_target(cos: torch.Tensor, margins: tuple[float, float, float]):
    """Target logit f(c) = cos(m1*acos(c) + m2) - m3 and its derivative f'(c) (B_target values)."""
    m1, m2, m3 = margins
    if m1 == 1.0 and m2 == 0.0:  # CosFace / plain softmax: no acos, exact gradient 1
        return cos - m3, torch.ones_like(cos)
    theta = torch.acos(cos.clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS))
    angle = m1 * theta + m2
    past_pi = angle > math.pi  # cos(angle) turns back up there: continue linearly, gradient 1
    turn = math.cos((math.pi - m2) / m1)  # the cosine where m1*theta + m2 = pi
    target = torch.where(past_pi, cos - turn - 1.0, torch.cos(angle)) - m3
    grad = torch.where(past_pi, 1.0, m1 * torch.sin(angle) / torch.sin(theta))
    return target, grad


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row dot product without an (n, d) temporary."""
    return torch.einsum("nd,nd->n", a, b)


class _Workspace:
    """Large per-step buffers kept from one step to the next.

    A fresh 100 MB+ tensor costs a page fault per 4 KB on every step (glibc hands big blocks back to
    the OS). Buffers are lent out by `take` and come back by `give`; one that is still lent (e.g.
    during gradient accumulation) is simply not available, and `take` allocates a new one.
    """

    def __init__(self) -> None:
        self._free: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        size = math.prod(shape)
        buf = self._free.pop(name, None)
        if buf is None or buf.numel() < size or buf.device != like.device:
            buf = like.new_empty(size)
        return buf[:size].view(shape)

    def give(self, name: str, tensor: torch.Tensor | None) -> None:
        if tensor is None:
            return
        base = (tensor if tensor._base is None else tensor._base).detach()
        if base.is_inference():  # made under inference_mode: a training step could not write it
            return
        if base.is_contiguous() and base.dtype == torch.float32:
            base = base.view(-1)
            held = self._free.get(name)
            if held is None or held.numel() < base.numel():
                self._free[name] = base

    def clear(self) -> None:
        self._free.clear()


@dataclass(frozen=True)
class _Comm:
    """The process group a sharded head talks over (None is used for a single process)."""

    group: Any
    world: int
    rank: int

    def all_reduce(self, tensor: torch.Tensor, op: Any) -> None:
        dist.all_reduce(tensor, op=op, group=self.group)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather rows; the backward reduce-scatters (sums over ranks, keeps the local slice)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, comm: _Comm, grad_scale: float) -> torch.Tensor:
        ctx.comm, ctx.grad_scale = comm, grad_scale
        return comm.all_gather(local)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        comm: _Comm = ctx.comm
        parts = list(grad.contiguous().chunk(comm.world))
        out = torch.empty_like(parts[comm.rank])
        dist.reduce_scatter(out, parts, group=comm.group)
        if ctx.grad_scale != 1.0:
            out.mul_(ctx.grad_scale)
        return out, None, None


def _softmax_target_stats(
    logits: torch.Tensor, rows: torch.Tensor, target: torch.Tensor, comm: _Comm | None
) -> torch.Tensor:
    """Turn local logits into global softmax probabilities in place; return -log p(target) per row.

    Only (B,) vectors cross ranks: the row max (MAX), then the row sum of exp and the shifted target
    logit (one SUM; each target lives on exactly one rank, the others contribute 0).
    """
    batch = logits.shape[0]
    if logits.shape[1]:
        row_max = logits.amax(dim=1)
    else:  # this rank holds (or sampled) no class
        row_max = logits.new_full((batch,), -math.inf)
    if comm is not None:
        comm.all_reduce(row_max, dist.ReduceOp.MAX)
    stats = logits.new_zeros(2, batch)
    stats[1, rows] = target - row_max[rows]
    logits.sub_(row_max[:, None]).exp_()
    torch.sum(logits, dim=1, out=stats[0])
    if comm is not None:
        comm.all_reduce(stats, dist.ReduceOp.SUM)
    logits.div_(stats[0][:, None])
    return stats[0].log() - stats[1]


class _MarginSoftmaxCE(torch.autograd.Function):
    """mean_i -log softmax(s * margin(cos(e_i, w_j)))[y_i] over the sharded classes, fp32.

    Inputs: gathered embeddings (B, d), local (sampled) centres (k, d), local labels (B,) with -1
    where the target class lives on another rank. The backward is written out so that the normalised
    centres are never materialised: with g_ij = dL/dcos_ij / |w_j|, dW_j = A_j - (A_j . w_j) w_j /
    |w_j|^2 where A = g^T e_hat, and dE_i = (b_i - (b_i . e_hat_i) e_hat_i) / |e_i| where b = g W.
    """

    @staticmethod
    def forward(
        ctx, emb, weight, labels, scale, margins, comm: _Comm | None, ws: _Workspace, track
    ):
        e_norm = emb.norm(dim=1).clamp_min(_NORM_EPS)
        e_hat = emb / e_norm[:, None]
        w_norm = weight.norm(dim=1).clamp_min(_NORM_EPS)
        logits = ws.take("logits", (emb.shape[0], weight.shape[0]), emb)
        torch.mm(e_hat, weight.t(), out=logits)
        # the clamp only cuts rounding beyond +-1: its gradient is taken as 1
        logits.div_(w_norm).clamp_(-1.0, 1.0)
        rows = (labels >= 0).nonzero().squeeze(1)
        cols = labels[rows]
        target, d_target = _margin_target(logits[rows, cols], margins)
        logits.mul_(scale)
        logits[rows, cols] = target * scale
        loss_rows = _softmax_target_stats(logits, rows, target * scale, comm)
        ctx.save_for_backward(logits, e_hat, e_norm, weight, w_norm, rows, cols, d_target)
        ctx.scale, ctx.ws = scale, ws
        if not track:  # no backward will come to hand the buffer back
            ws.give("logits", logits)
        return loss_rows.mean()

    @staticmethod
    def backward(ctx, grad_out):
        probs, e_hat, e_norm, weight, w_norm, rows, cols, d_target = ctx.saved_tensors
        g = probs  # reused in place: a second backward fails the saved-tensor version check
        g[rows, cols] = (g[rows, cols] - 1.0) * d_target
        g.mul_(grad_out * (ctx.scale / g.shape[0]))
        g.div_(w_norm)
        grad_emb = grad_weight = None
        if ctx.needs_input_grad[0]:
            b = torch.mm(g, weight)
            grad_emb = (b - _row_dot(b, e_hat)[:, None] * e_hat).div_(e_norm[:, None])
        if ctx.needs_input_grad[1]:  # written into a lent buffer that autograd adopts as .grad
            grad_weight = ctx.ws.take("grad", tuple(weight.shape), weight)
            torch.mm(g.t(), e_hat, out=grad_weight)
            coef = _row_dot(grad_weight, weight).div_(w_norm.square())
            grad_weight.addcmul_(weight, coef[:, None], value=-1.0)
        ctx.ws.give("logits", g)
        return grad_emb, grad_weight, None, None, None, None, None, None


class _ReadyHook:
    """Post-accumulate-grad hook of a forward's leaf; holds the head weakly (no reference cycle)."""

    def __init__(self, head: PartialFC, index: torch.Tensor | None) -> None:
        self.head, self.index = weakref.ref(head), index

    def __call__(self, leaf: torch.Tensor) -> None:
        head = self.head()
        if head is not None:
            head._grad_ready(self.index, leaf)


@dataclass
class RowUpdate:
    """Gradient for some rows of the local shard: `index` None means all rows (sample_rate 1)."""

    index: torch.Tensor | None
    rows: torch.Tensor  # current values of those rows (an alias of the shard when index is None)
    grad: torch.Tensor


class PartialFC(nn.Module):
    """Sharded margin-softmax head with per-rank negative sampling and its own sparse optimizer.

    ``forward(embeddings (B, d), labels (B,))`` returns the mean loss over the global batch
    (identical on all ranks). Every rank must pass the same batch size (drop_last). Step the centres
    with :class:`PartialFCOptimizer`; keep this module out of DDP / DeepSpeed (its centres are not
    replicated).
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        margin: str | tuple[float, float, float] = "arcface",
        scale: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        rank: int | None = None,
        world_size: int | None = None,
        group: Any = None,
        *,
        compensate_dp_mean: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise FacemaeError(f"sample_rate={sample_rate} must be in (0, 1]")
        if embedding_size <= 0 or num_classes <= 0:
            raise FacemaeError("embedding_size and num_classes must be positive")
        dist_on = dist.is_available() and dist.is_initialized()
        self.world_size = world_size if world_size is not None else _default_world(dist_on, group)
        self.rank = rank if rank is not None else (dist.get_rank(group) if dist_on else 0)
        if not 0 <= self.rank < self.world_size:
            raise FacemaeError(f"rank {self.rank} is outside world size {self.world_size}")
        self.group = group
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.sample_rate, self.scale = float(sample_rate), float(scale)
        self.margins = resolve_margin(margin, m1, m2, m3)
        self.compensate_dp_mean, self.seed = compensate_dp_mean, seed
        self.class_start, self.class_end = shard_range(num_classes, self.rank, self.world_size)
        self.num_sample = int(self.sample_rate * self.num_local)
        init = torch.Generator().manual_seed(seed * 1_000_003 + self.class_start)
        self.weight = torch.normal(0.0, 0.01, (self.num_local, embedding_size), generator=init)
        self.state_rows: dict[str, torch.Tensor] = {}  # optimizer state, one row per local class
        # the leaf of the last forward and its local rows (None: all); valid until the next forward
        self.sub_weight: torch.Tensor | None = None
        self.weight_index: torch.Tensor | None = None
        # (rows, gradient) arrived since the last step (a post-accumulate hook merges them here)
        self._ready: tuple[torch.Tensor | None, torch.Tensor] | None = None
        self._spent: list[tuple[str, torch.Tensor]] = []  # buffers of the last step, to reuse
        self._ws = _Workspace()
        self._sample_gen: torch.Generator | None = None

    # ----------------------------------------------------------------- layout
    @property
    def class_range(self) -> tuple[int, int]:
        """[start, end) of the global class ids held by this rank."""
        return self.class_start, self.class_end

    @property
    def num_local(self) -> int:
        return self.class_end - self.class_start

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"class_range={self.class_range}, sample_rate={self.sample_rate}, "
            f"margins={self.margins}, scale={self.scale}, rank={self.rank}/{self.world_size}"
        )

    # ----------------------------------------------------------------- forward
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean margin-softmax loss over the global batch (fp32 scalar, same value on every rank).

        In train mode (and grad mode) the sampled centres get a gradient for PartialFCOptimizer; in
        eval mode they are frozen while the embeddings still get theirs.
        """
        labels = self._check_inputs(embeddings, labels)
        comm = self._comm()
        self._start_step()
        emb = embeddings.float()  # fp32 math; a bf16 input gets a bf16 gradient back
        if comm is not None:
            scale = float(comm.world) if self.compensate_dp_mean else 1.0
            emb = _GatherWithGrad.apply(emb, comm, scale)
            labels = comm.all_gather(labels)
        local = torch.where(
            (labels >= self.class_start) & (labels < self.class_end), labels - self.class_start, -1
        )
        index, local = self._sample(local)
        sub_weight = self._select_rows(index)
        track = torch.is_grad_enabled() and (emb.requires_grad or sub_weight.requires_grad)
        loss = _MarginSoftmaxCE.apply(
            emb, sub_weight, local, self.scale, self.margins, comm, self._ws, track
        )
        self.sub_weight, self.weight_index = sub_weight, index
        if sub_weight.requires_grad:
            sub_weight.register_post_accumulate_grad_hook(_ReadyHook(self, index))
        elif index is not None:
            self._ws.give("rows", sub_weight)
        return loss

    def _start_step(self) -> None:
        """Reuse the buffers of the last optimizer step."""
        for name, tensor in self._spent:
            self._ws.give(name, tensor)
        self._spent = []

    def _grad_ready(self, index: torch.Tensor | None, leaf: torch.Tensor) -> None:
        """A forward's gradient has arrived: merge it into the one pending for the next step.

        Merging as they come keeps gradient accumulation (or a head never stepped) within one
        (num_local, d) gradient. Each forward is backpropagated at most once (a second backward
        fails the saved-tensor version check), so a leaf never arrives twice.
        """
        if self._ready is None:
            self._ready = (index, leaf.grad)
            return
        (ia, ga), ib, gb = self._ready, index, leaf.grad
        if ia is None:
            self._ready = (None, ga.add_(gb) if ib is None else ga.index_add_(0, ib, gb))
        elif ib is None:
            self._ready = (None, gb.index_add_(0, ia, ga))
        else:
            union, inverse = torch.unique(torch.cat([ia, ib]), return_inverse=True)
            grad = ga.new_zeros(union.numel(), self.embedding_size)
            self._ready = (union, grad.index_add_(0, inverse, torch.cat([ga, gb])))

    def _check_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise FacemaeError(
                f"embeddings of shape {tuple(embeddings.shape)}: "
                f"expected (batch, {self.embedding_size})"
            )
        labels = labels.reshape(-1).long().to(self.weight.device)
        if labels.numel() != embeddings.shape[0]:
            raise FacemaeError(f"{labels.numel()} labels for {embeddings.shape[0]} embeddings")
        if embeddings.device != self.weight.device:
            raise FacemaeError(f"embeddings on {embeddings.device}, head on {self.weight.device}")
        if labels.numel():
            low, high = torch.aminmax(labels)
            if int(low) < 0 or int(high) >= self.num_classes:
                raise FacemaeError(
                    f"labels span [{int(low)}, {int(high)}] but the head has {self.num_classes} "
                    "classes: set num_classes from the training manifest"
                )
        return labels

    def _comm(self) -> _Comm | None:
        if self.world_size == 1:
            return None
        if not (dist.is_available() and dist.is_initialized()):
            raise FacemaeError(
                f"PartialFC built for world_size={self.world_size} but no process group is "
                "initialised: start it through facemae_dist.dist (torchrun / srun) or use "
                "world_size=1"
            )
        actual = dist.get_world_size(self.group)
        if actual != self.world_size:
            raise FacemaeError(
                f"head built for {self.world_size} ranks, process group has {actual}"
            )
        return _Comm(self.group, self.world_size, self.rank)

    def _sample(self, local: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Local positives of the global batch + random negatives: int(rate * n) rows, sorted."""
        if self.num_sample >= self.num_local:
            return None, local
        hit = local >= 0
        positive = torch.unique(local[hit])  # sorted
        if positive.numel() >= self.num_sample:
            index = positive
        else:
            scores = torch.rand(self.num_local, device=local.device, generator=self._generator())
            scores[positive] = 2.0  # above any random score: positives are always kept
            keep = torch.zeros(self.num_local, dtype=torch.bool, device=local.device)
            keep[scores.topk(self.num_sample, sorted=False).indices] = True
            index = keep.nonzero().squeeze(1)  # sorted, in linear time
        remapped = local.clone()
        remapped[hit] = torch.searchsorted(index, local[hit])
        return index, remapped

    def _generator(self) -> torch.Generator:
        """Per-rank sampling stream (ranks seeded alike globally must not sample alike)."""
        device = self.weight.device
        if self._sample_gen is None or self._sample_gen.device != device:
            self._sample_gen = torch.Generator(device=device)
            self._sample_gen.manual_seed(self.seed * 7919 + self.rank + 1)
        return self._sample_gen

    def sampler_state(self) -> dict[str, Any]:
        """Position of this rank's negative-sampling stream (checkpoint it for an exact resume)."""
        gen = self._generator()
        return {"device": gen.device.type, "state": gen.get_state()}

    def load_sampler_state(self, state: dict[str, Any]) -> None:
        """Continue a stream saved by :meth:`sampler_state` on the same rank.

        One saved on another device type (a CPU run resumed on GPUs) has another layout: the stream
        then stays freshly seeded.
        """
        gen = self._generator()
        if state["device"] == gen.device.type:
            gen.set_state(state["state"])

    def _select_rows(self, index: torch.Tensor | None) -> torch.Tensor:
        """The leaf the loss is taken against: an alias of the shard, or a copy of sampled rows."""
        if index is None:
            rows = self.weight.detach()
        else:
            rows = self._ws.take("rows", (index.numel(), self.embedding_size), self.weight)
            torch.index_select(self.weight, 0, index, out=rows)
        if torch.is_grad_enabled() and self.training:
            rows.requires_grad_(True)
        return rows

    # ----------------------------------------------------------------- updates
    def pop_update(self) -> RowUpdate | None:
        """The gradient since the last step (merged over accumulated forwards), for the optimizer.

        It is handed over, not copied: the optimizer may overwrite it and the rows it comes with.
        """
        ready, last = self._ready, self.sub_weight
        self.zero_grad_rows()
        if ready is None:
            return None
        index, grad = ready
        self._spent.append(("grad", grad))  # buffers come back to the workspace at the next forward
        if index is None:
            return RowUpdate(None, self.weight, grad)
        if index is self.weight_index and last is not None:  # one forward: its leaf has the rows
            rows = last.detach()
            self._spent.append(("rows", last))
        else:
            rows = self._ws.take("rows", tuple(grad.shape), self.weight)
            torch.index_select(self.weight, 0, index, out=rows)
            self._spent.append(("rows", rows))
        return RowUpdate(index, rows, grad)

    def zero_grad_rows(self) -> None:
        """Forget gradients not yet stepped (called by PartialFCOptimizer.zero_grad)."""
        self._ready = None
        if self.sub_weight is not None:
            self.sub_weight.grad = None

    def state_row(
        self, name: str, dtype: torch.dtype = torch.float32, per_class: bool = False
    ) -> torch.Tensor:
        """Optimizer state with one row per local class, created as zeros on first use."""
        shape = (self.num_local,) if per_class else (self.num_local, self.embedding_size)
        if name not in self.state_rows:
            self.state_rows[name] = torch.zeros(shape, dtype=dtype, device=self.weight.device)
        return self.state_rows[name]

    def _apply(self, fn, recurse: bool = True):
        """`.to(device)` moves the shard and its optimizer rows; dtype casts are ignored (fp32)."""
        super()._apply(fn, recurse)

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(fn(t[:0]).device)

        self.weight = move(self.weight)
        self.state_rows = {k: move(v) for k, v in self.state_rows.items()}
        self._ready, self._spent = None, []
        self._ws.clear()
        return self

    # ----------------------------------------------------------------- checkpoints
    def local_state_dict(self) -> dict[str, Any]:
        """This rank's shard: weight rows, optimizer rows and the class range they cover."""
        return {
            "format": STATE_FORMAT,
            "num_classes": self.num_classes,
            "embedding_size": self.embedding_size,
            "class_start": self.class_start,
            "class_end": self.class_end,
            "rank": self.rank,
            "world_size": self.world_size,
            "weight": self.weight,
            "rows": dict(self.state_rows),
        }

    def load_local_state_dict(self, state: dict[str, Any]) -> None:
        """Load a shard whose class range is exactly this rank's (else see :meth:`load_sharded`)."""
        _check_state(state, self.num_classes, self.embedding_size)
        if (state["class_start"], state["class_end"]) != self.class_range:
            raise FacemaeError(
                f"shard covers classes [{state['class_start']}, {state['class_end']}) but this "
                f"rank holds {list(self.class_range)}: load with PartialFC.load_sharded(all_shards)"
            )
        self._assign(state, copy=True)

    def load_sharded(self, states: Sequence[dict[str, Any]]) -> None:
        """Load this rank's range from shards saved on any world size (e.g. 8 ranks -> 2 ranks)."""
        for state in states:
            _check_state(state, self.num_classes, self.embedding_size)
        self._assign(self.reshard(states, self.rank, self.world_size), copy=False)

    def _assign(self, state: dict[str, Any], copy: bool) -> None:
        """Take a checked shard's tensors; `copy` unless they are fresh (never alias a caller's)."""
        device = self.weight.device

        def own(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
            out = t.to(device=device, dtype=dtype or t.dtype)
            return out.clone() if copy and out.data_ptr() == t.data_ptr() else out

        self.weight = own(state["weight"], torch.float32)
        self.state_rows = {k: own(v) for k, v in state["rows"].items()}
        self._ready, self._spent = None, []
        self._ws.clear()

    @staticmethod
    def reshard(states: Sequence[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any]:
        """The shard of (rank, world_size) cut from saved shards; they need only cover its range."""
        if not states:
            raise FacemaeError("no partial-FC shards given to reshard")
        first = states[0]
        for state in states:
            _check_state(state, first["num_classes"], first["embedding_size"])
        start, end = shard_range(first["num_classes"], rank, world_size)
        pieces = _covering_pieces(states, start, end)
        names = set(first["rows"])
        if any(set(s["rows"]) != names for s in states):
            raise FacemaeError(
                "partial-FC shards disagree on their optimizer state: mixed checkpoints?"
            )

        def cut(get) -> torch.Tensor:
            parts = [get(s)[lo - s["class_start"] : hi - s["class_start"]] for s, lo, hi in pieces]
            return torch.cat(parts) if parts else get(first)[:0].clone()

        return {
            **{k: first[k] for k in ("format", "num_classes", "embedding_size")},
            "class_start": start,
            "class_end": end,
            "rank": rank,
            "world_size": world_size,
            "weight": cut(lambda s: s["weight"]),
            "rows": {name: cut(lambda s, name=name: s["rows"][name]) for name in sorted(names)},
        }

    def get_extra_state(self) -> dict[str, Any]:
        """`state_dict()` holds the shard (weight, optimizer rows, class range) here."""
        return self.local_state_dict()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.load_sharded([state])


def _default_world(dist_on: bool, group: Any) -> int:
    return dist.get_world_size(group) if dist_on else 1


def _check_state(state: dict[str, Any], num_classes: int, embedding_size: int) -> None:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise FacemaeError(f"not a partial-FC shard (expected format {STATE_FORMAT!r})")
    if state["num_classes"] != num_classes or state["embedding_size"] != embedding_size:
        raise FacemaeError(
            f"shard is for {state['num_classes']} classes x {state['embedding_size']}-d, "
            f"head is for {num_classes} x {embedding_size}-d: wrong checkpoint or config"
        )


def _covering_pieces(states: Sequence[dict[str, Any]], start: int, end: int) -> list:
    """(shard, lo, hi) slices that tile [start, end) exactly, or a FacemaeError naming the gap."""
    pieces, cursor = [], start
    for state in sorted(states, key=lambda s: s["class_start"]):
        lo, hi = max(cursor, state["class_start"]), min(end, state["class_end"])
        if lo > cursor:
            break
        if hi > lo:
            pieces.append((state, lo, hi))
            cursor = hi
    if cursor < end:
        raise FacemaeError(
            f"partial-FC shards do not cover classes [{cursor}, {end}): "
            "pass the shards of every rank"
        )
    return pieces


class PartialFCOptimizer(torch.optim.Optimizer):
    """SGD (momentum, weight decay) or AdamW for a :class:`PartialFC` shard; sampled rows only.

    Each rank updates its own shard; nothing is synchronised. The per-row state (momentum / Adam
    moments / per-row step counts) lives in ``head.state_rows`` so it is checkpointed and re-sharded
    with the weight. ``param_groups[0]`` holds the hyper-parameters, so torch LR schedulers drive
    ``lr`` as usual (the single "param" is an empty placeholder: the rows are the head's). Rows not
    sampled in a step are not touched at all (lazy semantics; see the module docstring). AdamW bias
    correction uses each row's own step count.
    """

    def __init__(
        self,
        head: PartialFC,
        kind: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if kind not in ("sgd", "adamw"):
            raise FacemaeError(f"PartialFCOptimizer kind {kind!r}: use 'sgd' or 'adamw'")
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise FacemaeError(
                f"bad optimizer settings lr={lr} momentum={momentum} wd={weight_decay}"
            )
        defaults = dict(
            kind=kind, lr=lr, momentum=momentum, weight_decay=weight_decay, betas=betas, eps=eps
        )
        super().__init__([torch.empty(0)], defaults)
        self.head = head

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Apply the gradient of the forwards since the last step to their rows of the shard."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        update = self.head.pop_update()
        if update is not None:
            group = self.param_groups[0]
            if group["kind"] == "sgd":
                self._sgd(update, group)
            else:
                self._adamw(update, group)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.head.zero_grad_rows()

    def _sgd(self, up: RowUpdate, group: dict[str, Any]) -> None:
        """torch.optim.SGD maths (dampening 0, no Nesterov) on the updated rows."""
        head, grad, lr = self.head, up.grad, group["lr"]
        if group["weight_decay"]:
            grad.add_(up.rows, alpha=group["weight_decay"])
        if group["momentum"]:
            buf = head.state_row("momentum_buffer")
            if up.index is None:
                grad = buf.mul_(group["momentum"]).add_(grad)
            else:
                # the sampled rows' copy is spent once decayed into grad: reuse it, no new (k, d)
                grad = torch.index_select(buf, 0, up.index, out=up.rows).mul_(group["momentum"])
                grad.add_(up.grad)
                buf.index_copy_(0, up.index, grad)
        if up.index is None:
            head.weight.add_(grad, alpha=-lr)
        else:
            head.weight.index_add_(0, up.index, grad, alpha=-lr)

    def _adamw(self, up: RowUpdate, group: dict[str, Any]) -> None:
        """torch.optim.AdamW maths on the updated rows, bias-corrected by each row's step count."""
        head, grad, lr = self.head, up.grad, group["lr"]
        beta1, beta2 = group["betas"]
        names = ("exp_avg", "exp_avg_sq")
        full = [head.state_row(n) for n in names]
        steps = head.state_row("step", torch.int64, per_class=True)
        ws = head._ws
        if up.index is None:
            rows, (m, v), step = up.rows, full, steps.add_(1)
        else:
            rows = up.rows  # a copy of the sampled rows, ours to overwrite
            m, v = (torch.index_select(t, 0, up.index, out=ws.take(n, grad.shape, grad))
                    for t, n in zip(full, names, strict=True))  # fmt: skip
            step = steps.index_select(0, up.index).add_(1)
        rows.mul_(1.0 - lr * group["weight_decay"])
        m.lerp_(grad, 1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        step64 = step.double()
        step_size = (lr / (1.0 - torch.pow(beta1, step64))).float()[:, None]
        bc2_sqrt = (1.0 - torch.pow(beta2, step64)).sqrt().float()[:, None]
        denom = torch.sqrt(v, out=ws.take("denom", grad.shape, grad))
        denom.div_(bc2_sqrt).add_(group["eps"]).div_(step_size)  # p -= m / (denom / step_size)
        rows.addcdiv_(m, denom, value=-1.0)
        ws.give("denom", denom)
        if up.index is not None:
            head.weight.index_copy_(0, up.index, rows)
            for t, new, name in zip(full, (m, v), names, strict=True):
                t.index_copy_(0, up.index, new)
                ws.give(name, new)
            steps.index_copy_(0, up.index, step)

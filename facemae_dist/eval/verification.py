"""Pair verification with the ArcFace 10-fold protocol (LFW, CFP-FP, AgeDB-30, own pair sets).

Protocol (insightface ``eval/verification.py``, re-implemented):

1. Embedding of a face = model(image) + model(horizontally flipped image), then L2-normalised (the
   ArcFace convention: summing keeps the embedding size; concatenating would double it).
2. Distance of a pair = squared L2 distance of the two embeddings, in [0, 4].
3. The pairs are cut into ``nfolds`` contiguous folds, no shuffle (sizes as sklearn's ``KFold``:
   the first ``n % nfolds`` folds hold one pair more). A pair is predicted "same" when
   ``distance < threshold``.
4. For each fold, the threshold in ``np.arange(0, 4, 0.01)`` with the best accuracy on the other
   folds (the first one on ties) scores the held-out fold. Reported: mean and population std of the
   fold accuracies, and the mean of the chosen thresholds.
5. TAR@FAR (VAL@FAR): per fold, the *largest* grid threshold whose false-accept rate on the other
   folds is <= ``far_target`` (threshold 0 accepts nothing, so one always exists); TAR and FAR
   are then measured on the held-out fold and averaged. arcface_torch instead interpolates the
   threshold with ``scipy.interpolate.interp1d``, which raises with scipy >= 1.17 when the FAR
   curve repeats values; the grid choice needs no scipy and never exceeds the target on training
   folds.

Counting is vectorised: per fold the distances are sorted once and ``np.searchsorted`` gives, for
all thresholds at once, how many same / different pairs fall below each threshold -- the counts a
thresholds x pairs comparison would give, in O((pairs + thresholds) log pairs) time and
O(folds x thresholds) memory, so million-pair sets cost no more than LFW.
"""

from __future__ import annotations

import os
import warnings
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from facemae_dist.errors import FacemaeError

__all__ = [
    "THRESHOLDS",
    "VerificationResult",
    "VerificationStopped",
    "embed_pairs",
    "evaluate",
    "fold_bounds",
    "make_pairs",
    "resolve_device",
    "verify_pair_set",
]

#: the ArcFace threshold grid for squared L2 distances of unit vectors
THRESHOLDS = np.arange(0, 4, 0.01)
IMAGE_SIZE = 112


@dataclass
class VerificationResult:
    """Outcome of the 10-fold protocol on one pair set."""

    accuracy: float  # mean held-out fold accuracy
    std: float  # population std of the fold accuracies (as ArcFace prints it)
    threshold: float  # mean of the per-fold best thresholds
    tar_at_far: float  # mean held-out TAR at the per-fold FAR-target threshold
    far: float  # mean held-out FAR at that threshold
    num_pairs: int
    tar_std: float = 0.0
    fold_accuracies: list[float] = field(default_factory=list)
    fold_thresholds: list[float] = field(default_factory=list)
    name: str = ""

    def summary(self) -> str:
        """One line as ArcFace logs it: accuracy-flip mean ± std, plus TAR@FAR."""
        label = f"[{self.name}] " if self.name else ""
        return (
            f"{label}accuracy {self.accuracy:.5f} ± {self.std:.5f} (threshold {self.threshold:.2f}),"
            f" TAR {self.tar_at_far:.5f} ± {self.tar_std:.5f} @ FAR {self.far:.2e}"
            f" ({self.num_pairs} pairs)"
        )


class VerificationStopped(Exception):
    """The embedding loop gave way to ``should_stop``: no result (a training run's stop signal)."""


# ---------------------------------------------------------------------------------- the protocol


def fold_bounds(num_pairs: int, nfolds: int = 10) -> list[tuple[int, int]]:
    """(start, stop) of each contiguous fold; the first ``num_pairs % nfolds`` get one extra pair."""
    if nfolds < 2 or num_pairs < nfolds:
        raise FacemaeError(
            f"{nfolds}-fold verification needs at least {max(nfolds, 2)} pairs and 2 folds, "
            f"got {num_pairs} pairs"
        )
    sizes = np.full(nfolds, num_pairs // nfolds)
    sizes[: num_pairs % nfolds] += 1
    stops = np.cumsum(sizes)
    return [(int(b - s), int(b)) for s, b in zip(sizes, stops, strict=True)]


def _below_counts(dist: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many of ``dist`` are strictly below each threshold."""
    return np.searchsorted(np.sort(dist), thresholds, side="left")


def _fold_counts(
    dist: np.ndarray, issame: np.ndarray, bounds: list[tuple[int, int]], thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per fold: same pairs below each threshold, different pairs below, #same, #different."""
    same_below = np.empty((len(bounds), len(thresholds)), dtype=np.int64)
    diff_below = np.empty_like(same_below)
    n_same = np.empty(len(bounds), dtype=np.int64)
    n_diff = np.empty_like(n_same)
    for f, (a, b) in enumerate(bounds):
        d, s = dist[a:b], issame[a:b]
        same_below[f] = _below_counts(d[s], thresholds)
        diff_below[f] = _below_counts(d[~s], thresholds)
        n_same[f], n_diff[f] = s.sum(), (~s).sum()
    return same_below, diff_below, n_same, n_diff


def _check_inputs(e1: np.ndarray, e2: np.ndarray, issame: np.ndarray) -> None:
    if e1.ndim != 2 or e1.shape != e2.shape or len(issame) != len(e1):
        raise FacemaeError(
            f"verification needs two (pairs, dim) embedding arrays and one label per pair; got "
            f"{e1.shape}, {e2.shape} and {len(issame)} labels"
        )
    if not (np.isfinite(e1).all() and np.isfinite(e2).all()):
        raise FacemaeError("embeddings contain NaN or inf: the model diverged or got bad input")
    norms = np.concatenate([np.linalg.norm(e1, axis=1), np.linalg.norm(e2, axis=1)])
    if np.abs(norms - 1).max() > 1e-3:
        raise FacemaeError(
            "embeddings must be L2-normalised (the thresholds cover squared distances of unit "
            "vectors, 0..4); normalise them, or use embed_pairs"
        )
    if issame.all() or not issame.any():
        raise FacemaeError("verification needs both same and different pairs")


def evaluate(
    embeddings1: np.ndarray,
    embeddings2: np.ndarray,
    issame: np.ndarray,
    nfolds: int = 10,
    far_target: float = 1e-3,
) -> VerificationResult:
    """ArcFace k-fold verification of pairs (embeddings1[i], embeddings2[i]); see module doc."""
    e1 = np.asarray(embeddings1, dtype=np.float64)
    e2 = np.asarray(embeddings2, dtype=np.float64)
    same = np.asarray(issame, dtype=bool).reshape(-1)
    _check_inputs(e1, e2, same)
    dist = np.sum(np.square(np.subtract(e1, e2)), axis=1)
    bounds = fold_bounds(len(dist), nfolds)
    sb, db, n_same, n_diff = _fold_counts(dist, same, bounds, THRESHOLDS)
    sizes = n_same + n_diff
    # training part of fold f = all pairs minus fold f
    tp = sb.sum(0) - sb
    fp = db.sum(0) - db
    tn = (n_diff.sum() - n_diff)[:, None] - fp
    best = np.argmax(tp + tn, axis=1)  # first best, as np.argmax over the accuracies
    rows = np.arange(len(bounds))
    correct = sb[rows, best] + n_diff - db[rows, best]
    accuracies = correct.astype(np.float64) / sizes
    train_far = fp / np.maximum(n_diff.sum() - n_diff, 1)[:, None]
    at_far = (train_far <= far_target).sum(axis=1) - 1  # FAR grows with the threshold
    with np.errstate(invalid="ignore", divide="ignore"):
        tar = sb[rows, at_far] / n_same
        far = db[rows, at_far] / n_diff
    return VerificationResult(
        accuracy=float(np.mean(accuracies)),
        std=float(np.std(accuracies)),
        threshold=float(np.mean(THRESHOLDS[best])),
        tar_at_far=float(np.nanmean(tar)),
        far=float(np.nanmean(far)),
        num_pairs=len(dist),
        tar_std=float(np.nanstd(tar)),
        fold_accuracies=accuracies.tolist(),
        fold_thresholds=THRESHOLDS[best].tolist(),
    )


# ------------------------------------------------------------------------------------ embeddings


def _decode_batch(
    images: Sequence[bytes], start: int, image_size: int, what: str = "the pair set"
) -> torch.Tensor:
    """uint8 (B, 3, S, S) from encoded images; made S x S like the sharder's default (padded to a
    centred square, then resized) when they are not."""
    from facemae_dist.data.images import BadImage, decode_rgb, fit_square

    arrays = []
    for k, data in enumerate(images):
        try:
            img = decode_rgb(bytes(data))
        except BadImage as exc:
            i = start + k
            raise FacemaeError(
                f"image {i} (pair {i // 2}) of {what}: {exc}; rebuild it (facemae make-pairs) "
                "or fetch it again"
            ) from None
        arrays.append(np.asarray(fit_square(img, image_size)))  # as the sharder does
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def resolve_device(device: str | torch.device | None, flag: str = "--device") -> torch.device:
    """A usable torch device: None = cuda when available, else cpu. An unknown name, or a GPU
    this machine does not have, is a FacemaeError naming ``flag`` and the fix."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise FacemaeError(
            f"{flag} {device!r} is not a device: use cpu, cuda or cuda:N (or leave {flag} out)"
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise FacemaeError(
                f"{flag} {device}: no CUDA GPU is usable on this machine; use {flag} cpu "
                f"(or leave {flag} out)"
            )
        if dev.index is not None and dev.index >= count:
            raise FacemaeError(
                f"{flag} {device}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise FacemaeError(f"{flag} {device}: MPS is not available here; use {flag} cpu")
    elif dev.type != "cpu":
        raise FacemaeError(f"{flag} {device}: use cpu, cuda or cuda:N (or leave {flag} out)")
    return dev


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.inference_mode()
def _embed_batch(model: nn.Module, batch: torch.Tensor, device: torch.device) -> np.ndarray:
    x = batch.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    param = next(model.parameters(), None)
    if param is not None and param.is_floating_point():
        x = x.to(param.dtype)  # a bf16 model (DeepSpeed bf16 training) takes bf16 inputs
    out = model(torch.cat([x, x.flip(3)])).double()
    n = len(batch)
    return torch.nn.functional.normalize(out[:n] + out[n:], dim=1).cpu().numpy()


def embed_pairs(
    model: nn.Module,
    images: Sequence[bytes] | torch.Tensor,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    image_size: int = IMAGE_SIZE,
    what: str = "the pair set",
    should_stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """L2-normalised (image + flipped image) embeddings, float64, one row per image.

    ``images``: encoded images (bytes, or uint8 arrays of the bytes), or a uint8 (N, 3, H, W)
    tensor. Decoding happens per batch, so a large pair set never sits decoded in memory.
    ``device``: where inputs go; None = the model's device (the model is never moved). The model
    runs in eval mode and is put back in its previous mode. ``what`` names the images in errors.
    ``should_stop``: asked before each batch; when it returns True, :class:`VerificationStopped`
    is raised (so a stop signal during a long eval is not held up until the eval ends).
    """
    if batch_size < 1:
        raise FacemaeError(f"batch_size must be positive, got {batch_size}")
    dev = resolve_device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(images), batch_size):
            if should_stop is not None and should_stop():
                raise VerificationStopped(f"stopped after {start} of {len(images)} images")
            chunk = images[start : start + batch_size]
            if not isinstance(chunk, torch.Tensor):
                chunk = _decode_batch(chunk, start, image_size, what)
            out.append(_embed_batch(model, chunk, dev))
    finally:
        model.train(was_training)
    if not out:
        raise FacemaeError("no images to embed")
    return np.concatenate(out)


def verify_pair_set(
    model: nn.Module,
    pair_set: Any,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    nfolds: int = 10,
    far_target: float = 1e-3,
    should_stop: Callable[[], bool] | None = None,
) -> VerificationResult:
    """Embed a :class:`~facemae_dist.data.sources.PairSet` and run the k-fold protocol on it;
    ``should_stop`` as in :func:`embed_pairs` (raises :class:`VerificationStopped`)."""
    # name the set in decode errors: `facemae eval` takes several .bin files at once
    what = f"pair set {pair_set.name!r}" if pair_set.name else "the pair set"
    emb = embed_pairs(
        model, pair_set.images, batch_size, device, what=what, should_stop=should_stop
    )
    result = evaluate(emb[0::2], emb[1::2], pair_set.issame, nfolds, far_target)
    result.name = pair_set.name
    return result


# ------------------------------------------------------------------------------ building pair sets


def _index_split(
    urls: list[str], expected: list[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
    """(shard index, position in shard, class) of every sample: 16 bytes per sample, no images;
    and {sample: why} for images that fail the cheap check (empty, truncated, bad header)."""
    from facemae_dist.data.images import BadImage, check_image
    from facemae_dist.data.stream import IMAGE_EXTS, read_shard

    shard, pos, cls = array("i"), array("i"), array("q")
    bad: dict[int, str] = {}
    for s, (url, count) in enumerate(zip(urls, expected, strict=True)):
        for p, sample in enumerate(read_shard(url, count)):
            if "cls" not in sample:
                raise FacemaeError(f"sample {sample['__key__']} in {url} has no 'cls' label")
            data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
            if data is None:
                raise FacemaeError(f"sample {sample['__key__']} in {url} has no image")
            try:
                check_image(data)  # header and end marker only: no decode in this pass
            except BadImage as exc:
                bad[len(cls)] = f"{sample['__key__']} in {url}: {exc}"
            shard.append(s)
            pos.append(p)
            cls.append(int(sample["cls"]))
    return (
        np.frombuffer(shard, np.int32),
        np.frombuffer(pos, np.int32),
        np.frombuffer(cls, np.int64),
        bad,
    )


def _draw_pairs(rng: np.random.Generator, draw, count: int) -> tuple[list[tuple[int, int]], int]:
    """``count`` pairs from ``draw(rng)``, avoiding repeats while the pool allows; (pairs, repeats)."""
    seen: set[tuple[int, int]] = set()
    pairs: list[tuple[int, int]] = []
    tries = 0
    while len(pairs) < count:
        a, b = draw(rng)
        key = (min(a, b), max(a, b))
        tries += 1
        if key in seen and tries < 20 * count:
            continue
        seen.add(key)
        pairs.append((a, b))
    return pairs, len(pairs) - len(seen)


def _samplers(cls: np.ndarray):
    """Draw functions for a same pair (uniform identity with >= 2 images, two distinct images)
    and a different pair (two distinct identities, one image each)."""
    order = np.argsort(cls, kind="stable")
    ids, starts, counts = np.unique(cls[order], return_index=True, return_counts=True)
    multi = np.flatnonzero(counts >= 2)
    if len(ids) < 2 or len(multi) == 0:
        raise FacemaeError(
            f"the split has {len(ids)} identities, {len(multi)} of them with 2+ images: pairs need "
            "at least 2 identities and one with 2+ images; shard more data into this split"
        )

    def same(rng: np.random.Generator) -> tuple[int, int]:
        k = multi[rng.integers(len(multi))]
        i, j = rng.choice(counts[k], size=2, replace=False)
        return int(order[starts[k] + i]), int(order[starts[k] + j])

    def different(rng: np.random.Generator) -> tuple[int, int]:
        k1, k2 = rng.choice(len(ids), size=2, replace=False)
        return (
            int(order[starts[k1] + rng.integers(counts[k1])]),
            int(order[starts[k2] + rng.integers(counts[k2])]),
        )

    return same, different, len(ids), len(multi)


def _fetch_images(urls: list[str], shard: np.ndarray, pos: np.ndarray, wanted: set[int]) -> dict:
    """(key, encoded image bytes) of the ``wanted`` sample indices, reading only their shards."""
    from facemae_dist.data.stream import IMAGE_EXTS, read_shard

    by_shard: dict[int, dict[int, int]] = {}
    for i in wanted:
        by_shard.setdefault(int(shard[i]), {})[int(pos[i])] = i
    got: dict[int, bytes] = {}
    for s in sorted(by_shard):
        need = by_shard[s]
        for p, sample in enumerate(read_shard(urls[s])):
            if p in need:
                data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
                if data is None:
                    raise FacemaeError(f"sample {sample['__key__']} in {urls[s]} has no image")
                got[need[p]] = (sample["__key__"], data)
    if len(got) != len(wanted):
        raise FacemaeError("the shards changed while pairs were being made; run make-pairs again")
    return got


def make_pairs(split_dir: str, out_path: str, num_pairs: int, seed: int = 0) -> dict:
    """Build a verification pair set (.bin) from a sharded split, ready for the 10-fold protocol.

    10 contiguous folds of ``num_pairs/10`` pairs; each fold holds ``num_pairs/20`` same pairs
    followed by as many different pairs (the LFW layout). Same pairs: an identity with 2+ images
    drawn uniformly, two distinct images of it; different pairs: two distinct identities, one
    image each. Repeated pairs are avoided while the split allows; when many repeat, a warning
    says how many distinct pairs the split can give. Two passes over the shards: the first keeps
    (shard, position, class) per sample, the second reads only chosen images. Images that do not
    decode are left out with a warning (``skipped_images`` counts them).
    """
    from facemae_dist.data.shards import load_manifest
    from facemae_dist.data.sources import write_pair_set

    if num_pairs < 20 or num_pairs % 20:
        raise FacemaeError(
            f"num_pairs must be a positive multiple of 20 (10 folds x same/different), "
            f"got {num_pairs}; e.g. 6000 as LFW"
        )
    manifest = load_manifest(split_dir)
    urls = manifest["urls"]
    shard, pos, cls, bad = _index_split(urls, [s["samples"] for s in manifest["shards"]])
    while True:
        # an image that does not decode would break `facemae eval` on the whole set: leave it
        # out and draw again (from the same seed, so the set stays reproducible)
        keep = np.setdiff1d(np.arange(len(cls)), np.fromiter(bad, np.int64, len(bad)))
        drawn, issame, repeated, num_ids, num_multi = _draw_folds(cls[keep], num_pairs, seed)
        pairs = [(int(keep[a]), int(keep[b])) for a, b in drawn]
        wanted = {i for pair in pairs for i in pair}
        images = _fetch_images(urls, shard, pos, wanted)
        undecodable = _undecodable(images, urls, shard)
        if not undecodable:
            break
        bad.update(undecodable)
    write_pair_set(out_path, [images[i][1] for pair in pairs for i in pair], np.array(issame))
    if bad:
        warnings.warn(
            f"left out {len(bad)} undecodable image(s) of {split_dir}, e.g. "
            f"{next(iter(bad.values()))}",
            stacklevel=2,
        )
    same_max, diff_max = _distinct_pairs(cls[keep])
    if repeated > num_pairs // 10:  # then folds share pairs: the 10-fold std says little
        fit = 2 * min(same_max, diff_max) // 20 * 20
        hint = f"ask for at most {fit} pairs (--pairs {fit})" if fit else "no --pairs value fits"
        warnings.warn(
            f"{repeated} of the {num_pairs} pairs are repeats: {split_dir} ({len(keep)} images, "
            f"{num_ids} identities) gives only {same_max} distinct same and {diff_max} distinct "
            f"different pairs, so the 10-fold accuracy std is meaningless; {hint} or shard more "
            "images into this split",
            stacklevel=2,
        )
    return {
        "path": os.fspath(out_path),
        "split": manifest.get("split"),
        "num_pairs": num_pairs,
        "num_same": num_pairs // 2,
        "num_different": num_pairs // 2,
        "folds": 10,
        "pairs_per_fold": num_pairs // 10,
        "num_images": len(wanted),
        "samples_scanned": len(cls),
        "skipped_images": len(bad),
        "num_identities": num_ids,
        "identities_with_pairs": num_multi,
        "distinct_same_pairs": same_max,
        "distinct_different_pairs": diff_max,
        "repeated_pairs": repeated,
        "seed": seed,
    }


def _draw_folds(
    cls: np.ndarray, num_pairs: int, seed: int
) -> tuple[list[tuple[int, int]], list[bool], int, int, int]:
    """Pairs of indices into ``cls`` in the LFW fold layout: (pairs, issame, repeated pairs,
    identities, identities with 2+ images)."""
    same, different, num_ids, num_multi = _samplers(cls)
    rng = np.random.default_rng(seed)
    half = num_pairs // 2
    same_pairs, rep_s = _draw_pairs(rng, same, half)
    diff_pairs, rep_d = _draw_pairs(rng, different, half)
    per = num_pairs // 20
    pairs, issame = [], []
    for f in range(10):
        pairs += same_pairs[f * per : (f + 1) * per] + diff_pairs[f * per : (f + 1) * per]
        issame += [True] * per + [False] * per
    return pairs, issame, rep_s + rep_d, num_ids, num_multi


def _distinct_pairs(cls: np.ndarray) -> tuple[int, int]:
    """How many distinct same pairs and different pairs the samples of ``cls`` can form."""
    counts = np.unique(cls, return_counts=True)[1].tolist()  # Python ints: no overflow
    same = sum(c * (c - 1) // 2 for c in counts)
    n = len(cls)
    return same, n * (n - 1) // 2 - same


def _undecodable(images: dict, urls: list[str], shard: np.ndarray) -> dict[int, str]:
    """{sample: why} for the fetched images that do not decode."""
    from facemae_dist.data.images import BadImage, decode_rgb

    bad = {}
    for i, (key, data) in images.items():
        try:
            decode_rgb(bytes(data))
        except BadImage as exc:
            bad[i] = f"{key} in {urls[shard[i]]}: {exc}"
    return bad

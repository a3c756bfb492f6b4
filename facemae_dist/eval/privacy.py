"""Privacy leakage audit: retrieve released faces against the original faces.

Protocol:

1. A recognizer that never saw the released identities (the user's responsibility: train it on
   other identities) embeds every face as in :mod:`facemae_dist.eval.verification`: model(image)
   + model(flipped image), L2-normalised; kept as float32 numpy, one row per face.
2. Every released face is a query; the gallery holds the original faces of all identities, i.e.
   the originals of the released identities plus any distractor splits. Identities are matched
   by NAME (the sample's json ``label``, else the manifest's ``label_map[cls]``), never by
   ``cls``, whose numbering differs between splits. A release that names no one (the default of
   `facemae reconstruct`) is read through the input split its manifest records
   (:class:`ReleaseNames`): its class i is the input's class i, its key the input position.
3. Similarity is the cosine (dot product of unit vectors). Computed in blocks of ``block``
   queries x ``gallery_block`` gallery faces with a running top-k per query (``torch.topk``
   merge), so memory stays O(queries x k + block x gallery_block), never queries x gallery.
4. Reported, lower = less leakage:

   * ``top{k}`` (identity hit@k): share of queries with at least one of the k nearest gallery
     faces of the query's identity;
   * ``source_top1``: share of queries whose own source face ranks first; the source is the
     input face at the released key's position (json ``source_key`` in a --keep-names release),
     else the query's own ``__key__`` (auditing a set against itself; keys are source indices,
     so this fallback only means something when both splits were sharded from the same
     source). A hit needs the same key AND the same identity, so a distractor split whose keys
     collide with the originals' does not count. Measured over the queries whose source is in
     the gallery (``source_queries``; ``source_top1`` is None when there are none).
   * ``chance_top1``: identity hit@1 of a random ranking (mean share of the gallery that holds
     the query's identity), the floor to compare ``top1`` with.

`facemae audit` and the demo's report table print these as "leakage top-k", "own image ranked
first" and "leakage top-1 by chance" (:func:`facemae_dist.report.leakage_name`).

Released identities absent from the gallery: their queries could never hit, so they are left out
of the rates with a warning and counted in ``skipped_queries`` / ``missing_identities``; with
``strict=True`` (``--strict``) this is an error, and it always is when no identity matches.
Ties in similarity are broken arbitrarily (as ``torch.topk``).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facemae_dist.data.shards import load_manifest
from facemae_dist.data.stream import FaceStream, check_image_size, make_loader, read_shard
from facemae_dist.errors import FacemaeError
from facemae_dist.eval.verification import IMAGE_SIZE, embed_pairs, resolve_device

__all__ = ["audit", "embed_split", "main", "nearest", "retrieval"]

Paths = str | os.PathLike | Sequence[str | os.PathLike]


# ------------------------------------------------------------------------------------ embedding


class _MetaStream(FaceStream):
    """A FaceStream whose batches also carry each sample's json metadata (``"meta"``)."""

    def _batch(self, samples: list[dict], rng: np.random.Generator) -> dict[str, Any]:
        batch = super()._batch(samples, rng)
        batch["meta"] = [_sample_meta(s) for s in samples]
        return batch


def _sample_meta(sample: dict[str, Any]) -> dict[str, Any]:
    if "json" not in sample:
        return {}
    try:
        return json.loads(sample["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FacemaeError(
            f"sample {sample['__key__']} in {sample['__url__']}: bad json metadata ({exc})"
        ) from None


def _as_list(paths: Paths) -> list[str]:
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not items:
        raise FacemaeError("no split given: pass shard split folders (with a manifest.json)")
    return [os.fspath(p) for p in items]


def _identity(meta: dict, cls: int, label_map: list[str], key: str, split: str) -> str:
    """The identity name of a sample: json ``label``, else the manifest's name of its class."""
    if "label" in meta:
        return str(meta["label"])
    if 0 <= cls < len(label_map):
        return str(label_map[cls])
    raise FacemaeError(
        f"sample {key} in {split} has no identity: neither a json 'label' nor a cls in the "
        "manifest's label_map; re-create the split with `facemae shard`"
    )


class ReleaseNames:
    """Identity names and source keys of a split's faces. A pseudonymous release (`facemae
    reconstruct` without --keep-names) names no one: its class i is the input split's class i and
    its key `SSSSSS_PPPPPP_C` is the face at position P of the input's shard S, so both are read
    from the input split, which the auditor (who holds the originals) has."""

    def __init__(self, split: str) -> None:
        manifest = load_manifest(split)
        self.split, self.input = split, None
        if manifest.get("pseudonymous"):
            self.input = manifest.get("input_split", "")
            if not Path(self.input).is_dir():
                raise FacemaeError(
                    f"{split} is a release that names no one: the audit maps it back through the "
                    f"split it was made from, {self.input or '(not recorded)'}, which is not there; "
                    "put that split back at that path"
                )
            manifest = load_manifest(self.input)
        self.label_map: list[str] = manifest["label_map"]
        self._urls: list[str] = manifest["urls"]
        self._keys: dict[int, list[str]] = {}

    def source(self, key: str, meta: dict) -> str:
        if self.input is None:
            return str(meta.get("source_key", key))
        shard, pos, _ = (int(part) for part in key.split("_"))
        if shard not in self._keys:  # keys only: the input's images are not decoded
            self._keys[shard] = [s["__key__"] for s in read_shard(self._urls[shard])]
        return self._keys[shard][pos]


def embed_split(
    model: nn.Module,
    split_dirs: Paths,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, list[str], list[str], list[str]]:
    """Embed every face of one or more splits, each once.

    Returns (float32 (N, D) L2-normalised embeddings, identity names, ``__key__``s, source keys:
    json ``source_key`` or the key itself). ``device``: where inputs go (None: the model's).
    """
    from facemae_dist.progress import ProgressBar

    embs: list[np.ndarray] = []
    ids: list[str] = []
    keys: list[str] = []
    sources: list[str] = []
    for split in _as_list(split_dirs):
        names = ReleaseNames(split)
        stream = _MetaStream(split, batch_size, repeat=False)
        with ProgressBar(f"embed {split}", stream.num_samples, "img", progress) as bar:
            for batch in make_loader(stream, num_workers):
                emb = embed_pairs(model, batch["image"], len(batch["key"]), device)
                embs.append(emb.astype(np.float32))
                for key, cls, meta in zip(
                    batch["key"], batch["label"].tolist(), batch["meta"], strict=True
                ):
                    ids.append(_identity(meta, cls, names.label_map, key, split))
                    keys.append(key)
                    sources.append(names.source(key, meta))
                bar.advance(len(batch["key"]))
    if not embs:
        raise FacemaeError(f"no faces in {', '.join(_as_list(split_dirs))}")
    return np.concatenate(embs), ids, keys, sources


# ------------------------------------------------------------------------------------ retrieval


def nearest(
    query: np.ndarray,
    gallery: np.ndarray,
    k: int,
    block: int = 4096,
    gallery_block: int = 65536,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Indices (Q, min(k, G)) of each query's k most similar gallery rows (dot product), best
    first; blocks of ``block`` x ``gallery_block`` similarities with a running top-k merge."""
    if block < 1 or gallery_block < 1 or k < 1:
        raise FacemaeError(f"block sizes and k must be positive, got {block}, {gallery_block}, {k}")
    dev = resolve_device(device)
    nq, ng = len(query), len(gallery)
    k = min(k, ng)
    best_val = torch.full((nq, k), -torch.inf, device=dev)
    best_idx = torch.zeros((nq, k), dtype=torch.int64, device=dev)
    for g0 in range(0, ng, gallery_block):
        g = torch.from_numpy(np.ascontiguousarray(gallery[g0 : g0 + gallery_block]))
        g = g.to(dev).float()
        kk = min(k, len(g))
        for q0 in range(0, nq, block):
            q = torch.from_numpy(np.ascontiguousarray(query[q0 : q0 + block])).to(dev).float()
            val, idx = (q @ g.T).topk(kk, dim=1)
            val = torch.cat([best_val[q0 : q0 + block], val], dim=1)
            idx = torch.cat([best_idx[q0 : q0 + block], idx + g0], dim=1)
            top, pos = val.topk(k, dim=1)
            best_val[q0 : q0 + block] = top
            best_idx[q0 : q0 + block] = idx.gather(1, pos)
    return best_idx.cpu().numpy()


def _check_retrieval_inputs(
    q: np.ndarray, g: np.ndarray, per_query: Sequence[Sequence], per_gallery: Sequence[Sequence]
) -> None:
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise FacemaeError(
            f"retrieval needs (queries, dim) and (gallery, dim) embeddings, got {q.shape}, {g.shape}"
        )
    if len(q) == 0 or len(g) == 0:
        raise FacemaeError(f"retrieval needs queries and a gallery, got {len(q)} and {len(g)}")
    if any(len(x) != len(q) for x in per_query) or any(len(x) != len(g) for x in per_gallery):
        raise FacemaeError(
            "retrieval needs one identity and one source key per query and one identity and one "
            f"key per gallery row; got {[len(x) for x in per_query]} for {len(q)} queries, "
            f"{[len(x) for x in per_gallery]} for {len(g)} gallery rows"
        )
    for name, emb in (("query", q), ("gallery", g)):
        if not np.isfinite(emb).all():
            raise FacemaeError(f"{name} embeddings contain NaN or inf: the model diverged")


def retrieval(
    query_emb: np.ndarray,
    query_ids: Sequence[str],
    query_src: Sequence[str],
    gallery_emb: np.ndarray,
    gallery_ids: Sequence[str],
    gallery_keys: Sequence[str],
    ks: Sequence[int] = (1, 5),
    block: int = 4096,
    gallery_block: int = 65536,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Identity hit@k for each k in ``ks`` (``top{k}``), ``source_top1`` and ``chance_top1``
    of queries against a gallery of L2-normalised embeddings (see the module doc)."""
    if not ks or min(ks) < 1:
        raise FacemaeError(f"ks must be positive ranks, e.g. (1, 5); got {tuple(ks)}")
    query_emb, gallery_emb = np.asarray(query_emb), np.asarray(gallery_emb)
    _check_retrieval_inputs(
        query_emb, gallery_emb, (query_ids, query_src), (gallery_ids, gallery_keys)
    )
    names, g_code, g_count = np.unique(
        np.asarray(gallery_ids, dtype=object), return_inverse=True, return_counts=True
    )
    code_of = {name: c for c, name in enumerate(names.tolist())}
    q_code = np.array([code_of.get(i, -1) for i in query_ids], dtype=np.int64)
    top = nearest(query_emb, gallery_emb, max(ks), block, gallery_block, device)
    hit = g_code.reshape(-1)[top] == q_code[:, None]  # (Q, k): neighbour has the query's identity
    result: dict[str, Any] = {f"top{k}": float(hit[:, :k].any(1).mean()) for k in ks}
    g_pairs = set(zip(gallery_keys, gallery_ids, strict=True))
    has_src = np.array([p in g_pairs for p in zip(query_src, query_ids, strict=True)], dtype=bool)
    first_key = np.asarray(gallery_keys, dtype=object)[top[:, 0]]
    src_hit = (first_key == np.asarray(query_src, dtype=object)) & hit[:, 0]
    result["source_top1"] = float(src_hit[has_src].mean()) if has_src.any() else None
    share = np.where(q_code >= 0, g_count[np.maximum(q_code, 0)] / len(gallery_emb), 0.0)
    result.update(
        chance_top1=float(share.mean()),
        num_queries=len(query_emb),
        num_gallery=len(gallery_emb),
        source_queries=int(has_src.sum()),
        query_identities=len(set(query_ids)),
        gallery_identities=len(names),
    )
    return result


# ---------------------------------------------------------------------------------------- audit


def _warn_shared_names(per_split: dict[str, set[str]]) -> None:
    """Warn (once) when one identity name is in several gallery splits: matched by name, their
    faces count as one person, which is right for more faces of the same people and wrong for
    unrelated sets that happen to reuse names (e.g. synthetic sets of different seeds)."""
    seen: dict[str, str] = {}
    shared: dict[str, list[str]] = {}
    for split, names in per_split.items():
        for name in sorted(names):
            if name in seen:
                shared.setdefault(name, [seen[name]]).append(split)
            else:
                seen[name] = split
    if not shared:
        return
    sources = sorted({s for splits in shared.values() for s in splits})
    examples = ", ".join(repr(n) for n in sorted(shared)[:3])
    warnings.warn(
        f"{len(shared)} identity names (e.g. {examples}) appear in more than one gallery split "
        f"({', '.join(sources)}): matched by name, they are counted as one person each. If "
        "these splits hold different people, give them distinct identity names",
        stacklevel=4,  # the caller of audit()
    )


def _check_splits(released: list[str], gallery: list[str], strict: bool) -> list[str]:
    """Fail early on missing splits and unmatched identities; the released names not in the
    gallery (from the manifests' label maps)."""
    for role, splits in (("released", released), ("original", gallery)):
        for split in splits:
            if not Path(split).exists():
                raise FacemaeError(f"{role} split {split} not found: pass a shard split folder")
    names = {n for s in released for n in ReleaseNames(s).label_map}
    per_split = {s: set(ReleaseNames(s).label_map) for s in dict.fromkeys(gallery)}
    _warn_shared_names(per_split)
    known = set().union(*per_split.values())
    missing = sorted(names - known)
    if missing and (strict or len(missing) == len(names)):
        raise FacemaeError(
            f"{len(missing)} of {len(names)} released identities have no original faces in "
            f"{', '.join(gallery)} (e.g. {missing[0]!r}): pass the split(s) the released set "
            "was made from" + ("" if len(missing) == len(names) else ", or drop --strict")
        )
    return missing


def _prepare_model(model: nn.Module | str | os.PathLike, device: str | torch.device | None):
    """(model in eval mode, device): a path is loaded with load_recognizer and moved to device."""
    if isinstance(model, nn.Module):
        param = next(model.parameters(), None)
        dev = resolve_device(device) if device is not None else None
        return model.eval(), dev or (param.device if param is not None else torch.device("cpu"))
    from facemae_dist.engine.recognize import load_recognizer

    dev = resolve_device(device)
    return load_recognizer(model).to(dev).eval(), dev


def audit(
    released: Paths,
    original: Paths,
    model: nn.Module | str | os.PathLike,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    strict: bool = False,
    progress: bool = False,
    block: int = 4096,
    gallery_block: int = 65536,
) -> dict[str, Any]:
    """Retrieve every released face against the originals (+ distractors); see the module doc.

    ``model``: a recognizer module or a `facemae train` export path. Returns the retrieval report
    plus the splits, ``missing_identities`` and ``skipped_queries``.
    """
    rel, gal = _as_list(released), _as_list(original)
    missing = _check_splits(rel, gal, strict)
    for split in rel + gal:
        check_image_size(split, IMAGE_SIZE, "the recognizer")
    net, dev = _prepare_model(model, device)
    q_emb, q_ids, _, q_src = embed_split(net, rel, batch_size, dev, num_workers, progress)
    g_emb, g_ids, g_keys, _ = embed_split(net, gal, batch_size, dev, num_workers, progress)
    known = set(g_ids)
    keep = np.array([i in known for i in q_ids], dtype=bool)
    if not keep.any():
        raise FacemaeError(f"no released face has its identity in the gallery {', '.join(gal)}")
    skipped = int((~keep).sum())
    if skipped:
        warnings.warn(
            f"{skipped} released faces of {len(set(np.array(q_ids)[~keep]))} identities have no "
            "original faces in the gallery: left out of the rates",
            stacklevel=2,
        )
    pick = np.flatnonzero(keep)
    result = retrieval(
        q_emb[pick], [q_ids[i] for i in pick], [q_src[i] for i in pick],
        g_emb, g_ids, g_keys, block=block, gallery_block=gallery_block, device=dev,
    )  # fmt: skip
    missing = sorted(set(missing) | {q_ids[i] for i in np.flatnonzero(~keep)})
    result.update(released=rel, gallery=gal, missing_identities=missing, skipped_queries=skipped)
    if not isinstance(model, nn.Module):
        result["model"] = os.fspath(model)
    return result


# ------------------------------------------------------------------------------------------ CLI


def _table(report: dict[str, Any]):
    """The report as a table, its rates named and formatted as in the demo's report table."""
    from rich.table import Table

    from facemae_dist.report import LEAKAGE_FORMAT, leakage_name

    table = Table(title="privacy leakage (lower = less leakage)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rates = sorted(
        (k for k in report if k.startswith("top") and k[3:].isdigit()), key=lambda k: int(k[3:])
    )
    for key in [*rates, "source_top1", "chance_top1"]:
        value = report[key]  # None: no query's source is in the gallery
        table.add_row(leakage_name(key), "—" if value is None else LEAKAGE_FORMAT.format(value))
    table.add_row("queries (released faces)", f"{report['num_queries']:,}")
    table.add_row("  with their source in the gallery", f"{report['source_queries']:,}")
    table.add_row("  left out (identity not in gallery)", f"{report['skipped_queries']:,}")
    table.add_row("gallery faces", f"{report['num_gallery']:,}")
    table.add_row("gallery identities", f"{report['gallery_identities']:,}")
    return table


def parser() -> argparse.ArgumentParser:
    """The `facemae audit` command line."""
    p = argparse.ArgumentParser(
        prog="facemae audit",
        description="Privacy leakage: retrieve released faces against the originals with a "
        "recognizer that never saw the released identities.",
        epilog="example:\n  facemae audit shards/released shards/unseen shards/distractors "
        "--model runs/r50/backbone.safetensors --out runs/audit.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("released", help="released split folder (e.g. written by `facemae reconstruct`)")
    p.add_argument("original", nargs="+", help="gallery split folders: originals + distractors")
    p.add_argument("--model", required=True, help="recognizer export (.safetensors + model.json)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=128,
        metavar="B",
        help="faces per forward pass (default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        metavar="W",
        help="decoding processes (default: %(default)s)",
    )
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--strict", action="store_true", help="error when a released identity is absent")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in logs)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`facemae audit RELEASED ORIGINAL [ORIGINAL ...] --model M [--out report.json]`."""
    from rich.console import Console

    args = parser().parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        raise FacemaeError("--batch-size must be positive and --workers not negative")
    report = audit(
        args.released, args.original, args.model, batch_size=args.batch_size,
        device=args.device, num_workers=args.workers, strict=args.strict,
        progress=not args.no_progress,
    )  # fmt: skip
    Console().print(_table(report))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        print(f"report → {out}")
    return report

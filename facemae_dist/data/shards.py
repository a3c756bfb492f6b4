"""Faces → WebDataset shards: planned up front, written in parallel, streaming, resumable, checksummed.

Flow: the source is listed (labels and sizes only, as numpy arrays), identities are split into
``train`` and (with a hold-out) ``unseen``, each split's items are ordered (optionally shuffled) and cut
into shards by sample count and byte budget. Each shard is then an independent task: a worker process
reads its items, checks them, writes ``<name>-NNNNNN.tar.tmp`` and renames it when complete. The main
process appends each finished shard to a journal, so ``resume`` keeps verified shards and redoes the
rest; the plan is deterministic and the tar writer byte-stable, so a resumed run ends with the same
shards (same sha256) as an uninterrupted one. Memory: the plan costs ~16 bytes per image, workers hold
one image at a time.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shlex
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from facemae_dist.config import write_text_atomic
from facemae_dist.data.images import FITS, BadImage, check_image, exif_orientation, reencode
from facemae_dist.data.sources import Source
from facemae_dist.data.tario import HashingTarWriter, sha256_file
from facemae_dist.errors import FacemaeError
from facemae_dist.progress import ProgressBar

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_JOURNAL = ".journal.jsonl"
_PLAN = ".plan.json"
_META_BYTES = 2 * (512 + 512)  # .cls and .json members: a header and a data block each


@dataclass
class ShardOptions:
    """What `facemae shard` / tools/shard_dataset.py accept (see their --help)."""

    samples_per_shard: int = 1000
    max_shard_bytes: int | None = None
    workers: int = 1
    shuffle: bool = False  # `facemae shard` shuffles unless --no-shuffle
    seed: int = 0
    holdout_identities: int = 0
    holdout_fraction: float = 0.0
    strict: bool = False
    resume: bool = False
    image_size: int = 112
    fit: str = "pad"  # how non-square faces become square: pad, crop or squash (images.FITS)
    name: str = "faces"
    full_decode: bool = (
        False  # decode every image to validate it (slower; catches corrupt payloads)
    )
    progress: bool = True
    command: str = field(
        default_factory=lambda: shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:])
    )

    def validate(self) -> None:
        if self.samples_per_shard < 1:
            raise FacemaeError("--samples-per-shard must be ≥ 1")
        if self.max_shard_bytes is not None and self.max_shard_bytes < 16 * 1024:
            raise FacemaeError("--max-shard-bytes must be at least 16384 (one image plus headers)")
        if self.holdout_identities < 0:
            raise FacemaeError(f"--holdout-identities must be ≥ 0, got {self.holdout_identities}")
        if self.holdout_identities and self.holdout_fraction:
            raise FacemaeError("use either --holdout-identities or --holdout-fraction, not both")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise FacemaeError("--holdout-fraction must be in [0, 1)")
        if self.workers < 1:
            raise FacemaeError("--workers must be ≥ 1")
        if self.seed < 0:
            raise FacemaeError(f"--seed must be ≥ 0, got {self.seed}")
        if self.fit not in FITS:
            raise FacemaeError(f"--fit must be one of {', '.join(FITS)}, got {self.fit!r}")


@dataclass
class SplitPlan:
    name: str
    items: np.ndarray  # source indices in write order
    cls: np.ndarray  # contiguous label per item
    identities: np.ndarray  # source identity id of each cls
    bounds: np.ndarray  # shard i holds items[bounds[i]:bounds[i+1]]

    def fingerprint(self, source: Source, opts: ShardOptions) -> str:
        """What a shard's bytes depend on: a resume keeps old shards only when all of it matches
        (labels too: a corrected file list must not keep shards with the old labels)."""
        sha = hashlib.sha256()
        for arr in (self.items, self.bounds, self.cls, self.identities):
            sha.update(np.ascontiguousarray(arr).tobytes())
        names = source.identity_names
        label_names = "\n".join(str(names[i]) for i in self.identities.tolist())
        sha.update(label_names.encode("utf-8", "surrogateescape"))  # names may not be UTF-8
        sha.update(f"{source.description}|{len(source)}|{opts.image_size}|{opts.name}".encode())
        sha.update(f"|{opts.full_decode}|{opts.strict}|{opts.fit}".encode())
        return sha.hexdigest()


# ---------------------------------------------------------------- planning


def holdout_mask(num_identities: int, opts: ShardOptions) -> np.ndarray:
    """Boolean per identity: True → moved to the `unseen` split (whole identities, seeded)."""
    k = opts.holdout_identities or int(round(opts.holdout_fraction * num_identities))
    if opts.holdout_fraction and k == 0:  # asked for a hold-out: never silently give none
        k = 1
    if k >= num_identities:
        raise FacemaeError(
            f"hold-out of {k} identities leaves none of the {num_identities} for training"
        )
    mask = np.zeros(num_identities, dtype=bool)
    if k:
        mask[np.random.default_rng(opts.seed).choice(num_identities, k, replace=False)] = True
    return mask


def _shard_bounds(sizes: np.ndarray, opts: ShardOptions) -> np.ndarray:
    """Cut points: at most samples_per_shard per shard and, if set, at most max_shard_bytes."""
    n = len(sizes)
    if opts.max_shard_bytes is None:
        return np.append(np.arange(0, n, opts.samples_per_shard), n)
    budget = opts.max_shard_bytes - 1024  # end-of-archive blocks
    cum = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    bounds = [0]
    while bounds[-1] < n:
        start = bounds[-1]
        by_bytes = int(np.searchsorted(cum, cum[start] + budget, side="right")) - 1
        bounds.append(min(max(by_bytes, start + 1), start + opts.samples_per_shard, n))
    return np.asarray(bounds, dtype=np.int64)


def _member_sizes(source: Source, items: np.ndarray) -> np.ndarray:
    sizes = source.sizes()
    if sizes is None:  # unknown up front (synthetic): estimate from a few items
        probe = [len(source.read(int(i)).data) for i in items[:32]]
        est = int(max(probe) * 1.25) if probe else 4096
        sizes = np.full(len(source), est, dtype=np.int64)
    data = np.asarray(sizes, dtype=np.int64)[items]
    return 512 + (data + 511) // 512 * 512 + _META_BYTES


def plan_splits(source: Source, opts: ShardOptions) -> list[SplitPlan]:
    labels = np.asarray(source.labels, dtype=np.int64)
    unseen = holdout_mask(len(source.identity_names), opts)
    plans = []
    for name, id_mask in (("train", ~unseen), ("unseen", unseen)):
        if not id_mask.any():
            continue
        items = np.flatnonzero(id_mask[labels]).astype(np.int64)
        if opts.shuffle:
            rng = np.random.default_rng([opts.seed, len(plans)])
            items = items[rng.permutation(len(items))]
        identities = np.flatnonzero(id_mask)
        remap = np.full(len(id_mask), -1, dtype=np.int64)
        remap[identities] = np.arange(len(identities))
        need_sizes = opts.max_shard_bytes is not None
        sizes = _member_sizes(source, items) if need_sizes else np.zeros(len(items), np.int64)
        bounds = _shard_bounds(sizes, opts)
        plans.append(SplitPlan(name, items, remap[labels[items]], identities, bounds))
    return plans


# ---------------------------------------------------------------- writing (worker side)

_WORKER_SOURCE: Source | None = None
_WORKER_META: tuple[np.ndarray, list[str]] | None = None


def _init_worker(source: Source | None) -> None:
    global _WORKER_SOURCE, _WORKER_META
    if source is not None:
        _WORKER_SOURCE, _WORKER_META = source, None


def _source_meta(source: Source) -> tuple[np.ndarray, list[str]]:
    """(labels, identity names) of the source, fetched once per process, not once per shard:
    a source may compute them on each access (SyntheticSource: ~0.8 s and ~450 MB at 2M ids)."""
    global _WORKER_META
    if _WORKER_META is None:
        _WORKER_META = (np.asarray(source.labels), source.identity_names)
    return _WORKER_META


def _encode(data: bytes, opts: ShardOptions) -> tuple[bytes, str, bool]:
    """(encoded bytes, extension, whether the face was not square)."""
    kind, (width, height) = check_image(data, opts.full_decode)
    # already encoded at the target size: pass through untouched, unless an EXIF orientation says
    # to turn it (the readers ignore the tag: such a face is turned and re-encoded)
    square = kind in ("jpg", "png") and width == height == opts.image_size
    if square and exif_orientation(data, kind) == 1:
        return data, kind, False
    return *reencode(data, opts.image_size, kind, fit=opts.fit), width != height


def _sample(source: Source, index: int, opts: ShardOptions) -> tuple[bytes, str, str, bool]:
    """(encoded bytes, extension, position, was not square) of one item; raises _Rejected with
    the reason."""
    try:
        rec = source.read(index)
    except OSError as exc:
        raise _Rejected(f"item {index}", f"unreadable ({exc})") from exc
    try:
        data, ext, non_square = _encode(rec.data, opts)
    except BadImage as exc:
        raise _Rejected(rec.position, str(exc)) from exc
    return data, ext, rec.position, non_square


class _Rejected(Exception):
    def __init__(self, position: str, reason: str) -> None:
        super().__init__(f"{position}: {reason}")
        self.position, self.reason = position, reason


def write_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Write one planned shard atomically; return its journal entry (runs in a worker)."""
    source, opts, path = _WORKER_SOURCE, task["opts"], task["path"]
    labels, names = _source_meta(source)
    rejected, samples, non_square = [], 0, 0
    with open(path + ".tmp", "wb") as f:
        tar = HashingTarWriter(f)
        for index, cls in zip(task["items"].tolist(), task["cls"].tolist(), strict=True):
            try:
                data, ext, position, reshaped = _sample(source, index, opts)
            except _Rejected as bad:
                if opts.strict:
                    raise FacemaeError(
                        f"bad input {bad} (item {index}): fix or remove it, then run the same "
                        "command again (add --resume to keep shards already written), or drop "
                        "--strict to skip bad inputs (they are listed in the manifest)"
                    ) from None
                rejected.append({"index": index, "position": bad.position, "reason": bad.reason})
                continue
            key = f"{index:010d}"
            meta = {"label": names[labels[index]], "position": position, "index": index}
            tar.add(f"{key}.{ext}", data)
            tar.add(f"{key}.cls", str(cls).encode())
            tar.add(f"{key}.json", json.dumps(meta).encode())  # ASCII escapes: any name round-trips
            samples += 1
            non_square += reshaped
        sha = tar.close()
    os.replace(path + ".tmp", path)
    return {
        "file": os.path.basename(path),
        "shard": task["shard"],
        "samples": samples,
        "bytes": tar.bytes_written,
        "sha256": sha,
        "rejected": rejected,
        "non_square": non_square,
    }


# ---------------------------------------------------------------- orchestration (main process)


def verified_shards(split_dir: Path, journal_glob: str = _JOURNAL) -> dict[int, dict[str, Any]]:
    """Journalled shards whose file is complete (size and sha256 match), by shard index.

    Shared by every stage that writes shards resumably (`shard`, `reconstruct`): a line cut by a
    kill, a missing or damaged file just means that shard is redone.
    """
    entries: dict[int, dict[str, Any]] = {}
    for journal in sorted(split_dir.glob(journal_glob)):
        for line in journal.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            path = split_dir / entry["file"]
            if (
                path.is_file()
                and path.stat().st_size == entry["bytes"]
                and sha256_file(str(path)) == entry["sha256"]
            ):
                entries[entry["shard"]] = entry
    return entries


def open_journal(path: Path) -> TextIO:
    """A shard journal opened for appending entries (one JSON line each): a line cut by a kill is
    ended first, so that it does not swallow the next entry."""
    journal = open(path, "a")  # noqa: SIM115 (the caller's with-block closes it)
    if journal.tell() and not path.read_bytes().endswith(b"\n"):
        journal.write("\n")
    return journal


def save_manifest(split_dir: Path, manifest: dict) -> dict:
    """Write manifest.json atomically (readers never see half of it)."""
    write_text_atomic(split_dir / MANIFEST, json.dumps(manifest, indent=1))  # ASCII: any name
    return manifest


def _only_leftovers(split_dir: Path) -> bool:
    """True when the folder holds only the bookkeeping of a run that finished no shard (plan,
    journal, unfinished ``*.tmp`` files) and nothing else: no shard, manifest or foreign file."""
    names = list(split_dir.iterdir())
    return bool(names) and all(
        p.is_file() and (p.name in (_PLAN, _JOURNAL) or p.name.endswith(".tmp")) for p in names
    )


def _prepare_split_dir(split_dir: Path, fingerprint: str, opts: ShardOptions) -> dict[int, dict]:
    """Create the split folder, or on --resume return the verified finished shards."""
    plan_file = split_dir / _PLAN
    if split_dir.exists() and _only_leftovers(split_dir):
        # a run that stopped before its first shard (e.g. --strict on a bad input) left nothing
        # worth keeping: start afresh rather than demand --resume with matching options
        for leftover in split_dir.iterdir():
            leftover.unlink()
    if split_dir.exists() and any(split_dir.iterdir()):
        if not opts.resume:
            raise FacemaeError(
                f"{split_dir} already holds shards: pass --resume to continue that run, "
                "or choose an empty output directory"
            )
        try:
            old = json.loads(plan_file.read_text()) if plan_file.exists() else {}
        except ValueError:  # damaged: the shards' origin is unknown, so they cannot be kept
            old = {}
        if old.get("fingerprint") != fingerprint:
            raise FacemaeError(
                f"cannot resume into {split_dir}: it was written from a different source or "
                "options (labels, seed, shuffle, hold-out, shard size, --strict, --full-decode, --fit). "
                "Use the original command, or an empty output directory"
            )
    split_dir.mkdir(parents=True, exist_ok=True)
    for tmp in split_dir.glob("*.tmp"):
        tmp.unlink()
    # atomic: a kill mid-write must not leave a plan that blocks every later --resume
    write_text_atomic(plan_file, json.dumps({"fingerprint": fingerprint}))
    return verified_shards(split_dir)


def _tasks(plan: SplitPlan, split_dir: Path, done: dict[int, dict], opts: ShardOptions):
    for shard in range(len(plan.bounds) - 1):
        if shard in done:
            continue
        lo, hi = plan.bounds[shard], plan.bounds[shard + 1]
        yield {
            "shard": shard,
            "path": str(split_dir / f"{opts.name}-{shard:06d}.tar"),
            "items": plan.items[lo:hi],
            "cls": plan.cls[lo:hi],
            "opts": opts,
        }


def _run_tasks(tasks: list[dict], source: Source, opts: ShardOptions, on_done) -> None:
    if opts.workers == 1 or len(tasks) <= 1:
        _init_worker(source)
        for task in tasks:
            on_done(write_shard(task))
        return
    # fork shares the listed source with the workers for free; spawn pickles it once per worker
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    init_arg = None if method == "fork" else source
    _init_worker(source)
    # an executor, not a Pool: a worker killed outright (the OOM killer on a huge image) breaks it
    # with an error, where Pool.imap waits forever for the dead worker's shard
    with ProcessPoolExecutor(
        opts.workers, mp_context=ctx, initializer=_init_worker, initargs=(init_arg,)
    ) as pool:
        futures = [pool.submit(write_shard, task) for task in tasks]
        try:
            for future in as_completed(futures):
                on_done(future.result())
        except BrokenProcessPool:
            raise FacemaeError(
                "a shard writer process died (killed for memory on a huge image?): the shards "
                "finished so far are kept; run the same command with --resume, with fewer --workers "
                "if memory is short"
            ) from None
        finally:  # on an error (e.g. --strict) stop the queued shards instead of writing them all
            for future in futures:
                future.cancel()


def _write_split(source: Source, plan: SplitPlan, out_dir: Path, opts: ShardOptions) -> dict:
    split_dir = out_dir / plan.name
    done = _prepare_split_dir(split_dir, plan.fingerprint(source, opts), opts)
    tasks = list(_tasks(plan, split_dir, done, opts))
    kept = sum(len(plan.items[plan.bounds[k] : plan.bounds[k + 1]]) for k in done)
    with (
        open_journal(split_dir / _JOURNAL) as journal,
        ProgressBar(f"shard {plan.name}", len(plan.items), "img", opts.progress) as bar,
    ):
        bar.advance(kept)

        def on_done(entry: dict) -> None:
            journal.write(json.dumps(entry) + "\n")
            journal.flush()
            done[entry["shard"]] = entry
            bar.advance(entry["samples"] + len(entry["rejected"]))

        _run_tasks(tasks, source, opts, on_done)
    return write_manifest(source, plan, split_dir, done, opts)


def write_manifest(
    source: Source, plan: SplitPlan, split_dir: Path, done: dict[int, dict], opts: ShardOptions
) -> dict:
    entries = [done[k] for k in sorted(done)]
    rejected = []
    for entry in entries:
        for bad in entry["rejected"]:
            rejected.append({**bad, "shard": entry["file"]})
    names = source.identity_names
    manifest = {
        "format_version": FORMAT_VERSION,
        "split": plan.name,
        "num_samples": sum(e["samples"] for e in entries),
        "num_classes": len(plan.identities),
        # faces made square by --fit (journals of older versions did not count them)
        "non_square": sum(e.get("non_square", 0) for e in entries),
        "label_map": [names[i] for i in plan.identities.tolist()],
        # a shard whose inputs were all rejected holds nothing: readers never see it
        "shards": [
            {k: e[k] for k in ("file", "samples", "bytes", "sha256")}
            for e in entries
            if e["samples"]
        ],
        "source": source.description,
        "command": opts.command,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("command", "progress")},
        "rejected": rejected,
    }
    save_manifest(split_dir, manifest)
    if not manifest["num_samples"]:
        raise FacemaeError(
            f"every input of split {plan.name!r} was rejected ({len(rejected)}; reasons in "
            f"{split_dir / MANIFEST}): check the source, or pass --strict to stop at the first one"
        )
    over = [e for e in entries if opts.max_shard_bytes and e["bytes"] > opts.max_shard_bytes]
    if over:  # the plan uses the source's file sizes; resized faces are re-encoded
        warnings.warn(
            f"{len(over)} shard(s) of {plan.name!r} exceed --max-shard-bytes "
            f"{opts.max_shard_bytes} (largest {max(e['bytes'] for e in over)} bytes): their faces "
            f"were resized to {opts.image_size} px and re-encoded larger than the source files; "
            "lower --max-shard-bytes to compensate",
            stacklevel=2,
        )
    return manifest


def shard_dataset(
    source: Source, out_dir: str | os.PathLike, opts: ShardOptions
) -> dict[str, dict]:
    """Shard `source` into OUT_DIR/<split>/; return {split: manifest}."""
    opts.validate()
    if len(source) == 0:
        raise FacemaeError(f"{source.description}: no images found")
    out = Path(out_dir)
    return {plan.name: _write_split(source, plan, out, opts) for plan in plan_splits(source, opts)}


def load_manifest(path: str | os.PathLike) -> dict:
    """Read a split's manifest (pass the split folder or the manifest file); adds `urls`."""
    p = Path(path)
    p = p / MANIFEST if p.is_dir() else p
    if not p.is_file():
        # `facemae shard` writes OUT_DIR/<split>/manifest.json: name the splits of a root
        root = Path(path) if Path(path).is_dir() else None
        splits = sorted(d for d in root.iterdir() if (d / MANIFEST).is_file()) if root else []
        if splits:
            examples = " or ".join(str(d) for d in splits[:3])
            raise FacemaeError(f"{root} is a shard root: pass one of its splits, e.g. {examples}")
        if not Path(path).exists():
            raise FacemaeError(
                f"no shard manifest at {p}: {path} does not exist (a typo? pass a split "
                "folder, e.g. OUT_DIR/train)"
            )
        raise FacemaeError(f"no shard manifest at {p}: run `facemae shard SOURCE OUT_DIR` first")
    try:
        manifest = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise FacemaeError(
            f"{p} is not valid JSON ({exc}); re-run `facemae shard --resume`"
        ) from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FacemaeError(f"{p}: unsupported manifest format {manifest.get('format_version')}")
    manifest["urls"] = [str(p.parent / s["file"]) for s in manifest["shards"]]
    return manifest

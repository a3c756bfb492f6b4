"""Deployment: faces of identities FaceMAE never saw → masked → reconstructed → a new shard set.

The same command builds the comparison sets from the same split: `masked` (masked patches blanked),
`blur`, `noise` and `original` (a re-encoded copy, the no-privacy reference).

Distributed without collectives in the hot path: rank r of W takes input shards r, r+W, ... and
writes one output shard per input shard (same index, so no two ranks write one file), atomically,
journalled per rank. A killed job run again skips complete shards. Rank 0 merges the manifest.
Masks are seeded by (seed, shard, copy), so the output does not depend on the number of ranks.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from facemae_dist import dist
from facemae_dist.config import model_json_kind, read_json, write_text_atomic
from facemae_dist.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    load_manifest,
    open_journal,
    save_manifest,
    verified_shards,
)
from facemae_dist.data.stream import check_image_size, decode_face, normalize, read_shard
from facemae_dist.data.tario import HashingTarWriter
from facemae_dist.errors import FacemaeError
from facemae_dist.progress import ProgressBar

METHODS = ("facemae", "masked", "blur", "noise", "original")


@dataclass
class ReconstructOptions:
    method: str = "facemae"
    model: str | None = None  # FaceMAE run folder (from `facemae pretrain`), for method facemae
    mask_ratio: float = 0.75
    copies: int = 1  # reconstructions per face, each with its own mask
    paste_visible: bool = True
    jpeg_quality: int = 95
    # Baseline strengths at which retrieval of the source face drops to the level of 75% masking
    # (measured in the demo: top-1 identity retrieval 19% for blur 10 px, 7% for noise 2.0); weaker
    # settings leave faces fully identifiable (blur 3 px: 100%) and are no privacy baseline at all.
    blur_sigma: float = 10.0  # pixels
    noise_std: float = 2.0  # in the [-1, 1] image space
    patch_size: int = 16  # mask grid of the model-free baselines (FaceMAE uses its own)
    batch_size: int = 64
    seed: int = 0
    # off: the release names no one (pseudonymous classes, keys and metadata; the audit maps them
    # back through the input split); on: names, source keys and metadata kept (internal use only)
    keep_names: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.method not in METHODS:
            raise FacemaeError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.method == "facemae" and not self.model:
            raise FacemaeError(
                "--method facemae needs --model RUN_DIR (a finished `facemae pretrain` run)"
            )
        if not 0.0 < self.mask_ratio < 1.0:
            raise FacemaeError(f"--mask-ratio must be in (0, 1), got {self.mask_ratio}")
        if self.copies < 1:
            raise FacemaeError(f"--copies must be ≥ 1, got {self.copies}")
        if not self.blur_sigma > 0:
            raise FacemaeError(f"--blur-sigma must be > 0 pixels, got {self.blur_sigma}")
        if not self.noise_std > 0:
            raise FacemaeError(f"--noise-std must be > 0, got {self.noise_std}")
        if not 1 <= self.jpeg_quality <= 100:
            raise FacemaeError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if self.batch_size < 1:
            raise FacemaeError(f"--batch-size must be ≥ 1, got {self.batch_size}")
        if self.patch_size < 1:
            raise FacemaeError(f"patch_size must be ≥ 1, got {self.patch_size}")
        if self.method == "facemae":
            _model_files(self.model)


def _model_files(model: str | os.PathLike) -> tuple[Path, Path]:
    """(model.json, facemae.safetensors) of a FaceMAE run folder, or a FacemaeError naming the fix."""
    run = Path(model)
    if run.is_file() and run.suffix == ".safetensors":
        run = run.parent  # the weights file itself: its folder is the run
    fix = "pass the folder of a finished `facemae pretrain` run (model.json + facemae.safetensors)"
    meta, weights = run / "model.json", run / "facemae.safetensors"
    if not run.is_dir():
        raise FacemaeError(f"--model {model}: no such folder; {fix}")
    if not meta.is_file():
        raise FacemaeError(f"--model {model}: no model.json here; {fix}")
    kind = model_json_kind(read_json(meta, f"--model {model}", fix))
    if kind != "facemae":
        what = "a recognizer export from `facemae train`" if kind else "no FaceMAE export"
        raise FacemaeError(f"--model {model}: its model.json describes {what}; {fix}")
    if not weights.is_file():
        raise FacemaeError(
            f"--model {model}: model.json but no facemae.safetensors (the run did not finish, or "
            f"the weights were not copied with it); {fix}"
        )
    return meta, weights


class Releaser:
    """Turns a batch of original faces (normalised) into released faces with one method."""

    def __init__(self, opts: ReconstructOptions, device: torch.device) -> None:
        self.opts, self.device = opts, device
        self.model = None
        if opts.method == "facemae":
            from safetensors import SafetensorError

            from facemae_dist.engine.pretrain import load_facemae

            meta, _ = _model_files(opts.model)
            try:
                self.model = load_facemae(meta.parent).to(device)
            except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise FacemaeError(
                    f"--model {opts.model}: cannot load the FaceMAE weights "
                    f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); pass the folder of a finished "
                    "`facemae pretrain` run, exported by this version of the toolkit"
                ) from None
        self.patch = self.model.patch_size if self.model is not None else opts.patch_size

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        from facemae_dist.models import mae

        o, b = self.opts, images.shape[0]
        if o.method == "original":
            return images
        if o.method == "blur":
            from torchvision.transforms.functional import gaussian_blur

            # 3 sigma each side, but no wider than the image allows (reflect padding < its size)
            kernel = min(2 * int(3 * o.blur_sigma) + 1, 2 * min(images.shape[-2:]) - 1)
            return gaussian_blur(images, [kernel, kernel], [o.blur_sigma, o.blur_sigma])
        if o.method == "noise":
            noise = torch.randn(images.shape, generator=generator, device=generator.device)
            return (images + o.noise_std * noise.to(images.device)).clamp(-1, 1)
        if o.method == "masked":
            num_patches = (images.shape[-1] // self.patch) ** 2
            masking = mae.random_masking(b, num_patches, o.mask_ratio, generator, images.device)
            return mae.masked_images(images, masking.mask, self.patch)
        with torch.no_grad():
            recon, _ = self.model.reconstruct(images, o.mask_ratio, generator, o.paste_visible)
        return recon.clamp(-1, 1)


def _jpeg(image: torch.Tensor, quality: int) -> bytes:
    array = (
        ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    )
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _batches(url: str, expected: int, size: int):
    batch: list[dict] = []
    for sample in read_shard(url, expected):
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def release_shard(releaser: Releaser, url: str, expected: int, out_path: Path, shard: int) -> dict:
    """Write the released version of one input shard; returns its journal entry."""
    o = releaser.opts
    tmp = out_path.with_name(out_path.name + ".tmp")
    samples = 0
    with open(tmp, "wb") as f:
        tar = HashingTarWriter(f)
        # each face is decoded once; every copy draws its masks from its own generator (seeded by
        # shard and copy, running on across batches, so no two faces of a shard share a mask).
        # Copy 0 streams out; later copies are kept encoded (a few KB a face) and written after it,
        # so copies of one face are not neighbours for a trainer's shuffle buffer
        gens = [
            torch.Generator().manual_seed(o.seed * 1_000_003 + shard * 1009 + c)
            for c in range(o.copies)
        ]
        later: list[list[tuple[str, bytes]]] = [[] for _ in gens[1:]]
        first = 0  # position of the batch's first face in the input shard
        for batch in _batches(url, expected, o.batch_size):
            images = normalize(torch.stack([decode_face(s) for s in batch])).to(releaser.device)
            for copy, gen in enumerate(gens):
                released = releaser(images, gen).cpu()  # JPEG encoding happens on the host
                for pos, (sample, image) in enumerate(zip(batch, released, strict=True), first):
                    files = _sample_files(sample, image, (shard, pos, copy), o)
                    if copy:
                        later[copy - 1] += files
                    else:
                        for name, data in files:
                            tar.add(name, data)
                    samples += 1
            first += len(batch)
        for name, data in itertools.chain.from_iterable(later):
            tar.add(name, data)
        sha = tar.close()
    os.replace(tmp, out_path)
    return {
        "shard": shard,
        "file": out_path.name,
        "samples": samples,
        "bytes": tar.bytes_written,
        "sha256": sha,
    }


def pseudonymous_key(shard: int, pos: int, copy: int) -> str:
    """The key of a released face that names no one: where its source sits in the input split
    (shard index in the input manifest, position in that shard) and which copy it is."""
    return f"{shard:06d}_{pos:06d}_{copy}"


def _sample_files(
    sample: dict, image: torch.Tensor, where: tuple[int, int, int], o: ReconstructOptions
) -> list[tuple[str, bytes]]:
    """The tar members of one released face: JPEG, label and metadata. Without --keep-names the
    key and metadata carry nothing of the source (its key or json may hold a name or a path)."""
    shard, pos, copy = where
    meta: dict[str, Any] = {"method": o.method, "mask_ratio": o.mask_ratio, "copy": copy}
    if o.keep_names:
        key = f"{sample['__key__']}_{copy}"
        meta = json.loads(sample.get("json", b"{}")) | {"source_key": sample["__key__"]} | meta
    else:
        key = pseudonymous_key(shard, pos, copy)
    return [
        (f"{key}.jpg", _jpeg(image, o.jpeg_quality)),
        (f"{key}.cls", sample["cls"]),
        (f"{key}.json", json.dumps(meta).encode()),  # ASCII escapes: any name round-trips
    ]


def _done_entries(out: Path) -> dict[int, dict]:
    """Shards finished by any rank of an earlier attempt, verified against their journals."""
    return verified_shards(out, _JOURNALS)


_JOURNALS = ".journal-rank*.jsonl"
#: the fingerprint of the run writing an output folder, saved before any shard is written
PLAN = ".reconstruct-plan.json"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def fingerprint(src: dict, opts: ReconstructOptions) -> dict[str, Any]:
    """Everything the released shards depend on: the input split's content (its shards' sha256s
    and label map), the method and the options that method reads, and for FaceMAE the model's
    identity (folder, model.json, size and mtime of the weights). Equal fingerprints, equal shards."""
    shards = [[s["file"], s.get("sha256"), s.get("samples")] for s in src["shards"]]
    fp: dict[str, Any] = {
        "input": _digest({"shards": shards, "label_map": src["label_map"]}),
        "method": opts.method,
        "mask_ratio": opts.mask_ratio,  # also written in every sample's metadata
        "copies": opts.copies,
        "jpeg_quality": opts.jpeg_quality,
        "batch_size": opts.batch_size,
        "keep_names": opts.keep_names,
    }
    if opts.method in ("noise", "masked", "facemae"):
        fp["seed"] = opts.seed
    if opts.method == "blur":
        fp["blur_sigma"] = opts.blur_sigma
    elif opts.method == "noise":
        fp["noise_std"] = opts.noise_std
    elif opts.method == "masked":
        fp["patch_size"] = opts.patch_size
    elif opts.method == "facemae":
        meta, weights = _model_files(opts.model)
        stat = weights.stat()
        fp.update(
            paste_visible=opts.paste_visible,
            model=str(meta.parent.resolve()),
            model_json=hashlib.sha256(meta.read_bytes()).hexdigest(),
            weights_bytes=stat.st_size,
            weights_mtime_ns=stat.st_mtime_ns,
        )
    return fp


def _check_paths(input_split: str, out: Path) -> None:
    """Refuse an output folder that is, lies inside, or holds the input split."""
    given = Path(input_split)
    inp = (given if given.is_dir() else given.parent).resolve()
    dst = out.resolve()
    if inp == dst or dst.is_relative_to(inp) or inp.is_relative_to(dst):
        where = "is" if inp == dst else "lies inside" if dst.is_relative_to(inp) else "contains"
        raise FacemaeError(
            f"output folder {out} {where} the input split {input_split}: the release would "
            "overwrite or mix with the original shards; choose an output folder outside it, "
            "e.g. released/<method>"
        )


def _claim_output(out: Path, input_split: str, fp: dict[str, Any], rank: int) -> None:
    """Record this run's fingerprint in `out`, or refuse when `out` holds shards of another
    release (other input or options) or shards no release recorded. The same run again (a killed
    job rerun) matches and resumes. Ranks write identical plans, each atomically."""
    # look for released files BEFORE reading the plan: a rank writes its plan before any shard,
    # so when another rank's shards are seen here, that rank's plan is seen below
    released = any(out.glob(_JOURNALS)) or (out / MANIFEST).exists() or any(out.glob("*.tar"))
    plan_file = out / PLAN
    fix = f"choose another output folder, or delete {out} to release into it again"
    if plan_file.is_file():
        try:
            old = json.loads(plan_file.read_text()).get("fingerprint")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            old = None
        if released and old != fp:
            old = old if isinstance(old, dict) else {}
            diff = [
                f"{k} {old.get(k, '-')!r} → {fp.get(k, '-')!r}"
                if k not in ("input", "model_json")
                else f"{k} differs"
                for k in sorted(set(old) | set(fp))
                if old.get(k) != fp.get(k)
            ]
            raise FacemaeError(
                f"{out} holds a release made with other options or from another input "
                f"({'; '.join(diff[:6])}): {fix}"
            )
    elif released:
        raise FacemaeError(
            f"{out} already holds shards or a manifest, but no record of the `facemae "
            f"reconstruct` run that wrote them (another split, or an older release): {fix}"
        )
    write_text_atomic(
        plan_file, json.dumps({"fingerprint": fp, "input": str(input_split)}, indent=1)
    )


def reconstruct_split(input_split: str, output_split: str, opts: ReconstructOptions) -> dict | None:
    """Release every face of `input_split` into `output_split`; returns the manifest on rank 0,
    plus ``already_complete: True`` when an earlier run had finished it (nothing was written).

    An output folder belongs to one release (see :func:`fingerprint`): running the same command
    again resumes it; another input or other options there are refused."""
    opts.validate()
    src = load_manifest(input_split)
    out = Path(output_split)
    _check_paths(input_split, out)
    fp = fingerprint(src, opts)
    info = dist.detect()
    if info.world_size > 1:
        dist.init(use_deepspeed=False)
    releaser = Releaser(opts, dist.device(info))  # a model that does not load: fail before writing
    if releaser.model is not None:
        check_image_size(input_split, releaser.model.img_size, f"--model {opts.model}")
    out.mkdir(parents=True, exist_ok=True)
    _claim_output(out, input_split, fp, info.rank)
    done = _done_entries(out)
    # the same command again after it finished (not after a kill that left only the manifest out)
    complete = len(done) == len(src["urls"]) and (out / MANIFEST).is_file()
    mine = [
        i for i in range(len(src["urls"])) if i % info.world_size == info.rank and i not in done
    ]
    total = sum(src["shards"][i]["samples"] for i in mine) * opts.copies
    show = opts.progress and info.is_main and not complete  # no "0 img ... done" bar
    with (
        open_journal(out / f".journal-rank{info.rank:05d}.jsonl") as journal,
        ProgressBar(f"release {opts.method}", total, "img", show) as bar,
    ):
        for i in mine:
            entry = release_shard(
                releaser,
                src["urls"][i],
                src["shards"][i]["samples"],
                out / Path(src["urls"][i]).name,
                i,
            )
            journal.write(json.dumps(entry) + "\n")
            journal.flush()
            bar.advance(entry["samples"])
    dist.barrier()
    manifest = _merge_manifest(src, out, opts, input_split) if info.is_main else None
    dist.barrier()
    return {**manifest, "already_complete": True} if manifest and complete else manifest


def _merge_manifest(src: dict, out: Path, opts: ReconstructOptions, input_split: str) -> dict:
    done = _done_entries(out)
    missing = [i for i in range(len(src["urls"])) if i not in done]
    if missing:
        raise FacemaeError(
            f"{out}: shards {missing[:5]} were not written; run the same command again to finish"
        )
    entries = [done[i] for i in sorted(done)]
    manifest = {
        "format_version": FORMAT_VERSION,
        "split": src["split"],
        "num_samples": sum(e["samples"] for e in entries),
        "num_classes": src["num_classes"],
        "label_map": src["label_map"] if opts.keep_names else pseudonyms(src["num_classes"]),
        # the audit maps a pseudonymous release back to names and sources through its input
        "pseudonymous": not opts.keep_names,
        "input_split": os.path.abspath(input_split),
        "shards": [{k: e[k] for k in ("file", "samples", "bytes", "sha256")} for e in entries],
        "source": f"released:{opts.method}:{input_split}",
        "command": shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "options": {k: v for k, v in asdict(opts).items() if k != "progress"},
        "rejected": [],
    }
    return save_manifest(out, manifest)


def pseudonyms(num_classes: int) -> list[str]:
    """The names a shareable release gives its classes (class i of the input is `identity-i`)."""
    return [f"identity-{i:06d}" for i in range(num_classes)]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="facemae reconstruct",
        description="Mask and reconstruct faces of unseen identities into a privacy-preserving shard set "
        "(or build a baseline: masked, blur, noise, original).",
        epilog="examples:\n  facemae reconstruct shards/unseen released/blur --method blur --blur-sigma 10\n  torchrun --nproc_per_node 8 -m facemae_dist.reconstruct shards/unseen released/facemae "
        "--model runs/mae-b8 --mask-ratio 0.75",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="split folder to release (identities FaceMAE never saw)")
    p.add_argument("output", help="output split folder (shards + manifest.json)")
    d = ReconstructOptions()
    p.add_argument(
        "--method",
        default=d.method,
        choices=METHODS,
        help="facemae, or a baseline to compare with (default: %(default)s)",
    )
    p.add_argument("--model", default=None, help="FaceMAE run folder (for --method facemae)")
    p.add_argument(
        "--mask-ratio",
        type=float,
        default=d.mask_ratio,
        help="share of patches masked, for facemae and masked (default: %(default)s)",
    )
    p.add_argument(
        "--copies",
        type=int,
        default=d.copies,
        help="reconstructions per face, different masks (default: %(default)s)",
    )
    p.add_argument(
        "--no-paste-visible", action="store_true", help="use the model's prediction for every patch"
    )
    p.add_argument(
        "--jpeg-quality",
        type=int,
        default=d.jpeg_quality,
        help="JPEG quality of the released faces, 1-100 (default: %(default)s)",
    )
    p.add_argument(
        "--blur-sigma",
        type=float,
        default=d.blur_sigma,
        help="Gaussian blur in pixels, for --method blur (default: %(default)s)",
    )
    p.add_argument(
        "--noise-std",
        type=float,
        default=d.noise_std,
        help="noise std in the [-1, 1] image range, for --method noise (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="faces per forward pass (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of the masks and noise (default: %(default)s)",
    )
    p.add_argument(
        "--keep-names",
        action="store_true",
        help="keep identity names, source keys and the input's per-face metadata in the release "
        "(internal use: such a release is not shareable; by default it names no one and "
        "`facemae audit` maps it back through the input split)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in logs)")
    return p


def _options(a: argparse.Namespace) -> ReconstructOptions:
    return ReconstructOptions(
        method=a.method, model=a.model, mask_ratio=a.mask_ratio, copies=a.copies,
        paste_visible=not a.no_paste_visible, jpeg_quality=a.jpeg_quality, blur_sigma=a.blur_sigma,
        noise_std=a.noise_std, batch_size=a.batch_size, seed=a.seed, keep_names=a.keep_names,
        progress=not a.no_progress,
    )  # fmt: skip


def preflight(argv: Sequence[str], world_size: int = 1) -> None:
    """What `facemae submit` checks before queueing a release: options, paths, the input's
    manifest and the FaceMAE run folder (nothing is written, no model is loaded)."""
    a = parser().parse_args(list(argv))
    _options(a).validate()  # also the FaceMAE run folder
    _check_paths(a.input, Path(a.output))
    load_manifest(a.input)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    a = parser().parse_args(argv)
    opts = _options(a)
    manifest = reconstruct_split(a.input, a.output, opts)
    if manifest is None:
        return None
    faces = f"{manifest['num_samples']:,} faces of {manifest['num_classes']:,} identities"
    if manifest.get("already_complete"):
        print(
            f"{a.output} already holds this complete {opts.method} release of {a.input} "
            f"({faces}): nothing to do; to release again, delete {a.output} or choose another "
            "output folder"
        )
    else:
        print(f"{opts.method}: {faces} → {a.output}")
    return manifest

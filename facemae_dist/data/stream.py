"""Reading shards for training and inference: rank/worker split, shuffling, decode, flip, batching.

Training streams (``repeat=True``) read every sample at most once per epoch and give every rank
exactly ``batches_per_epoch`` batches, whatever the shard count: each epoch the shards are put in a
new order (the same on every rank), their samples form one sequence (counts from the manifest),
and each (rank, worker) slot reads its own contiguous part of it, as many samples as its batches
need; a part may begin or end inside a shard. What does not fill a global batch (fewer than
ranks x micro-batch samples) waits for another epoch. A slot shuffles its part through a buffer that
is emptied at the part's end. Everything random is seeded by (seed, epoch, slot), which makes the
stream reproducible and lets a resumed run skip the batches it already trained on (skipped samples
are never decoded).

Inference streams (``repeat=False``) read each shard once, the last batch may be short.
"""

from __future__ import annotations

import io
import os
import random
import signal
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen

from facemae_dist.data.images import to_rgb
from facemae_dist.data.shards import load_manifest
from facemae_dist.errors import FacemaeError

IMAGE_EXTS = ("jpg", "jpeg", "png")
_USED = frozenset({"cls", *IMAGE_EXTS})  # the members the loader reads


class BadShardError(FacemaeError):
    """A shard that cannot be read to the end (truncated or corrupt)."""


class _TarError(Exception):
    pass


_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")


def _octal_field(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 (sizes over 8 GiB)
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a PAX extended header ("LEN key=value\\n" records)."""
    pos, path = 0, None
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos += length
    return path


def iter_tar(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular members of a ustar / PAX / GNU tar stream, in order.

    ~20x faster than tarfile for small members (WebDataset shards hold 3 per face). Raises
    _TarError on a bad header checksum (which includes a header cut short; tarfile takes that
    for the end of the archive) or a member cut short.
    """
    next_name: str | None = None
    while True:
        header = stream.read(_BLOCK)
        if not header.strip(b"\0"):
            return  # end of archive, or a cut at a member boundary (read_shard checks)
        try:
            checksum = _octal_field(header[148:156])
        except ValueError:
            checksum = -1
        if len(header) < _BLOCK or checksum != sum(header[:148]) + 256 + sum(header[156:]):
            raise _TarError("bad checksum")
        size = _octal_field(header[124:136])
        data, pad = stream.read(size), -size % _BLOCK
        if len(data) < size or len(stream.read(pad)) < pad:
            raise _TarError("unexpected end of data")
        kind = header[156:157]
        if kind == b"L":  # GNU long name of the next member
            next_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind == b"x":  # PAX header of the next member
            next_name = _pax_path(data) or next_name
        elif kind in _REGULAR:
            name = header[:100].split(b"\0", 1)[0]
            if header[257:262] == b"ustar" and header[345]:
                name = header[345:500].split(b"\0", 1)[0] + b"/" + name
            yield next_name or name.decode("utf-8", "surrogateescape"), data
            next_name = None
        else:
            next_name = None


def read_shard(url: str, expected: int | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one WebDataset tar as dicts {__key__, __url__, <ext>: bytes}.

    Raises BadShardError naming the shard when it is truncated or corrupt, including a tar cut at
    a member boundary (detected when ``expected``, the manifest's count, is known).
    """
    count, current, members = 0, None, None
    try:
        with gopen(url, "rb") as stream:
            for name, data in iter_tar(stream):
                key, _, ext = os.path.basename(name).partition(".")
                if current is None or current["__key__"] != key:
                    if current is not None:
                        count += 1
                        used = current.keys() & _USED  # what every earlier sample had
                        members = used if members is None else members & used
                        yield current
                    current = {"__key__": key, "__url__": url}
                current[ext.lower()] = data
    except (_TarError, OSError, EOFError, ValueError) as exc:
        raise BadShardError(
            f"shard {url} is truncated or corrupt ({exc}); re-create it with `facemae shard --resume`"
        ) from None
    if current is not None:
        if members and not members <= current.keys():  # cut inside the last sample
            missing = ", ".join(sorted(members - current.keys()))
            raise BadShardError(
                f"shard {url} ends inside sample {current['__key__']} (no {missing}): it is "
                "truncated; re-create it with `facemae shard --resume`"
            )
        count += 1
        yield current
    if expected is not None and count != expected:
        raise BadShardError(
            f"shard {url} ended after {count} of {expected} samples: it is truncated; "
            "re-create it with `facemae shard --resume`"
        )


def decode_face(sample: dict[str, Any]) -> torch.Tensor:
    """uint8 (3, H, W) RGB tensor from a sample's encoded image."""
    return torch.from_numpy(_decode_array(sample).copy()).permute(2, 0, 1)  # writable


def _decode_array(sample: dict[str, Any]) -> np.ndarray:
    """uint8 (H, W, 3) RGB array of a sample's encoded image (no copy when already RGB)."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            try:
                with Image.open(io.BytesIO(sample[ext])) as img:
                    return np.asarray(to_rgb(img))  # no copy when already RGB
            except (OSError, SyntaxError, ValueError) as err:  # what PIL raises on corrupt data
                raise BadShardError(
                    f"sample {sample['__key__']} in {sample['__url__']} cannot be decoded ({err}): "
                    "re-shard with `facemae shard --full-decode`, which drops corrupt images"
                ) from err
    raise BadShardError(f"sample {sample['__key__']} in {sample['__url__']} has no image")


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images → float in [-1, 1]: the model input convention (x/255 - 0.5)/0.5."""
    return images.float().div_(127.5).sub_(1.0)


def to_model_input(
    images: torch.Tensor, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """A loader batch as model input on ``device``: uint8 batches travel as uint8 (a quarter of
    float32's bytes through the workers' shared memory and the host-to-device copy) and are
    normalised there, in float32 as :func:`normalize` does, then cast to ``dtype``. On a CPU the
    values are exactly those of normalising in the loader; CUDA divides by a scalar as a multiply
    by its reciprocal, so there some differ by 1 ulp of float32 (measured on an H200)."""
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = normalize(images)
    return images.to(dtype)


def resolve(shards: str | Sequence[str]) -> tuple[list[str], list[int] | None, dict | None]:
    """(urls, samples per shard or None, manifest or None) from a split folder/manifest or URLs."""
    if isinstance(shards, str | os.PathLike) and (
        os.path.isdir(shards) or str(shards).endswith(".json")
    ):
        manifest = load_manifest(shards)
        return manifest["urls"], [s["samples"] for s in manifest["shards"]], manifest
    urls = [shards] if isinstance(shards, str) else list(shards)
    if not urls:
        raise FacemaeError("no shards given")
    return urls, None, None


def check_image_size(split: str | os.PathLike, expected: int, who: str) -> None:
    """Refuse a shard split written at another face size than ``who`` takes (its manifest says)."""
    size = load_manifest(split).get("options", {}).get("image_size")
    if size is not None and size != expected:
        raise FacemaeError(
            f"shards {split} hold {size} px faces but {who} takes {expected} px: re-shard the "
            f"source with `facemae shard SOURCE OUT_DIR --image-size {expected}`"
        )


class FaceStream(IterableDataset):
    """Batches {"image", "label", "key"} from face shards; see the module docstring."""

    def __init__(
        self,
        shards: str | Sequence[str],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        repeat: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        flip: bool = False,
        normalize: bool = False,
        skip_bad_shards: bool = False,
    ) -> None:
        self.urls, self.shard_samples, self.manifest = resolve(shards)
        self.num_samples = sum(self.shard_samples) if self.shard_samples else None
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.repeat, self.shuffle_buffer, self.seed = repeat, shuffle_buffer, seed
        self.flip, self.normalize, self.skip_bad_shards = flip, normalize, skip_bad_shards
        self.epoch, self.skip_batches, self.bad_shards = 0, 0, 0
        if repeat and self.num_samples is None:
            raise FacemaeError(
                "a training stream needs a manifest (split folder) for its epoch length"
            )

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank yields per epoch (drop-last over the global batch)."""
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch (reshuffles) and how many of its batches a resumed run already saw."""
        self.epoch, self.skip_batches = epoch, skip_batches

    # ------------------------------------------------------------ shard assignment

    def _slot(self) -> tuple[int, int, int, int]:
        """(slot, number of slots, role, workers) of this DataLoader worker.

        The DataLoader takes batches from its workers round-robin starting at worker 0, so batch i
        of a rank's epoch comes from role i % workers. A run resumed after `skip_batches` batches
        must start at role skip_batches % workers: worker w plays role (w + skip) % workers (its
        shards, seeds and quota), which keeps the order of batches exact across a resume.
        """
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        role = (worker + self.skip_batches) % workers if self.repeat else worker
        return self.rank * workers + role, self.world_size * workers, role, workers

    def _slot_part(self, role: int, workers: int) -> tuple[int, int]:
        """Training: [start, stop) of this slot in the epoch's sample sequence; slots follow each
        other by rank, then by role (a rank's batches alternate between its workers' roles)."""
        per_batch = self.batch_size
        start = self.rank * self.batches_per_epoch * per_batch
        start += sum(_share(self.batches_per_epoch, r, workers) for r in range(role)) * per_batch
        return start, start + _share(self.batches_per_epoch, role, workers) * per_batch

    def _part_samples(self, start: int, stop: int) -> Iterator[dict[str, Any]]:
        """Samples [start, stop) of the epoch's sequence: the shards in this epoch's order (the same
        on every rank), one after the other. A bad shard that is skipped leaves the part short: then
        the part is read again from its start to fill the slot's quota (equal steps on every rank)."""
        order = list(range(len(self.urls)))
        random.Random(f"{self.seed}/{self.epoch}").shuffle(order)
        while True:
            yielded, first = 0, 0  # first: sequence position of the shard's first sample
            for index in order:
                count = self.shard_samples[index]
                if first + count <= start:
                    first += count
                    continue
                if first >= stop:
                    break
                for pos, sample in enumerate(self._read(index), first):
                    if pos >= stop:
                        break
                    if pos >= start:
                        yielded += 1
                        yield sample
                first += count
            if yielded == stop - start:
                return
            if not yielded:  # reading the part again would spin forever without a sample
                raise BadShardError(
                    f"rank {self.rank}'s shards of epoch {self.epoch} hold no readable sample (all "
                    "skipped as bad): re-create them with `facemae shard --resume`"
                )

    def _read(self, index: int) -> Iterator[dict[str, Any]]:
        """The samples of shard ``index``; a bad shard ends early with a warning when
        ``skip_bad_shards`` (the samples before the damage are kept), else raises."""
        expected = self.shard_samples[index] if self.shard_samples else None
        try:
            yield from read_shard(self.urls[index], expected)
        except BadShardError as exc:
            if not self.skip_bad_shards:
                raise
            self.bad_shards += 1
            warnings.warn(f"skipping: {exc}", stacklevel=2)

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if not self.repeat or self.shuffle_buffer <= 1:
            yield from samples
            return
        buffer: list[dict] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            yield buffer[i]
            buffer[i] = sample
        rng.shuffle(buffer)
        yield from buffer

    # ------------------------------------------------------------ batching

    def _batch(self, samples: list[dict], rng: np.random.Generator) -> dict[str, Any]:
        flips = rng.random(len(samples)) < 0.5 if self.flip else np.zeros(len(samples), bool)
        first = _decode_array(samples[0])
        hwc = np.empty((len(samples), *first.shape), dtype=np.uint8)  # decoded straight in
        for i, sample in enumerate(samples):
            array = first if i == 0 else _decode_array(sample)
            if array.shape != first.shape:
                raise BadShardError(
                    f"sample {sample['__key__']} in {sample['__url__']} is {array.shape[1]}x"
                    f"{array.shape[0]} px, the batch's first image {first.shape[1]}x{first.shape[0]}"
                )
            hwc[i] = array[:, ::-1] if flips[i] else array  # the flip costs nothing here
        images = torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()
        labels = torch.tensor([int(s.get("cls", b"-1")) for s in samples], dtype=torch.int64)
        return {
            "image": normalize(images) if self.normalize else images,
            "label": labels,
            "key": [s["__key__"] for s in samples],
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, num_slots, worker, workers = self._slot()
        if self.repeat:  # this worker's share of the rank's batches, minus those already seen
            rng = random.Random(f"{self.seed}/{self.epoch}/{slot}")
            samples = self._shuffled(self._part_samples(*self._slot_part(worker, workers)), rng)
            quota = _share(self.batches_per_epoch, worker, workers)
            skip = _share(self.skip_batches, worker, workers)
            for _ in range(skip * self.batch_size):
                next(samples)
            for index in range(skip, quota):
                batch = [next(samples) for _ in range(self.batch_size)]
                yield self._batch(batch, self._flip_rng(slot, index))
            return
        batch: list[dict] = []
        shards = range(slot, len(self.urls), num_slots)  # inference: whole shards, each once
        for sample in (s for index in shards for s in self._read(index)):
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._batch(batch, self._flip_rng(slot, 0))
                batch = []
        if batch:
            yield self._batch(batch, self._flip_rng(slot, 0))

    def _flip_rng(self, slot: int, batch_index: int) -> np.random.Generator:
        """Flips depend only on (seed, epoch, slot, batch): a resumed stream flips identically."""
        return np.random.default_rng([self.seed, self.epoch, slot, batch_index])


def _share(total: int, worker: int, workers: int) -> int:
    """How many of `total` round-robin items fall to `worker` (DataLoader order: 0, 1, 0, 1, ...)."""
    return total // workers + (worker < total % workers)


def _ignore_interrupt(_worker: int) -> None:
    """Loader workers leave Ctrl-C to the trainer, which stops with a checkpoint (a worker that
    quit on it would fail the step the trainer still has to finish)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(stream: FaceStream, num_workers: int = 0, prefetch_factor: int = 4) -> DataLoader:
    """DataLoader over a FaceStream (batches are formed in the stream, so batch_size=None)."""
    kwargs: dict[str, Any] = {"prefetch_factor": prefetch_factor} if num_workers else {}
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        # each new iterator draws a base seed; from torch's global generator it would shift the
        # dropout/drop-path draws of a run resumed mid-epoch (the stream seeds itself anyway)
        generator=torch.Generator(),
        worker_init_fn=_ignore_interrupt,
        pin_memory=torch.cuda.is_available(),  # lets the host-to-device copy run asynchronously
        **kwargs,
    )

"""Loader throughput: our FaceStream + make_loader vs an arcface_torch-style map-style RecordIO loader.

    .venv/bin/python bench/bench_loader.py [--quick] [--profile]

Same 20k synthetic 112 px JPEGs (1000 identities x 20) for both, batch 128, flip + normalise to
[-1, 1], num_workers 0, 1 and 2:
  ours     : shards written by shard_dataset (shuffled at shard time), FaceStream(repeat=True,
             shuffle_buffer=1000, flip=True) through make_loader, as the trainers read it: uint8
             batches out of the workers, normalised by the consumer (to_model_input, which the
             trainers run on their device after the copy; here on the CPU, inside the timing);
  baseline : arcface_torch MXFaceDataset without mxnet: seek + read the record, parse the
             IRHeader, PIL decode, RandomHorizontalFlip, ToTensor, Normalize(0.5, 0.5), through
             torch DataLoader(shuffle=True, batch_size=128, drop_last=True).
Full mode times one epoch (156 batches) 3 times per loader and worker count, --quick 80 batches
twice; runs go round-robin so a change in machine load hits every configuration alike. Reported:
median wall-clock img/s (worker start-up included, as in a real epoch) and median CPU time per
image over all processes (user + sys, workers included): on a shared machine the CPU figure is
the steadier one. --profile adds a cProfile of both loaders at 0 workers.
Target: ours / baseline >= 1.0 at every worker count.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import struct
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    RECORDIO_MAGIC,
    Timing,
    ensure_faces,
    ensure_recordio,
    ensure_shards,
    interleaved,
    load_avg,
    print_header,
    spread,
    table,
    warm_page_cache,
)

from facemae_dist.data.stream import FaceStream, make_loader, to_model_input  # noqa: E402

BATCH = 128
_IR_HEADER = struct.Struct("<IfQQ")


class MXFaceDataset(Dataset):
    """arcface_torch's MXFaceDataset, with the RecordIO reading done in plain Python."""

    def __init__(self, rec_dir: Path) -> None:
        self.rec_path = str(rec_dir / "train.rec")
        with open(rec_dir / "train.idx") as f:
            self.offsets = [int(line.split("\t")[1]) for line in f if line.strip()]
        self.transform = transforms.Compose(
            [
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
            ]
        )
        self._file: io.BufferedReader | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.offsets)

    def _read_record(self, index: int) -> bytes:
        """Seek to record ``index`` and read its data (IRHeader + JPEG)."""
        if self._file is None or self._pid != os.getpid():  # one handle per worker process
            self._file, self._pid = open(self.rec_path, "rb"), os.getpid()  # noqa: SIM115
        self._file.seek(self.offsets[index])
        magic, lrec = struct.unpack("<II", self._file.read(8))
        if magic != RECORDIO_MAGIC or lrec >> 29:
            raise ValueError(f"bad or split record at {self.offsets[index]}")
        return self._file.read(lrec & ((1 << 29) - 1))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        data = self._read_record(index)
        flag, label, _, _ = _IR_HEADER.unpack_from(data)
        if flag > 0:
            label = struct.unpack_from("<f", data, _IR_HEADER.size)[0]
        img = Image.open(io.BytesIO(data[_IR_HEADER.size + 4 * flag :])).convert("RGB")
        return self.transform(img), torch.tensor(int(label), dtype=torch.long)


def baseline_loader(rec_dir: Path, workers: int) -> DataLoader:
    """Map-style DataLoader as arcface_torch builds it (shuffle, drop_last; no pinning on a CPU)."""
    return DataLoader(
        MXFaceDataset(rec_dir),
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
    )


def ours_loader(split_dir: Path, workers: int) -> DataLoader:
    """FaceStream in training mode through make_loader."""
    stream = FaceStream(str(split_dir), BATCH, repeat=True, flip=True, seed=0)
    return make_loader(stream, num_workers=workers)


def _images_labels(batch: object) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a FaceStream dict batch or a (images, labels) tuple batch."""
    if isinstance(batch, dict):
        return batch["image"], batch["label"]
    return batch[0], batch[1]


def consume(loader: Iterable, max_batches: int) -> int:
    """Iterate up to ``max_batches`` batches; check each one; return the images seen."""
    seen = 0
    for i, batch in enumerate(loader):
        images, labels = _images_labels(batch)
        images = to_model_input(images, "cpu", torch.float32)  # ours: uint8 until here
        if images.shape != (BATCH, 3, 112, 112) or images.dtype != torch.float32:
            raise AssertionError(f"unexpected batch {tuple(images.shape)} {images.dtype}")
        if labels.shape != (BATCH,) or labels.min() < 0:
            raise AssertionError("labels missing or negative")
        if images.min() < -1.0 or images.max() > 1.0:
            raise AssertionError("images not normalised to [-1, 1]")
        seen += len(images)
        if i + 1 >= max_batches:
            break
    return seen


def measure(
    makers: dict[str, Callable[[int], DataLoader]], workers: list[int], batches: int, repeats: int
) -> dict[str, Timing]:
    """Timings per "loader w=N", round-robin over loaders and worker counts (load drift hits all)."""
    runs = {
        f"{name} w={w}": (lambda m=make, w=w: consume(m(w), batches))
        for w in workers
        for name, make in makers.items()
    }
    return interleaved(runs, repeats)


def report(results: dict[str, Timing], workers: list[int], images: int) -> None:
    """Print img/s and CPU per image per loader and worker count, and the ours/baseline ratios."""
    rows = []
    for w in workers:
        base, ours = results[f"baseline w={w}"], results[f"ours w={w}"]
        ratio = base.sec / ours.sec
        rows.append(
            [
                str(w),
                f"{images / base.sec:,.0f}",
                spread(base.wall),
                f"{images / ours.sec:,.0f}",
                spread(ours.wall),
                f"{ratio:.2f}x",
                "PASS" if ratio >= 1.0 else "FAIL",
                f"{1e6 * base.cpu_sec / images:,.0f}",
                f"{1e6 * ours.cpu_sec / images:,.0f}",
                f"{base.cpu_sec / ours.cpu_sec:.2f}x",
            ]
        )
    headers = ["workers", "baseline img/s", "spread", "ours img/s", "spread", "ours/base"]
    cpu = ["base CPU us/img", "ours CPU us/img", "CPU ratio"]
    print(table([*headers, "target >= 1.0x", *cpu], rows))
    print(
        "(img/s: wall-clock medians; CPU us/img: all processes incl. workers, medians; CPU ratio "
        f"= baseline/ours, less sensitive to other jobs; load after: {load_avg()})",
        flush=True,
    )


def profile(makers: dict[str, Callable[[int], DataLoader]], batches: int) -> None:
    """cProfile each loader at 0 workers; print the top functions by own time."""
    for name, make in makers.items():
        prof = cProfile.Profile()
        prof.enable()
        consume(make(0), batches)
        prof.disable()
        print(f"\n-- cProfile {name}, 0 workers, {batches} batches (top 14 by own time)")
        stats = pstats.Stats(prof, stream=sys.stdout)
        stats.sort_stats("tottime").print_stats(14)


def main() -> None:
    """Build or reuse the inputs, then time both loaders at 0, 1 and 2 workers."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="80 batches twice per configuration")
    ap.add_argument("--repeats", type=int, help="timed runs per configuration (median)")
    ap.add_argument("--batches", type=int, help="batches per timed run (default: one epoch)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--profile", action="store_true", help="also cProfile both at 0 workers")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads of the main process (DataLoader workers always use 1); "
        "1 by default: on a shared 2-core machine OpenMP barriers of 2 threads stall for ms",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print_header("bench_loader: FaceStream vs arcface_torch-style RecordIO loader")
    t0 = time.perf_counter()
    root = ensure_faces(1000, 20)
    split_dir, rec_dir = ensure_shards(root), ensure_recordio(root)
    nbytes = warm_page_cache([str(p) for p in split_dir.glob("*.tar")])
    warm_page_cache([str(rec_dir / "train.rec")])
    epoch = FaceStream(str(split_dir), BATCH).batches_per_epoch
    batches = args.batches or (80 if args.quick else epoch)
    repeats = args.repeats or (2 if args.quick else 3)
    print(
        f"\n-- {epoch * BATCH:,} images/epoch ({nbytes / 1e6:.0f} MB of shards), batch {BATCH}, "
        f"{batches} batches x {repeats} run(s) per configuration, main-process torch threads "
        f"{torch.get_num_threads()}, load {load_avg()}"
    )
    makers = {
        "baseline": lambda w: baseline_loader(rec_dir, w),
        "ours": lambda w: ours_loader(split_dir, w),
    }
    results = measure(makers, args.workers, batches, repeats)
    report(results, args.workers, batches * BATCH)
    if args.profile:
        profile(makers, min(batches, 40))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

"""Shared helpers for the data benchmarks: machine header, cached synthetic inputs, tables.

Inputs are generated once into ``$FACEMAE_BENCH_CACHE`` (default ``/tmp/facemae-bench``) and reused:
a synthetic image folder, its WebDataset shards (our sharder) and an InsightFace RecordIO copy of the
same JPEG bytes (a minimal writer, for the arcface_torch-style baseline).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import platform
import resource
import shlex
import shutil
import statistics
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("FACEMAE_BENCH_CACHE", "/tmp/facemae-bench"))
MB = 1e6
_DONE = ".complete"


# ---------------------------------------------------------------- machine / reporting


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo ('unknown' elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_avg() -> str:
    """The 1/5/15-minute load averages as text."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def print_header(title: str) -> None:
    """Print the title, the exact command, the machine and its current load."""
    import numpy
    import PIL

    print(f"== {title}")
    print(f"command : {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"machine : nproc={os.cpu_count()} cpu='{cpu_model()}' python={platform.python_version()}"
        f" numpy={numpy.__version__} pillow={PIL.__version__}"
    )
    print(f"load    : {load_avg()} (1/5/15 min) at {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(f"cache   : {CACHE} (page cache warm: inputs are read once before timing)")
    sys.stdout.flush()


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with right-aligned columns (first column left-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        """One formatted row."""
        parts = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        return "  ".join(parts)

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children (workers)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class Timing:
    """Wall and CPU seconds of the repeated runs of one contender."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def sec(self) -> float:
        """Median wall seconds."""
        return statistics.median(self.wall)

    @property
    def cpu_sec(self) -> float:
        """Median CPU seconds (all processes): robust to other jobs' load, blind to parallelism."""
        return statistics.median(self.cpu)


def interleaved(
    runs: dict[str, Callable[[], object]], repeats: int, once: frozenset[str] = frozenset()
) -> dict[str, Timing]:
    """Time every run ``repeats`` times, round-robin, so a change of machine load hits all alike.

    Names in ``once`` run only in the first round (slow references).
    """
    results = {name: Timing() for name in runs}
    for rep in range(repeats):
        for name, fn in runs.items():
            if rep and name in once:
                continue
            c0, t0 = cpu_seconds(), time.perf_counter()
            fn()
            results[name].wall.append(time.perf_counter() - t0)
            results[name].cpu.append(cpu_seconds() - c0)
            print(f"   [{rep + 1}/{repeats}] {name}: {results[name].wall[-1]:.2f} s", flush=True)
    return results


def spread(times: list[float]) -> str:
    """Min–max of repeated timings as a percentage of the median ('' for a single run)."""
    if len(times) < 2:
        return ""
    return f"±{50 * (max(times) - min(times)) / statistics.median(times):.0f}%"


# ---------------------------------------------------------------- synthetic image folder


def _write_identities(args: tuple[int, int, int, int, str]) -> int:
    """Worker: write identities [lo, hi) of the folder; return the image count."""
    from facemae_dist.data.synthetic import SynthConfig, encode_face, identity_name

    lo, hi, per, seed, out = args
    cfg = SynthConfig(hi, per, seed=seed)
    for identity in range(lo, hi):
        folder = Path(out) / identity_name(identity)
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per):
            (folder / f"{j:04d}.jpg").write_bytes(encode_face(cfg, identity, j))
    return (hi - lo) * per


def ensure_faces(identities: int, per: int, seed: int = 0, workers: int = 2) -> Path:
    """A cached synthetic folder root/<identity>/<NNNN>.jpg (same bytes as synthetic.write_folder).

    The folder name carries a hash of the first face, so a changed renderer gets a new folder.
    """
    from facemae_dist.data.synthetic import SynthConfig, encode_face

    tag = hashlib.sha256(encode_face(SynthConfig(identities, per, seed=seed), 0, 0)).hexdigest()
    root = CACHE / f"faces_{identities}x{per}_s{seed}_{tag[:8]}"
    if (root / _DONE).exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    step = max(1, identities // (8 * workers))
    chunks = [
        (lo, min(lo + step, identities), per, seed, str(root)) for lo in range(0, identities, step)
    ]
    with mp.get_context("fork").Pool(workers) as pool:
        total = sum(pool.imap_unordered(_write_identities, chunks))
    (root / _DONE).write_text(f"{total}\n")
    print(f"generated {total:,} faces into {root} in {time.perf_counter() - t0:.1f} s")
    return root


def folder_files(root: Path) -> list[str]:
    """Image paths in FolderSource order (sorted identities, sorted files)."""
    from facemae_dist.data.sources import FolderSource

    src = FolderSource(root)
    return [os.path.join(src.root, src.relative_path(i)) for i in range(len(src))]


def warm_page_cache(paths: Sequence[str]) -> int:
    """Read every file once (so timings compare CPU work, not the first disk read); total bytes."""
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            total += len(f.read())
    return total


# ---------------------------------------------------------------- shards and RecordIO of the folder


def ensure_shards(root: Path, samples_per_shard: int = 1000) -> Path:
    """Our shards of the folder (shuffled at shard time, as for training); returns the split dir."""
    from facemae_dist.data.shards import ShardOptions, shard_dataset
    from facemae_dist.data.sources import FolderSource

    out = CACHE / f"shards_{root.name}_{samples_per_shard}"
    if (out / _DONE).exists():
        return out / "train"
    shutil.rmtree(out, ignore_errors=True)
    opts = ShardOptions(
        samples_per_shard=samples_per_shard, workers=2, shuffle=True, progress=False
    )
    shard_dataset(FolderSource(root), out, opts)
    (out / _DONE).write_text("ok\n")
    return out / "train"


RECORDIO_MAGIC = 0xCED7230A
_IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2


def _aligned_find(data: bytes, needle: bytes) -> int:
    """First 4-byte-aligned position of ``needle`` in ``data``, or -1."""
    pos = data.find(needle)
    while pos >= 0 and pos % 4:
        pos = data.find(needle, pos + 1)
    return pos


def write_recordio(
    out_dir: Path, items: Sequence[tuple[int, bytes]], num_classes: int, size: int
) -> None:
    """Minimal InsightFace writer (im2rec layout: key i = image i, scalar label, no split records)."""
    magic = struct.pack("<I", RECORDIO_MAGIC)
    out_dir.mkdir(parents=True, exist_ok=True)
    offsets = []
    with open(out_dir / "train.rec", "wb") as rec:
        for key, (label, jpeg) in enumerate(items):
            data = _IR_HEADER.pack(0, float(label), key, 0) + jpeg
            if _aligned_find(data, magic) >= 0:
                raise ValueError(f"record {key} holds the RecordIO magic: needs a split record")
            offsets.append(rec.tell())
            rec.write(struct.pack("<II", RECORDIO_MAGIC, len(data)) + data)
            rec.write(b"\x00" * (-len(data) % 4))
    with open(out_dir / "train.idx", "w") as idx:
        idx.writelines(f"{key}\t{off}\n" for key, off in enumerate(offsets))
    (out_dir / "property").write_text(f"{num_classes},{size},{size}\n")


def ensure_recordio(root: Path) -> Path:
    """train.rec/.idx/property holding the folder's JPEG bytes in folder order; returns its dir."""
    from facemae_dist.data.sources import FolderSource

    out = CACHE / f"rec_{root.name}"
    if (out / _DONE).exists():
        return out
    src = FolderSource(root)
    items = ((int(src.labels[i]), src.read(i).data) for i in range(len(src)))
    write_recordio(out, list(items), len(src.identity_names), 112)
    (out / _DONE).write_text("ok\n")
    return out

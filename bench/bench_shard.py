"""Sharder throughput and memory: our `shard_dataset` vs a raw copy and a naive ShardWriter loop.

    .venv/bin/python bench/bench_shard.py [--quick]

1. Throughput on a cached synthetic image folder (1000 identities x 20 = 20k JPEGs, 112 px):
   (a) raw copy: list the folder like FolderSource, read every file in that order, append to one
       file, fsync (the I/O bound of a folder source); plus a sequential copy of that one big file;
   (b) naive: one process, PIL decode -> JPEG re-encode -> webdataset.ShardWriter;
   (c) ours: FolderSource + shard_dataset, 1 and 2 workers (pass-through JPEGs, fsync per shard).
   Targets: ours >= 0.5x raw copy, >= 5x naive (wall clock; repeats run round-robin, medians).
   CPU time per image (all processes) is printed too: steadier than wall time on a shared machine.
2. Bounded memory: shard SyntheticSource at 2-3 sizes (quick: 20k, 100k; full: 20k, 200k, 1M),
   each in a fresh subprocess, with its real listing, labels and identity names; the pixels come
   from 64 pre-rendered faces (--mem-render renders every face, ~10x slower). Reports peak RSS of
   the main process and of the workers (getrusage), peak PSS/RSS of the whole tree (psutil
   polling) and a linear extrapolation to 40M images / 2M identities.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    CACHE,
    MB,
    Timing,
    ensure_faces,
    folder_files,
    interleaved,
    load_avg,
    print_header,
    spread,
    table,
    warm_page_cache,
)

WORK = CACHE / "work"
BASE_SPEC = "1x2000"  # 2 shards: the smallest run that starts the worker pool
TARGET_IMAGES, TARGET_IDS = 40_000_000, 2_000_000


# ---------------------------------------------------------------- the contenders


def _listing(root: Path) -> list[str]:
    """Folder listing in FolderSource order (sorted identity folders, sorted files)."""
    paths = []
    for ident in sorted(e.name for e in os.scandir(root) if e.is_dir()):
        folder = os.path.join(root, ident)
        paths.extend(os.path.join(folder, n) for n in sorted(os.listdir(folder)))
    return paths


def raw_copy(root: Path, out_file: Path) -> None:
    """List, read every image in order and append it to one file; fsync at the end."""
    with open(out_file, "wb") as out:
        for path in _listing(root):
            with open(path, "rb") as f:
                out.write(f.read())
        out.flush()
        os.fsync(out.fileno())


def big_file_copy(src: Path, dst: Path, chunk: int = 8 << 20) -> None:
    """Sequential copy of one big file in 8 MB chunks; fsync at the end."""
    with open(src, "rb") as f, open(dst, "wb") as out:
        while block := f.read(chunk):
            out.write(block)
        out.flush()
        os.fsync(out.fileno())


def naive_shard(root: Path, out_dir: Path) -> None:
    """Single process: PIL decode -> re-encode JPEG (q95) -> webdataset.ShardWriter (1000/shard)."""
    import webdataset as wds
    from PIL import Image

    out_dir.mkdir(parents=True)
    paths = _listing(root)
    labels = {name: i for i, name in enumerate(sorted({Path(p).parent.name for p in paths}))}
    with wds.ShardWriter(str(out_dir / "naive-%06d.tar"), maxcount=1000, verbose=0) as sink:
        for i, path in enumerate(paths):
            with Image.open(path) as img:
                buf = io.BytesIO()
                img.convert("RGB").save(buf, format="JPEG", quality=95)
            label = labels[Path(path).parent.name]
            sink.write({"__key__": f"{i:010d}", "jpg": buf.getvalue(), "cls": label})


def ours(root: Path, out_dir: Path, workers: int) -> None:
    """FolderSource (listing included) + shard_dataset."""
    from facemae_dist.data.shards import ShardOptions, shard_dataset
    from facemae_dist.data.sources import FolderSource

    opts = ShardOptions(workers=workers, progress=False, command="bench_shard")
    shard_dataset(FolderSource(root), out_dir, opts)


# ---------------------------------------------------------------- throughput section


def _fresh(path: Path) -> Path:
    """Remove ``path`` (file or folder) if present; return it."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    return path


def throughput(root: Path, repeats: int) -> None:
    """Time every contender on the folder; print the table and the target ratios."""
    paths = folder_files(root)
    nbytes = warm_page_cache(paths)
    n = len(paths)
    WORK.mkdir(parents=True, exist_ok=True)
    concat = WORK / "concat.bin"
    raw_copy(root, concat)  # also the input of the big-file copy
    print(f"\n-- throughput: {n:,} images, {nbytes / MB:.1f} MB input, load {load_avg()}")
    runs = {
        "raw copy (list+read+append)": lambda: raw_copy(root, _fresh(WORK / "raw.bin")),
        "big-file sequential copy": lambda: big_file_copy(concat, _fresh(WORK / "big.bin")),
        "naive PIL+ShardWriter": lambda: naive_shard(root, _fresh(WORK / "naive")),
        "ours shard_dataset w=1": lambda: ours(root, _fresh(WORK / "ours1"), 1),
        "ours shard_dataset w=2": lambda: ours(root, _fresh(WORK / "ours2"), 2),
    }
    results = interleaved(runs, repeats, once=frozenset({"naive PIL+ShardWriter"}))
    _throughput_table(results, n, nbytes)
    shutil.rmtree(WORK)


def _throughput_table(results: dict[str, Timing], n: int, nbytes: int) -> None:
    """Print the throughput table and the target verdicts (wall clock; CPU time as a cross-check)."""
    rows = [
        [
            name,
            f"{t.sec:.2f}",
            spread(t.wall),
            f"{n / t.sec:,.0f}",
            f"{nbytes / MB / t.sec:,.1f}",
            f"{1e6 * t.cpu_sec / n:,.0f}",
        ]
        for name, t in results.items()
    ]
    print(table(["method", "wall s", "spread", "img/s", "MB/s in", "CPU us/img"], rows))
    raw, naive = results["raw copy (list+read+append)"], results["naive PIL+ShardWriter"]
    for w in (1, 2):
        ours_t = results[f"ours shard_dataset w={w}"]
        to_raw, to_naive = raw.sec / ours_t.sec, naive.sec / ours_t.sec
        print(
            f"ours w={w}: {to_raw:.2f}x raw copy (target >= 0.5x: "
            f"{'PASS' if to_raw >= 0.5 else 'FAIL'}; CPU per image {raw.cpu_sec / ours_t.cpu_sec:.2f}x), "
            f"{to_naive:.1f}x naive (target >= 5x: {'PASS' if to_naive >= 5 else 'FAIL'}; "
            f"CPU {naive.cpu_sec / ours_t.cpu_sec:.1f}x)"
        )
    print(f"(MB/s counts input JPEG bytes; load after: {load_avg()})", flush=True)


# ---------------------------------------------------------------- bounded-memory section


def pooled_source(spec: str) -> object:
    """SyntheticSource(spec) whose read() returns one of 64 faces rendered once per process.

    Listing, labels and identity names are the real ones; only the pixels repeat, so the sharder's
    memory is measured at 10x the speed of rendering every face (--mem-render does that).
    """
    from facemae_dist.data.sources import SourceRecord
    from facemae_dist.data.synthetic import SyntheticSource, encode_face

    class PooledSyntheticSource(SyntheticSource):
        """SyntheticSource with pooled pixels (see pooled_source)."""

        _pool: list[bytes] | None = None

        def read(self, index: int) -> SourceRecord:
            """Bytes of a pooled face under item ``index``'s position."""
            if self._pool is None:
                cfg = self.cfg
                ids, per = cfg.num_identities, cfg.images_per_identity
                self._pool = [encode_face(cfg, k % ids, k % per) for k in range(64)]
            identity, j = divmod(index, self.cfg.images_per_identity)
            return SourceRecord(self._pool[index % 64], f"synth:{identity}/{j}")

    base = SyntheticSource.from_spec(spec)
    return PooledSyntheticSource(base.cfg)


def _vm_hwm() -> int:
    """Peak RSS of this process image in bytes (VmHWM; unlike ru_maxrss it restarts at exec,
    so it does not report the RSS of the parent that forked this interpreter)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mem_child(spec: str, out_dir: str, workers: int, render: bool) -> None:
    """Run in a fresh process: shard the synthetic source; print JSON with maxrss figures."""
    from facemae_dist.data.shards import ShardOptions, shard_dataset
    from facemae_dist.data.synthetic import SyntheticSource

    t0 = time.perf_counter()
    source = SyntheticSource.from_spec(spec) if render else pooled_source(spec)
    opts = ShardOptions(workers=workers, progress=False, command="bench_shard mem")
    manifests = shard_dataset(source, out_dir, opts)
    kib = 1024  # Linux ru_maxrss is in KiB
    print(
        json.dumps(
            {
                "images": sum(m["num_samples"] for m in manifests.values()),
                "seconds": time.perf_counter() - t0,
                "main_maxrss": _vm_hwm(),
                "worker_maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib,
            }
        )
    )


def _tree_memory(proc: object) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) over a psutil process and its descendants."""
    import psutil

    rss = pss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
    return rss, pss


def run_mem_child(spec: str, workers: int, render: bool) -> dict:
    """Start `mem_child` in a fresh interpreter, poll its tree's memory, return its figures."""
    import psutil

    out = _fresh(WORK / f"mem_{spec.replace(':', '_')}")
    cmd = [sys.executable, os.path.abspath(__file__), "--mem-child", spec, "--mem-out", str(out)]
    cmd += ["--workers", str(workers)] + (["--mem-render"] if render else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss, pss = _tree_memory(ps)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.1)
    stdout = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"memory child {spec} failed with status {proc.returncode}")
    shutil.rmtree(out)
    result = json.loads(stdout.strip().splitlines()[-1])
    return {**result, "tree_rss": peak_rss, "tree_pss": peak_pss}


def plan_bytes(spec: str) -> int:
    """Bytes of the shard plan arrays (items, cls, bounds, identities) for a synthetic spec."""
    from facemae_dist.data.shards import ShardOptions, plan_splits
    from facemae_dist.data.synthetic import SyntheticSource

    plans = plan_splits(SyntheticSource.from_spec(spec), ShardOptions(progress=False))
    return sum(p.items.nbytes + p.cls.nbytes + p.bounds.nbytes + p.identities.nbytes for p in plans)


def _mb(value: float) -> str:
    """Bytes as MB text."""
    return f"{value / MB:,.1f}"


def memory(specs: list[str], workers: int, render: bool) -> None:
    """Peak memory per dataset size (fresh subprocess each) and the 40M-image extrapolation."""
    how = "every face rendered" if render else "64 rendered faces reused (--mem-render: all)"
    print(f"\n-- bounded memory: SyntheticSource, {how}, workers={workers}")
    print(f"   load {load_avg()}", flush=True)
    rows, points = [], []
    for spec in [BASE_SPEC, *specs]:
        r = run_mem_child(spec, workers, render)
        ids = int(spec.split("x")[0])
        plan = plan_bytes(spec)
        points.append((r["images"], r))
        rows.append(
            [
                spec, f"{r['images']:,}", f"{ids:,}", f"{r['seconds']:.1f}",
                f"{r['images'] / r['seconds']:,.0f}", _mb(plan), _mb(r["main_maxrss"]),
                _mb(r["worker_maxrss"]), _mb(r["tree_pss"]), _mb(r["tree_rss"]),
            ]
        )  # fmt: skip
        print(f"   {spec}: {r['seconds']:.1f} s", flush=True)
    print(
        table(
            [
                "spec",
                "images",
                "ids",
                "s",
                "img/s",
                "plan MB",
                "main maxrss MB",
                "worker maxrss MB",
                "tree PSS MB",
                "tree RSS MB",
            ],
            rows,
        )  # fmt: skip
    )
    _extrapolate(points, plan_bytes(specs[-1]) / points[-1][0])


def _extrapolate(points: list[tuple[int, dict]], plan_per_image: float) -> None:
    """Linear fit through the two largest sizes, evaluated at 40M images / 2M identities."""
    (n1, r1), (n2, r2) = points[-2], points[-1]
    print(
        f"extrapolation to {TARGET_IMAGES / 1e6:.0f}M images / {TARGET_IDS / 1e6:.0f}M identities "
        f"(20 per identity, as measured), slope from {n1:,} -> {n2:,} images:"
    )
    for key, label in (
        ("main_maxrss", "main process"),
        ("worker_maxrss", "largest worker"),
        ("tree_pss", "whole tree (PSS)"),
    ):
        slope = max(0.0, (r2[key] - r1[key]) / (n2 - n1))
        at_target = r2[key] + slope * (TARGET_IMAGES - n2)
        growth = r2[key] - points[0][1][key]
        print(
            f"  {label:17s}: {slope:6.1f} B/image measured growth, "
            f"{growth / MB:6.1f} MB above the {BASE_SPEC} run at {n2:,}; "
            f"-> {at_target / 1e9:.2f} GB at 40M"
        )
    print(
        f"  plan arrays      : {plan_per_image:.1f} B/image -> "
        f"{plan_per_image * TARGET_IMAGES / 1e9:.2f} GB at 40M (the documented ~16 B/image)"
    )
    print(
        "  (maxrss of a forked worker includes pages it shares with the main process; PSS splits"
        " shared pages between the processes)"
    )
    print(f"(load after: {load_avg()})", flush=True)


def main() -> None:
    """Parse the flags and run the sections (or the memory child)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: < 2 min once inputs are cached")
    ap.add_argument("--repeats", type=int, help="timed runs per contender (median reported)")
    ap.add_argument("--mem-specs", nargs="+", help="synthetic specs of the memory section")
    ap.add_argument("--workers", type=int, default=2, help="workers of the memory section")
    ap.add_argument("--mem-render", action="store_true", help="render every face (10x slower)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--mem-child", help=argparse.SUPPRESS)
    ap.add_argument("--mem-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mem_child:
        mem_child(args.mem_child, args.mem_out, args.workers, args.mem_render)
        return
    repeats = args.repeats or (1 if args.quick else 3)
    specs = args.mem_specs or (
        ["1000x20", "5000x20"] if args.quick else ["1000x20", "10000x20", "50000x20"]
    )
    print_header("bench_shard: sharder throughput and memory" + (" (quick)" if args.quick else ""))
    t0 = time.perf_counter()
    if not args.skip_throughput:
        throughput(ensure_faces(1000, 20), repeats)
    if not args.skip_memory:
        memory(specs, args.workers, args.mem_render)
    shutil.rmtree(WORK, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

"""Partial-FC head vs a dense full-softmax head: seconds per step and peak RSS per rank.

    python bench/bench_partial_fc.py --quick   # 100k classes only (~2 min on 2 cores)
    python bench/bench_partial_fc.py           # 100k and 1M classes (~10 min, ~13 GB peak)

One step = forward + backward + optimizer step (SGD, momentum 0.9 -- or 0, column "mom" -- and wd
5e-4) of the head alone, on a (128, 512) fp32 embedding batch per rank. Every case runs in fresh
processes (one per rank, gloo for 2 ranks), so ``ru_maxrss`` is the honest peak of that case alone.
Baselines measured in the same run:

* ``dense``: full logits ``F.linear(normalize(e), normalize(W))`` + ArcFace + ``F.cross_entropy``, a
  ``Parameter`` weight with a full fp32 gradient and ``torch.optim.SGD``;
* ``pfc_v2-style``: arcface_torch PartialFC_V2's memory layout re-implemented for one CPU process
  (sample by indexing a ``Parameter`` -> full (C, d) gradient, dense ``torch.optim.SGD``).

"s/step" is the median wall time of a step (the worst rank), "cpu s" its CPU time summed over
threads (less sensitive to other load on the machine). Ratios are against ``dense`` at the same
class count: speed-up in samples/s, memory as peak RSS per rank. 2-rank cases use 1 thread per rank
(the machine's cores are shared), 1-rank cases all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ANCHOR = "arcface_torch PartialFC_V2 (ENVIRONMENT.md, this CPU): 1M/0.1: 3.38 s/step, 4.7 GB"
GB = 1024**3


@dataclass(frozen=True)
class Case:
    impl: str  # "dense" | "pfc_v2-style" | "partial_fc"
    classes: int
    rate: float
    world: int
    momentum: float = 0.9

    def est_bytes(self, dim: int) -> float:
        """Rough bytes over all ranks, to skip what cannot fit: (C, d) fp32 copies alive at peak."""
        copies = {
            "dense": 6.0,
            "pfc_v2-style": 4.0 + self.rate,
            "partial_fc": 2.2 + 1.5 * self.rate,
        }
        copies = copies[self.impl] - (1.0 if self.momentum == 0 else 0.0)
        return copies * self.classes * dim * 4 + self.world * 0.5 * GB


# ---------------------------------------------------------------- workers (one process per rank)
def _arcface_logits(emb, weight, labels, scale: float = 64.0, m2: float = 0.5):
    """Dense ArcFace logits the textbook way (autograd through normalize, linear and the margin)."""
    import torch
    import torch.nn.functional as F

    cos = F.linear(F.normalize(emb), F.normalize(weight)).clamp(-1, 1)
    target = cos.gather(1, labels[:, None])
    theta = torch.acos(target.clamp(-1 + 1e-7, 1 - 1e-7))
    return cos.scatter(1, labels[:, None], torch.cos(theta + m2)) * scale


def _baseline_step(impl: str, classes: int, rate: float, dim: int, momentum: float):
    """A closure running one step of the dense or pfc_v2-style head (single process)."""
    import torch
    import torch.nn.functional as F

    weight = torch.nn.Parameter(torch.normal(0.0, 0.01, (classes, dim)))
    opt = torch.optim.SGD([weight], lr=0.1, momentum=momentum, weight_decay=5e-4)
    num_sample = int(rate * classes)

    def step(emb, labels):
        if impl == "pfc_v2-style" and num_sample < classes:
            positive = labels.unique()
            scores = torch.rand(classes)
            scores[positive] = 2.0
            index = scores.topk(num_sample).indices.sort().values
            sub, labels = weight[index], torch.searchsorted(index, labels)
        else:
            sub = weight
        loss = F.cross_entropy(_arcface_logits(emb, sub, labels), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    return step


def _partial_fc_step(classes: int, rate: float, dim: int, rank: int, world: int, momentum: float):
    from facemae_dist.losses.partial_fc import PartialFC, PartialFCOptimizer

    head = PartialFC(dim, classes, sample_rate=rate, rank=rank, world_size=world)
    opt = PartialFCOptimizer(head, "sgd", lr=0.1, momentum=momentum, weight_decay=5e-4)

    def step(emb, labels):
        loss = head(emb, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    return step


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    if args.world > 1:
        dist.init_process_group(
            "gloo", init_method=args.init, rank=args.rank, world_size=args.world
        )
    base = _rss_bytes()
    if args.impl == "partial_fc":
        step = _partial_fc_step(
            args.classes, args.rate, args.dim, args.rank, args.world, args.momentum
        )
    else:
        step = _baseline_step(args.impl, args.classes, args.rate, args.dim, args.momentum)
    gen = torch.Generator().manual_seed(1000 + args.rank)
    wall, cpu = [], []  # CPU seconds (all threads) are less sensitive to a loaded machine
    for i in range(args.warmup + args.steps):
        emb = torch.randn(args.batch, args.dim, generator=gen).requires_grad_(True)
        labels = torch.randint(0, args.classes, (args.batch,), generator=gen)
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = step(emb, labels)
        if i >= args.warmup:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    report = {
        "step_s": statistics.median(wall),
        "cpu_s": statistics.median(cpu),
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "base": base,
        "loss": float(loss.detach()),
    }
    print(json.dumps(report))
    if args.world > 1:
        dist.destroy_process_group()


# ---------------------------------------------------------------- driver
def run_case(case: Case, args: argparse.Namespace) -> dict | None:
    """Launch one process per rank; per-rank step time and peak RSS, worst rank reported."""
    threads = max(1, (os.cpu_count() or 1) // case.world)
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", "--impl", case.impl,
                 "--classes", str(case.classes), "--rate", str(case.rate),
                 "--world", str(case.world), "--rank", str(rank), "--momentum", str(case.momentum),
                 "--init", f"file://{tmp}/init", "--threads", str(threads),
                 "--batch", str(args.batch), "--dim", str(args.dim),
                 "--steps", str(timed_steps(args, case.classes)), "--warmup", str(args.warmup)],
                stdout=subprocess.PIPE, text=True,
            )
            for rank in range(case.world)
        ]  # fmt: skip
        outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        print(f"  {case}: worker failed (exit {[p.returncode for p in procs]})", flush=True)
        return None
    reports = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    return {
        "step_s": max(r["step_s"] for r in reports),
        "cpu_s": max(r["cpu_s"] for r in reports),
        "peak_gb": max(r["peak"] for r in reports) / GB,
        "delta_gb": max(r["peak"] - r["base"] for r in reports) / GB,
        "loss": reports[0]["loss"],
    }


def timed_steps(args: argparse.Namespace, classes: int) -> int:
    """Each 1M-class dense step costs ~20 s here: time at most 2 of them."""
    return min(args.steps, 2) if classes >= 1_000_000 else args.steps


def cases_for(classes: int) -> list[Case]:
    out = [Case("dense", classes, 1.0, 1)]
    out += [Case("pfc_v2-style", classes, rate, 1) for rate in (0.3, 0.1)]
    out += [Case("partial_fc", classes, rate, w) for w in (1, 2) for rate in (1.0, 0.3, 0.1)]
    # without momentum state too: the arcface_torch anchor's 4.7 GB has room for no (C, d) state
    out += [Case(impl, classes, 0.1, 1, 0.0) for impl in ("pfc_v2-style", "partial_fc")]
    return out


def mem_available() -> float:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def print_table(rows: list[tuple[Case, dict | None]], batch: int) -> None:
    head = f"{'classes':>9} {'head':<13} {'rate':>5} {'mom':>4} {'ranks':>5} {'s/step':>8} "
    head += f"{'cpu s':>7} "
    head += (
        f"{'samples/s':>10} {'peak GB/rank':>12} {'Δ GB/rank':>9} {'speed-up':>9} {'mem ratio':>9}"
    )
    print(head)
    print("-" * len(head))
    dense = {c.classes: r for c, r in rows if c.impl == "dense" and r}
    for case, res in rows:
        prefix = f"{case.classes:>9,} {case.impl:<13} {case.rate:>5.1f} {case.momentum:>4.1f} "
        prefix += f"{case.world:>5}"
        if res is None:
            print(f"{prefix} {'skipped / failed':>40}")
            continue
        sps = batch * case.world / res["step_s"]
        line = f"{prefix} {res['step_s']:>8.3f} {res['cpu_s']:>7.2f} {sps:>10,.0f} "
        line += f"{res['peak_gb']:>12.2f} "
        line += f"{res['delta_gb']:>9.2f}"
        ref = dense.get(case.classes)
        if ref:
            speed = sps / (batch / ref["step_s"])
            line += f" {speed:>8.2f}x {res['peak_gb'] / ref['peak_gb']:>9.2f}"
        print(line, flush=True)


def run_driver(args: argparse.Namespace) -> None:
    print("command:", shlex.join([sys.executable, *sys.argv]))
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, "
          f"MemAvailable {mem_available() / GB:.1f} GB, "
          f"batch {args.batch}/rank x {args.dim}-d fp32")  # fmt: skip
    print(f"anchor: {ANCHOR}", flush=True)
    sizes = [100_000] if args.quick else [100_000, 1_000_000]
    rows = []
    for classes in sizes:
        for case in cases_for(classes):
            need = case.est_bytes(args.dim)
            if need > 0.85 * mem_available():
                print(f"  skip {case}: needs ~{need / GB:.1f} GB", flush=True)
                rows.append((case, None))
                continue
            t0 = time.perf_counter()
            rows.append((case, run_case(case, args)))
            print(f"  done {case.impl} {case.classes:,} rate {case.rate} x{case.world} "
                  f"in {time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
    print()
    print_table(rows, args.batch)
    anchor_sps = args.batch / 3.38  # samples/s of the anchor (1 rank, batch 128)
    for case, r in rows:
        if case.impl == "partial_fc" and case.classes == 1_000_000 and case.rate == 0.1 and r:
            sps = args.batch * case.world / r["step_s"]
            print(f"vs anchor, 1M/0.1, {case.world} rank(s), momentum {case.momentum}: "
                  f"{sps / anchor_sps:.2f}x its samples/s, "
                  f"{r['peak_gb']:.2f} GB/rank vs 4.7 GB peak")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="100k classes only")
    ap.add_argument("--batch", type=int, default=128, help="per-rank batch")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (1M classes: at most 2)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--momentum", type=float, default=0.9, help=argparse.SUPPRESS)
    for flag, kind in (("--impl", str), ("--classes", int), ("--rate", float), ("--world", int),
                       ("--rank", int), ("--init", str), ("--threads", int)):  # fmt: skip
        ap.add_argument(flag, type=kind, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(args)
    else:
        run_driver(args)


if __name__ == "__main__":
    main()

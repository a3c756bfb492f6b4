"""Synthetic face generator: images/s on one core (render + JPEG encode) and a contact sheet.

    python bench/bench_synth.py [--n 2000] [--grid /tmp/synth_grid.png]

Prints wall-clock and CPU-time rates: on a shared machine the CPU-time rate is the one that says
what a dedicated core would do. Pin to one core with `taskset -c 0` and OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

from facemae_dist.data.synthetic import SynthConfig, encode_face, render_face


def contact_sheet(cfg: SynthConfig, ids: int, per: int, path: str) -> None:
    rows = [np.hstack([render_face(cfg, i, j) for j in range(per)]) for i in range(ids)]
    Image.fromarray(np.vstack(rows)).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description="render + JPEG speed of the synthetic faces")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="500 images (what `make bench` runs)")
    ap.add_argument("--per", type=int, default=20, help="images per identity in the timed run")
    ap.add_argument("--grid", default="/tmp/synth_grid.png")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.n = min(args.n, 500)
    cfg = SynthConfig(num_identities=1_000_000, images_per_identity=args.per, seed=args.seed)
    encode_face(cfg, 0, 0)  # warm the module-level caches (noise bank, grids)
    t0, c0 = time.perf_counter(), time.process_time()
    nbytes = sum(len(encode_face(cfg, i // args.per, i % args.per)) for i in range(args.n))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(
        f"render+jpeg, {args.n} images: {args.n / wall:,.0f} img/s wall, "
        f"{args.n / cpu:,.0f} img/s per CPU-second, {nbytes / args.n:,.0f} B/img"
    )
    if args.grid:
        contact_sheet(SynthConfig(8, 8, seed=args.seed), 8, 8, args.grid)
        print(f"contact sheet: {args.grid}")


if __name__ == "__main__":
    main()

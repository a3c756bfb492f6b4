"""Run a function on 2 real processes with a gloo process group (for the distributed tests)."""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, fn, args, results) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),  # a hang (unequal steps) fails the test instead of CI
    )
    try:
        results[rank] = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, *args, world: int = 2) -> list:
    """fn(rank, world, *args) on `world` spawned processes; returns each rank's result."""
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_entry, (world, os.path.join(tmp, "init"), fn, args, results), nprocs=world)
        return [results[r] for r in range(world)]

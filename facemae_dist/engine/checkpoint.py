"""Checkpoints shared by both trainers: atomic, keep-last-K, a `latest` pointer, exact resume.

Layout (on a file system every node sees)::

    RUN/checkpoints/step-00000100/   DeepSpeed engine files + rank00000.pt ... (per-rank state)
    RUN/checkpoints/latest           name of the newest complete checkpoint

Every rank writes into `.tmp-step-N`; after a barrier rank 0 renames it and only then moves the
`latest` pointer, so a kill at any moment leaves the previous checkpoint intact and never a half
one. A step saved again (a run that went back to an earlier checkpoint) moves the old `step-N` to
`.old-step-N` until `latest` has moved; :func:`latest` falls back to it if a kill comes in between.
Per-rank files hold what DeepSpeed does not save per rank: RNG states, the data position and task
extras (partial-FC shards).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from facemae_dist import dist
from facemae_dist.errors import FacemaeError

LATEST = "latest"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync(path: Path) -> None:
    """Flush a file or folder to the disk (a folder: its entries, e.g. a rename). Some network file
    systems refuse it on folders: their server orders metadata itself."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Every file under ``folder``, then the folder: what this node wrote reaches the disk before
    `latest` may name it (else a node crash right after could leave `latest` naming lost data)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            _fsync(path)
    _fsync(folder)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def save(engine, root: Path, step: int, rank_state: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank calls it at the same step. Returns the final checkpoint folder."""
    root.mkdir(parents=True, exist_ok=True)
    tmp_tag, final = f".tmp-{step_name(step)}", root / step_name(step)
    if dist.detect().is_main and (root / tmp_tag).exists():
        shutil.rmtree(root / tmp_tag)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    rank = dist.detect().rank
    torch.save(rank_state, root / tmp_tag / f"rank{rank:05d}.pt")
    _fsync_tree(root / tmp_tag)  # every rank: each node flushes what it wrote
    dist.barrier()
    if dist.detect().is_main:
        if final.exists():  # never delete what `latest` may name before `latest` has moved
            aside = root / f".old-{final.name}"
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(final, aside)
        os.replace(root / tmp_tag, final)
        _fsync(root)
        _atomic_write(root / LATEST, final.name)
        _prune(root, final, keep_last)
    dist.barrier()
    return final


def _prune(root: Path, newest: Path, keep_last: int) -> None:
    """Keep `newest` (the one `latest` names) and the keep_last - 1 highest-numbered others.

    `newest` is kept whatever its number: an older run in the same folder may have left higher ones.
    """
    others = sorted(p for p in root.glob("step-*") if p.is_dir() and p != newest)
    for old in others[: max(0, len(others) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not path.is_dir() and (root / f".old-{path.name}").is_dir():
        path = root / f".old-{path.name}"  # a re-save was killed between its two renames
    if not path.is_dir():
        raise FacemaeError(
            f"{pointer} names {path.name}, which is missing: restore it or delete {pointer} to start over"
        )
    return path


def load(engine, path: Path) -> list[dict[str, Any]]:
    """Restore engine (model, optimizer, scheduler); return every saved rank's own state.

    The run's own `optim.grad_clip` wins over the checkpoint's: DeepSpeed's ZeRO optimizers restore
    the saved clipping (so "set optim.grad_clip, then resume" did nothing) and refuse a checkpoint
    saved with clipping when this run skips the gradient norm (see loop.deepspeed_config)."""
    optimizer = engine.optimizer
    clip = engine.gradient_clipping()
    skips_norm = getattr(optimizer, "compute_grad_norm", None) is False
    if skips_norm:
        optimizer.compute_grad_norm = True
    try:
        loaded, _ = engine.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
    except RuntimeError as err:  # e.g. tensors of other shapes
        raise other_settings(path, err) from None
    finally:
        if skips_norm:
            optimizer.compute_grad_norm = False
    if loaded is None:
        raise FacemaeError(f"cannot load checkpoint {path}: DeepSpeed found no engine state in it")
    if hasattr(optimizer, "clip_grad"):
        optimizer.clip_grad = clip
    return load_rank_states(path)


def other_settings(path: Path, err: Exception) -> FacemaeError:
    """The error for a checkpoint that does not fit this run's model or data."""
    reason = str(err).strip().splitlines()[-1][:300]
    return FacemaeError(
        f"cannot resume from {path}: {reason}. That run folder holds a run with other settings: "
        "choose another run.out_dir, or set run.resume=false to train from scratch there"
    )


def load_rank_states(path: Path) -> list[dict[str, Any]]:
    """Every rank's saved state (for re-sharding onto a different number of ranks)."""
    files = sorted(path.glob("rank*.pt"))
    if not files:
        raise FacemaeError(f"checkpoint {path} has no per-rank state files; it is incomplete")
    return [torch.load(f, map_location="cpu", weights_only=True) for f in files]


@contextlib.contextmanager
def gathered(engine, zero_stage: int):
    """Full parameters on every rank inside the block (collective under ZeRO-3, free otherwise)."""
    if zero_stage != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        yield


def export_module(engine, path: Path, zero_stage: int) -> Path:
    """Consolidated fp32 weights of the engine's module as safetensors (collective; rank 0 writes)."""
    from safetensors.torch import save_file

    with gathered(engine, zero_stage):
        if dist.detect().is_main:
            state = engine.module.state_dict()
            tensors = {k: v.detach().float().contiguous().cpu().clone() for k, v in state.items()}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            save_file(tensors, str(tmp))
            os.replace(tmp, path)
    dist.barrier()
    return path

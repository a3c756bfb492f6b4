"""Deployment stage: released sets keep labels, match across rank counts, and resume."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facemae_dist.data.shards import ShardOptions, load_manifest, shard_dataset
from facemae_dist.data.stream import read_shard
from facemae_dist.data.synthetic import SyntheticSource
from facemae_dist.engine.reconstruct import ReconstructOptions, reconstruct_split
from facemae_dist.errors import FacemaeError

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def unseen(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("release")
    opts = ShardOptions(samples_per_shard=10, holdout_identities=3, progress=False)
    shard_dataset(SyntheticSource.from_spec("8x10:2"), root / "shards", opts)
    return root / "shards/unseen"


def opts(**kw) -> ReconstructOptions:
    return ReconstructOptions(progress=False, batch_size=7, **kw)


def test_masked_release_keeps_labels_and_blanks_the_mask(unseen, tmp_path):
    m = reconstruct_split(str(unseen), str(tmp_path / "masked"), opts(method="masked", copies=2))
    src = load_manifest(unseen)
    assert m["num_samples"] == 2 * src["num_samples"] and m["label_map"] == src["label_map"]
    samples = [s for url in load_manifest(tmp_path / "masked")["urls"] for s in read_shard(url)]
    originals = {s["__key__"]: s for url in src["urls"] for s in read_shard(url)}
    for s in samples[:6]:
        meta = json.loads(s["json"])
        assert s["cls"] == originals[meta["source_key"]]["cls"] and meta["method"] == "masked"
        image = np.asarray(Image.open(io.BytesIO(s["jpg"])), dtype=np.int16)
        patches = image.reshape(7, 16, 7, 16, 3).transpose(0, 2, 1, 3, 4).reshape(49, -1)
        # JPEG rings at patch edges, so judge each patch by its median distance from mid-grey
        grey = (np.median(np.abs(patches - 128), axis=1) <= 2).sum()
        assert grey == 49 - int(49 * 0.25)
    keys = {json.loads(s["json"])["source_key"] for s in samples}
    assert keys == set(originals)  # every face released


def test_errors_name_the_fix(unseen, tmp_path):
    with pytest.raises(FacemaeError, match="needs --model"):
        reconstruct_split(str(unseen), str(tmp_path / "x"), opts(method="facemae"))
    with pytest.raises(FacemaeError, match="--mask-ratio"):
        reconstruct_split(str(unseen), str(tmp_path / "x"), opts(method="masked", mask_ratio=1.0))


@pytest.mark.dist
def test_two_ranks_write_the_same_shards_and_a_killed_job_resumes(unseen, tmp_path):
    single = reconstruct_split(str(unseen), str(tmp_path / "one"), opts(method="noise"))
    out = tmp_path / "two"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(29900 + os.getpid() % 90),
           "-m", "facemae_dist.reconstruct", str(unseen), str(out), "--method", "noise", "--batch-size", "7",
           "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_manifest(out)["shards"] == single["shards"]  # independent of the rank count
    assert len(list(out.glob(".journal-rank*.jsonl"))) == 2  # each rank wrote its own shards

    (out / "faces-000001.tar").write_bytes(b"cut short")  # a shard damaged by a kill
    (out / "manifest.json").unlink()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert load_manifest(out)["shards"] == single["shards"]


def test_masks_differ_across_batches_and_copies_are_not_neighbours(unseen, tmp_path):
    out = tmp_path / "masked"
    reconstruct_split(str(unseen), str(out), opts(method="masked", copies=2))  # batches of 7
    first = list(read_shard(load_manifest(out)["urls"][0]))
    copies = [json.loads(s["json"])["copy"] for s in first]
    assert copies == sorted(copies)  # all of copy 0, then all of copy 1

    def grey_patches(sample: dict) -> tuple[bool, ...]:
        image = np.asarray(Image.open(io.BytesIO(sample["jpg"])), dtype=np.int16)
        patches = image.reshape(7, 16, 7, 16, 3).transpose(0, 2, 1, 3, 4).reshape(49, -1)
        return tuple(np.median(np.abs(patches - 128), axis=1) <= 2)

    masks = [grey_patches(s) for s in first if json.loads(s["json"])["copy"] == 0]
    assert len(masks) == 10 and len(set(masks)) == 10  # row i of batch 2 ≠ row i of batch 1

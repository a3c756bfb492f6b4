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
    return ReconstructOptions(**{"progress": False, "batch_size": 7, **kw})


def test_masked_release_keeps_labels_and_blanks_the_mask(unseen, tmp_path):
    masked = opts(method="masked", copies=2, keep_names=True)
    m = reconstruct_split(str(unseen), str(tmp_path / "masked"), masked)
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


def test_a_default_release_names_no_one_and_the_audit_maps_it_back(unseen, tmp_path):
    """Shareable by default: no identity name, source key or input metadata in the released files
    (keys and classes are positions in the input); the audit recovers names and sources from the
    input split, which only the data owner has."""
    from facemae_dist.eval.privacy import ReleaseNames

    out = tmp_path / "blur"
    reconstruct_split(str(unseen), str(out), opts(method="blur", copies=2))
    m, src = load_manifest(out), load_manifest(unseen)
    assert m["pseudonymous"] and m["label_map"] == [f"identity-{i:06d}" for i in range(3)]
    originals = [(s["__key__"], s["cls"]) for url in src["urls"] for s in read_shard(url)]
    released = b"".join(Path(url).read_bytes() for url in m["urls"])
    released += (out / "manifest.json").read_bytes()
    for name in src["label_map"]:
        assert json.dumps(name).strip('"').encode() not in released
    for key, _ in originals:
        assert key.encode() not in released
    names = ReleaseNames(str(out))
    assert names.label_map == src["label_map"]
    seen = set()
    for url in m["urls"]:
        for s in read_shard(url):
            assert set(json.loads(s["json"])) == {"method", "mask_ratio", "copy"}
            source = names.source(s["__key__"], {})
            assert dict(originals)[source] == s["cls"]  # the same face's class
            seen.add(source)
    assert seen == {k for k, _ in originals}


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


def tar_hashes(split: Path) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(split.glob("*"))}


def test_a_folder_holds_one_release_and_resumes_only_that_one(unseen, tmp_path):
    out = str(tmp_path / "rel")
    first = reconstruct_split(str(unseen), out, opts(method="blur"))
    for other in (opts(method="noise"), opts(method="blur", blur_sigma=4.0)):
        with pytest.raises(FacemaeError, match="other options.*choose another output folder"):
            reconstruct_split(str(unseen), out, other)
    with pytest.raises(FacemaeError, match="another input.*input differs"):
        reconstruct_split(str(unseen.parent / "train"), out, opts(method="blur"))
    assert load_manifest(out)["shards"] == first["shards"]  # nothing was overwritten
    (tmp_path / "rel/faces-000001.tar").unlink()  # as a killed run left it
    (tmp_path / "rel/manifest.json").unlink()
    again = reconstruct_split(str(unseen), out, opts(method="blur", noise_std=0.5))  # unused
    assert again["shards"] == first["shards"]  # the same release, resumed

    legacy = tmp_path / "legacy"  # shards with no record of their options (older release, a split)
    legacy.mkdir()
    (legacy / "manifest.json").write_text("{}")
    with pytest.raises(FacemaeError, match="no record .*choose another output folder"):
        reconstruct_split(str(unseen), str(legacy), opts(method="blur"))


def test_output_must_not_overlap_the_input(unseen):
    before = tar_hashes(unseen)
    for out in (unseen, unseen / "released", unseen.parent):
        with pytest.raises(FacemaeError, match="input split .*choose an output folder outside"):
            reconstruct_split(str(unseen), str(out), opts(method="blur"))
    assert tar_hashes(unseen) == before and not (unseen / "released").exists()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"blur_sigma": 0.0}, "--blur-sigma must be > 0"),
        ({"blur_sigma": -2.0}, "--blur-sigma must be > 0"),
        ({"noise_std": 0.0}, "--noise-std must be > 0"),
        ({"jpeg_quality": 0}, "--jpeg-quality must be in 1..100"),
        ({"jpeg_quality": 101}, "--jpeg-quality must be in 1..100"),
        ({"copies": 0}, "--copies must be ≥ 1"),
        ({"batch_size": 0}, "--batch-size must be ≥ 1"),
        ({"mask_ratio": float("nan")}, "--mask-ratio must be in"),
    ],
)
def test_bad_options_are_named(unseen, tmp_path, kw, match):
    with pytest.raises(FacemaeError, match=match):
        reconstruct_split(str(unseen), str(tmp_path / "x"), opts(method="blur", **kw))
    assert not (tmp_path / "x").exists()


def test_model_folders_that_are_no_facemae_export(unseen, tmp_path, capsys):
    from facemae_dist.cli import main as cli_main

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.json").write_text(
        json.dumps({"name": "facemae_vit_micro_patch16_112", "kwargs": {}})
    )
    cases = {"no facemae.safetensors": run}
    recog = tmp_path / "recog"
    recog.mkdir()
    (recog / "model.json").write_text(json.dumps({"backbone": "tiny", "embedding_size": 8}))
    (recog / "backbone.safetensors").write_bytes(b"x")
    cases["a recognizer export"] = recog
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.json").write_text((run / "model.json").read_text())
    (broken / "facemae.safetensors").write_bytes(b"not safetensors")
    cases["cannot load the FaceMAE weights"] = broken
    for match, model in cases.items():
        with pytest.raises(FacemaeError, match=match):
            reconstruct_split(str(unseen), str(tmp_path / "x"), opts(model=str(model)))
    assert not (tmp_path / "x").exists()
    argv = ["reconstruct", str(unseen), str(tmp_path / "x"), "--model", str(broken)]
    assert cli_main(argv) == 2
    assert cli_main(["reconstruct", str(unseen), str(tmp_path / "x"), "--blur-sigma", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("facemae reconstruct: error: --") for line in err)


def test_a_blur_wider_than_the_face_is_cut_to_it():
    import torch

    from facemae_dist.engine.reconstruct import Releaser

    released = Releaser(opts(method="blur", blur_sigma=50.0), torch.device("cpu"))(
        torch.rand(1, 3, 32, 32) * 2 - 1, torch.Generator()
    )
    assert released.shape == (1, 3, 32, 32) and released.std() < 0.1


def test_auditing_a_release_whose_input_moved_names_the_missing_split(unseen, tmp_path):
    import shutil

    from facemae_dist.eval.privacy import ReleaseNames

    moved = tmp_path / "unseen"
    shutil.copytree(unseen, moved)
    reconstruct_split(str(moved), str(tmp_path / "blur"), opts(method="blur"))
    shutil.rmtree(moved)
    with pytest.raises(FacemaeError, match=f"made from, {moved}, which is not there"):
        ReleaseNames(str(tmp_path / "blur"))


def test_rerunning_a_finished_release_says_it_is_complete(unseen, tmp_path, capsys):
    """The same `facemae reconstruct` into a finished folder writes nothing and says so (and how
    to release again), instead of a "0 img ... done" progress line."""
    from facemae_dist.engine.reconstruct import main

    out = tmp_path / "blur"
    args = [str(unseen), str(out), "--method", "blur", "--batch-size", "7"]
    first = main(args)
    printed = capsys.readouterr()
    assert "already_complete" not in first
    assert f"blur: 30 faces of 3 identities → {out}" in printed.out
    assert "release blur: 30" in printed.err  # the progress line of the real work
    before = tar_hashes(out)
    again = main(args)
    printed = capsys.readouterr()
    assert again["already_complete"] is True and again["shards"] == first["shards"]
    assert printed.out.strip() == (
        f"{out} already holds this complete blur release of {unseen} (30 faces of 3 "
        f"identities): nothing to do; to release again, delete {out} or choose another output "
        "folder"
    )
    assert "img" not in printed.err  # no progress bar over nothing
    assert {k: v for k, v in tar_hashes(out).items() if k.endswith(".tar")} == {
        k: v for k, v in before.items() if k.endswith(".tar")
    }
    (out / "manifest.json").unlink()  # a run killed before its manifest: that one is finished
    assert "already_complete" not in main(args)
    assert f"blur: 30 faces of 3 identities → {out}" in capsys.readouterr().out

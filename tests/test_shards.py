"""The sharder: layout, pass-through, bad inputs, hold-out splits, byte budget, resume."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile

import numpy as np
import pytest
import webdataset as wds
from conftest import MemorySource, jpeg_bytes, make_source
from PIL import Image

from facemae_dist.data.shards import ShardOptions, load_manifest, shard_dataset
from facemae_dist.errors import FacemaeError


def opts(**kw) -> ShardOptions:
    return ShardOptions(progress=False, command="test", **kw)


def read_back(split_dir) -> list[dict]:
    urls = load_manifest(split_dir)["urls"]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_layout_passthrough_and_readback(tmp_path, memory_source):
    manifests = shard_dataset(memory_source, tmp_path, opts(samples_per_shard=8))
    m = manifests["train"]
    assert m["num_samples"] == len(memory_source) == 30
    assert m["num_classes"] == 6 and m["label_map"][0] == "id 0 é"
    assert [s["file"] for s in m["shards"]] == [f"faces-{i:06d}.tar" for i in range(4)]
    samples = read_back(tmp_path / "train")
    assert len(samples) == 30 and len({s["__key__"] for s in samples}) == 30
    for s in samples:
        index = json.loads(s["json"])["index"]
        assert s["jpg"] == memory_source.items[index][1]  # encoded bytes untouched
        assert int(s["cls"]) == memory_source.items[index][0]
    listing = subprocess.run(
        ["tar", "-tf", str(tmp_path / "train" / "faces-000000.tar")], capture_output=True, text=True
    )
    assert listing.returncode == 0 and len(listing.stdout.split()) == 3 * 8
    # deterministic tar: no PAX headers, size = headers + padded data
    with tarfile.open(tmp_path / "train" / "faces-000000.tar") as tar:
        assert all(not m.pax_headers and m.mtime == 0 for m in tar.getmembers())


def test_bad_inputs_are_skipped_listed_and_valid_ones_kept(tmp_path):
    good = [
        (0, jpeg_bytes(1)),
        (0, jpeg_bytes(2)),
        (1, jpeg_bytes(3)),
        (1, jpeg_bytes(4, fmt="PNG")),
    ]
    resized = [(1, jpeg_bytes(5, size=128))]
    bad = [
        (0, b""),
        (1, jpeg_bytes(6)[:-300]),
        (0, b"not an image at all"),
        (1, b"UNREADABLE"),
        (0, jpeg_bytes(7, fmt="PNG")[:40]),
    ]
    source = MemorySource(good + resized + bad)
    m = shard_dataset(source, tmp_path, opts(samples_per_shard=3))["train"]
    assert m["num_samples"] == len(good) + len(resized)
    reasons = " | ".join(r["reason"] for r in m["rejected"])
    assert len(m["rejected"]) == len(bad)
    assert "empty" in reasons and "truncated JPEG" in reasons and "unreadable" in reasons
    samples = {json.loads(s["json"])["index"]: s for s in read_back(tmp_path / "train")}
    assert samples[3]["png"] == good[3][1]  # PNG passes through as PNG
    assert samples[4]["jpg"][:3] == b"\xff\xd8\xff" and samples[4]["jpg"] != resized[0][1]
    assert wds.autodecode.imagehandler("rgb8")("jpg", samples[4]["jpg"]).shape == (112, 112, 3)


def test_strict_stops_and_names_the_input(tmp_path):
    source = MemorySource([(0, jpeg_bytes(1)), (0, b"garbage bytes")])
    with pytest.raises(FacemaeError, match="item 1.*--strict"):
        shard_dataset(source, tmp_path, opts(strict=True))


def test_holdout_splits_are_identity_disjoint(tmp_path):
    source = make_source(num_ids=10, per_id=3)
    ms = shard_dataset(source, tmp_path, opts(holdout_identities=3, shuffle=True, seed=1))
    train, unseen = ms["train"], ms["unseen"]
    assert unseen["num_classes"] == 3 and train["num_classes"] == 7
    assert not set(train["label_map"]) & set(unseen["label_map"])
    assert train["num_samples"] + unseen["num_samples"] == 30
    for split in ("train", "unseen"):
        labels = {int(s["cls"]) for s in read_back(tmp_path / split)}
        assert labels == set(range(ms[split]["num_classes"]))  # contiguous per split
    frac = shard_dataset(source, tmp_path / "f", opts(holdout_fraction=0.2))
    assert frac["unseen"]["num_classes"] == 2


def test_max_shard_bytes_is_respected(tmp_path, memory_source):
    budget = 64 * 1024
    m = shard_dataset(memory_source, tmp_path, opts(max_shard_bytes=budget))["train"]
    assert len(m["shards"]) > 1 and m["num_samples"] == 30
    assert all(s["bytes"] <= budget for s in m["shards"])
    # small files: the per-sample .cls/.json members (a header and a block each) dominate
    flat = [(i % 3, _flat_jpeg(i)) for i in range(120)]
    budget = 16 * 1024
    m = shard_dataset(MemorySource(flat), tmp_path / "flat", opts(max_shard_bytes=budget))["train"]
    assert len(m["shards"]) > 1 and m["num_samples"] == 120
    assert all(s["bytes"] <= budget for s in m["shards"])
    # faces that must be resized are re-encoded: the plan cannot know their size, so it warns
    tiny = MemorySource([(i % 3, jpeg_bytes(i, size=16)) for i in range(40)])
    with pytest.warns(UserWarning, match="exceed --max-shard-bytes 16384.*resized to 112 px"):
        shard_dataset(tiny, tmp_path / "tiny", opts(max_shard_bytes=budget))


def _flat_jpeg(value: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (112, 112), (value, 90, 200)).save(out, format="JPEG")
    return out.getvalue()


def test_non_utf8_identity_names_round_trip(tmp_path):
    names = ["Jos\udce9", "张伟"]  # a latin-1 folder name as os.fsdecode gives it, and UTF-8
    source = MemorySource([(0, jpeg_bytes(1)), (1, jpeg_bytes(2))], names=names)
    m = shard_dataset(source, tmp_path, opts())["train"]
    assert load_manifest(tmp_path / "train")["label_map"] == m["label_map"] == names
    labels = [json.loads(s["json"])["label"] for s in read_back(tmp_path / "train")]
    assert sorted(labels) == sorted(names)


def test_resume_repairs_damage_and_matches_uninterrupted(tmp_path, memory_source):
    ref = shard_dataset(memory_source, tmp_path / "ref", opts(samples_per_shard=4, workers=2))
    out = tmp_path / "out"
    shard_dataset(memory_source, out, opts(samples_per_shard=4, workers=2))
    split = out / "train"
    (split / "faces-000002.tar").unlink()  # lost shard
    with open(split / "faces-000004.tar", "r+b") as f:  # damaged shard (sha256 mismatch)
        f.truncate(2048)
    (split / "faces-000005.tar.tmp").write_bytes(b"half written")
    (split / "manifest.json").unlink()
    with pytest.raises(FacemaeError, match="--resume"):
        shard_dataset(memory_source, out, opts(samples_per_shard=4))
    with pytest.raises(FacemaeError, match="different source or options"):
        shard_dataset(memory_source, out, opts(samples_per_shard=5, resume=True))
    got = shard_dataset(memory_source, out, opts(samples_per_shard=4, resume=True))
    assert got["train"]["shards"] == ref["train"]["shards"]
    assert not list(split.glob("*.tmp"))


def test_errors_for_empty_source_and_bad_options(tmp_path):
    empty = MemorySource([(0, jpeg_bytes(0))])
    empty.items = []
    with pytest.raises(FacemaeError, match="no images"):
        shard_dataset(empty, tmp_path, opts())
    with pytest.raises(FacemaeError, match="not both"):
        shard_dataset(make_source(), tmp_path, opts(holdout_identities=1, holdout_fraction=0.1))
    with pytest.raises(FacemaeError, match="leaves none"):
        shard_dataset(make_source(), tmp_path, opts(holdout_identities=6))
    with pytest.raises(FacemaeError, match="--seed must be ≥ 0"):
        shard_dataset(make_source(), tmp_path, opts(seed=-1))
    with pytest.raises(FacemaeError, match="no shard manifest"):
        load_manifest(tmp_path / "nowhere")


def test_plan_memory_is_compact():
    """The plan keeps numpy arrays only: ~16 bytes per image (items + cls), not Python objects."""
    from facemae_dist.data.shards import plan_splits

    class Big(MemorySource):
        def __init__(self, n: int) -> None:
            self._labels = np.arange(n, dtype=np.int64) // 20
            self._names = [str(i) for i in range(n // 20)]
            self.description = "big"

        def __len__(self) -> int:
            return len(self._labels)

    (plan,) = plan_splits(Big(2_000_000), opts(shuffle=True))
    assert plan.items.nbytes + plan.cls.nbytes == 2_000_000 * 16


def test_sigkill_then_resume_gives_the_uninterrupted_shards(tmp_path):
    """A real kill of a parallel run mid-way, then --resume: same shards, same sha256."""
    import signal
    import sys
    import time
    from pathlib import Path

    facemae = str(Path(sys.executable).parent / "facemae")
    args = [
        "shard",
        "120x20:4",
        "--format",
        "synthetic",
        "--samples-per-shard",
        "100",
        "--workers",
        "2",
    ]
    ref = subprocess.run(
        [facemae, *args, str(tmp_path / "ref"), "--no-progress"], capture_output=True, text=True
    )
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out"
    proc = subprocess.Popen([facemae, *args, str(out), "--no-progress"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while not list((out / "train").glob("*.tar")) and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the sharder and its worker processes
    proc.wait()
    assert not (out / "train" / "manifest.json").exists(), "finished before the kill"
    again = subprocess.run(
        [facemae, *args, str(out), "--resume", "--no-progress"], capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    assert load_manifest(out / "train")["shards"] == load_manifest(tmp_path / "ref/train")["shards"]


def test_shards_whose_inputs_were_all_rejected_are_left_out(tmp_path):
    items = [(0, b"not an image"), (0, b"UNREADABLE"), (1, jpeg_bytes(1)), (1, jpeg_bytes(2))]
    m = shard_dataset(MemorySource(items), tmp_path / "a", opts(samples_per_shard=2))["train"]
    assert [s["samples"] for s in m["shards"]] == [2] and len(m["rejected"]) == 2
    with pytest.raises(FacemaeError, match="every input of split 'train' was rejected"):
        shard_dataset(MemorySource(items[:2]), tmp_path / "b", opts())


def test_tar_headers_refuse_what_ustar_cannot_hold():
    from facemae_dist.data.tario import BLOCK, member_header

    assert len(member_header("a.jpg", 8**11 - 1)) == BLOCK
    with pytest.raises(ValueError, match="at most 8 GiB"):
        member_header("a.jpg", 8**11)
    with pytest.raises(ValueError, match="too long"):
        member_header("x" * 100, 1)


def test_strict_stop_before_any_shard_does_not_block_the_rerun(tmp_path):
    bad = MemorySource([(0, b"garbage bytes"), (0, jpeg_bytes(1)), (1, jpeg_bytes(2))])
    with pytest.raises(FacemaeError, match="item 0.*run the same command again.*--resume"):
        shard_dataset(bad, tmp_path, opts(strict=True))
    split = tmp_path / "train"
    assert not list(split.glob("*.tar")) and list(split.glob("*.tmp"))  # no shard finished
    fixed = MemorySource([(0, jpeg_bytes(3)), (0, jpeg_bytes(1)), (1, jpeg_bytes(2))])
    m = shard_dataset(fixed, tmp_path, opts(strict=True))["train"]  # plain rerun: no --resume
    assert m["num_samples"] == 3 and not list(split.glob("*.tmp"))
    # removing the bad input changes the plan: with nothing finished, --resume starts afresh too
    again = tmp_path / "again"
    with pytest.raises(FacemaeError):
        shard_dataset(bad, again, opts(strict=True))
    m = shard_dataset(MemorySource(fixed.items[1:]), again, opts(strict=True, resume=True))
    assert m["train"]["num_samples"] == 2


def test_a_finished_shard_or_foreign_file_still_needs_resume(tmp_path, memory_source):
    shard_dataset(memory_source, tmp_path, opts(samples_per_shard=8))
    with pytest.raises(FacemaeError, match="already holds shards: pass --resume"):
        shard_dataset(memory_source, tmp_path, opts(samples_per_shard=8))
    other = tmp_path / "other" / "train"
    other.mkdir(parents=True)
    (other / "notes.txt").write_text("mine")  # never deleted as a leftover
    with pytest.raises(FacemaeError, match="already holds shards"):
        shard_dataset(memory_source, tmp_path / "other", opts())
    assert (other / "notes.txt").read_text() == "mine"


def test_shard_root_names_its_splits(tmp_path):
    shard_dataset(make_source(), tmp_path / "shards", opts(holdout_identities=2))
    root = tmp_path / "shards"
    with pytest.raises(
        FacemaeError, match=r"is a shard root: pass one of its splits, e\.g\. .*train"
    ):
        load_manifest(root)
    with pytest.raises(FacemaeError) as err:
        load_manifest(str(root))
    assert f"{root}/train or {root}/unseen" in str(err.value)


def test_resume_refuses_shards_written_with_other_labels(tmp_path):
    """A corrected label list must not keep shards that carry the old labels."""
    faces = [jpeg_bytes(i) for i in range(8)]
    first = MemorySource([(0, f) for f in faces[:4]] + [(1, f) for f in faces[4:]])
    shard_dataset(first, tmp_path, opts(samples_per_shard=4))
    (tmp_path / "train/faces-000001.tar").unlink()  # killed before the second shard
    fixed = MemorySource([(0, f) for f in faces[:2]] + [(1, f) for f in faces[2:]])
    with pytest.raises(FacemaeError, match="different source or options \\(labels"):
        shard_dataset(fixed, tmp_path, opts(samples_per_shard=4, resume=True))


class _DyingSource(MemorySource):
    """Item 5 kills the worker process that reads it (what the OOM killer does)."""

    parent = os.getpid()

    def read(self, index: int):
        if index == 5 and os.getpid() != self.parent:
            os.kill(os.getpid(), 9)
        return super().read(index)


def test_a_killed_writer_process_ends_the_run_with_a_resume_hint(tmp_path):
    source = _DyingSource([(i % 3, jpeg_bytes(i)) for i in range(12)])
    with pytest.raises(FacemaeError, match="shard writer process died.*--resume"):
        shard_dataset(source, tmp_path, opts(samples_per_shard=2, workers=2))


def test_a_journal_line_cut_by_a_kill_costs_no_later_entry(tmp_path, memory_source):
    shard_dataset(memory_source, tmp_path, opts(samples_per_shard=8))
    split = tmp_path / "train"
    journal = split / ".journal.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])  # cut inside the third entry
    (split / "faces-000002.tar").unlink()
    (split / "faces-000003.tar").unlink()
    (split / "manifest.json").unlink()
    shard_dataset(memory_source, tmp_path, opts(samples_per_shard=8, resume=True))
    from facemae_dist.data.shards import verified_shards

    assert sorted(verified_shards(split)) == [0, 1, 2, 3]


def test_a_hold_out_fraction_holds_out_at_least_one_identity(tmp_path):
    source = make_source(num_ids=5, per_id=2)
    manifests = shard_dataset(source, tmp_path, opts(holdout_fraction=0.1))
    assert manifests["unseen"]["num_classes"] == 1
    with pytest.raises(FacemaeError, match="--holdout-identities must be"):
        opts(holdout_identities=-1).validate()

"""The streaming loader: batches, equal steps per rank, resume position, truncated shards."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import jpeg_bytes
from distributed import run_ranks

from facemae_dist.data.shards import load_manifest
from facemae_dist.data.stream import BadShardError, FaceStream, decode_face, make_loader
from facemae_dist.errors import FacemaeError


def keys_of(loader) -> list[list[str]]:
    return [batch["key"] for batch in loader]


def test_batches_are_decoded_flipped_and_normalised(sharded_split):
    stream = FaceStream(sharded_split, 4, flip=True, normalize=True, seed=3)
    batch = next(iter(make_loader(stream)))
    assert batch["image"].shape == (4, 3, 112, 112) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["label"].dtype == torch.int64 and len(batch["key"]) == 4
    raw = next(iter(make_loader(FaceStream(sharded_split, 4, seed=3))))
    assert raw["image"].dtype == torch.uint8 and raw["key"] == batch["key"]
    unflipped = raw["image"].float() / 127.5 - 1
    same = [torch.allclose(unflipped[i], batch["image"][i], atol=1e-5) for i in range(4)]
    flipped = [
        torch.allclose(unflipped[i].flip(-1), batch["image"][i], atol=1e-5) for i in range(4)
    ]
    assert all(a or b for a, b in zip(same, flipped, strict=True))


def test_inference_stream_reads_every_sample_once(sharded_split):
    stream = FaceStream(sharded_split, 5, repeat=False)
    keys = [k for batch in keys_of(make_loader(stream, num_workers=2)) for k in batch]
    assert len(keys) == 28 and len(set(keys)) == 28


@pytest.mark.parametrize("workers,skip", [(0, 4), (2, 4), (2, 3)])
def test_resume_skips_exactly_the_batches_already_seen(sharded_split, workers, skip):
    stream = FaceStream(sharded_split, 3, seed=5, shuffle_buffer=10, flip=True)
    stream.set_epoch(1)
    full = list(make_loader(stream, workers))
    assert len(full) == stream.batches_per_epoch == 28 // 3
    # an odd skip with 2 workers: the DataLoader starts at worker 0, which must play worker 1's role
    stream.set_epoch(1, skip_batches=skip)
    resumed = list(make_loader(stream, workers))
    assert [b["key"] for b in resumed] == [b["key"] for b in full[skip:]]
    assert all(
        torch.equal(a["image"], b["image"]) for a, b in zip(resumed, full[skip:], strict=True)
    )
    full = [b["key"] for b in full]
    stream.set_epoch(2)
    assert keys_of(make_loader(stream, workers)) != full  # reshuffled per epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_reads_each_sample_at_most_once_over_ranks_and_workers(sharded_split, workers):
    """28 faces in 7 shards, 2 ranks x 3 faces: 4 batches per rank use 24 distinct faces; the 4
    that do not fill a global batch wait for another epoch. The shuffle buffer (larger than a
    slot's part) must not hold any back, nor may a slot wrap around into a second pass."""
    for epoch in (0, 1):
        keys = []
        for rank in (0, 1):
            stream = FaceStream(sharded_split, 3, rank=rank, world_size=2, shuffle_buffer=100)
            stream.set_epoch(epoch)
            keys += [k for batch in keys_of(make_loader(stream, workers)) for k in batch]
        assert len(keys) == 24 and len(set(keys)) == 24, sorted(keys)


@pytest.mark.parametrize("workers", [0, 2])
def test_starting_an_epoch_leaves_the_global_generator_alone(sharded_split, workers):
    """A resumed run restores torch's global RNG, then starts its epoch: if the loader drew from it,
    every dropout/drop-path mask after a mid-epoch resume would differ from the uninterrupted run."""
    stream = FaceStream(sharded_split, 3, seed=5)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    next(iter(make_loader(stream, workers)))
    assert torch.equal(torch.get_rng_state(), before)


def test_truncated_shard_is_named_or_skipped(sharded_split):
    shard = sharded_split / "faces-000003.tar"
    shard.write_bytes(shard.read_bytes()[:4000])
    with pytest.raises(BadShardError, match="faces-000003.tar"):
        keys_of(make_loader(FaceStream(sharded_split, 4, repeat=False)))
    full = sharded_split / "faces-000002.tar"
    with tarfile.open(full) as tar:
        boundary = tar.getmembers()[3].offset  # where the second sample starts
    shard.write_bytes(full.read_bytes()[:boundary])  # only the manifest count can tell
    with pytest.raises(BadShardError, match=r"faces-000003.tar ended after 1 of 4"):
        keys_of(make_loader(FaceStream(sharded_split, 4, repeat=False)))
    stream = FaceStream(sharded_split, 4, repeat=False, skip_bad_shards=True)
    with pytest.warns(UserWarning, match="skipping"):
        keys = [k for b in keys_of(make_loader(stream)) for k in b]
    assert len(keys) == 24 + 1 and stream.bad_shards == 1  # the sample before the cut is kept


def test_a_rank_without_readable_samples_fails_instead_of_spinning(sharded_split):
    for shard in sharded_split.glob("*.tar"):
        shard.write_bytes(shard.read_bytes()[:1000])  # every shard truncated in its first sample
    stream = FaceStream(sharded_split, 4, skip_bad_shards=True)
    with (
        pytest.warns(UserWarning, match="skipping"),
        pytest.raises(BadShardError, match="hold no readable sample"),
    ):
        next(iter(make_loader(stream)))


def test_corrupt_image_data_names_the_sample_and_shard():
    corrupt = (
        jpeg_bytes(1)[:400] + b"\xff\xd9"
    )  # headers, then the end marker: passes a cheap check
    sample = {"jpg": corrupt, "__key__": "0000000007", "__url__": "shards/faces-000001.tar"}
    with pytest.raises(BadShardError, match=r"0000000007 in shards/faces-000001.tar cannot be dec"):
        decode_face(sample)


def _count_steps(rank: int, world: int, split: str, workers: int) -> tuple[int, list[str]]:
    stream = FaceStream(split, 2, rank=rank, world_size=world, seed=1)
    steps, keys = 0, []
    for batch in make_loader(stream, workers):
        total = torch.tensor([1.0])
        dist.all_reduce(total)  # hangs (then times out) if one rank had fewer batches
        steps += 1
        keys += batch["key"]
    return steps, keys


@pytest.mark.dist
def test_two_ranks_get_equal_steps_from_seven_shards(sharded_split):
    assert len(load_manifest(sharded_split)["shards"]) == 7
    for workers in (0, 2):
        (s0, k0), (s1, k1) = run_ranks(_count_steps, str(sharded_split), workers)
        assert s0 == s1 == 28 // (2 * 2)
        # slots own 2, 2, 2 and 1 shards: the small slot wraps, yet most samples are seen
        assert len(set(k0) | set(k1)) >= 16


def test_urls_that_webdataset_opens_work_too(sharded_split):
    urls = [f"pipe:cat {p}" for p in sorted(sharded_split.glob("*.tar"))]
    keys = [k for b in keys_of(make_loader(FaceStream(urls, 5, repeat=False))) for k in b]
    assert len(keys) == 28 and len(set(keys)) == 28


def test_a_cut_inside_the_last_sample_is_not_a_short_sample(sharded_split):
    """tarfile would read a cut inside the last face's .cls header as the end of the archive and
    hand out a face without a label; the reader reports the shard as truncated instead."""
    shard = sharded_split / "faces-000006.tar"
    with tarfile.open(shard) as tar:
        cls_member = [m for m in tar.getmembers() if m.name.endswith(".cls")][-1]
    shard.write_bytes(shard.read_bytes()[: cls_member.offset + 100])
    with pytest.raises(BadShardError, match="faces-000006.tar"):
        keys_of(make_loader(FaceStream([str(shard)], 4, repeat=False)))


def test_16bit_png_samples_are_scaled_not_clipped():
    import io

    import numpy as np
    from PIL import Image

    ramp = (np.arange(112 * 112, dtype=np.uint32).reshape(112, 112) * 5).astype(np.uint16)
    out = io.BytesIO()
    Image.fromarray(ramp).save(out, format="PNG")  # mode I;16, passed through by the sharder
    face = decode_face({"png": out.getvalue(), "__key__": "k", "__url__": "u"})
    assert face.shape == (3, 112, 112)
    assert torch.equal(face[1], torch.from_numpy((ramp >> 8).astype(np.uint8)))


def test_shards_at_another_face_size_are_refused_by_every_model_stage(tmp_path):
    from facemae_dist.config import load_config
    from facemae_dist.data.shards import ShardOptions, shard_dataset
    from facemae_dist.data.synthetic import SyntheticSource
    from facemae_dist.engine import pretrain, recognize

    shard_dataset(
        SyntheticSource.from_spec("4x2"),
        tmp_path / "s",
        ShardOptions(image_size=64, progress=False),
    )
    split = str(tmp_path / "s/train")
    repo = Path(__file__).resolve().parents[1]
    mae = load_config(
        pretrain.PretrainConfig, repo / "configs/mae/tiny_cpu.yaml", [f"data.train={split}"]
    )
    with pytest.raises(
        FacemaeError, match="hold 64 px faces but model.image_size takes 112 px.*--image-size 112"
    ):
        pretrain.validate(mae, 1)
    rec = load_config(
        recognize.RecogConfig,
        repo / "configs/recog/tiny_cpu.yaml",
        [f"data.train={split}", "eval.pairs=[]"],
    )
    with pytest.raises(FacemaeError, match="hold 64 px faces but backbone"):
        recognize.validate(rec, 1)


def test_model_input_from_uint8_batches_equals_normalising_in_the_loader() -> None:
    from facemae_dist.data.stream import normalize, to_model_input

    raw = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    expected = normalize(raw)
    assert torch.equal(to_model_input(raw, "cpu", torch.float32), expected)
    assert torch.equal(to_model_input(raw, "cpu", torch.bfloat16), expected.to(torch.bfloat16))
    assert torch.equal(to_model_input(expected, "cpu", torch.float32), expected)  # already float
    assert raw.dtype == torch.uint8 and raw.max() > 1  # the loader's batch is left as it was

"""The ArcFace 10-fold verification protocol, embeddings of pair sets, and building pair sets."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from facemae_dist.data.shards import load_manifest
from facemae_dist.data.sources import PairSet, load_pair_set, write_pair_set
from facemae_dist.data.stream import read_shard
from facemae_dist.engine.recognize import load_recognizer
from facemae_dist.errors import FacemaeError
from facemae_dist.eval.verification import (
    THRESHOLDS,
    embed_pairs,
    evaluate,
    fold_bounds,
    make_pairs,
    resolve_device,
    verify_pair_set,
)
from facemae_dist.models.backbones import build_backbone

# ------------------------------------------------------------------- a plain reference protocol


def reference_folds(n: int, k: int) -> list[np.ndarray]:
    """sklearn KFold(k, shuffle=False) test indices: the first n % k folds get one more."""
    folds, start = [], 0
    for f in range(k):
        size = n // k + (1 if f < n % k else 0)
        folds.append(np.arange(start, start + size))
        start += size
    return folds


def reference_accuracy(threshold: float, dist: np.ndarray, same: np.ndarray) -> float:
    predict = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict, same))
    tn = np.sum(np.logical_and(np.logical_not(predict), np.logical_not(same)))
    return float(tp + tn) / dist.size


def reference_protocol(e1, e2, same, k=10, far_target=1e-3):
    """Loops over folds and thresholds, as insightface's calculate_roc / calculate_val do."""
    dist = np.sum(np.square(np.subtract(e1, e2)), 1)
    accs, best_thr, tars = [], [], []
    for test in reference_folds(len(dist), k):
        train = np.setdiff1d(np.arange(len(dist)), test)
        acc_train = [reference_accuracy(t, dist[train], same[train]) for t in THRESHOLDS]
        best = THRESHOLDS[int(np.argmax(acc_train))]
        best_thr.append(best)
        accs.append(reference_accuracy(best, dist[test], same[test]))
        val_thr = 0.0
        for t in THRESHOLDS:  # the largest threshold whose training FAR stays within the target
            d_train = dist[train][~same[train]]
            if np.sum(d_train < t) / d_train.size <= far_target:
                val_thr = t
        tars.append(np.sum(dist[test][same[test]] < val_thr) / np.sum(same[test]))
    return np.mean(accs), np.std(accs), np.mean(best_thr), np.mean(tars), accs


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def structured_pairs(n: int, dim: int = 32, seed: int = 0):
    """Same pairs are noisy copies (noise level varies per pair); different pairs independent."""
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.5
    e1 = unit(rng.standard_normal((n, dim)))
    noise = rng.standard_normal((n, dim)) * rng.uniform(0.05, 1.5, (n, 1))
    e2 = np.where(same[:, None], unit(e1 + noise), unit(rng.standard_normal((n, dim))))
    return e1, e2, same


@pytest.mark.parametrize("n,seed", [(600, 0), (605, 1), (1003, 2)])
def test_matches_reference_protocol(n: int, seed: int) -> None:
    e1, e2, same = structured_pairs(n, seed=seed)
    acc, std, thr, tar, fold_accs = reference_protocol(e1, e2, same)
    got = evaluate(e1, e2, same)
    assert got.fold_accuracies == fold_accs
    assert (got.accuracy, got.std, got.threshold) == (acc, std, thr)
    assert got.tar_at_far == pytest.approx(tar, abs=1e-12)
    assert 0.6 < got.accuracy < 0.99  # the structure makes the task neither trivial nor hopeless
    assert got.num_pairs == n


def test_fold_bounds_are_contiguous_kfold() -> None:
    bounds = fold_bounds(605, 10)
    assert [b - a for a, b in bounds] == [61] * 5 + [60] * 5
    assert bounds[0][0] == 0 and bounds[-1][1] == 605
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(9))


def test_perfect_and_random_embeddings() -> None:
    rng = np.random.default_rng(0)
    n = 2000
    same = np.arange(n) % 2 == 0
    e1 = unit(rng.standard_normal((n, 64)))
    e2 = np.where(same[:, None], e1, -e1)  # same: distance 0, different: distance 4
    perfect = evaluate(e1, e2, same)
    assert (perfect.accuracy, perfect.std, perfect.tar_at_far, perfect.far) == (1.0, 0.0, 1.0, 0.0)
    rand = evaluate(e1, unit(rng.standard_normal((n, 64))), same)
    assert abs(rand.accuracy - 0.5) < 0.05
    assert rand.far <= 0.01


def test_tar_at_far_keeps_training_far_within_target() -> None:
    e1, e2, same = structured_pairs(4000, seed=3)
    res = evaluate(e1, e2, same, far_target=1e-2)
    assert 0 < res.tar_at_far <= 1 and res.far <= 0.03
    assert res.tar_at_far <= evaluate(e1, e2, same, far_target=1e-1).tar_at_far


def test_evaluate_rejects_bad_input() -> None:
    e1, e2, same = structured_pairs(100)
    with pytest.raises(FacemaeError, match="L2-normalised"):
        evaluate(e1 * 3, e2, same)
    with pytest.raises(FacemaeError, match="one label per pair"):
        evaluate(e1, e2[:50], same)
    with pytest.raises(FacemaeError, match="both same and different"):
        evaluate(e1, e2, np.ones(100, bool))
    with pytest.raises(FacemaeError, match="NaN"):
        evaluate(np.full_like(e1, np.nan), e2, same)


# ----------------------------------------------------------------------------------- embeddings


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("tiny", embedding_size=64)


def test_embed_pairs_bytes_tensor_and_flip(tiny_model) -> None:
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
    arrays[1] = arrays[0][:, ::-1]  # image 1 is the mirror of image 0
    tensor = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
    from_bytes = embed_pairs(tiny_model, [encode(a) for a in arrays], batch_size=2)
    from_tensor = embed_pairs(tiny_model, tensor, batch_size=3)
    assert from_bytes.shape == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(from_bytes, axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(from_bytes, from_tensor, atol=1e-6)
    np.testing.assert_allclose(from_bytes[0], from_bytes[1], atol=1e-5)  # flip-sum is mirror-proof
    assert tiny_model.training  # mode restored


def test_verify_pair_set_round_trip(tmp_path, tiny_model) -> None:
    rng = np.random.default_rng(1)
    images = [
        encode(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "JPEG")
        for size in [112, 96] * 20  # other sizes are resized to 112
    ]
    issame = np.arange(20) % 2 == 0
    write_pair_set(tmp_path / "own.bin", images, issame)
    pairs = load_pair_set(tmp_path / "own.bin")
    res = verify_pair_set(tiny_model, pairs, batch_size=16)
    assert res.name == "own" and res.num_pairs == 20
    assert 0.0 <= res.accuracy <= 1.0 and len(res.fold_accuracies) == 10
    assert "accuracy" in res.summary()


def test_non_square_pair_image_is_padded_like_the_sharder() -> None:
    from facemae_dist.eval.verification import _decode_batch

    face = np.full((112, 96, 3), 77, np.uint8)  # a 112x96 (SphereFace-aligned) crop
    (got,) = _decode_batch([encode(face, "PNG")], 0, 112).permute(0, 2, 3, 1).numpy()
    assert (got[:, :8] == 0).all() and (got[:, -8:] == 0).all() and (got[:, 8:104] == 77).all()


def test_undecodable_image_is_named(tiny_model) -> None:
    bad = PairSet(
        [encode(np.zeros((112, 112, 3), np.uint8)), b"not an image"], np.array([True]), "x"
    )
    with pytest.raises(FacemaeError, match="image 1"):
        embed_pairs(tiny_model, bad.images)


# ---------------------------------------------------------------------------- making pair sets


def shard_classes(split_dir) -> dict[bytes, int]:
    """Encoded image -> class, read back from the shards."""
    out = {}
    for url in load_manifest(split_dir)["urls"]:
        for sample in read_shard(url):
            out[sample.get("jpg", sample.get("png"))] = int(sample["cls"])
    return out


def test_make_pairs_balanced_folds(sharded_split, tmp_path) -> None:
    out = tmp_path / "pairs.bin"
    summary = make_pairs(str(sharded_split), str(out), num_pairs=40, seed=3)
    assert summary["num_same"] == summary["num_different"] == 20
    assert summary["samples_scanned"] == 28 and summary["num_identities"] == 7
    assert summary["repeated_pairs"] == 0
    pairs = load_pair_set(out)
    assert len(pairs) == 40 and len(pairs.images) == 80
    for a, b in fold_bounds(40, 10):
        assert pairs.issame[a:b].sum() == 2 and (~pairs.issame[a:b]).sum() == 2
    classes = shard_classes(sharded_split)
    for i, same in enumerate(pairs.issame):
        c1, c2 = classes[pairs.images[2 * i]], classes[pairs.images[2 * i + 1]]
        assert (c1 == c2) == bool(same)
        assert pairs.images[2 * i] != pairs.images[2 * i + 1]
    again = tmp_path / "again.bin"
    make_pairs(str(sharded_split), str(again), num_pairs=40, seed=3)
    assert again.read_bytes() == out.read_bytes()  # the seed fixes the pairs


def test_make_pairs_rejects_bad_requests(sharded_split, tmp_path) -> None:
    with pytest.raises(FacemaeError, match="multiple of 20"):
        make_pairs(str(sharded_split), str(tmp_path / "p.bin"), num_pairs=30, seed=0)
    with pytest.raises(FacemaeError, match="no shard manifest"):
        make_pairs(str(tmp_path / "nowhere"), str(tmp_path / "p.bin"), num_pairs=20, seed=0)


def test_devices_are_checked(tiny_model, monkeypatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(FacemaeError, match="'foo' is not a device"):
        embed_pairs(tiny_model, torch.zeros(2, 3, 112, 112, dtype=torch.uint8), device="foo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(FacemaeError, match="--device cuda:1: no CUDA GPU"):
        resolve_device("cuda:1")
    with pytest.raises(FacemaeError, match="--device meta: use cpu, cuda"):
        resolve_device("meta")


def test_recognizer_export_checks(tiny_model, tmp_path) -> None:
    save_file(tiny_model.state_dict(), tmp_path / "backbone.safetensors")
    (tmp_path / "model.json").write_text(json.dumps({"name": "facemae_vit", "kwargs": {}}))
    with pytest.raises(FacemaeError, match="a FaceMAE export .*`facemae train`"):
        load_recognizer(tmp_path / "backbone.safetensors")
    (tmp_path / "model.json").write_text(json.dumps({"backbone": "tiny", "embedding_size": 32}))
    with pytest.raises(FacemaeError, match="cannot load the recognizer .*`facemae train`"):
        load_recognizer(tmp_path)  # weights of another embedding size
    (tmp_path / "model.json").write_text(json.dumps({"backbone": "tiny", "embedding_size": 64}))
    assert not load_recognizer(tmp_path).training


def test_verify_pair_set_names_the_set_with_an_undecodable_image(tiny_model) -> None:
    good = encode(np.zeros((112, 112, 3), np.uint8))
    bad = PairSet([good, good, good, b"not an image"], np.array([True, False]), "agedb_30")
    with pytest.raises(FacemaeError, match=r"image 3 \(pair 1\) of pair set 'agedb_30'"):
        verify_pair_set(tiny_model, bad)


def _damage_images(split_dir) -> list[bytes]:
    """Spoil two JPEGs in place (the tar stays valid): one keeps its end marker but does not
    decode, one loses its end marker. Returns the spoilt bytes."""
    import tarfile

    url = load_manifest(split_dir)["urls"][0]
    with tarfile.open(url) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith((".jpg", ".png"))][:2]
    with open(url, "r+b") as f:
        f.seek(members[0].offset_data + 200)
        f.write(b"\0" * (members[0].size - 400))
        f.seek(members[1].offset_data + members[1].size - 2)
        f.write(b"\0\0")
    with tarfile.open(url) as tar:
        return [tar.extractfile(m).read() for m in members]


def test_make_pairs_leaves_out_undecodable_images(sharded_split, tmp_path) -> None:
    from facemae_dist.data.images import decode_rgb

    spoilt = _damage_images(sharded_split)
    out = tmp_path / "pairs.bin"
    with pytest.warns(UserWarning) as record:  # 200 pairs of 26 images also repeat: 2 warnings
        summary = make_pairs(str(sharded_split), str(out), num_pairs=200, seed=0)
    assert any("left out 2 undecodable image(s)" in str(w.message) for w in record)
    assert summary["skipped_images"] == 2 and summary["samples_scanned"] == 28
    assert summary["num_images"] <= 26
    pairs = load_pair_set(out)
    for image in pairs.images:
        assert image not in spoilt
        decode_rgb(image)  # `facemae eval` can read every image


def test_make_pairs_warns_when_most_pairs_repeat(sharded_split, tmp_path) -> None:
    import warnings

    # 7 identities x 4 images: 7 x 6 = 42 distinct same pairs, 378 - 42 = 336 different
    with pytest.warns(
        UserWarning,
        match=r"only 42 distinct same and 336 distinct different.*"
        r"--pairs 80",
    ):
        summary = make_pairs(str(sharded_split), str(tmp_path / "p.bin"), num_pairs=400, seed=0)
    assert summary["repeated_pairs"] >= 400 // 2 - 42
    assert summary["distinct_same_pairs"] == 42 and summary["distinct_different_pairs"] == 336
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a set the split can fill: no warning
        summary = make_pairs(str(sharded_split), str(tmp_path / "q.bin"), num_pairs=40, seed=0)
    assert summary["repeated_pairs"] == 0 and summary["skipped_images"] == 0


def test_make_pairs_on_a_shard_root_names_the_splits(sharded_split, tmp_path) -> None:
    with pytest.raises(FacemaeError, match=r"is a shard root: pass one of its splits, e\.g\. "):
        make_pairs(str(sharded_split.parent), str(tmp_path / "p.bin"), num_pairs=20, seed=0)

"""The privacy leakage audit: blockwise retrieval vs a brute-force reference, name matching across
splits, source@1 on a set audited against itself, errors and the command line."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MemorySource, jpeg_bytes, make_source

from facemae_dist.cli import main as cli_main
from facemae_dist.data.shards import ShardOptions, load_manifest, shard_dataset
from facemae_dist.data.stream import read_shard
from facemae_dist.data.tario import HashingTarWriter
from facemae_dist.errors import FacemaeError
from facemae_dist.eval.privacy import audit, embed_split, main, nearest, retrieval
from facemae_dist.models.backbones import build_backbone

# ---------------------------------------------------------------------- a brute-force reference


def reference(q, q_ids, q_src, g, g_ids, g_keys, ks=(1, 5)):
    """The full similarity matrix, sorted: what the blockwise version must reproduce."""
    order = np.argsort(-(q.astype(np.float64) @ g.astype(np.float64).T), axis=1, kind="stable")
    out = {}
    for k in ks:
        out[f"top{k}"] = np.mean(
            [q_ids[i] in {g_ids[j] for j in order[i, :k]} for i in range(len(q))]
        )
    pairs = set(zip(g_keys, g_ids, strict=True))
    hits = [
        g_keys[order[i, 0]] == q_src[i] and g_ids[order[i, 0]] == q_ids[i]
        for i in range(len(q))
        if (q_src[i], q_ids[i]) in pairs
    ]
    out["source_top1"] = float(np.mean(hits)) if hits else None
    return out, order


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic(seed: int = 0, nq: int = 150, ng: int = 230, d: int = 24, ids: int = 12):
    """Identity-clustered unit embeddings; some queries' sources are in the gallery, some not."""
    rng = np.random.default_rng(seed)
    centres = unit(rng, ids, d)
    g_code = rng.integers(0, ids, ng)
    g = centres[g_code] + 1.5 * unit(rng, ng, d)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    src = rng.integers(0, ng, nq)
    q = g[src] + 1.5 * unit(rng, nq, d)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g_ids = [f"id{c}" for c in g_code]
    g_keys = [f"{j:06d}" for j in range(ng)]
    q_ids = [g_ids[s] for s in src]
    q_src = [g_keys[s] if i % 4 else "elsewhere" for i, s in enumerate(src)]
    q_ids[3] = "stranger"  # an identity the gallery does not hold: never a hit
    return q.astype(np.float32), q_ids, q_src, g.astype(np.float32), g_ids, g_keys


@pytest.mark.parametrize(("block", "gallery_block"), [(4096, 65536), (7, 13), (16, 3), (1, 1)])
def test_blockwise_retrieval_matches_brute_force(block, gallery_block):
    q, q_ids, q_src, g, g_ids, g_keys = synthetic()
    want, order = reference(q, q_ids, q_src, g, g_ids, g_keys)
    sims = np.sort(q.astype(np.float64) @ g.astype(np.float64).T, axis=1)[:, ::-1]
    assert np.diff(-sims[:, :6], axis=1).min() > 1e-5  # no near-ties: the order is well defined
    top = nearest(q, g, 5, block=block, gallery_block=gallery_block, device="cpu")
    np.testing.assert_array_equal(top, order[:, :5])
    got = retrieval(q, q_ids, q_src, g, g_ids, g_keys, block=block, gallery_block=gallery_block)
    for key in ("top1", "top5", "source_top1"):
        assert got[key] == pytest.approx(want[key], abs=0), key
    assert 0 < got["top1"] < got["top5"] < 1 and 0 < got["source_top1"] < 1
    assert got["num_queries"] == 150 and got["num_gallery"] == 230
    assert got["source_queries"] == sum(1 for i in range(150) if i % 4 and i != 3)
    counts = {n: g_ids.count(n) for n in set(g_ids)}
    chance = np.mean([counts.get(i, 0) / 230 for i in q_ids])
    assert got["chance_top1"] == pytest.approx(chance)


def test_k_larger_than_gallery_and_float16_gallery():
    q, q_ids, q_src, g, g_ids, g_keys = synthetic(seed=1, nq=20, ng=3, ids=2)
    got = retrieval(q, q_ids, q_src, g.astype(np.float16), g_ids, g_keys, ks=(1, 5, 10))
    assert nearest(q, g, 5).shape == (20, 3)
    assert got["top5"] == got["top10"] == pytest.approx(np.mean([i in g_ids for i in q_ids]))


def test_retrieval_input_errors():
    q, q_ids, q_src, g, g_ids, g_keys = synthetic(nq=10, ng=20)
    with pytest.raises(FacemaeError, match="one identity"):
        retrieval(q, q_ids[:-1], q_src, g, g_ids, g_keys)
    with pytest.raises(FacemaeError, match="dim"):
        retrieval(q[:, :5], q_ids, q_src, g, g_ids, g_keys)
    with pytest.raises(FacemaeError, match="NaN"):
        retrieval(q * np.nan, q_ids, q_src, g, g_ids, g_keys)
    with pytest.raises(FacemaeError, match="positive"):
        nearest(q, g, 5, block=0)
    with pytest.raises(FacemaeError, match="ks must be positive"):
        retrieval(q, q_ids, q_src, g, g_ids, g_keys, ks=())


# ------------------------------------------------------------------------------ shards on disk


def shard(source: MemorySource, out: Path, holdout: int = 0) -> dict[str, Path]:
    opts = ShardOptions(samples_per_shard=5, holdout_identities=holdout, progress=False)
    return {name: out / name for name in shard_dataset(source, out, opts)}


def release_copy(split: Path, out: Path) -> Path:
    """A 'released' split of the same images under new keys with json source_key, and the class
    numbering reversed (label_map reversed with it): only names tie it to the originals."""
    manifest = load_manifest(split)
    n = manifest["num_classes"]
    out.mkdir(parents=True)
    shards = []
    for i, url in enumerate(manifest["urls"]):
        path = out / f"released-{i:06d}.tar"
        with open(path, "wb") as f:
            tar = HashingTarWriter(f)
            for count, sample in enumerate(read_shard(url), 1):  # noqa: B007
                meta = json.loads(sample["json"]) | {"source_key": sample["__key__"]}
                key = f"r{sample['__key__']}"
                tar.add(f"{key}.jpg", sample["jpg"])
                tar.add(f"{key}.cls", str(n - 1 - int(sample["cls"])).encode())
                tar.add(f"{key}.json", json.dumps(meta).encode())
            sha = tar.close()
        shards.append({"file": path.name, "samples": count, "bytes": tar.bytes_written})
        shards[-1]["sha256"] = sha
    released = {k: v for k, v in manifest.items() if k != "urls"}
    released.update(split="released", shards=shards, label_map=manifest["label_map"][::-1])
    (out / "manifest.json").write_text(json.dumps(released))
    return out


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict[str, Path]:
    """train (4 identities) + unseen (2) of 6 x 5 faces, a released copy of unseen, and a split
    of other images of the unseen identities with other cls numbers."""
    root = tmp_path_factory.mktemp("privacy")
    out = shard(make_source(6, 5), root / "shards", holdout=2)
    out["released"] = release_copy(out["unseen"], root / "released")
    names = make_source().identity_names
    other = MemorySource(
        [(i, jpeg_bytes(9000 + 10 * i + j)) for i in range(6) for j in range(3)], names[::-1]
    )
    out["other"] = shard(other, root / "other")["train"]
    return out


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("tiny", 128).eval()


def test_embed_split_reads_names_keys_and_source_keys(splits, tiny):
    emb, ids, keys, src = embed_split(tiny, splits["released"], batch_size=4)
    assert emb.shape == (10, 128) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    unseen = load_manifest(splits["unseen"])["label_map"]
    assert sorted(set(ids)) == sorted(unseen) and all(k.startswith("r") for k in keys)
    assert src == [k[1:] for k in keys]
    emb2, ids2, keys2, _ = embed_split(tiny, splits["released"], batch_size=3, num_workers=2)
    order = [keys2.index(k) for k in keys]  # worker batches interleave; metadata travels with them
    np.testing.assert_allclose(emb2[order], emb, atol=1e-5)
    assert [ids2[i] for i in order] == ids
    _, o_ids, o_keys, o_src = embed_split(tiny, [splits["unseen"], splits["train"]])
    assert len(o_keys) == 30 and o_src == o_keys and set(o_ids) == set(make_source().identity_names)


def test_a_set_audited_against_itself_is_fully_retrieved(splits, tiny):
    report = audit(splits["train"], splits["train"], tiny, batch_size=8)
    assert report["top1"] == report["top5"] == report["source_top1"] == 1.0
    assert report["num_queries"] == report["num_gallery"] == report["source_queries"] == 20
    assert report["skipped_queries"] == 0 and report["missing_identities"] == []


def test_identities_and_sources_matched_by_name_and_source_key(splits, tiny):
    """The released copy has reversed cls numbers and new keys: a match by cls would score 0."""
    report = audit(splits["released"], [splits["unseen"], splits["train"]], tiny, block=3)
    assert report["top1"] == report["source_top1"] == 1.0
    assert report["num_queries"] == 10 and report["num_gallery"] == 30
    assert report["chance_top1"] == pytest.approx(5 / 30)
    # other images of the same names, numbered differently, against the originals as gallery
    other = audit(splits["other"], [splits["train"], splits["unseen"]], tiny)
    assert other["num_queries"] == 18 and other["query_identities"] == 6
    assert other["gallery_identities"] == 6 and 0 <= other["top1"] <= other["top5"] <= 1


def test_missing_identities_warn_or_fail(splits, tiny):
    with pytest.warns(UserWarning, match="6 released faces of 2 identities"):
        report = audit(splits["other"], splits["train"], tiny)
    assert report["skipped_queries"] == 6 and report["num_queries"] == 12
    assert report["missing_identities"] == sorted(load_manifest(splits["unseen"])["label_map"])
    with pytest.raises(FacemaeError, match="2 of 6 released identities.*--strict"):
        audit(splits["other"], splits["train"], tiny, strict=True)
    with pytest.raises(FacemaeError, match="2 of 2 released identities"):
        audit(splits["unseen"], splits["train"], tiny)
    with pytest.raises(FacemaeError, match="released split .*nowhere not found"):
        audit(splits["train"].parent / "nowhere", splits["train"], tiny)
    with pytest.raises(FacemaeError, match="is a shard root: pass one of its splits"):
        audit(splits["train"], splits["train"].parent, tiny)


def export(model: torch.nn.Module, run: Path) -> Path:
    from safetensors.torch import save_file

    run.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), run / "backbone.safetensors")
    meta = {"backbone": "tiny", "embedding_size": 128, "kwargs": {}}
    (run / "model.json").write_text(json.dumps(meta))
    return run / "backbone.safetensors"


def test_command_line_writes_the_report(splits, tiny, tmp_path, capsys):
    weights = export(tiny, tmp_path / "run")
    out = tmp_path / "reports" / "audit.json"
    argv = [str(splits["released"]), str(splits["unseen"]), str(splits["train"])]
    argv += ["--model", str(weights), "--out", str(out), "--workers", "0", "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = main(argv)
    assert report["top1"] == report["source_top1"] == 1.0 and report["model"] == str(weights)
    assert json.loads(out.read_text())["num_gallery"] == 30
    assert "own image ranked first" in capsys.readouterr().out
    assert cli_main(["audit", *argv[:2], "--model", str(tmp_path / "none.safetensors")]) == 2
    assert "no recognizer export" in capsys.readouterr().err


def test_one_name_in_two_gallery_splits_warns_once(splits, tiny):
    """`other` reuses the names of train and unseen: matched by name, counted as one person."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        audit(splits["released"], [splits["unseen"], splits["other"]], tiny)
    shared = [w for w in caught if "more than one gallery split" in str(w.message)]
    assert len(shared) == 1 and "counted as one person" in str(shared[0].message)
    assert str(splits["unseen"]) in str(shared[0].message) and "2 identity names" in str(
        shared[0].message
    )
    assert shared[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # distinct names in unseen and train: no warning
        audit(splits["released"], [splits["unseen"], splits["train"]], tiny)


def test_bad_device_and_facemae_export_are_one_line_errors(splits, tiny, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    with pytest.raises(FacemaeError, match="'foo' is not a device"):
        audit(splits["train"], splits["train"], tiny, device="foo")
    mae = tmp_path / "mae"
    mae.mkdir()
    save_file({"w": torch.zeros(2)}, mae / "facemae.safetensors")
    (mae / "model.json").write_text(json.dumps({"name": "facemae_vit_micro", "kwargs": {}}))
    with pytest.raises(FacemaeError, match="FaceMAE export .*`facemae train`"):
        audit(splits["train"], splits["train"], mae / "facemae.safetensors", device="cpu")
    with pytest.raises(FacemaeError, match="FaceMAE export .*`facemae train`"):  # its folder
        audit(splits["train"], splits["train"], mae, device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FacemaeError, match="no CUDA GPU .*--device cpu"):
        audit(splits["train"], splits["train"], tiny, device="cuda")
    argv = ["audit", str(splits["train"]), str(splits["train"]), "--no-progress"]
    assert cli_main([*argv, "--model", str(mae / "facemae.safetensors")]) == 2
    assert cli_main([*argv, "--model", str(export(tiny, tmp_path / "r")), "--device", "cuda"]) == 2


def test_audit_table_names_and_formats_rates_as_the_demo_report_does() -> None:
    """`facemae audit` prints each rate under the demo report table's column name, in its format,
    so a user can compare the two; the JSON keys stay top1/top5/source_top1/chance_top1."""
    import io

    from rich.console import Console

    from facemae_dist.eval.privacy import _table
    from facemae_dist.report import _COLUMNS, _cells

    def printed(report: dict) -> dict[str, str]:
        console = Console(file=io.StringIO(), width=200)
        console.print(_table(report))
        lines = console.file.getvalue().splitlines()
        cells = [[c.strip() for c in line.strip("│ ").split("│")] for line in lines]
        return {c[0]: c[1] for c in cells if len(c) == 2}

    report = {
        "top1": 0.0461, "top5": 0.2, "top10": 0.5, "source_top1": 0.0123, "chance_top1": 0.004,
        "num_queries": 10, "source_queries": 8, "skipped_queries": 0, "num_gallery": 30,
        "gallery_identities": 6,
    }  # fmt: skip
    rows = printed(report)
    demo = {"method": "x", **{f"leak_{k}": v for k, v in report.items()}}
    shown = dict(zip((header for _, header, _ in _COLUMNS), _cells(demo), strict=True))
    for key in ("leak_top1", "leak_top5", "leak_source_top1"):
        header = next(h for k, h, _ in _COLUMNS if k == key)
        assert rows[header] == shown[header], header  # same name, same number
    assert list(rows)[:5] == [
        "leakage top-1", "leakage top-5", "leakage top-10", "own image ranked first",
        "leakage top-1 by chance",
    ]  # fmt: skip
    assert rows["leakage top-1"] == "0.046" and rows["leakage top-1 by chance"] == "0.004"
    assert printed({**report, "source_top1": None})["own image ranked first"] == "—"

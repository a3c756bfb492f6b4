"""Shared fixtures: small in-memory face sources and sharded splits built inside the tests."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from facemae_dist.data.shards import ShardOptions, shard_dataset
from facemae_dist.data.sources import Source, SourceRecord

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def jpeg_bytes(seed: int, size: int = 112, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


class MemorySource(Source):
    """A list of (identity, bytes) held in memory; for tests of the sharder and loader."""

    def __init__(self, items: list[tuple[int, bytes]], names: list[str] | None = None) -> None:
        self.items = items
        num_ids = max(i for i, _ in items) + 1
        self._names = names or [f"id {i} é" for i in range(num_ids)]
        self._labels = np.array([i for i, _ in items], dtype=np.int64)
        self.description = "memory:test"

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def identity_names(self) -> list[str]:
        return self._names

    def sizes(self) -> np.ndarray:
        return np.array([len(b) for _, b in self.items], dtype=np.int64)

    def read(self, index: int) -> SourceRecord:
        data = self.items[index][1]
        if data == b"UNREADABLE":
            raise OSError("permission denied")
        return SourceRecord(data, f"mem/{index}")


def make_source(num_ids: int = 6, per_id: int = 5) -> MemorySource:
    return MemorySource(
        [(i, jpeg_bytes(i * 100 + j)) for i in range(num_ids) for j in range(per_id)]
    )


@pytest.fixture
def memory_source() -> MemorySource:
    return make_source()


@pytest.fixture
def sharded_split(tmp_path):
    """A 'train' split of 7 shards × 4 samples (28 faces, 7 identities)."""
    source = make_source(num_ids=7, per_id=4)
    opts = ShardOptions(samples_per_shard=4, progress=False)
    shard_dataset(source, tmp_path / "shards", opts)
    return tmp_path / "shards" / "train"

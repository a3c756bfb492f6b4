"""Readers in facemae_dist.data.sources, on small fixtures built here (real JPEGs, RecordIO, .bin)."""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facemae_dist.data.sources import (
    FolderSource,
    ListSource,
    PairSet,
    RecordIOSource,
    Source,
    build_index,
    load_pair_set,
    open_source,
    write_index,
    write_pair_set,
)
from facemae_dist.errors import FacemaeError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)


# ------------------------------------------------------------------------------------------------
# fixtures: images, a RecordIO writer that splits records like dmlc-core, a Python-2 pickle writer
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    """Eight distinct 112x112 JPEGs."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


def decodes(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.size == (112, 112)


def pack(label: float | list[float], image: bytes, rid: int = 0, id2: int = 0) -> bytes:
    """mx.recordio.pack: IRHeader(flag, label, id, id2), label floats when a vector, image."""
    if isinstance(label, list):
        head = struct.pack("<IfQQ", len(label), 0.0, rid, id2)
        return head + struct.pack(f"<{len(label)}f", *label) + image
    return struct.pack("<IfQQ", 0, label, rid, id2) + image


def write_record(f: io.BufferedWriter, data: bytes) -> None:
    """dmlc RecordIOWriter::WriteRecord: split where the magic sits 4-aligned in the data."""
    dptr = 0
    for i in range(0, len(data) & ~3, 4):
        if data[i : i + 4] == MAGIC_BYTES:
            cflag = 1 if dptr == 0 else 2
            f.write(MAGIC_BYTES + struct.pack("<I", cflag << 29 | (i - dptr)) + data[dptr:i])
            dptr = i + 4
    cflag = 3 if dptr else 0
    f.write(MAGIC_BYTES + struct.pack("<I", cflag << 29 | (len(data) - dptr)) + data[dptr:])
    f.write(b"\0" * (-len(data) % 4))


def write_rec(folder: Path, records: list[tuple[int, bytes]], idx: bool = True) -> Path:
    """train.rec (+ train.idx) holding ``(key, data)`` records in the given file order."""
    folder.mkdir(parents=True, exist_ok=True)
    rec = folder / "train.rec"
    entries = []
    with open(rec, "wb") as f:
        for key, data in records:
            entries.append((key, f.tell()))
            write_record(f, data)
    if idx:
        (folder / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in entries))
    return rec


def face2rec2(images: list[bytes], ids: list[int], vector: bool) -> list[tuple[int, bytes]]:
    """Records as insightface's face2rec2 writes them: images, then header 0, then identities."""
    n = len(images)
    records = []
    for key, (image, ident) in enumerate(zip(images, ids, strict=True), 1):
        label = [float(ident), 1.0] if vector else float(ident)
        records.append((key, pack(label, image, rid=key)))
    bounds, start = [], 1
    for k in range(1, n + 1):
        if k == n or ids[k] != ids[k - 1]:
            bounds.append((start, k + 1))
            start = k + 1
    records.append((0, pack([float(n + 1), float(n + 1 + len(bounds))], b"", rid=0)))
    for j, (a, b) in enumerate(bounds):
        records.append((n + 1 + j, pack([float(a), float(b)], b"", rid=n + 1 + j)))
    return records


class Global:
    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name


class Reduce:
    def __init__(self, func: Global, args: tuple, state: object = None) -> None:
        self.func, self.args, self.state = func, args, state


def py2_pickle(obj: object) -> bytes:
    """A protocol-2 pickle as Python 2 writes it: byte strings as (SHORT_)BINSTRING."""
    out = bytearray(b"\x80\x02")

    def emit(o: object) -> None:
        if isinstance(o, bytes):
            size = len(o)
            out.extend((b"U" + bytes([size]) if size < 256 else b"T" + struct.pack("<i", size)) + o)
        elif o is None or isinstance(o, bool):
            out.extend({None: b"N", True: b"\x88", False: b"\x89"}[o])
        elif isinstance(o, int):
            out.extend(b"J" + struct.pack("<i", o))
        elif isinstance(o, (list, tuple)):
            out.extend(b"](" if isinstance(o, list) else b"(")
            for item in o:
                emit(item)
            out.extend(b"e" if isinstance(o, list) else b"t")
        elif isinstance(o, Global):
            out.extend(f"c{o.module}\n{o.name}\n".encode())
        elif isinstance(o, Reduce):
            emit(o.func)
            emit(o.args)
            out.extend(b"R")
            if o.state is not None:
                emit(o.state)
                out.extend(b"b")
        else:
            raise TypeError(o)

    emit(obj)
    return bytes(out + b".")


def py2_bool_array(values: list[bool]) -> Reduce:
    """numpy bool array as numpy pickles it under Python 2 (strings are byte strings)."""
    dtype = Reduce(Global("numpy", "dtype"), (b"b1", 0, 1), (3, b"|", None, None, None, -1, -1, 0))
    return Reduce(
        Global("numpy.core.multiarray", "_reconstruct"),
        (Global("numpy", "ndarray"), (0,), b"b"),
        (1, (len(values),), dtype, False, bytes(values)),
    )


# ------------------------------------------------------------------------------------------------
# image folder
# ------------------------------------------------------------------------------------------------


def test_folder_source_names_order_hidden(tmp_path: Path, jpegs: list[bytes]) -> None:
    root = tmp_path / "faces"
    layout = {
        "Zoë Ünïcode": ["b.jpg", "a.JPEG"],
        "alice smith": ["2.png", "10.jpg", "x.WebP"],
        "bob": ["only.bmp"],
    }
    k = 0
    for ident, files in layout.items():
        (root / ident).mkdir(parents=True)
        for name in files:
            (root / ident / name).write_bytes(jpegs[k % len(jpegs)])
            k += 1
    (root / "alice smith" / ".hidden.jpg").write_bytes(jpegs[0])
    (root / "alice smith" / "notes.txt").write_text("not an image")
    (root / "alice smith" / "nested").mkdir()
    (root / "alice smith" / "nested" / "deep.jpg").write_bytes(jpegs[0])
    (root / ".cache").mkdir()
    (root / ".cache" / "c.jpg").write_bytes(jpegs[0])
    (root / "empty").mkdir()
    (root / "loose.jpg").write_bytes(jpegs[0])

    src = FolderSource(root)
    assert isinstance(src, Source)
    assert src.identity_names == ["Zoë Ünïcode", "alice smith", "bob"]  # sorted, empty one dropped
    assert len(src) == 6
    assert src.labels.dtype == np.int64
    assert src.labels.tolist() == [0, 0, 1, 1, 1, 2]
    positions = [src.read(i).position for i in range(len(src))]
    assert positions == [
        "Zoë Ünïcode/a.JPEG",
        "Zoë Ünïcode/b.jpg",
        "alice smith/10.jpg",
        "alice smith/2.png",
        "alice smith/x.WebP",
        "bob/only.bmp",
    ]
    for i, pos in enumerate(positions):
        assert src.read(i).data == (root / pos).read_bytes()
    assert src.sizes().tolist() == [(root / p).stat().st_size for p in positions]
    clone = pickle.loads(pickle.dumps(src))
    assert clone.read(3) == src.read(3) and clone.labels.tolist() == src.labels.tolist()
    assert FolderSource(root).read(0) == src.read(0)  # deterministic


def test_folder_source_names_the_unreadable_identity_folder(
    tmp_path: Path, jpegs: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    for ident in ("alice", "bob"):
        (tmp_path / ident).mkdir()
        (tmp_path / ident / "0.jpg").write_bytes(jpegs[0])
    real_scandir = os.scandir

    def scandir(path):  # tests may run as root, where chmod 000 does not stop reading
        if os.fspath(path).endswith("bob"):
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    bob = re.escape(str(tmp_path / "bob"))
    with pytest.raises(FacemaeError, match=f"cannot list identity folder {bob}: Permission denied"):
        FolderSource(tmp_path)


# ------------------------------------------------------------------------------------------------
# file list
# ------------------------------------------------------------------------------------------------


def test_list_source_spaces_relative_absolute(tmp_path: Path, jpegs: list[bytes]) -> None:
    (tmp_path / "imgs" / "my folder").mkdir(parents=True)
    (tmp_path / "imgs" / "my folder" / "face one.jpg").write_bytes(jpegs[0])
    (tmp_path / "imgs" / "b.jpg").write_bytes(jpegs[1])
    elsewhere = tmp_path / "abs dir"
    elsewhere.mkdir()
    (elsewhere / "c.png").write_bytes(jpegs[2])
    lists = tmp_path / "lists"
    lists.mkdir()
    lst = lists / "train.txt"
    lst.write_text(
        "# path label\n"
        "\n"
        "../imgs/my folder/face one.jpg   10\n"
        f"{elsewhere / 'c.png'}\t2\n"
        "  ../imgs/b.jpg 007  \n"
    )
    src = ListSource(lst)
    assert len(src) == 3
    assert src.identity_names == ["2", "7", "10"]  # all integers: numeric order
    assert src.labels.tolist() == [2, 0, 1]
    rec = src.read(0)
    assert rec.data == jpegs[0]
    assert rec.position == "line 3: ../imgs/my folder/face one.jpg"
    assert src.read(1).data == jpegs[2] and src.read(2).data == jpegs[1]
    assert src.read(2).position == "line 5: ../imgs/b.jpg"
    assert src.sizes().tolist() == [len(jpegs[0]), len(jpegs[2]), len(jpegs[1])]


def test_list_source_string_labels_and_errors(tmp_path: Path, jpegs: list[bytes]) -> None:
    (tmp_path / "a.jpg").write_bytes(jpegs[0])
    lst = tmp_path / "names.lst"
    lst.write_text("a.jpg carol\na.jpg alice\na.jpg carol\nmissing.jpg bob\n")
    src = ListSource(lst)
    assert src.identity_names == ["carol", "alice", "bob"]  # first appearance
    assert src.labels.tolist() == [0, 1, 0, 2]
    with pytest.raises(OSError):
        src.read(3)

    bad = tmp_path / "bad.txt"
    bad.write_text("a.jpg 1\n\n# fine\nno_label_here\n")
    with pytest.raises(FacemaeError, match=r"bad\.txt, line 4: expected '<image path> <label>'"):
        ListSource(bad)
    im2rec = tmp_path / "train.lst"
    im2rec.write_text("0\t3\tid3/a.jpg\n")
    with pytest.raises(FacemaeError, match="line 1: the label 'id3/a.jpg' is an image name"):
        ListSource(im2rec)


def test_list_source_face2rec2_lst(tmp_path: Path, jpegs: list[bytes]) -> None:
    (tmp_path / "imgs").mkdir()
    for i in range(4):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(jpegs[i])
    (tmp_path / "imgs" / "a b.jpg").write_bytes(jpegs[4])
    lst = tmp_path / "train.lst"
    lst.write_text(  # InsightFace face2rec2: aligned, path, label[, more fields]
        "1\timgs/0.jpg\t0\n"
        "1\timgs/1.jpg\t0\n"
        "0\timgs/2.jpg\t5.0\t10\t20\t30\t40\n"
        f"1\t{tmp_path / 'imgs' / '3.jpg'}\t5\n"
        "imgs/a b.jpg 2\n"  # '<path> <label>' lines still work in the same file
    )
    src = open_source(lst)
    assert isinstance(src, ListSource) and len(src) == 5
    assert src.identity_names == ["0", "2", "5"] and src.labels.tolist() == [0, 0, 2, 2, 1]
    assert [src.read(i).data for i in range(5)] == jpegs[:5]
    assert src.read(2).position == "line 3: imgs/2.jpg"
    im2rec = tmp_path / "multi.lst"
    im2rec.write_text("0\t3\t4\timgs/0.jpg\n")  # im2rec, two labels: still named as im2rec
    with pytest.raises(FacemaeError, match="line 1: the label 'imgs/0.jpg' is an image name"):
        ListSource(im2rec)


# ------------------------------------------------------------------------------------------------
# RecordIO
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", [False, True], ids=["scalar-labels", "vector-labels"])
def test_recordio_face2rec2(tmp_path: Path, jpegs: list[bytes], vector: bool) -> None:
    ids = [5, 5, 9, 9, 9, 40]
    images = jpegs[: len(ids)]
    write_rec(tmp_path / "ds", face2rec2(images, ids, vector))
    (tmp_path / "ds" / "property").write_text("3,112,112")
    src = RecordIOSource(tmp_path / "ds")
    assert len(src) == 6 and src.num_skipped == 4  # header + 3 identity records
    assert src.identity_names == ["5", "9", "40"]
    assert src.labels.tolist() == [0, 0, 1, 1, 1, 2]
    assert src.property_values == (3, 112, 112)
    for i, image in enumerate(images):
        rec = src.read(i)
        assert rec.data == image and rec.position == f"rec:{i + 1}"
    assert decodes(src.read(0).data)
    assert src.sizes().tolist() == [len(image) for image in images]
    assert RecordIOSource(tmp_path / "ds" / "train.rec").labels.tolist() == src.labels.tolist()


def test_recordio_im2rec_without_header(tmp_path: Path, jpegs: list[bytes]) -> None:
    # key 0 is an image with a vector label [id, aligned]: not a face2rec2 header (it has bytes)
    records = [(0, pack([3.0, 1.0], jpegs[0], rid=0))]
    records += [(k, pack(float(k % 2), jpegs[k], rid=k)) for k in (2, 1, 3)]  # out of key order
    write_rec(tmp_path, records)
    src = RecordIOSource(tmp_path / "train.rec")
    assert len(src) == 4 and src.num_skipped == 0
    assert src.identity_names == ["0", "1", "3"]
    assert [src.read(i).position for i in range(4)] == ["rec:0", "rec:1", "rec:2", "rec:3"]
    assert src.labels.tolist() == [2, 1, 0, 1]
    assert [src.read(i).data for i in range(4)] == jpegs[:4]


def magic_laden(image: bytes) -> bytes:
    """``image`` followed by the RecordIO magic at 4-aligned places (trailing bytes after EOI)."""
    pad = b"\x00" * (-len(image) % 4)
    return image + pad + MAGIC_BYTES + b"abcd" + MAGIC_BYTES + MAGIC_BYTES + b"xyzw" + MAGIC_BYTES


def test_recordio_split_records_byte_exact(tmp_path: Path, jpegs: list[bytes]) -> None:
    laden = magic_laden(jpegs[1])
    records = [
        (0, pack(1.0, jpegs[0], rid=0)),
        (1, pack([7.0, 1.0], laden, rid=1)),  # split inside the image, also at its very end
        (2, pack(2.0, jpegs[2], rid=2, id2=MAGIC)),  # split inside the IRHeader itself
        (3, pack(3.0, MAGIC_BYTES + jpegs[3], rid=3)),  # magic right after header
    ]
    write_rec(tmp_path, records)
    raw = (tmp_path / "train.rec").read_bytes()
    assert raw.count(MAGIC_BYTES) > len(records) + 4  # the writer really split
    src = RecordIOSource(tmp_path)
    assert src.identity_names == ["1", "2", "3", "7"]
    assert src.labels.tolist() == [0, 3, 1, 2]
    assert src.read(1).data == laden
    assert src.read(2).data == jpegs[2]
    assert src.read(3).data == MAGIC_BYTES + jpegs[3]
    assert decodes(src.read(1).data)
    assert src.sizes().tolist() == [len(jpegs[0]), len(laden), len(jpegs[2]), len(jpegs[3]) + 4]


def test_recordio_missing_idx_builds_index(tmp_path: Path, jpegs: list[bytes]) -> None:
    records = face2rec2(jpegs[:3], [1, 1, 2], vector=True)
    records[1] = (2, pack([1.0, 1.0], magic_laden(jpegs[1]), rid=2))
    rec = write_rec(tmp_path, records, idx=False)
    with pytest.warns(UserWarning, match="no index"):
        src = RecordIOSource(rec)
    assert [src.read(i).position for i in range(3)] == ["rec:1", "rec:2", "rec:3"]
    assert src.read(1).data == magic_laden(jpegs[1])
    entries = build_index(rec)
    assert [k for k, _ in entries] == [1, 2, 3, 0, 4, 5]  # keys from the IRHeader ids
    write_index(tmp_path / "train.idx", entries)
    again = RecordIOSource(rec)
    assert again.labels.tolist() == src.labels.tolist() == [0, 0, 1]


def test_recordio_truncated_and_corrupt(tmp_path: Path, jpegs: list[bytes]) -> None:
    rec = write_rec(tmp_path / "t", [(k, pack(float(k), jpegs[k], rid=k)) for k in range(3)])
    data = rec.read_bytes()
    rec.write_bytes(data[: len(data) - 100])
    with pytest.raises(FacemaeError, match="truncated.*fetch the file again"):
        RecordIOSource(rec)
    rec.write_bytes(data[: len(data) // 2])  # the last offsets point past the end
    with pytest.raises(FacemaeError, match="past the end"):
        RecordIOSource(rec)

    rec2 = write_rec(tmp_path / "c", [(k, pack(float(k), jpegs[k], rid=k)) for k in range(3)])
    idx = tmp_path / "c" / "train.idx"
    idx.write_text(idx.read_text().replace("\t0\n", "\t12\n"))  # key 0 points inside a record
    with pytest.raises(FacemaeError, match="bad magic.*rebuild the index"):
        RecordIOSource(rec2)
    idx.write_text("0\t0\n1\tzero\n")
    with pytest.raises(FacemaeError, match=r"train\.idx, line 2"):
        RecordIOSource(rec2)
    with pytest.warns(UserWarning), pytest.raises(FacemaeError, match="bad magic"):
        idx.unlink()
        rec2.write_bytes(b"\0" * 64)
        RecordIOSource(rec2)


def test_recordio_damage_after_listing_is_an_oserror(tmp_path: Path, jpegs: list[bytes]) -> None:
    rec = write_rec(tmp_path, [(k, pack(float(k), jpegs[k], rid=k)) for k in range(3)])
    idx = tmp_path / "train.idx"
    idx.write_text(idx.read_text().replace("\t", "  ") + "\n\n")  # spaces, blank lines: still read
    src = RecordIOSource(rec)
    offset = int(idx.read_text().split()[3])
    with open(rec, "r+b") as f:  # damage record 1 after listing
        f.seek(offset)
        f.write(b"JUNK")
    with pytest.raises(OSError, match="bad magic") as caught:
        src.read(1)
    assert isinstance(caught.value, FacemaeError)
    assert src.read(2).data == jpegs[2]


def test_recordio_pickles_without_handle(tmp_path: Path, jpegs: list[bytes]) -> None:
    write_rec(tmp_path, [(k, pack(float(k), jpegs[k], rid=k)) for k in range(4)])
    src = RecordIOSource(tmp_path)
    assert src.read(2).data == jpegs[2]  # opens the handle
    state = src.__getstate__()
    assert state["_fd"] is None
    clone = pickle.loads(pickle.dumps(src))
    assert clone.read(3).data == jpegs[3] and clone.labels.tolist() == [0, 1, 2, 3]
    clone.close()
    src.close()
    assert src.read(0).data == jpegs[0]  # reopens


# ------------------------------------------------------------------------------------------------
# pair sets
# ------------------------------------------------------------------------------------------------


def test_pair_set_python2_pickle(tmp_path: Path, jpegs: list[bytes]) -> None:
    issame = [True, False, True]
    for name, same in [("lfw", issame), ("agedb_30", py2_bool_array(issame))]:
        blob = py2_pickle((jpegs[:6], same))
        pickle.loads(blob, encoding="bytes")  # the fixture is a valid pickle
        (tmp_path / f"{name}.bin").write_bytes(blob)
        pairs = load_pair_set(tmp_path / f"{name}.bin")
        assert isinstance(pairs, PairSet) and pairs.name == name and len(pairs) == 3
        assert pairs.images == jpegs[:6]
        assert pairs.issame.dtype == bool and pairs.issame.tolist() == issame


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pair_set_python3_pickles(tmp_path: Path, jpegs: list[bytes], protocol: int) -> None:
    arrays = [np.frombuffer(j, dtype=np.uint8) for j in jpegs[:4]]
    cases = {
        "bytes": (jpegs[:4], [np.bool_(False), True]),
        "arrays": (arrays, np.array([False, True])),
        "ints": ([bytearray(j) for j in jpegs[:4]], np.array([0, 1], dtype=np.int64)),
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(pickle.dumps(content, protocol=protocol))
        pairs = load_pair_set(path)
        assert pairs.images == jpegs[:4] and pairs.issame.tolist() == [False, True]


def test_write_pair_set_round_trip(tmp_path: Path, jpegs: list[bytes]) -> None:
    path = tmp_path / "own_pairs.bin"
    write_pair_set(path, jpegs[:8], [True, False, False, True])
    with open(path, "rb") as f:
        bins, issame = pickle.load(f)  # the layout insightface's loaders read
    assert all(isinstance(b, np.ndarray) and b.dtype == np.uint8 and b.ndim == 1 for b in bins)
    assert isinstance(issame, np.ndarray)
    pairs = load_pair_set(path)
    assert pairs.images == jpegs[:8] and pairs.issame.tolist() == [True, False, False, True]
    assert decodes(pairs.images[7])
    with pytest.raises(FacemaeError, match="7 images for 4 pairs"):
        write_pair_set(path, jpegs[:7], [True, False, False, True])


def test_write_pair_set_creates_the_folder(tmp_path: Path, jpegs: list[bytes]) -> None:
    path = tmp_path / "new" / "eval" / "pairs.bin"  # `facemae make-pairs` into a new folder
    write_pair_set(path, jpegs[:2], [True])
    assert load_pair_set(path).images == jpegs[:2]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FacemaeError, match=r"cannot write pair set .*file.*choose a writable path"):
        write_pair_set(tmp_path / "file" / "pairs.bin", jpegs[:2], [True])


def test_pair_set_structure_errors(tmp_path: Path, jpegs: list[bytes]) -> None:
    cases = {
        "three": ((jpegs[:2], [True], "extra"), r"expected a pickle of \(images, issame\)"),
        "odd": ((jpegs[:3], [True]), "3 images for 1 pairs"),
        "notbool": ((jpegs[:2], [2]), "not a flat list of booleans"),
        "notimage": (([jpegs[0], 5], [True]), "image 1 is int"),
        "dict": (({"a": 1}, [True]), "images are a dict"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(pickle.dumps(content, protocol=2))
        with pytest.raises(FacemaeError, match=message):
            load_pair_set(path)
    (tmp_path / "junk.bin").write_bytes(b"\x80\x02garbage")
    with pytest.raises(FacemaeError, match="not a readable pair set.*facemae make-pairs SPLIT"):
        load_pair_set(tmp_path / "junk.bin")  # e.g. a shard tar passed as --pairs
    with pytest.raises(FacemaeError, match="cannot read pair set"):
        load_pair_set(tmp_path / "absent.bin")


class _Exploit:
    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def _exploits(target: Path) -> dict[str, object]:
    return {
        "os.system": _Exploit(os.system, f"touch '{target}'"),
        "open": _Exploit(open, str(target), "w"),
        "subprocess": _Exploit(subprocess.call, ["touch", str(target)]),
        "eval": _Exploit(eval, f"open({str(target)!r}, 'w')"),
        "exec": _Exploit(exec, f"open({str(target)!r}, 'w').close()"),
    }


@pytest.mark.parametrize("attack", ["os.system", "open", "subprocess", "eval", "exec"])
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_malicious_pair_set_is_refused(tmp_path: Path, attack: str, protocol: int) -> None:
    target = tmp_path / "pwned"
    payload = _exploits(target)[attack]
    blob = pickle.dumps(([b"\xff\xd8", payload], [True]), protocol=protocol)
    evil = tmp_path / "lfw.bin"
    evil.write_bytes(blob)
    with pytest.raises(FacemaeError, match=r"refusing to load .*lfw\.bin: it asks for"):
        load_pair_set(evil)
    assert not target.exists()
    if attack == "open":  # the fixture is a real exploit: a plain unpickler runs it
        pickle.loads(blob)
        assert target.exists()


def test_malicious_pickles_through_admitted_names(tmp_path: Path) -> None:
    nd = Global("numpy", "ndarray")
    cases = {
        # numpy helpers beyond the few array-rebuilding ones are not admitted
        "numpy.testing": py2_pickle(Reduce(Global("numpy.testing", "runstring"), (b"1", None))),
        "dotted": pickle.dumps(types.SimpleNamespace(), protocol=4),
        # _reconstruct asked to build something other than an ndarray
        "subtype": py2_pickle(
            Reduce(Global("numpy.core.multiarray", "_reconstruct"), (Global("numpy", "dtype"),))
        ),
        # bytes(2**31 - 1) would allocate 2 GB
        "alloc": py2_pickle(Reduce(Global("__builtin__", "bytes"), (2**31 - 1,))),
        # an object-dtype array or any dtype a pair set never has
        "dtype": py2_pickle(
            (
                [
                    Reduce(
                        Global("numpy.core.multiarray", "_reconstruct"),
                        (nd, (0,), b"b"),
                        (1, (1,), Reduce(Global("numpy", "dtype"), (b"V8", 0, 1)), False, b"x"),
                    )
                ]
                * 2,
                [True],
            )
        ),
        "codec": py2_pickle(Reduce(Global("_codecs", "encode"), (b"x", b"zlib"))),
    }
    for name, blob in cases.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(blob)
        with pytest.raises(FacemaeError, match="refusing to load|no pair set uses"):
            load_pair_set(path)


# ------------------------------------------------------------------------------------------------
# open_source
# ------------------------------------------------------------------------------------------------


def test_open_source_auto_detection(tmp_path: Path, jpegs: list[bytes]) -> None:
    (tmp_path / "folder" / "id1").mkdir(parents=True)
    (tmp_path / "folder" / "id1" / "a.jpg").write_bytes(jpegs[0])
    (tmp_path / "list.txt").write_text("folder/id1/a.jpg 3\n")
    rec = write_rec(tmp_path / "rec", face2rec2(jpegs[:2], [1, 2], vector=False))
    assert isinstance(open_source(str(tmp_path / "folder")), FolderSource)
    assert isinstance(open_source(str(tmp_path / "list.txt")), ListSource)
    assert isinstance(open_source(str(tmp_path / "rec")), RecordIOSource)
    assert isinstance(open_source(str(rec)), RecordIOSource)
    assert isinstance(open_source(str(rec.with_suffix(".idx")), "recordio"), RecordIOSource)
    assert isinstance(open_source(str(rec.with_suffix(".idx"))), RecordIOSource)
    assert isinstance(open_source(str(tmp_path / "list.txt"), "list"), ListSource)
    assert open_source(str(tmp_path / "folder")).description.startswith("folder:")


def test_open_source_synthetic_is_lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    class FakeSynthetic:
        @classmethod
        def from_spec(cls, spec: str) -> str:
            seen.append(spec)
            return "synthetic source"

    module = types.ModuleType("facemae_dist.data.synthetic")
    module.SyntheticSource = FakeSynthetic
    monkeypatch.setitem(sys.modules, "facemae_dist.data.synthetic", module)
    assert open_source("ids=10,per_id=5", "synthetic") == "synthetic source"
    assert seen == ["ids=10,per_id=5"]


def test_open_source_auto_reads_a_synthetic_spec(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    source = open_source("3x2:5")
    assert len(source) == 6 and type(source).__name__ == "SyntheticSource"
    (tmp_path / "3x2").mkdir()  # a real folder of that name wins over the spec
    with pytest.raises(FacemaeError, match="no images found in 3x2"):
        open_source("3x2")


def test_synth_command_takes_the_seed_in_the_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from facemae_dist.cli import main

    def faces(folder: str) -> list[bytes]:
        return [p.read_bytes() for p in sorted((tmp_path / folder).rglob("*.jpg"))]

    assert main(["synth", "2x1:7", str(tmp_path / "spec")]) == 0
    assert main(["synth", "2x1", str(tmp_path / "flag"), "--seed", "7"]) == 0
    assert main(["synth", "2x1:7", str(tmp_path / "both"), "--seed", "7"]) == 0
    assert main(["synth", "2x1", str(tmp_path / "default")]) == 0
    assert len(faces("spec")) == 2 and faces("spec") == faces("flag") == faces("both")
    assert faces("default") != faces("spec")  # no seed anywhere: seed 0
    capsys.readouterr()
    assert main(["synth", "2x1:7", str(tmp_path / "clash"), "--seed", "3"]) == 2
    assert "'2x1:7' sets seed 7 but --seed is 3" in capsys.readouterr().err
    assert main(["synth", "2x1:x", str(tmp_path / "bad")]) == 2
    assert "bad synthetic data spec '2x1:x'" in capsys.readouterr().err  # what the user typed


def test_open_source_errors(tmp_path: Path) -> None:
    with pytest.raises(FacemaeError, match="does not exist"):
        open_source(str(tmp_path / "nope"))
    with pytest.raises(FacemaeError, match="unknown source format 'tfrecord'.*choose one of"):
        open_source(str(tmp_path), "tfrecord")
    (tmp_path / "empty" / "id").mkdir(parents=True)
    (tmp_path / "empty" / "id" / "readme.txt").write_text("x")
    with pytest.raises(FacemaeError, match="no images found in .*empty.*identity"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(FacemaeError, match="no images found"):
        open_source(str(tmp_path / "empty.txt"))
    (tmp_path / "lfw.bin").write_bytes(b"\x80\x02")
    with pytest.raises(FacemaeError, match="pair set"):
        open_source(str(tmp_path / "lfw.bin"))
    (tmp_path / "blob.dat").write_bytes(b"\x00\x01\x02")
    with pytest.raises(FacemaeError, match="binary file"):
        open_source(str(tmp_path / "blob.dat"))
    with pytest.raises(FacemaeError, match="not a folder"):
        open_source(str(tmp_path / "empty.txt"), "folder")
    (tmp_path / "idxonly").mkdir()
    (tmp_path / "idxonly" / "train.idx").write_text("0\t0\n")
    with pytest.raises(FacemaeError, match=r"train\.rec is missing"):
        open_source(str(tmp_path / "idxonly" / "train.idx"))
    with pytest.raises(FacemaeError, match="no .rec file"):
        open_source(str(tmp_path / "idxonly"))
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a.rec").write_bytes(b"")
    (tmp_path / "two" / "b.rec").write_bytes(b"")
    with pytest.raises(FacemaeError, match="found a.rec, b.rec; pass the .rec file itself"):
        open_source(str(tmp_path / "two"))

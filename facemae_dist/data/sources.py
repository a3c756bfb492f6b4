"""Readers for the face formats users have: image folder, file list, InsightFace RecordIO, pair .bin.

Every reader is a random-access :class:`Source`: listing is cheap and compact (numpy arrays), bytes are
read on demand, so the sharder can plan, shuffle and split work over processes without holding images
in memory. Sources are pickled into worker processes: open file handles lazily, per process.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import re
import struct
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from facemae_dist.errors import FacemaeError


@dataclass(frozen=True)
class SourceRecord:
    """One face as the source stores it: encoded bytes plus where it came from."""

    data: bytes
    position: str  # human-readable origin, e.g. "alice/001.jpg", "rec:1234", "line 17"


class Source(ABC):
    """Random-access faces with identity labels."""

    #: short description used in manifests, e.g. "folder:/data/casia"
    description: str = ""

    @abstractmethod
    def __len__(self) -> int: ...

    @property
    @abstractmethod
    def labels(self) -> np.ndarray:
        """int64 array, one per item: index into :attr:`identity_names`."""

    @property
    @abstractmethod
    def identity_names(self) -> list[str]:
        """Original identity label of each label id, as a string."""

    def sizes(self) -> np.ndarray | None:
        """Encoded bytes per item when cheap to know (file sizes, RecordIO offsets), else None."""
        return None

    @abstractmethod
    def read(self, index: int) -> SourceRecord:
        """Bytes of item ``index``. Raises OSError when the item cannot be read."""


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "bmp", "webp"})


class _StringTable:
    """Many strings in one bytes blob plus an end-offset array: compact and cheap to pickle."""

    __slots__ = ("_blob", "_ends")

    def __init__(self, strings: Iterable[str]) -> None:
        encoded = [os.fsencode(s) for s in strings]
        self._blob = b"".join(encoded)
        self._ends = np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> str:
        start = int(self._ends[index - 1]) if index > 0 else 0
        return os.fsdecode(self._blob[start : int(self._ends[index])])


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _file_sizes(paths: Iterable[str]) -> np.ndarray:
    """Sizes of files in bytes (0 where a file cannot be stat'ed)."""
    sizes = []
    for path in paths:
        try:
            sizes.append(os.stat(path).st_size)
        except OSError:
            sizes.append(0)
    return _readonly(np.asarray(sizes, dtype=np.int64))


# --------------------------------------------------------------------------------------------------
# image folder
# --------------------------------------------------------------------------------------------------


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS


def _scan_identity_folder(folder: str) -> list[str]:
    """Sorted image file names directly inside ``folder`` (hidden files and subfolders ignored)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if _is_image_name(e.name) and e.is_file())


class FolderSource(Source):
    """Faces stored as ``root/<identity>/<image>``.

    Identity folders and files are sorted (code point order); names starting with '.' are
    ignored, as are files directly under ``root``, nested folders and non-image files
    (extensions: jpg, jpeg, png, bmp, webp, any case). Identities without images get no label.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)
        self.description = f"folder:{self.root}"
        try:
            with os.scandir(self.root) as entries:
                folders = sorted(
                    e.name for e in entries if not e.name.startswith(".") and e.is_dir()
                )
        except OSError as exc:
            raise FacemaeError(
                f"cannot list image folder {self.root}: {exc.strerror or exc}; "
                "check that it exists and is readable"
            ) from exc
        names, counts, files = [], [], []
        for folder in folders:
            path = os.path.join(self.root, folder)
            try:
                found = _scan_identity_folder(path)
            except OSError as exc:
                raise FacemaeError(
                    f"cannot list identity folder {path}: {exc.strerror or exc}; "
                    f"make it readable, or move it out of {self.root}"
                ) from exc
            if found:
                names.append(folder)
                counts.append(len(found))
                files.extend(found)
        self._names = names
        self._files = _StringTable(files)
        self._labels = _readonly(np.repeat(np.arange(len(names), dtype=np.int64), counts))
        self._sizes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._files)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def identity_names(self) -> list[str]:
        return self._names

    def relative_path(self, index: int) -> str:
        """Posix path of item ``index`` relative to the root."""
        return f"{self._names[int(self._labels[index])]}/{self._files[index]}"

    def sizes(self) -> np.ndarray:
        """File sizes, stat'ed on first call and cached."""
        if self._sizes is None:
            self._sizes = _file_sizes(
                os.path.join(self.root, self.relative_path(i)) for i in range(len(self))
            )
        return self._sizes

    def read(self, index: int) -> SourceRecord:
        rel = self.relative_path(index)
        with open(os.path.join(self.root, rel), "rb") as f:
            return SourceRecord(f.read(), rel)


# --------------------------------------------------------------------------------------------------
# file list
# --------------------------------------------------------------------------------------------------


_NUMBER = re.compile(r"[+-]?\d+(?:\.\d*)?")


def _face2rec_fields(line: str) -> tuple[str, str] | None:
    """(path, label) of an InsightFace face2rec2 line ``aligned<TAB>path<TAB>label[<TAB>...]``,
    else None. An im2rec .lst line (``index<TAB>label(s)<TAB>path``) ends with the image name,
    so it is left to the im2rec check in :func:`_parse_list_file`."""
    fields = line.split("\t")
    if (
        len(fields) < 3
        or not fields[0].strip().isdigit()
        or not _NUMBER.fullmatch(fields[2].strip())
        or _is_image_name(fields[-1].strip())
    ):
        return None
    return fields[1], str(int(float(fields[2])))  # face2rec2 may write labels as floats ("3.0")


def _parse_list_file(list_file: str) -> tuple[list[str], list[str], list[int]]:
    """(paths, label tokens, line numbers) of a ``path label`` or face2rec2 list; raises on a
    malformed line."""
    paths, tokens, lines = [], [], []
    try:
        with open(list_file, encoding="utf-8-sig", errors="surrogateescape") as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                parts = _face2rec_fields(line) or line.rsplit(None, 1)
                if len(parts) != 2:
                    raise FacemaeError(
                        f"{list_file}, line {lineno}: expected '<image path> <label>', "
                        f"found {line!r}; add the label after the path, or delete the line"
                    )
                if _is_image_name(parts[1]):
                    raise FacemaeError(
                        f"{list_file}, line {lineno}: the label {parts[1]!r} is an image name; "
                        "this looks like an im2rec .lst (index, label, path): write the list "
                        "as '<image path> <label>' lines"
                    )
                paths.append(parts[0])
                tokens.append(parts[1])
                lines.append(lineno)
    except OSError as exc:
        raise FacemaeError(
            f"cannot read list file {list_file}: {exc.strerror or exc}; check the path"
        ) from exc
    return paths, tokens, lines


def _label_ids(tokens: list[str]) -> tuple[np.ndarray, list[str]]:
    """Label ids and identity names: numeric order when every token is an int, else first seen."""
    try:
        values = np.asarray([int(t) for t in tokens], dtype=np.int64)
    except ValueError:
        first_seen: dict[str, int] = {}
        ids = np.fromiter(
            (first_seen.setdefault(t, len(first_seen)) for t in tokens), np.int64, len(tokens)
        )
        return ids, list(first_seen)
    unique, inverse = np.unique(values, return_inverse=True)
    return inverse.astype(np.int64).reshape(-1), [str(v) for v in unique.tolist()]


class ListSource(Source):
    """Faces named in a text list: one ``<path> <label>`` per line, or InsightFace face2rec2
    ``aligned<TAB>path<TAB>label[<TAB>...]`` lines (first field an integer; float labels are
    truncated to integers).

    The label is the last whitespace-separated token, so paths may contain spaces. Relative paths
    are resolved against the list file's folder; absolute paths are used as they are. Blank lines
    and lines starting with '#' are skipped (a '#' later in a line is part of the path).
    Identity names: when every label is an integer, the distinct values in numeric order (names
    are ``str(int(label))``, so "007" and "7" are one identity); otherwise the label strings in
    order of first appearance.
    """

    def __init__(self, list_file: str | os.PathLike[str]) -> None:
        self.list_file = os.fspath(list_file)
        self.base_dir = os.path.dirname(os.path.abspath(self.list_file))
        self.description = f"list:{self.list_file}"
        paths, tokens, lines = _parse_list_file(self.list_file)
        labels, self._names = _label_ids(tokens)
        self._labels = _readonly(labels)
        self._paths = _StringTable(paths)
        self._lines = np.asarray(lines, dtype=np.int64)
        self._sizes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def identity_names(self) -> list[str]:
        return self._names

    def path(self, index: int) -> str:
        """Filesystem path of item ``index``."""
        return os.path.join(self.base_dir, self._paths[index])

    def sizes(self) -> np.ndarray:
        """File sizes (0 for a missing file), stat'ed on first call and cached."""
        if self._sizes is None:
            self._sizes = _file_sizes(self.path(i) for i in range(len(self)))
        return self._sizes

    def read(self, index: int) -> SourceRecord:
        with open(self.path(index), "rb") as f:
            data = f.read()
        return SourceRecord(data, f"line {int(self._lines[index])}: {self._paths[index]}")


# --------------------------------------------------------------------------------------------------
# InsightFace / MXNet RecordIO
# --------------------------------------------------------------------------------------------------

RECORDIO_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", RECORDIO_MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2
_HEADER_WORDS = 9  # record header (2 words) + IRHeader (6) + first label float (1)
_CHUNK = 1 << 16
_REINDEX_HINT = (
    'rebuild the index: python -c "from facemae_dist.data.sources import build_index, '
    "write_index; write_index('{idx}', build_index('{rec}'))\""
)


class RecordIOError(FacemaeError, OSError):
    """A damaged RecordIO file. Also an OSError, so per-item readers can reject the item."""


def _aligned(n: int) -> int:
    return (n + 3) & ~3


def _truncated(rec: str, offset: int, need: int, size: int) -> RecordIOError:
    return RecordIOError(
        f"{rec} is truncated: the record at offset {offset} needs {need} bytes but the file "
        f"ends at {size}; the copy or download is incomplete, fetch the file again"
    )


def _read_record(fd: int, offset: int, size: int, rec: str, hint: int = 0) -> tuple[bytes, int]:
    """Data of the record starting at ``offset`` (split parts joined) and the offset after it.

    ``hint``: expected data length, so an unsplit record is read with one system call.
    """
    parts: list[bytes] = []
    pos = offset
    while True:
        head = os.pread(fd, 8 + (hint if not parts else 0), pos)
        if len(head) < 8:
            raise _truncated(rec, pos, 8, size)
        magic, lrec = struct.unpack_from("<II", head)
        if magic != RECORDIO_MAGIC:
            raise RecordIOError(
                f"{rec}: no RecordIO record at offset {pos} (bad magic 0x{magic:08X}); the file "
                "is corrupt or the index does not belong to it: "
                + _REINDEX_HINT.format(idx=_idx_path_for(rec), rec=rec)
            )
        cflag, length = lrec >> 29, lrec & _LENGTH_MASK
        if (cflag in (2, 3)) != bool(parts):
            raise RecordIOError(
                f"{rec}: record part at offset {pos} has continuation flag {cflag} out of "
                "sequence; the file is corrupt: fetch it again"
            )
        if pos + 8 + length > size:
            raise _truncated(rec, pos, 8 + length, size)
        body = head[8 : 8 + length]
        if len(body) < length:
            body += os.pread(fd, length - len(body), pos + 8 + len(body))
        parts.append(body)
        pos += 8 + _aligned(length)
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(parts), pos


def _split_ir_header(data: bytes, where: str) -> tuple[int, float, int, int]:
    """(flag, first label, id, header size incl. label floats) of a record's data."""
    if len(data) < _IR_HEADER.size:
        raise RecordIOError(f"{where}: record holds {len(data)} bytes, less than an IRHeader")
    flag, label, rid, _ = _IR_HEADER.unpack_from(data)
    skip = _IR_HEADER.size + 4 * flag
    if len(data) < skip:
        raise RecordIOError(f"{where}: record announces {flag} labels but holds {len(data)} bytes")
    if flag > 0:
        label = struct.unpack_from("<f", data, _IR_HEADER.size)[0]
    return flag, label, rid, skip


def _idx_path_for(rec: str) -> str:
    return os.path.splitext(rec)[0] + ".idx"


def build_index(rec_path: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """Scan a .rec file from start to end and return its index as ``(key, offset)`` pairs.

    Keys are the IRHeader ``id`` fields (im2rec and face2rec2 write the index key there) when
    they are unique, else the record's position in the file.
    """
    rec = os.fspath(rec_path)
    fd = os.open(rec, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        offsets, ids = [], []
        pos = 0
        while pos < size:
            head = os.pread(fd, 8 + _IR_HEADER.size, pos)
            magic, lrec = struct.unpack_from("<II", head) if len(head) >= 8 else (0, 0)
            length = lrec & _LENGTH_MASK
            if magic == RECORDIO_MAGIC and lrec >> 29 == 0 and pos + 8 + length <= size:
                data, end = head[8 : 8 + length], pos + 8 + _aligned(length)
            else:  # a split record, or a damaged one: the full reader raises the precise error
                data, end = _read_record(fd, pos, size, rec)
            offsets.append(pos)
            ids.append(_IR_HEADER.unpack_from(data)[2] if len(data) >= _IR_HEADER.size else -1)
            pos = end
    finally:
        os.close(fd)
    keys = ids if len(set(ids)) == len(ids) and min(ids, default=0) >= 0 else range(len(ids))
    return list(zip(keys, offsets, strict=True))


def write_index(idx_path: str | os.PathLike[str], entries: Iterable[tuple[int, int]]) -> None:
    """Write an MXNet ``.idx`` file (``key<TAB>offset`` per line) atomically."""
    idx = os.fspath(idx_path)
    tmp = f"{idx}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="ascii") as f:
        f.writelines(f"{key}\t{offset}\n" for key, offset in entries)
    os.replace(tmp, idx)


def _read_idx(idx: str, rec: str) -> tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) from an MXNet ``.idx`` text file."""
    try:
        with open(idx, encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        raise FacemaeError(f"cannot read index {idx}: {exc.strerror or exc}") from exc
    values = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # fast path: a clean file parses in one call; anything odd goes line by line
        with contextlib.suppress(ValueError, DeprecationWarning, AttributeError):
            values = np.fromstring(text, dtype=np.int64, sep=" ")
    n_lines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
    if values is None or values.size != 2 * n_lines or text.count("\t") != n_lines:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not all(p.lstrip("-").isdigit() for p in parts):
                raise FacemaeError(
                    f"{idx}, line {lineno}: expected '<key><TAB><offset>', found {line[:80]!r}; "
                    + _REINDEX_HINT.format(idx=idx, rec=rec)
                )
            rows.append((int(parts[0]), int(parts[1])))
        values = np.asarray(rows, dtype=np.int64).reshape(-1)
    keys, offsets = values[0::2].copy(), values[1::2].copy()
    ordered = np.sort(keys)
    if (ordered[1:] == ordered[:-1]).any():
        raise FacemaeError(f"{idx} lists a key twice; " + _REINDEX_HINT.format(idx=idx, rec=rec))
    return keys, offsets


def _check_offsets(offsets: np.ndarray, keys: np.ndarray, size: int, rec: str, idx: str) -> None:
    bad = np.flatnonzero((offsets < 0) | (offsets % 4 != 0) | (offsets >= size))
    if bad.size:
        i = int(bad[0])
        past = int(offsets[i]) >= size
        raise FacemaeError(
            f"{idx}: key {int(keys[i])} points at offset {int(offsets[i])}, "
            + (
                f"past the end of {rec} ({size} bytes): the .rec is truncated (fetch it again) "
                "or the index belongs to another file; "
                if past
                else f"which cannot start a record in {rec}; "
            )
            + _REINDEX_HINT.format(idx=idx, rec=rec)
        )


def _gather_heads(rec: str, offsets: np.ndarray, size: int) -> np.ndarray:
    """The first 9 little-endian words of every record, read through a memory map."""
    nwords = size // 4
    words = np.memmap(rec, dtype="<u4", mode="r", shape=(nwords,))
    try:
        out = np.empty((len(offsets), _HEADER_WORDS), dtype=np.uint32)
        span = np.arange(_HEADER_WORDS, dtype=np.int64)
        for start in range(0, len(offsets), _CHUNK):
            where = offsets[start : start + _CHUNK, None] // 4 + span
            np.minimum(where, nwords - 1, out=where)
            out[start : start + _CHUNK] = words[where]
    finally:
        del words
    return out


def _scan_heads(
    rec: str, keys: np.ndarray, offsets: np.ndarray, size: int, fd: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flag, first label, payload length) per record, reading only the record headers.

    A record split by the writer (continuation flag 1) is read whole.
    """
    heads = _gather_heads(rec, offsets, size)
    lrec = heads[:, 1]
    cflag, length = lrec >> 29, (lrec & _LENGTH_MASK).astype(np.int64)
    flag = heads[:, 2].astype(np.int64)
    label = np.where(flag == 0, heads[:, 3].view(np.float32), heads[:, 8].view(np.float32))
    payload = length - _IR_HEADER.size - 4 * flag
    bad = np.flatnonzero((heads[:, 0] != RECORDIO_MAGIC) | (cflag > 1))
    if bad.size:
        _read_record(fd, int(offsets[bad[0]]), size, rec)  # raises naming the offset
    too_long = np.flatnonzero(offsets + 8 + length > size)
    if too_long.size:
        i = int(too_long[0])
        raise _truncated(rec, int(offsets[i]), 8 + int(length[i]), size)
    for i in np.flatnonzero((cflag == 1) | ((cflag == 0) & (payload < 0))).tolist():
        data, _ = _read_record(fd, int(offsets[i]), size, rec)
        f, lab, _, skip = _split_ir_header(data, f"{rec} key {int(keys[i])}")
        flag[i], label[i], payload[i] = f, lab, len(data) - skip
    return flag, label, payload


def _resolve_recordio(path: str) -> tuple[str, str, str | None]:
    """(rec, idx, property or None) for a dataset folder or a .rec file."""
    if os.path.isdir(path):
        recs = sorted(n for n in os.listdir(path) if n.endswith(".rec") and not n.startswith("."))
        if "train.rec" in recs:
            recs = ["train.rec"]
        if len(recs) != 1:
            found = ", ".join(recs) if recs else "none"
            raise FacemaeError(
                f"{path}: expected one .rec file (train.rec) in the folder, found {found}; "
                "pass the .rec file itself"
            )
        rec = os.path.join(path, recs[0])
    else:
        rec = path
    if not os.path.isfile(rec):
        raise FacemaeError(f"RecordIO file {rec} does not exist; check the path")
    prop = os.path.join(os.path.dirname(rec), "property")
    return rec, _idx_path_for(rec), prop if os.path.isfile(prop) else None


def _read_property(prop: str) -> tuple[int, ...] | None:
    """``num_classes,height,width`` from an InsightFace ``property`` file, None if unreadable."""
    try:
        with open(prop, encoding="ascii") as f:
            return tuple(int(v) for v in f.read().strip().split(","))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


class RecordIOSource(Source):
    """InsightFace MXNet RecordIO (``train.rec`` + ``train.idx``), read in pure Python.

    ``path``: the dataset folder or the ``.rec`` file (the ``.idx`` lies beside it with the same
    stem; when it is missing the file is scanned once, with a warning). Both layouts are read:
    face2rec2 (record 0 is a header ``[N+1, N+1+K]``, images at keys 1..N, identity records
    after) and im2rec (every key is an image). Records without image bytes are skipped.
    Identity names are ``str(int(label))``, label ids follow their numeric order.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.rec_path, self.idx_path, prop = _resolve_recordio(os.fspath(path))
        self.description = f"recordio:{self.rec_path}"
        self.property_values = _read_property(prop) if prop else None
        self._fd: int | None = None
        self._fd_pid = -1
        self._file_size = os.path.getsize(self.rec_path)
        if self._file_size < 8 + _IR_HEADER.size:
            raise FacemaeError(
                f"{self.rec_path} holds {self._file_size} bytes, too few for a RecordIO "
                "record; the file is empty or truncated: fetch it again"
            )
        keys, offsets = self._load_index()
        _check_offsets(offsets, keys, self._file_size, self.rec_path, self.idx_path)
        flag, label, payload = _scan_heads(
            self.rec_path, keys, offsets, self._file_size, self._handle()
        )
        keep = self._image_mask(keys, offsets, flag, payload)
        order = np.flatnonzero(keep)[np.argsort(keys[keep], kind="stable")]
        self.num_skipped = int(len(keys) - len(order))
        self._set_items(keys[order], offsets[order], label[order], payload[order])
        self._check_property()

    def _load_index(self) -> tuple[np.ndarray, np.ndarray]:
        if os.path.isfile(self.idx_path):
            return _read_idx(self.idx_path, self.rec_path)
        warnings.warn(
            f"no index {self.idx_path} beside {self.rec_path}: scanning the whole file to build "
            "one (slow for large files); to keep it, run "
            + _REINDEX_HINT.format(idx=self.idx_path, rec=self.rec_path).split(": ", 1)[1],
            stacklevel=3,
        )
        entries = np.asarray(build_index(self.rec_path), dtype=np.int64).reshape(-1, 2)
        return entries[:, 0].copy(), entries[:, 1].copy()

    def _image_mask(
        self, keys: np.ndarray, offsets: np.ndarray, flag: np.ndarray, payload: np.ndarray
    ) -> np.ndarray:
        """Which records hold images: keys 1..N after a face2rec2 header, else all with bytes."""
        keep = payload > 0
        zero = np.flatnonzero(keys == 0)
        if zero.size and flag[zero[0]] >= 2 and payload[zero[0]] == 0:
            data, _ = _read_record(
                self._handle(), int(offsets[zero[0]]), self._file_size, self.rec_path
            )
            end = int(struct.unpack_from("<f", data, _IR_HEADER.size)[0])
            keep &= (keys >= 1) & (keys < end)
        return keep

    def _set_items(
        self, keys: np.ndarray, offsets: np.ndarray, raw: np.ndarray, payload: np.ndarray
    ) -> None:
        if not np.isfinite(raw).all():
            bad = int(keys[np.flatnonzero(~np.isfinite(raw))[0]])
            raise FacemaeError(f"{self.rec_path}: record key {bad} has a non-finite label")
        unique, inverse = np.unique(raw.astype(np.int64), return_inverse=True)
        self._names = [str(v) for v in unique.tolist()]
        self._labels = _readonly(inverse.astype(np.int64).reshape(-1))
        self._offsets = _readonly(offsets)
        self._sizes = _readonly(payload.astype(np.int64))
        contiguous = keys.size > 0 and bool((np.diff(keys) == 1).all())
        self._key0 = int(keys[0]) if keys.size else 0
        self._keys = None if contiguous else _readonly(keys)

    def _check_property(self) -> None:
        declared = self.property_values
        if declared and self._names and declared[0] != len(self._names):
            warnings.warn(
                f"{self.rec_path}: property says {declared[0]} classes, the records hold "
                f"{len(self._names)} distinct labels; using the records",
                stacklevel=3,
            )

    def _handle(self) -> int:
        """This process's file descriptor, opened on first use (sources travel between processes)."""
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd = os.open(self.rec_path, os.O_RDONLY)
            self._fd_pid = os.getpid()
        return self._fd

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"], state["_fd_pid"] = None, -1
        return state

    def close(self) -> None:
        """Close this process's file descriptor (reopened on the next read)."""
        if self._fd is not None and self._fd_pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __len__(self) -> int:
        return len(self._offsets)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def identity_names(self) -> list[str]:
        return self._names

    def sizes(self) -> np.ndarray:
        """Image bytes per record (record length less the IRHeader and its label floats)."""
        return self._sizes

    def key(self, index: int) -> int:
        """RecordIO key of item ``index``."""
        return self._key0 + int(index) if self._keys is None else int(self._keys[index])

    def read(self, index: int) -> SourceRecord:
        where = f"rec:{self.key(index)}"
        data, _ = _read_record(
            self._handle(),
            int(self._offsets[index]),
            self._file_size,
            self.rec_path,
            hint=int(self._sizes[index]) + 64,
        )
        _, _, _, skip = _split_ir_header(data, f"{self.rec_path} {where}")
        return SourceRecord(data[skip:], where)


# --------------------------------------------------------------------------------------------------
# pair sets (.bin): lfw, cfp_fp, agedb_30, ...
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class PairSet:
    """A verification pair set: pair ``i`` is ``images[2i]``, ``images[2i+1]``."""

    images: list[bytes]
    issame: np.ndarray  # bool, one per pair
    name: str

    def __len__(self) -> int:
        return len(self.issame)


class _NDArrayMarker:
    """Stands in for ``numpy.ndarray`` while unpickling; has no attributes to set."""

    __slots__ = ()


class _ArrayStub:
    """A numpy array as the pickle describes it; turned into a real array after loading."""

    __slots__ = ("state",)

    def __init__(self, state: object = None) -> None:
        self.state = state

    def __setstate__(self, state: object) -> None:
        self.state = state


class _DTypeStub:
    """A numpy dtype as the pickle describes it."""

    __slots__ = ("args", "state")

    def __init__(self, args: tuple) -> None:
        self.args, self.state = args, None

    def __setstate__(self, state: object) -> None:
        self.state = state


class _ScalarStub:
    """A numpy scalar (e.g. ``numpy.bool_``) as the pickle describes it."""

    __slots__ = ("dtype", "data")

    def __init__(self, dtype: object, data: object = None) -> None:
        self.dtype, self.data = dtype, data


_ARRAY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMERIC_MODULES = ("numpy.core.numeric", "numpy._core.numeric")
_BUILTIN_MODULES = ("builtins", "__builtin__")


def _pair_set_globals(path: str) -> dict[tuple[str, str], object]:
    """What a pair-set pickle may name, each bound to a harmless stand-in.

    Stand-ins are fresh per load (state a malicious pickle sets on them dies with the load) and
    build only inert stubs; no numpy code runs on the pickle's data until it has been checked.
    """
    marker = _NDArrayMarker()

    def refuse(what: str) -> FacemaeError:
        return FacemaeError(f"refusing to load {path}: {what}; the file is corrupt or malicious")

    def reconstruct(subtype: object, shape: object = None, code: object = None) -> _ArrayStub:
        if subtype is not marker:
            raise refuse("it rebuilds an array of a type other than numpy.ndarray")
        return _ArrayStub()

    def frombuffer(buf: object, dtype: object, shape: object, order: object) -> _ArrayStub:
        return _ArrayStub((1, shape, dtype, order == "F", buf))

    def latin1(text: object, encoding: object = "latin1", *_: object) -> bytes:
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise refuse("it encodes text in a way pickled bytes never use")
        return text.encode("latin-1")

    def make_bytes(*args: object) -> bytes:
        if args and not isinstance(args[0], (bytes, bytearray, str)):
            raise refuse("it builds bytes from something other than bytes or text")
        return latin1(*args) if args and isinstance(args[0], str) else bytes(*args)

    def make_bytearray(*args: object) -> bytearray:
        return bytearray(make_bytes(*args))

    table: dict[tuple[str, str], object] = {("numpy", "ndarray"): marker}
    table[("numpy", "dtype")] = lambda *args: _DTypeStub(args)
    table[("_codecs", "encode")] = latin1
    for module in _ARRAY_MODULES:
        table[(module, "_reconstruct")] = reconstruct
        table[(module, "scalar")] = lambda dtype, data=None: _ScalarStub(dtype, data)
    for module in _NUMERIC_MODULES:
        table[(module, "_frombuffer")] = frombuffer
    for module in _BUILTIN_MODULES:
        table[(module, "bytes")] = make_bytes
        table[(module, "bytearray")] = make_bytearray
    return table


class _PairSetUnpickler(pickle.Unpickler):
    """Unpickler that admits only the few globals a pair set contains (see _pair_set_globals)."""

    def __init__(self, file: BinaryIO, path: str) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path
        self._allowed = _pair_set_globals(path)

    def find_class(self, module: str, name: str) -> object:
        found = self._allowed.get((module, name))
        if found is None:
            raise FacemaeError(
                f"refusing to load {self._path}: it asks for {module}.{name}, which a pair set "
                "never contains; the file is corrupt or malicious, fetch it from a trusted source"
            )
        return found

    def persistent_load(self, pid: object) -> object:
        raise FacemaeError(
            f"refusing to load {self._path}: it refers to external objects, which a pair set "
            "never does; the file is corrupt or malicious, fetch it from a trusted source"
        )


_PLAIN_DTYPES = frozenset({"b1", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8"})
_OBJECT_DTYPES = frozenset({"O", "O4", "O8"})


def _text(value: object) -> str | None:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1")
    return value if isinstance(value, str) else None


def _real_dtype(stub: object, where: str) -> np.dtype | None:
    """A checked numpy dtype for a dtype stub; None for the object dtype."""
    code = _text(stub.args[0]) if isinstance(stub, _DTypeStub) and stub.args else None
    state = stub.state if isinstance(stub, _DTypeStub) else None
    order = _text(state[1]) if isinstance(state, tuple) and len(state) > 1 else "|"
    if code in _OBJECT_DTYPES:
        return None
    if code not in _PLAIN_DTYPES or order not in ("<", ">", "|", "="):
        raise FacemaeError(f"{where}: holds an array of type {code!r}, which no pair set uses")
    return np.dtype((order if order != "|" else "") + code)


def _real_array(stub: _ArrayStub, where: str) -> np.ndarray | list:
    """The checked array a stub describes (a list for a 1-D object array)."""
    state = stub.state
    if isinstance(state, tuple) and len(state) == 5:
        state = state[1:]
    if not isinstance(state, tuple) or len(state) != 4:
        raise FacemaeError(f"{where}: an array in it has no valid state")
    shape, dtype, fortran, raw = state
    if (
        not isinstance(shape, tuple)
        or len(shape) > 2
        or not all(isinstance(n, int) and n >= 0 for n in shape)
    ):
        raise FacemaeError(f"{where}: an array in it has the shape {shape!r}")
    count = math.prod(shape)
    real = _real_dtype(dtype, where)
    if real is None:
        if len(shape) != 1 or not isinstance(raw, list) or len(raw) != count:
            raise FacemaeError(f"{where}: an object array in it is not a flat list")
        return raw
    raw = raw.encode("latin-1") if isinstance(raw, str) else raw
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != count * real.itemsize:
        raise FacemaeError(f"{where}: an array in it has {count} items but not their bytes")
    flat = np.frombuffer(bytes(raw), dtype=real)
    return flat.reshape(shape, order="F" if fortran else "C")


def _image_bytes(item: object, k: int, where: str) -> bytes:
    if isinstance(item, _ArrayStub):
        item = _real_array(item, where)
    if isinstance(item, np.ndarray) and item.dtype.itemsize == 1 and item.ndim == 1:
        item = item.tobytes()
    elif isinstance(item, str):
        try:
            item = item.encode("latin-1")
        except UnicodeEncodeError:
            item = None
    if not isinstance(item, (bytes, bytearray)) or not item:
        raise FacemaeError(
            f"{where}: image {k} is {type(item).__name__}, not encoded image bytes; "
            "the file is not a pair set"
        )
    return bytes(item)


def _issame_array(value: object, where: str) -> np.ndarray:
    if isinstance(value, _ArrayStub):
        value = _real_array(value, where)
    if isinstance(value, (list, tuple)):
        value = [_scalar_value(v, where) for v in value]
    array = np.asarray(value)
    if array.size == 0 and array.ndim == 1:
        return np.zeros(0, dtype=bool)
    if array.ndim != 1 or array.dtype.kind not in "biu" or not np.isin(array, (0, 1)).all():
        raise FacemaeError(f"{where}: the issame list is not a flat list of booleans")
    return array.astype(bool)


def _scalar_value(value: object, where: str) -> object:
    if isinstance(value, _ScalarStub):
        real = _real_dtype(value.dtype, where)
        raw = value.data.encode("latin-1") if isinstance(value.data, str) else value.data
        if real is None or not isinstance(raw, (bytes, bytearray)) or len(raw) != real.itemsize:
            raise FacemaeError(f"{where}: a value in the issame list is not a number")
        return np.frombuffer(bytes(raw), dtype=real)[0].item()
    if not isinstance(value, (bool, int)):
        raise FacemaeError(f"{where}: the issame list holds a {type(value).__name__}")
    return value


def load_pair_set(path: str | os.PathLike[str]) -> PairSet:
    """Load an InsightFace pair set (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``, ...) safely.

    The file is a pickle of ``(images, issame)`` from Python 2 (images as byte strings) or 3
    (images as 1-D uint8 arrays). It is unpickled with a restricted unpickler: a file that asks
    for anything beyond bytes and plain numpy arrays is refused before any of its code runs.
    """
    where = os.fspath(path)
    try:
        with open(where, "rb") as f:
            loaded = _PairSetUnpickler(f, where).load()
    except FacemaeError:
        raise
    except OSError as exc:
        raise FacemaeError(f"cannot read pair set {where}: {exc.strerror or exc}") from exc
    except Exception as exc:  # any unpickling failure means a damaged or foreign file
        raise FacemaeError(
            f"{where} is not a readable pair set ({type(exc).__name__}: {exc}); fetch it again "
            "(lfw.bin, cfp_fp.bin, agedb_30.bin), or build one from a shard split with "
            "`facemae make-pairs SPLIT out.bin`"
        ) from exc
    if not isinstance(loaded, (tuple, list)) or len(loaded) != 2:
        raise FacemaeError(
            f"{where}: expected a pickle of (images, issame), found {type(loaded).__name__}"
        )
    bins, issame = loaded
    if isinstance(bins, _ArrayStub):
        bins = _real_array(bins, where)
    if not isinstance(bins, (list, tuple)):
        raise FacemaeError(f"{where}: the images are a {type(bins).__name__}, not a list")
    same = _issame_array(issame, where)
    if len(bins) != 2 * len(same):
        raise FacemaeError(
            f"{where}: {len(bins)} images for {len(same)} pairs; a pair set holds two images "
            "per pair: the file is damaged, fetch it again"
        )
    images = [_image_bytes(item, k, where) for k, item in enumerate(bins)]
    return PairSet(images, same, os.path.splitext(os.path.basename(where))[0])


def write_pair_set(
    path: str | os.PathLike[str], images: Sequence[bytes], issame: Sequence[bool] | np.ndarray
) -> None:
    """Write a pair set in the newer InsightFace layout: 1-D uint8 arrays + a bool array.

    ``images[2i]`` and ``images[2i+1]`` form pair ``i``; the file is written atomically.
    """
    target = os.fspath(path)
    same = np.asarray(issame, dtype=bool).reshape(-1)
    if len(images) != 2 * len(same):
        raise FacemaeError(
            f"cannot write {target}: {len(images)} images for {len(same)} pairs (need 2 per pair)"
        )
    bins = [np.frombuffer(bytes(image), dtype=np.uint8) for image in images]
    tmp = f"{target}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        with open(tmp, "wb") as f:
            pickle.dump((bins, same), f, protocol=4)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise FacemaeError(
            f"cannot write pair set {target}: {exc.strerror or exc}; choose a writable path"
        ) from exc


# --------------------------------------------------------------------------------------------------
# choosing a reader
# --------------------------------------------------------------------------------------------------

SOURCE_FORMATS = ("auto", "folder", "list", "recordio", "synthetic")


def _detect_format(path: str) -> str:
    """The reader for an existing ``path``: recordio, folder or list."""
    if os.path.isdir(path):
        names = [n for n in os.listdir(path) if not n.startswith(".")]
        if any(n.endswith(".rec") for n in names):
            return "recordio"
        if any(n.endswith(".idx") for n in names):
            raise FacemaeError(
                f"{path} holds a RecordIO index (.idx) but no .rec file; copy the .rec beside it"
            )
        return "folder"
    lower = path.lower()
    if lower.endswith(".rec"):
        return "recordio"
    if lower.endswith(".idx"):
        raise FacemaeError(
            f"{path} is a RecordIO index but {path[:-4]}.rec is missing; copy the .rec beside it"
        )
    if lower.endswith(".bin"):
        raise FacemaeError(
            f"{path} looks like a verification pair set (.bin), not a training source; "
            "use it for evaluation, or pass a folder, list or RecordIO dataset"
        )
    with open(path, "rb") as f:
        head = f.read(8192)
    if b"\0" in head:
        raise FacemaeError(
            f"{path} is a binary file, not a text list; pass an image folder, a list file "
            "('<path> <label>' per line) or a RecordIO .rec"
        )
    return "list"


def open_source(path: str | os.PathLike[str], fmt: str = "auto") -> Source:
    """Open a face source: ``fmt`` is one of auto, folder, list, recordio, synthetic.

    auto: a folder holding a .rec file, or a .rec file → RecordIO; another folder → image
    folder; another file → list; no such path but an ``IDSxPER[:SEED]`` spec → synthetic.
    synthetic: ``path`` is a synthetic-data spec (see :mod:`facemae_dist.data.synthetic`). Raises FacemaeError for a missing path, an
    unknown format, or a source without images.
    """
    path = os.fspath(path)
    if fmt not in SOURCE_FORMATS:
        raise FacemaeError(
            f"unknown source format {fmt!r} for {path}; choose one of {', '.join(SOURCE_FORMATS)}"
        )
    if fmt == "synthetic":
        from facemae_dist.data.synthetic import SyntheticSource

        return SyntheticSource.from_spec(path)
    if fmt in ("auto", "recordio") and path.endswith(".idx") and os.path.isfile(path[:-4] + ".rec"):
        path = path[:-4] + ".rec"  # the index was named: read the records beside it
    if not os.path.exists(path):
        if fmt == "auto":  # not a path: maybe a synthetic spec (its parser decides)
            from facemae_dist.data.synthetic import SyntheticSource

            with contextlib.suppress(FacemaeError):
                return SyntheticSource.from_spec(path)
        raise FacemaeError(f"source {path} does not exist; check the path")
    kind = _detect_format(path) if fmt == "auto" else fmt
    if kind == "folder" and not os.path.isdir(path):
        raise FacemaeError(f"{path} is not a folder; an image folder is <root>/<identity>/<image>")
    if kind == "list" and not os.path.isfile(path):
        raise FacemaeError(f"{path} is not a file; a list is a text file of '<path> <label>' lines")
    readers = {"folder": FolderSource, "list": ListSource, "recordio": RecordIOSource}
    source = readers[kind](path)
    if len(source) == 0:
        hint = {
            "folder": "expected <root>/<identity>/<image> with extensions "
            + ", ".join(sorted(IMAGE_EXTENSIONS)),
            "list": "expected lines of '<image path> <label>'",
            "recordio": "the file holds no image records",
        }[kind]
        raise FacemaeError(f"no images found in {path} (read as {kind}): {hint}")
    return source

"""A minimal, deterministic ustar writer for WebDataset shards.

Why not tarfile/ShardWriter: ShardWriter stores a float mtime, so tarfile adds a 1 KB PAX header to
every member (shards come out ~2x the image bytes), and timestamps make shards differ between runs.
Here every header is 512 bytes with mtime 0 and root ownership, so the same samples always give the
same bytes (same sha256): resuming a killed job can be checked against an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import os
from typing import BinaryIO

BLOCK = 512
END_OF_ARCHIVE = 2 * BLOCK
_FLUSH_BYTES = 1 << 20  # members are joined and hashed in ~1 MB chunks


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\x00" % (width - 1, value)


# The fields around the name (0:100), size (124:136) and checksum (148:156) never change.
_MODE_UID_GID = _octal(0o644, 8) + _octal(0, 8) + _octal(0, 8)  # 100:124
_MTIME = _octal(0, 12)  # 136:148
_TAIL = b"0" + bytes(100) + b"ustar\x0000" + b"root".ljust(32, b"\0") * 2  # 156:329
_TAIL += bytes(BLOCK - 329)  # 329:512
_FIXED_SUM = sum(_MODE_UID_GID) + sum(_MTIME) + sum(_TAIL) + 8 * ord(" ")
_ZEROS = bytes(BLOCK)
_MAX_SIZE = 8**11


def member_header(name: str, size: int) -> bytes:
    """512-byte ustar header of a regular file (mode 0644, mtime 0, uid/gid 0)."""
    raw = name.encode("ascii")
    if len(raw) > 99:
        raise ValueError(f"tar member name too long: {name!r}")
    if not 0 <= size < _MAX_SIZE:  # 11 octal digits: a larger size would shift every later field
        raise ValueError(f"tar member {name!r} of {size} bytes: ustar holds at most 8 GiB - 1")
    size_field = _octal(size, 12)
    checksum = b"%06o\x00 " % (_FIXED_SUM + sum(raw) + sum(size_field))
    return b"".join((raw.ljust(100, b"\0"), _MODE_UID_GID, size_field, _MTIME, checksum, _TAIL))


def member_bytes(size: int) -> int:
    """Bytes a member of `size` bytes takes in the archive (header + padded data)."""
    return BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK


class HashingTarWriter:
    """Write members to a binary file while computing its sha256 and size."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self._f = fileobj
        self._sha = hashlib.sha256()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self.bytes_written = 0

    def _flush(self) -> None:
        chunk = b"".join(self._pending)
        self._f.write(chunk)
        self._sha.update(chunk)
        self._pending.clear()
        self._pending_bytes = 0

    def add(self, name: str, data: bytes) -> None:
        pad = -len(data) % BLOCK
        self._pending += (member_header(name, len(data)), data, _ZEROS[:pad])
        size = BLOCK + len(data) + pad
        self._pending_bytes += size
        self.bytes_written += size
        if self._pending_bytes >= _FLUSH_BYTES:
            self._flush()

    def close(self) -> str:
        """Write the end-of-archive blocks; return the hex sha256 of the whole file."""
        self._pending.append(bytes(END_OF_ARCHIVE))
        self.bytes_written += END_OF_ARCHIVE
        self._flush()
        self._f.flush()
        os.fsync(self._f.fileno())
        return self._sha.hexdigest()


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
    return sha.hexdigest()

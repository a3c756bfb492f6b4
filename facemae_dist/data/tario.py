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


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\x00" % (width - 1, value)


def member_header(name: str, size: int) -> bytes:
    """512-byte ustar header of a regular file (mode 0644, mtime 0, uid/gid 0)."""
    raw = name.encode("ascii")
    if len(raw) > 99:
        raise ValueError(f"tar member name too long: {name!r}")
    header = bytearray(BLOCK)
    header[0 : len(raw)] = raw
    header[100:108] = _octal(0o644, 8)
    header[108:116] = _octal(0, 8)
    header[116:124] = _octal(0, 8)
    header[124:136] = _octal(size, 12)
    header[136:148] = _octal(0, 12)
    header[148:156] = b" " * 8  # checksum is computed with this field as spaces
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    header[265:269] = b"root"
    header[297:301] = b"root"
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header)


def member_bytes(size: int) -> int:
    """Bytes a member of `size` bytes takes in the archive (header + padded data)."""
    return BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK


END_OF_ARCHIVE = 2 * BLOCK


class HashingTarWriter:
    """Write members to a binary file while computing its sha256 and size."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self._f = fileobj
        self._sha = hashlib.sha256()
        self.bytes_written = 0

    def _write(self, chunk: bytes) -> None:
        self._f.write(chunk)
        self._sha.update(chunk)
        self.bytes_written += len(chunk)

    def add(self, name: str, data: bytes) -> None:
        self._write(member_header(name, len(data)))
        self._write(data)
        pad = -len(data) % BLOCK
        if pad:
            self._write(b"\x00" * pad)

    def close(self) -> str:
        """Write the end-of-archive blocks; return the hex sha256 of the whole file."""
        self._write(b"\x00" * END_OF_ARCHIVE)
        self._f.flush()
        os.fsync(self._f.fileno())
        return self._sha.hexdigest()


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
    return sha.hexdigest()

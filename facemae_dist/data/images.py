"""Encoded-image checks without decoding: format sniffing, size from the header, truncation.

The sharder passes JPEG/PNG bytes through untouched when they are already at the target size, so it
must judge an image from its bytes alone; a full decode is only needed to resize or re-encode.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image, ImageOps

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# SOF markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_NAMES = {"jpg": "JPEG", "png": "PNG", "other": "image"}
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class BadImage(ValueError):
    """The bytes are not a usable image; the message says why (stored in the manifest)."""


def sniff(data: bytes) -> str:
    """'jpg', 'png' or 'other' (another format PIL may decode) from the leading bytes."""
    if data.startswith(JPEG_MAGIC):
        return "jpg"
    if data.startswith(PNG_MAGIC):
        return "png"
    return "other"


def _jpeg_scan(data: bytes) -> tuple[tuple[int, int], bool]:
    """((width, height), whether the data reaches its EOI) in one walk of the marker segments
    (the sharder's hot path: one walk, not one for the size and another for the end). Up to the
    frame header the walk is strict; from there on it is :func:`_jpeg_has_eoi`'s."""
    pos, n = 2, len(data)
    while True:
        if pos + 4 > n:
            raise BadImage("truncated JPEG: no frame header")
        if data[pos] != 0xFF:
            raise BadImage("corrupt JPEG: marker expected")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        (seg_len,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _SOF_MARKERS:
            if pos + 9 > n:
                raise BadImage("truncated JPEG: no frame header")
            height, width = struct.unpack_from(">HH", data, pos + 5)
            return (width, height), _jpeg_has_eoi(data, pos)
        pos += 2 + seg_len


def _jpeg_has_eoi(data: bytes, pos: int = 2) -> bool:
    """True when the image data reaches an EOI marker (FFD9); bytes after it are ignored. ``pos``:
    a marker to start the walk at (after SOI).

    Walks the marker segments from SOI, jumping over each segment's payload (so the FFD9 of an EXIF
    thumbnail inside APP1 does not count), and scans entropy-coded data for the next marker: there
    a literal 0xFF is stuffed as FF00 and restart markers (FFD0-FFD7) sit inline, so any other FFxx
    is a real marker. A truncated file runs out of bytes before reaching EOI. Trailing bytes after
    EOI (CRLF, padding, appended data) are accepted, as decoders accept them.

    Fast path (nearly every file): once the header segments are passed, a file whose last bytes
    (before zero padding) are FFD9 ends with its EOI, since FFD9 cannot occur in entropy-coded
    data; only other files have their entropy data scanned (a Python step per 0xFF byte).
    """
    n = len(data)
    end = len(data.rstrip(b"\x00"))  # some writers zero-pad
    ends_with_eoi = data[end - 2 : end] == b"\xff\xd9"
    while True:
        pos = data.find(b"\xff", pos)  # also skips stray bytes between segments, as libjpeg does
        if pos < 0 or pos + 1 >= n:
            return False
        marker = data[pos + 1]
        if marker == 0xD9:
            return True
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker == 0x00 or 0xD0 <= marker <= 0xD7:  # stuffed 0xFF or restart marker
            pos += 2
        elif pos + 4 > n:
            return False
        else:  # a segment: skip its length-prefixed payload (entropy data follows SOS's header)
            pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
            if marker == 0xDA and ends_with_eoi and end - 2 >= pos:
                return True


def _size_and_completeness(data: bytes, kind: str) -> tuple[tuple[int, int], bool]:
    """((width, height) from the header, whether the file holds a whole image): cheap, no decode.
    A JPEG is walked once for both."""
    if kind == "jpg":
        return _jpeg_scan(data)
    if kind == "png":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise BadImage("truncated PNG: no IHDR")
        # the IEND chunk (type + CRC) is whole; bytes after it are ignored by readers
        end = data.rfind(b"IEND")
        return struct.unpack_from(">II", data, 16), end >= 4 and end + 8 <= len(data)
    try:
        return Image.open(io.BytesIO(data)).size, True
    except Exception as exc:
        raise BadImage(f"not an image ({type(exc).__name__})") from exc


def check_image(data: bytes, full_decode: bool = False) -> tuple[str, tuple[int, int]]:
    """Validate encoded bytes; return (kind, (width, height)) or raise BadImage with the reason."""
    if not data:
        raise BadImage("empty file")
    kind = sniff(data)
    size, complete = _size_and_completeness(data, kind)
    if not complete:
        raise BadImage(f"truncated {_NAMES[kind]}: end marker missing")
    if full_decode or kind == "other":
        decode_rgb(data)
    return kind, size


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB; 16-bit grayscale (modes I;16*, I) is scaled to 8 bits first, and an
    image with transparency is laid over black (the fill aligners use outside the face)."""
    if img.mode == "I" or img.mode.startswith("I;16"):
        # convert("RGB") would clip 0-65535 to 0-255, turning a 16-bit PNG almost all white
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        narrow = (wide >> 8).astype(np.uint8)
        key = img.info.get("transparency")  # a 16-bit grey PNG's transparent value (tRNS)
        if isinstance(key, int):
            narrow[wide == key] = 0  # laid over black, as below
        img = Image.fromarray(narrow, "L")
    if _has_alpha(img):
        # convert("RGB") drops alpha and shows whatever colour transparent pixels hold
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_rgb(data: bytes, upright: bool = False) -> Image.Image:
    """Decode to an RGB PIL image, raising BadImage on any decoder error. ``upright``: turn it as
    its EXIF orientation says (a camera's portrait photo is stored sideways with that tag)."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        if upright:
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except Exception as exc:
        raise BadImage(f"cannot decode ({type(exc).__name__}: {exc})") from exc


_ORIENTATION = 0x0112  # EXIF tag: 1 = as stored, 2-8 = mirrored and/or rotated


def exif_orientation(data: bytes, kind: str) -> int:
    """A JPEG's EXIF orientation from its header (no decode); 1 when it has none."""
    # APP1 "Exif" sits among the first header segments: a bounded search, no copy (hot path)
    if kind != "jpg" or data.find(b"Exif\x00\x00", 0, 1024) < 0:
        return 1
    try:
        return int(Image.open(io.BytesIO(data)).getexif().get(_ORIENTATION, 1))
    except Exception:  # an unreadable EXIF block: the pixels are taken as stored
        return 1


FITS = ("pad", "crop", "squash")  # how a non-square face becomes square; see fit_square


def fit_square(img: Image.Image, size: int, fit: str = "pad") -> Image.Image:
    """``img`` resized to size×size. A non-square face is padded with black to a centred square
    (``pad``: nothing is cut, and a 112×96 SphereFace crop lands on the 112×112 ArcFace alignment,
    which is the same template shifted 8 px), cut to its centred square (``crop``) or stretched
    (``squash``)."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if img.size == (size, size):
        return img
    width, height = img.size
    if width != height and fit == "pad":
        return ImageOps.pad(img, (size, size), Image.Resampling.BILINEAR, color=(0, 0, 0))
    if width != height and fit == "crop":
        return ImageOps.fit(img, (size, size), Image.Resampling.BILINEAR)
    return img.resize((size, size), Image.Resampling.BILINEAR)


def reencode(
    data: bytes, size: int, kind: str, jpeg_quality: int = 95, fit: str = "pad"
) -> tuple[bytes, str]:
    """Decode (turned upright by its EXIF orientation), make it size×size (see ``fit_square``) and
    encode again (PNG stays PNG, everything else → JPEG); the result carries no EXIF."""
    img = fit_square(decode_rgb(data, upright=True), size, fit)
    out = io.BytesIO()
    if kind == "png":
        img.save(out, format="PNG")
        return out.getvalue(), "png"
    img.save(out, format="JPEG", quality=jpeg_quality)
    return out.getvalue(), "jpg"


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    """uint8 (H, W, 3) array → JPEG bytes."""
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=quality)
    return out.getvalue()

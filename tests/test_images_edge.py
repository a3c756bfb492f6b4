"""Edge cases of facemae_dist.data.images: JPEG end detection and 16-bit PNG decoding."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from conftest import jpeg_bytes
from PIL import Image

from facemae_dist.data.images import BadImage, check_image, decode_rgb, reencode, to_rgb
from facemae_dist.errors import FacemaeError


@pytest.mark.parametrize(
    "trailer",
    [b"\r\n", b"\x00\x11" * 50, b"\xff" * 4, b"\x00" * 16, b"\xff\xd8 appended data"],
    ids=["crlf", "appended", "ff-padding", "zero-padding", "second-soi"],
)
def test_jpeg_with_bytes_after_eoi_is_accepted(trailer: bytes) -> None:
    data = jpeg_bytes(1) + trailer
    Image.open(io.BytesIO(data)).load()  # decoders accept it, so the sharder must too
    assert check_image(data) == ("jpg", (112, 112))


@pytest.mark.parametrize(
    "trailer", [b"\n", b"\x00" * 16, b"junk" * 25], ids=["lf", "zeros", "data"]
)
def test_png_with_bytes_after_iend_is_accepted(trailer: bytes) -> None:
    data = jpeg_bytes(1, fmt="PNG") + trailer
    Image.open(io.BytesIO(data)).load()  # decoders accept it, so the sharder must too
    assert check_image(data) == ("png", (112, 112))
    with pytest.raises(BadImage, match="truncated"):
        check_image(data[: data.rfind(b"IEND") + 6])  # a cut inside the IEND chunk's CRC


def _with_thumbnail(data: bytes) -> bytes:
    """The JPEG with an APP1 (EXIF) segment holding a whole thumbnail JPEG, FFD9 included, put
    after the frame header (just before SOS) so a cut after it still has a readable size."""
    payload = b"Exif\x00\x00" + jpeg_bytes(2, size=16)
    sos = data.index(b"\xff\xda")
    return data[:sos] + b"\xff\xe1" + struct.pack(">H", 2 + len(payload)) + payload + data[sos:]


@pytest.mark.parametrize("kind", ["baseline", "progressive", "thumbnail"])
def test_every_truncated_jpeg_is_rejected(kind: str) -> None:
    if kind == "progressive":
        out = io.BytesIO()
        Image.open(io.BytesIO(jpeg_bytes(3))).save(out, "JPEG", progressive=True)
        data = out.getvalue()
    else:
        data = jpeg_bytes(3)
    if kind == "thumbnail":  # the thumbnail's FFD9 must not pass for the image's end
        data = _with_thumbnail(data)
    assert check_image(data, full_decode=True) == ("jpg", (112, 112))
    for cut in range(3, len(data) - 1):
        with pytest.raises(BadImage, match="truncated JPEG"):
            check_image(data[:cut])


def test_16bit_png_is_scaled_not_clipped() -> None:
    gradient = np.linspace(0, 65535, 112 * 112).reshape(112, 112).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(gradient).save(buf, format="PNG")
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    expected = np.repeat((gradient >> 8).astype(np.uint8)[..., None], 3, axis=2)
    assert np.array_equal(np.asarray(decode_rgb(data)), expected)
    with Image.open(io.BytesIO(data)) as img:  # what the shard reader decodes with
        assert np.array_equal(np.asarray(to_rgb(img)), expected)
    png, ext = reencode(data, 112, "png")  # the sharder's re-encode keeps the scaled values
    assert ext == "png" and np.array_equal(np.asarray(Image.open(io.BytesIO(png))), expected)


def test_exif_orientation_is_applied_once_when_sharding(tmp_path) -> None:
    """A camera stores a portrait photo sideways with an EXIF orientation tag; the loaders ignore
    the tag, so the sharder turns such a face upright (re-encoded, tag gone); others pass through."""
    from conftest import MemorySource

    from facemae_dist.data.shards import ShardOptions, load_manifest, shard_dataset
    from facemae_dist.data.stream import read_shard

    upright = np.zeros((112, 112, 3), np.uint8)
    upright[:40] = 255  # a white band at the top: easy to tell from a turned face
    stored = np.ascontiguousarray(
        np.rot90(upright, k=1)
    )  # what the camera wrote (band on the left)
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90° clockwise to display"
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    tagged, plain = buf.getvalue(), jpeg_bytes(3)
    shard_dataset(MemorySource([(0, tagged), (0, plain)]), tmp_path, ShardOptions(progress=False))
    out = [s["jpg"] for url in load_manifest(tmp_path / "train")["urls"] for s in read_shard(url)]
    assert out[1] == plain  # no tag: bytes untouched
    got = np.asarray(Image.open(io.BytesIO(out[0])).convert("RGB"), dtype=np.int16)
    assert np.abs(got - upright).mean() < 8  # the band is on top now
    assert 0x0112 not in Image.open(io.BytesIO(out[0])).getexif()


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def test_non_square_face_is_padded_cropped_or_squashed() -> None:
    """A 112x96 (SphereFace) crop padded with 8 black columns each side is the ArcFace 112x112
    alignment; crop keeps the centred 96x96; squash stretches (the old behaviour)."""
    face = np.full((112, 96, 3), 200, np.uint8)
    face[:, :4] = 50  # dark edge columns: where do they end up?
    data = _png(face)
    padded = np.asarray(Image.open(io.BytesIO(reencode(data, 112, "png", fit="pad")[0])))
    assert (padded[:, :8] == 0).all() and (padded[:, -8:] == 0).all()
    assert np.array_equal(padded[:, 8:104], face)  # same scale: pixels untouched
    cropped = np.asarray(Image.open(io.BytesIO(reencode(data, 96, "png", fit="crop")[0])))
    assert np.array_equal(cropped, face[8:104])
    squashed = np.asarray(Image.open(io.BytesIO(reencode(data, 112, "png", fit="squash")[0])))
    assert squashed.shape == (112, 112, 3) and squashed.min() > 0  # stretched, no border
    with pytest.raises(ValueError, match="fit must be one of"):
        reencode(data, 112, "png", fit="stretch")


def test_transparent_pixels_are_black_not_their_hidden_colour() -> None:
    rgba = np.zeros((112, 112, 4), np.uint8)
    rgba[..., :3] = 255  # white under full transparency: convert("RGB") would show white
    rgba[:56, :, 3] = 255
    rgba[:56, :, :3] = (10, 120, 230)  # opaque top half
    rgba[56:60, :, 3] = 128  # a half-transparent band is blended over black
    got = np.asarray(decode_rgb(_png(rgba, "RGBA")))
    assert (got[:56] == (10, 120, 230)).all()
    assert (got[60:] == 0).all()
    assert np.abs(got[57].astype(int) - 128).max() <= 1
    la = np.stack([np.full((112, 112), 255, np.uint8), np.zeros((112, 112), np.uint8)], -1)
    assert (np.asarray(decode_rgb(_png(la, "LA"))) == 0).all()  # grey + alpha, all transparent
    with Image.open(io.BytesIO(_png(rgba, "RGBA"))) as img:  # the shard reader's path
        assert np.array_equal(np.asarray(to_rgb(img)), got)


def test_sharder_fits_non_square_faces_and_counts_them(tmp_path) -> None:
    from conftest import MemorySource

    from facemae_dist.data.shards import ShardOptions, load_manifest, shard_dataset
    from facemae_dist.data.stream import read_shard

    wide = _png(np.full((96, 112, 3), 90, np.uint8))
    source = MemorySource([(0, wide), (0, jpeg_bytes(3)), (1, wide)])
    manifest = shard_dataset(source, tmp_path, ShardOptions(progress=False))["train"]
    assert manifest["non_square"] == 2 and manifest["options"]["fit"] == "pad"
    faces = [
        s.get("png") for url in load_manifest(tmp_path / "train")["urls"] for s in read_shard(url)
    ]
    first = np.asarray(Image.open(io.BytesIO(faces[0])))
    assert first.shape == (112, 112, 3) and (first[:8] == 0).all() and (first[8:104] == 90).all()
    # another fit changes the shards' bytes: a resume must not keep the padded ones
    with pytest.raises(FacemaeError, match="--fit"):
        shard_dataset(source, tmp_path, ShardOptions(progress=False, resume=True, fit="crop"))


def test_transparent_value_of_a_16bit_grey_png_is_black() -> None:
    wide = np.full((112, 112), 40000, np.uint16)
    wide[:, :56] = 40010  # the tRNS colour key: these pixels are transparent
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG", transparency=40010)
    got = np.asarray(decode_rgb(buf.getvalue()))
    assert (got[:, :56] == 0).all() and (got[:, 56:] == 40000 >> 8).all()

"""Identity-structured synthetic faces: the embedded default data.

Real identity-labelled face sets cannot be downloaded here, yet every stage (sharding, MAE
pre-training, recognition, privacy audit) needs faces whose identity is learnable. This module
draws them. Each identity has fixed traits: head and jaw shape, eye spacing and size, brows, nose,
mouth, skin/hair/eye colour, hair style, beard, moles and freckles. Each image varies what a real
aligned crop varies: 3-D pose, expression, lighting, colour cast, alignment error, blur, noise,
JPEG quality and occlusion (glasses, hand, mask-like bar). Faces come out aligned like ArcFace
crops: the 5 projected landmarks are mapped onto the 112 x 112 template by a similarity transform,
then perturbed by a small residual "aligner error".

Image ``(identity, index)`` depends only on ``(seed, identity, index)``: any item can be rendered
on its own, in any process and order, and the same seed gives byte-identical JPEGs (for one
Pillow/numpy build).
"""

from __future__ import annotations

import functools
import io
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from facemae_dist.data.sources import Source, SourceRecord
from facemae_dist.errors import FacemaeError
from facemae_dist.progress import ProgressBar

#: ArcFace 112 x 112 template: left eye, right eye, nose tip, left and right mouth corner.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
_STREAM_IDENTITY, _STREAM_IMAGE = 1, 2
_SPEC_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*(?::\s*(-?\d+)\s*)?$")


@dataclass
class SynthConfig:
    """What to generate and how strong each nuisance is (0 switches a nuisance off)."""

    num_identities: int
    images_per_identity: int
    seed: int = 0
    image_size: int = 112
    jpeg_quality: tuple[int, int] = (70, 95)
    occlusion_prob: float = 0.1
    yaw_deg: float = 18.0  # head pose before alignment, uniform in +-
    pitch_deg: float = 10.0
    roll_deg: float = 3.0  # residual in-plane rotation left by the aligner
    shift_px: float = 2.0  # residual alignment shift (template pixels), uniform in +-
    scale_jitter: float = 0.04  # residual alignment scale, uniform in +-
    expression: float = 1.0  # smile, open mouth, brow raise, squint
    light_strength: float = 0.5  # 0 flat, 1 hard side light
    color_cast: float = 0.06  # std of the log gain per channel
    brightness: float = 0.2  # std of the log global gain
    blur_prob: float = 0.3
    blur_max: float = 1.2  # Gaussian radius, output pixels
    noise_std: float = 6.0  # max per-image noise std, 0-255 units
    supersample: int = 2  # draw at this factor and box-downsample (antialiasing)

    def __post_init__(self) -> None:
        if self.num_identities < 1 or self.images_per_identity < 1:
            raise FacemaeError(
                f"synthetic data needs at least 1 identity and 1 image per identity, got "
                f"{self.num_identities}x{self.images_per_identity}"
            )
        lo, hi = self.jpeg_quality
        if not 1 <= lo <= hi <= 100:
            raise FacemaeError(f"jpeg_quality must be (lo, hi) with 1 <= lo <= hi <= 100: {lo, hi}")
        if self.image_size < 32 or self.supersample < 1:
            raise FacemaeError("image_size must be >= 32 and supersample >= 1")
        if not 0.0 <= self.occlusion_prob <= 1.0 or not 0.0 <= self.blur_prob <= 1.0:
            raise FacemaeError("occlusion_prob and blur_prob must lie in [0, 1]")

    @property
    def num_images(self) -> int:
        return self.num_identities * self.images_per_identity


def _rng(seed: int, *keys: int) -> np.random.Generator:
    # SeedSequence mixes the whole key, so (seed, identity, index) streams never overlap.
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed & (2**63 - 1), *keys])))


# --------------------------------------------------------------------------------------------
# Identity traits
# --------------------------------------------------------------------------------------------

_HAIR = np.array(
    [[25, 20, 18], [60, 40, 28], [105, 70, 42], [170, 130, 80], [215, 180, 120], [140, 60, 30],
     [150, 150, 150], [225, 225, 220]],
    dtype=np.float64,
)  # fmt: skip
_HAIR_P = np.array([0.3, 0.22, 0.15, 0.08, 0.08, 0.07, 0.06, 0.04])
_IRIS = np.array(
    [[70, 45, 25], [110, 75, 40], [60, 110, 170], [90, 130, 90], [120, 130, 140], [40, 30, 25]],
    dtype=np.float64,
)


@dataclass(frozen=True, eq=False)
class Identity:
    """Fixed traits of one synthetic person; lengths in template pixels, face frame (y down)."""

    face_w: float  # half width at the cheeks
    head_top: float  # crown height above the origin
    chin: float  # chin below the origin
    jaw_n: float  # superellipse exponent of the jaw: low = pointed, high = square
    jaw_taper: float
    eye_dx: float  # half distance between eye centres
    eye_y: float
    eye_w: float
    eye_h: float
    eye_tilt: float
    iris_r: float
    brow_gap: float
    brow_thick: float
    brow_arch: float
    brow_len: float
    brow_tilt: float
    nose_y: float
    nose_w: float
    nose_z: float
    mouth_y: float
    mouth_w: float
    lip_top: float
    lip_bot: float
    ear: float
    skin: np.ndarray
    hair: np.ndarray
    iris: np.ndarray
    lips: np.ndarray
    hair_style: int  # 0 short, 1 long, 2 bald, 3 buzz
    hair_volume: float
    hairline: float
    hair_part: float
    beard: int  # 0 none, 1 stubble, 2 moustache, 3 full
    marks: np.ndarray  # (k, 3): x, y, radius of moles
    freckles: np.ndarray  # (k, 2)
    blush: float


def _identity_shape(r: np.random.Generator) -> dict[str, float]:
    u = r.uniform
    return dict(
        face_w=u(1.95, 2.35), head_top=u(58.0, 72.0), chin=u(33.0, 45.0), jaw_n=u(1.6, 3.6),
        jaw_taper=u(0.0, 0.45), eye_dx=u(15.0, 20.5), eye_y=u(-23.0, -16.0), eye_w=u(5.8, 8.8),
        eye_h=u(2.4, 4.4), eye_tilt=u(-0.15, 0.15), iris_r=u(0.55, 0.85), brow_gap=u(5.5, 11.0),
        brow_thick=u(1.3, 4.0), brow_arch=u(-0.5, 3.5), brow_len=u(12.0, 20.0),
        brow_tilt=u(-3.5, 3.5), nose_y=u(-3.0, 5.0), nose_w=u(4.5, 9.0), nose_z=u(7.0, 16.0),
        mouth_y=u(16.0, 26.0), mouth_w=u(10.0, 17.5), lip_top=u(1.5, 4.5), lip_bot=u(2.0, 6.0),
        ear=u(6.0, 11.0),
    )  # fmt: skip


def _identity_colours(r: np.random.Generator) -> dict[str, np.ndarray]:
    tone = r.beta(1.6, 1.6)  # 0 light .. 1 dark; real skin keeps R > G > B at every tone
    red = 238.0 - 143.0 * tone
    skin = red * np.array(
        [1.0, 0.84 - 0.12 * tone + r.normal(0, 0.025), 0.75 - 0.2 * tone + r.normal(0, 0.03)]
    )
    hair = _HAIR[r.choice(len(_HAIR), p=_HAIR_P)] * np.exp(r.normal(0.0, 0.12, 3))
    iris = _IRIS[r.integers(len(_IRIS))] * np.exp(r.normal(0.0, 0.15, 3))
    lips = skin * np.array([0.86, 0.58, 0.6]) * r.uniform(0.8, 1.05) + np.array([18.0, 0, 0])
    return {
        k: np.clip(v, 0, 255) for k, v in dict(skin=skin, hair=hair, iris=iris, lips=lips).items()
    }


@functools.lru_cache(maxsize=8192)
def identity_traits(seed: int, identity: int) -> Identity:
    """The fixed traits of ``identity`` under ``seed`` (cached: cheap, but drawn once per image)."""
    r = _rng(seed, _STREAM_IDENTITY, identity)
    shape = _identity_shape(r)
    shape["face_w"] *= shape["eye_dx"]  # drawn as a ratio: faces are about 2.2 eye spacings wide
    colours = _identity_colours(r)
    n_marks = r.choice(4, p=[0.35, 0.3, 0.2, 0.15])
    marks = np.column_stack(
        [r.uniform(-30, 30, n_marks), r.uniform(-30, 35, n_marks), r.uniform(0.6, 1.6, n_marks)]
    )
    n_freckles = int(r.integers(15, 45)) if r.random() < 0.2 else 0
    freckles = np.column_stack([r.normal(0, 14, n_freckles), r.normal(-4, 6, n_freckles)]).reshape(
        -1, 2
    )
    return Identity(
        **shape,
        **colours,
        hair_style=int(r.choice(4, p=[0.45, 0.3, 0.1, 0.15])),
        hair_volume=r.uniform(0.04, 0.22),
        hairline=r.uniform(-58.0, -44.0),
        hair_part=r.uniform(-0.6, 0.6),
        beard=int(r.choice(4, p=[0.7, 0.1, 0.1, 0.1])),
        marks=marks,
        freckles=freckles,
        blush=r.uniform(0, 45),
    )


# --------------------------------------------------------------------------------------------
# Per-image nuisance
# --------------------------------------------------------------------------------------------


@dataclass
class Nuisance:
    """Everything that varies from one image of a person to the next."""

    yaw: float
    pitch: float
    roll: float
    scale: float
    shift: np.ndarray
    smile: float
    mouth_open: float
    brow_raise: float
    eye_open: float
    gaze: np.ndarray
    light: np.ndarray  # unit vector towards the light, image frame (x right, y down, z viewer)
    light_k: float
    gain: np.ndarray  # per-channel colour cast times global brightness
    contrast: float
    background: np.ndarray
    clutter: int
    blur: float
    noise: float
    quality: int
    occlusion: int  # 0 none, 1 glasses, 2 hand, 3 mask-like bar


def draw_nuisance(cfg: SynthConfig, r: np.random.Generator) -> Nuisance:
    """Draw one image's nuisance parameters from ``r``."""
    u = r.uniform
    rad = math.pi / 180.0
    az, lz = u(0.0, 2 * math.pi), u(0.25, 0.9)
    light = np.array([math.cos(az) * math.sqrt(1 - lz**2), math.sin(az) * math.sqrt(1 - lz**2), lz])
    gain = np.exp(r.normal(0.0, cfg.color_cast, 3) + r.normal(0.0, cfg.brightness))
    opened = u(0.0, 1.0) * cfg.expression if r.random() < 0.3 else 0.0
    blur = u(0.3, max(cfg.blur_max, 0.3)) if r.random() < cfg.blur_prob else 0.0
    occl = int(r.integers(1, 4)) if r.random() < cfg.occlusion_prob else 0
    return Nuisance(
        yaw=u(-1, 1) * cfg.yaw_deg * rad, pitch=u(-1, 1) * cfg.pitch_deg * rad,
        roll=u(-1, 1) * cfg.roll_deg * rad, scale=1.0 + u(-1, 1) * cfg.scale_jitter,
        shift=u(-1, 1, 2) * cfg.shift_px, smile=u(-0.3, 1.0) * cfg.expression,
        mouth_open=opened, brow_raise=u(-1, 1) * cfg.expression,
        eye_open=u(0.15, 0.5) if r.random() < 0.08 else u(0.75, 1.15), gaze=u(-1, 1, 2),
        light=light, light_k=u(0.0, cfg.light_strength), gain=gain, contrast=u(0.75, 1.15),
        background=u(0, 255, 3), clutter=int(r.integers(0, 4)), blur=blur,
        noise=u(0.0, cfg.noise_std), occlusion=occl,
        quality=int(r.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1)),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Geometry: 3-D face frame -> pose -> alignment to the template -> canvas
# --------------------------------------------------------------------------------------------


def _surface_z(ident: Identity, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Depth of the face surface (an ellipsoid cap), so features move with yaw and pitch."""
    inner = 1.0 - (x / (ident.face_w * 1.15)) ** 2 - (y / 70.0) ** 2
    return 26.0 * np.sqrt(np.clip(inner, 0.05, 1.0))


def _lift(ident: Identity, pts: np.ndarray, dz: float = 0.0) -> np.ndarray:
    """2-D face-frame points -> 3-D points on the face surface, plus ``dz`` towards the viewer."""
    return np.column_stack([pts, _surface_z(ident, pts[:, 0], pts[:, 1]) + dz])


def _rotation(yaw: float, pitch: float) -> np.ndarray:
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return ry @ rx


def _similarity(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity (Umeyama, no reflection) taking src onto dst: x -> A x + t."""
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    u, sig, vt = np.linalg.svd(d.T @ s / len(src))
    fix = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rot = u @ fix @ vt
    scale = (sig * np.diag(fix)).sum() / (s**2).sum(1).mean()
    a = scale * rot
    return a, md - a @ ms


def _mouth_corners(ident: Identity, smile: float) -> np.ndarray:
    w = ident.mouth_w * (1.0 + 0.12 * smile)
    y = ident.mouth_y - 2.5 * smile
    return np.array([[-w, y], [w, y]])


def _landmarks3d(ident: Identity, nz: Nuisance) -> np.ndarray:
    eyes = np.array([[-ident.eye_dx, ident.eye_y], [ident.eye_dx, ident.eye_y]])
    lm = np.vstack([eyes, [[0.0, ident.nose_y]], _mouth_corners(ident, nz.smile)])
    out = _lift(ident, lm)
    out[2, 2] += ident.nose_z
    return out


@dataclass
class Projection:
    """Face frame (3-D) -> canvas pixels: ``p @ lin.T + off``; also the aligned landmarks."""

    lin: np.ndarray  # (2, 3)
    off: np.ndarray  # (2,)
    landmarks: np.ndarray  # (5, 2) in output pixels
    px: float  # canvas pixels per template pixel

    def points(self, pts: np.ndarray) -> np.ndarray:
        return pts @ self.lin.T + self.off


def project(cfg: SynthConfig, ident: Identity, nz: Nuisance) -> Projection:
    """Pose the head, align its landmarks to the template, then add the aligner's residual error."""
    rot3 = _rotation(nz.yaw, nz.pitch)[:2]
    lm = _landmarks3d(ident, nz) @ rot3.T
    a, t = _similarity(lm, ARCFACE_TEMPLATE)
    c, s = math.cos(nz.roll) * nz.scale, math.sin(nz.roll) * nz.scale
    jit = np.array([[c, -s], [s, c]])
    centre = ARCFACE_TEMPLATE.mean(0)
    # aligned point q -> centre + jit (q - centre) + shift, all scaled to the canvas
    px = cfg.image_size * cfg.supersample / 112.0
    lin = px * (jit @ a @ rot3)
    off = px * (jit @ (t - centre) + centre + nz.shift)
    landmarks = (lm @ a.T + t - centre) @ jit.T + centre + nz.shift
    return Projection(lin, off, landmarks * cfg.image_size / 112.0, px)


# --------------------------------------------------------------------------------------------
# Drawing: shapes are built in the face frame, lifted onto the face surface and projected with one
# matrix product per image, then painted with ImageDraw on a supersampled canvas ("RGBA" mode
# blends translucent fills). Shapes that never change for a person are built once and cached.
# --------------------------------------------------------------------------------------------

Fill = tuple[int, int, int, int]
_CIRCLES = {
    k: np.column_stack([np.cos(t), np.sin(t)])
    for k in (8, 10, 12, 14)
    for t in [np.linspace(0.0, 2 * math.pi, k, endpoint=False)]
}


def _rgba(colour: np.ndarray, alpha: float = 255.0) -> Fill:
    r, g, b = (min(255, max(0, int(c))) for c in colour)
    return r, g, b, min(255, max(0, int(alpha)))


def _ellipse(cx: float, cy: float, rx: float, ry: float, k: int = 12) -> np.ndarray:
    return _CIRCLES[k] * (rx, ry) + (cx, cy)


def _band(x: np.ndarray, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """Closed polygon between two curves sampled at the same x."""
    return np.vstack([np.column_stack([x, top]), np.column_stack([x, bottom])[::-1]])


@dataclass(frozen=True)
class _Painted:
    pts: np.ndarray  # (n, 3) face-frame points of every shape, concatenated
    items: list[tuple[str, int, Fill, float]]  # kind, point count, fill, line width or dot radius


class _Layer:
    """Shapes in the face frame, painted in the order they were added."""

    def __init__(self) -> None:
        self._pts: list[np.ndarray] = []
        self._dz: list[np.ndarray] = []
        self.items: list[tuple[str, int, Fill, float]] = []

    def add(
        self,
        kind: str,
        pts: np.ndarray,
        fill: Fill,
        dz: float | np.ndarray = 0.0,
        size: float = 0.0,
    ) -> None:
        """kind: "poly", "line" (size = width) or "dots" (size = radius), in template pixels."""
        self._pts.append(pts)
        self._dz.append(np.full(len(pts), dz) if np.ndim(dz) == 0 else np.asarray(dz))
        self.items.append((kind, len(pts), fill, size))

    def lift(self, ident: Identity) -> _Painted:
        if not self._pts:
            return _Painted(np.zeros((0, 3)), [])
        pts = np.concatenate(self._pts)
        z = _surface_z(ident, pts[:, 0], pts[:, 1]) + np.concatenate(self._dz)
        return _Painted(np.column_stack([pts, z]), self.items)


def _paint(draw: ImageDraw.ImageDraw, p: Projection, layers: list[_Painted]) -> None:
    xy = p.points(np.concatenate([layer.pts for layer in layers]))
    at = 0
    for layer in layers:
        for kind, n, fill, size in layer.items:
            seg, at = xy[at : at + n], at + n
            if kind == "poly":
                draw.polygon(seg.ravel().tolist(), fill=fill)
            elif kind == "line":
                draw.line(seg.ravel().tolist(), fill=fill, width=max(1, round(size * p.px)))
            else:
                rr = size * p.px
                for cx, cy in seg.tolist():
                    draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=fill)


def _outline(ident: Identity, t: np.ndarray | None = None, grow: float = 0.0) -> np.ndarray:
    """Head silhouette in the face frame at angles ``t``: a round top and the identity's jaw."""
    if t is None:
        t = np.linspace(0.0, 2 * math.pi, 40, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    yc = -8.0
    bottom = s > 0
    n = np.where(bottom, ident.jaw_n, 2.3)
    x = ident.face_w * np.sign(c) * np.abs(c) ** (2.0 / n)
    x = x * np.where(bottom, 1.0 - ident.jaw_taper * s, 1.0)
    half_h = np.where(bottom, ident.chin - yc, ident.head_top + yc)
    y = yc + half_h * np.sign(s) * np.abs(s) ** (2.0 / n)
    g = np.where(bottom, 1.0, 1.0 + grow)
    return np.column_stack([x * g, yc + (y - yc) * g])


def _hairline(ident: Identity, side_y: float, k: int = 12) -> np.ndarray:
    x = np.linspace(ident.face_w * 0.99, -ident.face_w * 0.99, k)
    q = np.abs(x / ident.face_w) ** 3
    y = ident.hairline + (side_y - ident.hairline) * q + ident.hair_part * 6.0 * x / ident.face_w
    return np.column_stack([x, y])


def _mouth_curves(
    ident: Identity, smile: float, opened: float, k: int = 11
) -> tuple[np.ndarray, ...]:
    """x, lip line, upper-lip top, mouth gap, lower-lip bottom; the smile lifts the corners."""
    w, y_corner = _mouth_corners(ident, smile)[1]
    u = np.linspace(-1.0, 1.0, k)
    line = y_corner + (ident.mouth_y + 0.5 - y_corner) * (1.0 - u**2)
    bulge = (1.0 - u**2) ** 0.6
    gap = 7.0 * opened * np.sqrt(1.0 - u**2)
    upper = line - ident.lip_top * bulge * (1.0 - 0.3 * np.exp(-((u / 0.15) ** 2)))
    lower = line + gap + ident.lip_bot * bulge
    return u * w, line, upper, gap, lower


def _add_head(layer: _Layer, ident: Identity) -> None:
    """Neck, back hair, ears and the face itself."""
    skin, fw = ident.skin, ident.face_w
    neck = np.array([[-fw * 0.55, ident.chin - 20], [fw * 0.55, ident.chin - 20],
                     [fw * 0.6, ident.chin + 30], [-fw * 0.6, ident.chin + 30]])  # fmt: skip
    layer.add("poly", neck, _rgba(skin * 0.72), dz=-12.0)
    if ident.hair_style in (0, 1):
        back = _outline(ident, grow=ident.hair_volume)
        if ident.hair_style == 1:  # long: the back hair falls below the ears
            low = back[:, 1] > -8.0
            back[low, 1] = -8.0 + (back[low, 1] + 8.0) * 1.9
            back[low, 0] *= 1.0 + ident.hair_volume
        layer.add("poly", back, _rgba(ident.hair * 0.85), dz=-14.0)
    for sx in (-1.0, 1.0):
        ear = _ellipse(sx * fw * 0.97, ident.eye_y + 9.0, ident.ear * 0.45, ident.ear, 10)
        layer.add("poly", ear, _rgba(skin * 0.88), dz=-3.0)
    layer.add("poly", _outline(ident), _rgba(skin))


def _add_skin_marks(layer: _Layer, ident: Identity) -> None:
    """Blush, freckles and moles: fixed per identity, placed on the face surface."""
    for sx in (-1.0, 1.0):
        cheek = _ellipse(sx * (ident.eye_dx + 3.0), ident.nose_y + 3.0, 7.0, 5.0, 12)
        layer.add("poly", cheek, _rgba(np.array([215.0, 70.0, 75.0]), ident.blush))
    if len(ident.freckles):
        layer.add("dots", ident.freckles, _rgba(ident.skin * 0.68, 170.0), size=0.45)
    for x, y, rad in ident.marks:
        layer.add("dots", np.array([[x, y]]), _rgba(np.array([62.0, 40.0, 32.0]), 230.0), size=rad)


def _add_beard(layer: _Layer, ident: Identity) -> None:
    """Stubble or full beard over the lower face, and/or a moustache."""
    if ident.beard in (1, 3):
        lower = _outline(ident, np.linspace(0.0, math.pi, 21))
        lower = lower[lower[:, 1] > ident.nose_y + 3.0]
        # the top edge dips below the cheeks and rises to the upper lip, as a beard line does
        w, my = ident.mouth_w + 4.0, ident.mouth_y
        ny = ident.nose_y + 5.0
        edge = np.array([[-w, my - 5.0], [-w * 0.5, ny], [w * 0.5, ny], [w, my - 5.0]])
        alpha = 75.0 if ident.beard == 1 else 200.0
        layer.add("poly", np.vstack([lower, edge]), _rgba(ident.hair * 0.9, alpha), dz=0.5)
    if ident.beard >= 2:
        x, _, upper, _, _ = _mouth_curves(ident, 0.0, 0.0, 9)
        u = np.linspace(-1.0, 1.0, 9)
        bottom = upper - 0.3 + 3.0 * u**2
        top = np.maximum(ident.nose_y + 3.5, bottom - 4.5) - 1.0 * (1.0 - u**2)
        layer.add("poly", _band(x * 1.15, top, bottom), _rgba(ident.hair * 0.85, 235.0), dz=1.5)


def _add_nose(layer: _Layer, ident: Identity) -> None:
    nw, ny, nzz, skin = ident.nose_w, ident.nose_y, ident.nose_z, ident.skin
    base = np.array([[-nw, ny - 0.5], [-nw * 0.4, ny + 2.5], [nw * 0.4, ny + 2.5], [nw, ny - 0.5]])
    layer.add("line", base, _rgba(skin * 0.55), dz=0.5 * nzz, size=1.0)
    for sx in (-1.0, 1.0):
        nostril = _ellipse(sx * nw * 0.42, ny + 1.4, nw * 0.22, 1.0, 8)
        layer.add("poly", nostril, _rgba(skin * 0.33), dz=0.6 * nzz)
    tip = _ellipse(0.0, ny - 1.5, nw * 0.35, 2.0, 8)
    layer.add("poly", tip, _rgba(skin * 1.12 + 8.0, 110), dz=nzz)


def _add_top_hair(layer: _Layer, ident: Identity) -> None:
    """Hair over the forehead down to the identity's hairline (none when bald, thin when buzzed)."""
    if ident.hair_style == 2:
        return
    buzz = ident.hair_style == 3
    grow = 0.02 if buzz else ident.hair_volume
    side_y = -6.0
    arc = _outline(ident, np.linspace(math.pi, 2 * math.pi, 17), grow)
    wide = ident.face_w * (1.0 + grow)
    outer = np.vstack([[[-wide, side_y]], arc, [[wide, side_y]]])
    shape = np.vstack([outer, _hairline(ident, side_y)])
    layer.add("poly", shape, _rgba(ident.hair, 130 if buzz else 255), dz=1.0)


@functools.lru_cache(maxsize=2048)
def _identity_layers(seed: int, identity: int) -> tuple[_Painted, _Painted]:
    """The shapes that never change for a person: (behind the features, in front of them)."""
    ident = identity_traits(seed, identity)
    back, front = _Layer(), _Layer()
    _add_head(back, ident)
    _add_skin_marks(back, ident)
    _add_beard(back, ident)
    _add_nose(back, ident)
    _add_top_hair(front, ident)
    return back.lift(ident), front.lift(ident)


def _add_eye(layer: _Layer, ident: Identity, nz: Nuisance, sx: float) -> None:
    cx, cy = sx * ident.eye_dx, ident.eye_y
    w, h = ident.eye_w, ident.eye_h * nz.eye_open
    t = np.linspace(0.0, math.pi, 9)
    upper = np.column_stack([w * np.cos(t), -h * np.sin(t) ** 0.8])
    lower = np.column_stack([w * np.cos(t[::-1]), 0.7 * h * np.sin(t[::-1])])
    c, s = math.cos(sx * ident.eye_tilt), math.sin(sx * ident.eye_tilt)
    turn = np.array([[c, s], [-s, c]]).T  # outer corners tilt up by eye_tilt on both sides
    socket = _ellipse(cx, cy - 1.0, w * 1.45, ident.eye_h * 2.3)
    layer.add("poly", socket, _rgba(ident.skin * 0.7, 70), dz=-1.0)
    almond = np.vstack([upper, lower]) @ turn + (cx, cy)
    layer.add("poly", almond, _rgba(np.array([236.0, 232.0, 225.0])), dz=-2.0)
    ir = ident.iris_r * w * 0.55
    gx, gy = nz.gaze[0] * w * 0.3, nz.gaze[1] * h * 0.15
    for rad, colour in ((ir, ident.iris), (ir * 0.45, np.array([15.0, 12.0, 12.0]))):
        disk = _ellipse(gx, gy, rad, rad)
        lid = h * np.sqrt(np.clip(1.0 - (disk[:, 0] / w) ** 2, 0.0, 1.0))
        disk[:, 1] = np.clip(disk[:, 1], -lid, 0.7 * lid)  # the lids cover the iris
        layer.add("poly", disk @ turn + (cx, cy), _rgba(colour), dz=-1.5)
    layer.add("line", upper @ turn + (cx, cy), _rgba(ident.hair * 0.3 + 10.0), dz=-1.0, size=1.1)


def _add_brows(layer: _Layer, ident: Identity, nz: Nuisance) -> None:
    colour = _rgba(np.minimum(ident.hair * 0.8, ident.skin * 0.45 + 10.0), 235)
    u = np.linspace(0.0, 1.0, 8)
    for sx in (-1.0, 1.0):
        x = sx * (ident.eye_dx - ident.brow_len * 0.45 + ident.brow_len * u)
        y = (ident.eye_y - ident.eye_h - ident.brow_gap - ident.brow_arch * np.sin(math.pi * u)
             + ident.brow_tilt * (u - 0.5) - 2.5 * nz.brow_raise)  # fmt: skip
        half = ident.brow_thick * (1.0 - 0.5 * u) / 2.0
        layer.add("poly", _band(x, y - half, y + half), colour, dz=0.5)


def _add_nose_shade(layer: _Layer, ident: Identity, nz: Nuisance) -> None:
    """The flank of the nose away from the light is in shade."""
    nw, ny, side = ident.nose_w, ident.nose_y, (-1.0 if nz.light[0] > 0 else 1.0)
    top = ident.eye_y + 3.0
    flank = np.array([[side * 1.5, top], [side * nw * 0.45, top], [side * nw * 0.95, ny],
                      [side * nw * 0.5, ny + 1.5]])  # fmt: skip
    dz = np.array([0.35, 0.2, 0.3, 0.6]) * ident.nose_z
    layer.add("poly", flank, _rgba(ident.skin * 0.72, 100.0 + 100.0 * nz.light_k), dz=dz)


def _add_mouth(layer: _Layer, ident: Identity, nz: Nuisance) -> None:
    x, line, upper, gap, lower = _mouth_curves(ident, nz.smile, nz.mouth_open)
    layer.add("poly", _band(x, upper, line), _rgba(ident.lips * 0.9), dz=2.0)
    layer.add("poly", _band(x, line + gap, lower), _rgba(ident.lips), dz=2.0)
    if nz.mouth_open > 0.05:
        layer.add("poly", _band(x, line, line + gap), _rgba(np.array([70.0, 22.0, 28.0])), dz=2.0)
        teeth = _band(x * 0.75, line, line + np.minimum(gap * 0.4, 2.2))
        layer.add("poly", teeth, _rgba(np.array([230.0, 225.0, 212.0])), dz=2.0)
    layer.add("line", np.column_stack([x, line]), _rgba(ident.lips * 0.5), dz=2.0, size=0.8)


def _expression_layer(ident: Identity, nz: Nuisance) -> _Painted:
    layer = _Layer()
    _add_nose_shade(layer, ident, nz)
    for sx in (-1.0, 1.0):
        _add_eye(layer, ident, nz, sx)
    _add_brows(layer, ident, nz)
    _add_mouth(layer, ident, nz)
    return layer.lift(ident)


def _body_layer(ident: Identity, shirt: np.ndarray) -> _Painted:
    fw = ident.face_w
    body = np.array([[-fw * 2.2, 120], [-fw * 0.6, ident.chin + 8], [fw * 0.6, ident.chin + 8],
                     [fw * 2.2, 120]])  # fmt: skip
    layer = _Layer()
    layer.add("poly", body, _rgba(shirt), dz=-30.0)
    return layer.lift(ident)


def _draw_backdrop(
    draw: ImageDraw.ImageDraw, nz: Nuisance, r: np.random.Generator, size: int
) -> None:
    """Random clutter behind the head, so the background is nuisance rather than identity."""
    for _ in range(nz.clutter):
        x0, y0 = r.uniform(-0.3, 1.0, 2) * size
        w, h = r.uniform(0.2, 0.7, 2) * size
        fill = _rgba(r.uniform(0, 255, 3))
        if r.random() < 0.5:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=fill)
        else:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=fill)


# --------------------------------------------------------------------------------------------
# Occlusions, drawn in aligned image space from the landmarks (canvas pixels)
# --------------------------------------------------------------------------------------------


def _draw_glasses(
    draw: ImageDraw.ImageDraw, lm: np.ndarray, unit: float, r: np.random.Generator
) -> None:
    frame = _rgba(r.uniform(0, 90, 3))
    tint = _rgba(r.uniform(0, 60, 3), [0.0, 50.0, 215.0][int(r.integers(3))])
    rx, ry = r.uniform(8.5, 11.5) * unit, r.uniform(5.5, 8.5) * unit
    width = max(1, round(r.uniform(0.8, 1.8) * unit))
    for cx, cy in lm[:2]:
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=tint, outline=frame, width=width)
    (lx, ly), (rx_, ry_) = lm[0], lm[1]
    draw.line([lx + rx, ly, rx_ - rx, ry_], fill=frame, width=width)
    draw.line([lx - rx, ly, lx - rx - 14 * unit, ly - 2 * unit], fill=frame, width=width)
    draw.line([rx_ + rx, ry_, rx_ + rx + 14 * unit, ry_ - 2 * unit], fill=frame, width=width)


def _draw_hand(
    draw: ImageDraw.ImageDraw, lm: np.ndarray, unit: float, skin: np.ndarray, r: np.random.Generator
) -> None:
    """A palm and four fingers reaching up over the lower or side face."""
    target = lm[int(r.integers(2, 5))] + r.uniform(-8.0, 8.0, 2) * unit
    a = r.uniform(-0.9, 0.9)
    d, e = np.array([math.sin(a), -math.cos(a)]), np.array([math.cos(a), math.sin(a)])
    colour = _rgba(skin * r.uniform(0.85, 1.1))
    edge = _rgba(skin * 0.6)
    palm = target - d * 16.0 * unit
    pts = palm + _ellipse(0.0, 0.0, 15.0 * unit, 18.0 * unit, 14) @ np.column_stack([e, d]).T
    draw.polygon(pts.ravel().tolist(), fill=colour, outline=edge)
    for j in range(4):
        base = palm + d * 8.0 * unit + e * (j - 1.5) * 5.5 * unit
        tip = base + d * (r.uniform(15.0, 22.0) - abs(j - 1.5) * 3.0) * unit
        w = e * 2.5 * unit
        finger = np.array([base - w, tip - w, tip + w, base + w])
        draw.polygon(finger.ravel().tolist(), fill=colour, outline=edge)


def _draw_bar(
    draw: ImageDraw.ImageDraw, lm: np.ndarray, unit: float, r: np.random.Generator
) -> None:
    """Either a mask over nose-to-chin or a dark bar over the eyes."""
    if r.random() < 0.6:
        colour = [np.array([170.0, 200.0, 225.0]), np.array([240.0, 240.0, 240.0]),
                  np.array([35.0, 35.0, 40.0])][int(r.integers(3))]  # fmt: skip
        top = lm[2, 1] - r.uniform(0.0, 5.0) * unit
        xl, xr = lm[0, 0] - 16.0 * unit, lm[1, 0] + 16.0 * unit
        bottom = lm[3, 1] + 24.0 * unit
        shape = [xl, top, xr, top, xr - 6.0 * unit, bottom, xl + 6.0 * unit, bottom]
        draw.polygon(shape, fill=_rgba(colour * r.uniform(0.85, 1.05)))
    else:
        half = r.uniform(5.0, 9.0) * unit
        ey = lm[:2, 1].mean()
        draw.rectangle([lm[0, 0] - 15 * unit, ey - half, lm[1, 0] + 15 * unit, ey + half],
                       fill=_rgba(r.uniform(0, 40, 3)))  # fmt: skip


def _draw_occlusion(
    draw: ImageDraw.ImageDraw, cfg: SynthConfig, ident: Identity, nz: Nuisance, p: Projection,
    r: np.random.Generator,
) -> None:  # fmt: skip
    if nz.occlusion == 0:
        return
    lm = p.landmarks * cfg.supersample
    if nz.occlusion == 1:
        _draw_glasses(draw, lm, p.px, r)
    elif nz.occlusion == 2:
        _draw_hand(draw, lm, p.px, ident.skin, r)
    else:
        _draw_bar(draw, lm, p.px, r)


# --------------------------------------------------------------------------------------------
# Photometric nuisance on the output-size image
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
    return xx, yy


@functools.lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    # Drawing fresh Gaussian noise costs more than the rest of the photometry; a fixed bank read at
    # a per-image random offset is as good for a sensor-noise nuisance and stays deterministic.
    return np.random.Generator(np.random.PCG64(20220523)).standard_normal(1 << 20, dtype=np.float32)


def _shading(cfg: SynthConfig, ident: Identity, nz: Nuisance, p: Projection) -> np.ndarray:
    """Directional light on an ellipsoid head: bright on the lit side, dark on the far side."""
    xx, yy = _grid(cfg.image_size)
    cx, cy = (p.points(np.array([[0.0, -8.0, 0.0]]))[0] / cfg.supersample).tolist()
    unit = p.px / cfg.supersample
    u = (xx - cx) * (1.0 / (ident.face_w * 1.1 * unit))
    v = (yy - cy) * (1.0 / ((ident.head_top + ident.chin) * 0.55 * unit))
    r2 = u * u + v * v
    w = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
    lx, ly, lz = nz.light.tolist()
    ndotl = (u * lx + v * ly + w * lz) / np.sqrt(r2 + w * w + 1e-6)
    k = nz.light_k
    return (1.0 - k) + (1.4 * k) * np.clip(ndotl, 0.0, None)


def _photometric(
    cfg: SynthConfig,
    img: np.ndarray,
    ident: Identity,
    nz: Nuisance,
    p: Projection,
    r: np.random.Generator,
) -> np.ndarray:
    """Lighting, colour cast, contrast and sensor noise; returns uint8."""
    gain = (nz.gain * nz.contrast).astype(np.float32)
    arr = img * (_shading(cfg, ident, nz, p)[..., None] * gain)
    arr += 128.5 * (1.0 - nz.contrast)  # contrast pivots on mid-grey; +0.5 rounds
    bank = _noise_bank()
    start = int(r.integers(0, max(len(bank) - arr.size, 1)))
    if nz.noise > 0:
        if arr.size <= len(bank):
            noise = bank[start : start + arr.size].reshape(arr.shape)
        else:  # images too big for the bank
            noise = r.standard_normal(arr.shape, dtype=np.float32)
        arr += noise * np.float32(nz.noise)
    return np.clip(arr, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _render(cfg: SynthConfig, identity: int, index: int) -> tuple[np.ndarray, Nuisance, Projection]:
    ident = identity_traits(cfg.seed, identity)
    r = _rng(cfg.seed, _STREAM_IMAGE, identity, index)
    nz = draw_nuisance(cfg, r)
    p = project(cfg, ident, nz)
    size = cfg.image_size * cfg.supersample
    canvas = Image.new("RGB", (size, size), _rgba(nz.background)[:3])
    draw = ImageDraw.Draw(canvas, "RGBA")
    _draw_backdrop(draw, nz, r, size)
    back, front = _identity_layers(cfg.seed, identity)
    layers = [_body_layer(ident, r.uniform(0, 255, 3)), back, _expression_layer(ident, nz), front]
    _paint(draw, p, layers)
    _draw_occlusion(draw, cfg, ident, nz, p, r)
    img = canvas.reduce(cfg.supersample) if cfg.supersample > 1 else canvas
    if nz.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(nz.blur * cfg.image_size / 112.0))
    return _photometric(cfg, np.asarray(img), ident, nz, p, r), nz, p


def _check_item(cfg: SynthConfig, identity: int, index: int) -> None:
    if not (0 <= identity < cfg.num_identities and 0 <= index < cfg.images_per_identity):
        raise IndexError(
            f"synthetic face ({identity}, {index}) outside "
            f"{cfg.num_identities}x{cfg.images_per_identity}"
        )


def render_face(cfg: SynthConfig, identity: int, index: int) -> np.ndarray:
    """Image ``index`` of ``identity``: uint8 (H, W, 3) before JPEG, a function of (seed, identity,
    index) alone."""
    _check_item(cfg, identity, index)
    return _render(cfg, identity, index)[0]


def face_landmarks(cfg: SynthConfig, identity: int, index: int) -> np.ndarray:
    """The 5 landmarks (ArcFace order) of that image in output pixels, without rendering it."""
    _check_item(cfg, identity, index)
    ident = identity_traits(cfg.seed, identity)
    nz = draw_nuisance(cfg, _rng(cfg.seed, _STREAM_IMAGE, identity, index))
    return project(cfg, ident, nz).landmarks


def encode_face(cfg: SynthConfig, identity: int, index: int) -> bytes:
    """JPEG bytes of that image, at its own quality drawn from ``cfg.jpeg_quality``."""
    _check_item(cfg, identity, index)
    arr, nz, _ = _render(cfg, identity, index)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=nz.quality)
    return buf.getvalue()


def identity_name(identity: int, seed: int = 0) -> str:
    """Folder / label name of an identity, e.g. ``synth0_000123``.

    The seed is part of the name because it is part of the person: identity 123 of seed 0 and of
    seed 7 are different people, and a leakage audit over both sets matches faces by name.
    """
    return f"synth{seed}_{identity:06d}"


class SyntheticSource(Source):
    """Synthetic faces as a :class:`Source`: item ``i`` is image ``i % per`` of ``i // per``.

    Holds only the config, so it pickles small; every item is rendered on demand.
    """

    def __init__(self, cfg: SynthConfig) -> None:
        self.cfg = cfg
        self.description = f"synth:{cfg.num_identities}x{cfg.images_per_identity}:{cfg.seed}"

    @classmethod
    def from_spec(cls, spec: str, **overrides: object) -> SyntheticSource:
        """Parse ``"IDSxPER"`` or ``"IDSxPER:SEED"`` (e.g. ``"200x20:7"``).

        Keyword arguments override the other :class:`SynthConfig` fields.
        """
        m = _SPEC_RE.match(spec) if isinstance(spec, str) else None
        if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise FacemaeError(
                f"bad synthetic data spec {spec!r}: expected IDSxPER or IDSxPER:SEED with positive "
                f"counts, e.g. '200x20' or '200x20:7'"
            )
        known = {f.name for f in fields(SynthConfig)}
        if unknown := sorted(set(overrides) - known):
            raise FacemaeError(
                f"unknown synthetic data option(s) {unknown}; known: {sorted(known)}"
            )
        seed = int(m.group(3)) if m.group(3) is not None else 0
        cfg = SynthConfig(int(m.group(1)), int(m.group(2)), seed=seed, **overrides)  # type: ignore[arg-type]
        return cls(cfg)

    def __len__(self) -> int:
        return self.cfg.num_images

    @functools.cached_property
    def labels(self) -> np.ndarray:  # cached: the sharder reads it per shard (320 MB at 40M)
        labels = np.repeat(
            np.arange(self.cfg.num_identities, dtype=np.int64), self.cfg.images_per_identity
        )
        labels.flags.writeable = False
        return labels

    @functools.cached_property
    def identity_names(self) -> list[str]:  # cached: 2M names take ~0.8 s to build
        return [identity_name(i, self.cfg.seed) for i in range(self.cfg.num_identities)]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()  # spawned workers rebuild the caches instead of unpickling
        state.pop("labels", None)
        state.pop("identity_names", None)
        return state

    def read(self, index: int) -> SourceRecord:
        if not 0 <= index < len(self):
            raise IndexError(f"synthetic item {index} outside 0..{len(self) - 1}")
        identity, j = divmod(index, self.cfg.images_per_identity)
        return SourceRecord(
            data=encode_face(self.cfg, identity, j), position=f"synth:{identity}/{j}"
        )


def write_folder(cfg: SynthConfig, out_dir: str | Path, progress: bool = True) -> int:
    """Write ``out_dir/<identity name>/<index:04d>.jpg`` for every image; returns how many."""
    out = Path(out_dir)
    count = 0
    with ProgressBar("synth", total=cfg.num_images, unit="img", enabled=progress) as bar:
        for identity in range(cfg.num_identities):
            folder = out / identity_name(identity, cfg.seed)
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(cfg.images_per_identity):
                (folder / f"{j:04d}.jpg").write_bytes(encode_face(cfg, identity, j))
                count += 1
            bar.advance(cfg.images_per_identity)
    return count

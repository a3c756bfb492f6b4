"""Pictures and tables for people: image grids, report tables, privacy–utility plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in the model's [-1, 1] space → (B, H, W, 3) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_grid(rows: Sequence[torch.Tensor], path: str | Path, labels: Sequence[str] = ()) -> Path:
    """One row per tensor (same batch size), one column per face, a label left of each row."""
    arrays = [to_uint8(r) for r in rows]
    n, h, w = arrays[0].shape[:3]
    label_w, pad = (110 if labels else 0), 2
    canvas = Image.new("RGB", (label_w + n * (w + pad), len(arrays) * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, array in enumerate(arrays):
        y = r * (h + pad)
        if r < len(labels):
            draw.text((4, y + h // 2 - 6), labels[r], fill="black")
        for c in range(n):
            canvas.paste(Image.fromarray(array[c]), (label_w + c * (w + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path

"""Pixel conversions shared by the slide readers: any 8-bit image to RGB on white, and resampling."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

#: the value of pixels outside the image (RGB white)
WHITE = 255


def rgba_to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite non-premultiplied RGBA ``[h, w, 4]`` uint8 over white; returns ``[h, w, 3]`` uint8."""
    alpha = rgba[..., 3]
    if alpha.size == 0 or alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha[..., None].astype(np.float32) / 255.0
    out = rgba[..., :3].astype(np.float32) * a + WHITE * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_rgb(arr: np.ndarray) -> np.ndarray:
    """Any 8-bit grayscale / RGB / RGBA array ``[h, w(, c)]`` -> RGB uint8 ``[h, w, 3]``."""
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] in (1, 2):  # grayscale (+ alpha or a second channel): first channel as gray
        return np.repeat(arr[..., :1], 3, axis=2)
    if arr.shape[2] == 4:
        return rgba_to_rgb_on_white(arr)
    return np.ascontiguousarray(arr[..., :3])


def resize_rgb(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resample ``[h, w, 3]`` uint8 to ``[height, width, 3]`` (box filter when shrinking, bilinear otherwise)."""
    if rgb.shape[0] == height and rgb.shape[1] == width:
        return rgb
    shrinking = width < rgb.shape[1] or height < rgb.shape[0]
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(rgb).resize((width, height), resample=resample))


def positive_float(value: Any) -> float | None:
    """``value`` as a finite positive float, or None (unparsable, zero, negative, NaN, infinite)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None

"""Image files: discovery, a cheap integrity check, loading, resize + crop to a bucket, augmentations, tensors.

Images are handled as uint8 numpy arrays [H, W, C] (C = 3, or 4 when the alpha channel is kept) until the
final conversion to a float tensor [3, H, W] in [-1, 1].

Resizing uses Pillow only: `area` is Pillow's BOX filter (an area average when shrinking), `lanczos` LANCZOS,
`nearest` NEAREST, `bilinear`/`linear` BILINEAR, `bicubic`/`cubic` BICUBIC, `box` BOX. The default is `area`
when shrinking in both axes and `lanczos` otherwise.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, features

IMAGE_EXTENSIONS = [".png", ".jpg", ".jpeg", ".webp", ".bmp"]
if features.check("avif"):
    IMAGE_EXTENSIONS.append(".avif")

_PIL_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX,
}

Size = tuple[int, int]


class BadImageError(Exception):
    """An image file that cannot be used; the message says why."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(directory: Path) -> list[Path]:
    """Image files directly in `directory` (not recursive), sorted, any extension case."""
    return sorted(p for p in directory.iterdir() if p.is_file() and is_image_file(p))


def check_image_file(path: Path) -> Size:
    """Return (width, height) after a cheap check: the header parses and the file is not cut short.

    Truncation is detected from the end-of-file marker (PNG IEND, JPEG EOI) or the declared size (WebP), so
    no pixels are decoded here. Raises BadImageError.
    """
    try:
        size_on_disk = path.stat().st_size
        if size_on_disk == 0:
            raise BadImageError("empty file")
        with Image.open(path) as image:
            width, height = image.size
            image_format = image.format
    except BadImageError:
        raise
    except Exception as exc:  # Pillow raises many types for non-images
        raise BadImageError(f"not a readable image ({type(exc).__name__}: {exc})") from exc
    if width <= 0 or height <= 0:
        raise BadImageError(f"invalid size {width}x{height}")
    with open(path, "rb") as handle:
        head = handle.read(12)
        handle.seek(max(0, size_on_disk - 4096))
        tail = handle.read()
    if image_format == "PNG" and b"IEND" not in tail[-64:]:
        raise BadImageError("truncated PNG (no IEND chunk at the end)")
    if image_format == "JPEG" and b"\xff\xd9" not in tail:
        raise BadImageError("truncated JPEG (no end-of-image marker)")
    if image_format == "WEBP" and head[:4] == b"RIFF":
        declared = int.from_bytes(head[4:8], "little") + 8
        if declared > size_on_disk:
            raise BadImageError(f"truncated WebP ({size_on_disk} of {declared} bytes)")
    return width, height


def load_image(path: Path, keep_alpha: bool) -> np.ndarray:
    """Decode an image to uint8 [H, W, 3] (RGB) or [H, W, 4] (RGBA when `keep_alpha`). Raises BadImageError."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGBA" if keep_alpha else "RGB")
            return np.asarray(image, dtype=np.uint8).copy()
    except Exception as exc:
        raise BadImageError(f"cannot decode ({type(exc).__name__}: {exc})") from exc


def resize_and_crop(image: np.ndarray, resized: Size, bucket: Size, interpolation: str | None,
                    crop_rng: random.Random | None) -> np.ndarray:
    """Resize [H, W, C] to `resized` (W, H), then crop to `bucket`: centred, or at a random offset if crop_rng."""
    height, width = image.shape[:2]
    if (width, height) != tuple(resized):
        shrinking = resized[0] < width and resized[1] < height
        name = interpolation or ("area" if shrinking else "lanczos")
        mode = "RGBA" if image.shape[2] == 4 else "RGB"
        image = np.asarray(Image.fromarray(image, mode).resize(tuple(resized), _PIL_FILTERS[name]), dtype=np.uint8)
    height, width = image.shape[:2]
    excess_w, excess_h = width - bucket[0], height - bucket[1]
    if excess_w < 0 or excess_h < 0:
        raise ValueError(f"resized image {width}x{height} is smaller than its bucket {bucket[0]}x{bucket[1]}")
    left = crop_rng.randint(0, excess_w) if crop_rng is not None else excess_w // 2
    top = crop_rng.randint(0, excess_h) if crop_rng is not None else excess_h // 2
    return image[top: top + bucket[1], left: left + bucket[0]]


def apply_color_aug(rgb: np.ndarray, rng: random.Random) -> np.ndarray:
    """With probability 0.33: a hue shift of up to +-8/180 of the hue circle, or a gamma in [0.95, 1.05]."""
    if rng.random() >= 0.33:
        return rgb
    if rng.random() < 0.5:
        hsv = np.asarray(Image.fromarray(rgb, "RGB").convert("HSV"), dtype=np.int16)
        shift = int(round(rng.uniform(-8, 8) * 256 / 180))
        hsv[..., 0] = (hsv[..., 0] + shift) % 256
        return np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"), dtype=np.uint8)
    gamma = rng.uniform(0.95, 1.05)
    scaled = np.power(rgb.astype(np.float32) / 255.0, gamma) * 255.0
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def split_alpha(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[H, W, 4] or [H, W, 3] uint8 -> (rgb [H, W, 3] uint8, alpha mask [H, W] float32 in [0, 1])."""
    if image.shape[2] == 4:
        return image[..., :3], image[..., 3].astype(np.float32) / 255.0
    return image, np.ones(image.shape[:2], dtype=np.float32)


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1]."""
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)  # a fresh, writable copy
    chw *= 1.0 / 127.5
    chw -= 1.0
    return torch.from_numpy(chw)


def file_fingerprint(path: str | os.PathLike) -> dict[str, int]:
    """Size and modification time of a file, for cache provenance."""
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

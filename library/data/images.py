"""Image files: discovery, a cheap integrity check, loading, resize + crop to a bucket, augmentations, tensors.

Images are handled as uint8 numpy arrays [H, W, C] (C = 3, or 4 when the alpha channel is kept) until the
final conversion to a float tensor [3, H, W] in [-1, 1].

Geometry is planned first (`CropPlan`: resize to a size, then cut a window) and then applied, so an image and
its conditioning (mask) image get exactly the same resize, crop and flip.

JPEG XL (`.jxl`) is read when the optional Pillow plugin `pillow-jxl-plugin` is installed; otherwise `.jxl` files
are skipped with a warning.

Resizing uses Pillow only: `area` is Pillow's BOX filter (an area average when shrinking), `lanczos` LANCZOS,
`nearest` NEAREST, `bilinear`/`linear` BILINEAR, `bicubic`/`cubic` BICUBIC, `box` BOX. The default is `area`
when shrinking in both axes and `lanczos` otherwise.
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, features

try:
    import pillow_jxl  # noqa: F401  (registers the JPEG XL format with Pillow)

    JXL_SUPPORTED = True
except ImportError:
    JXL_SUPPORTED = False

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = [".png", ".jpg", ".jpeg", ".webp", ".bmp"]
if features.check("avif"):
    IMAGE_EXTENSIONS.append(".avif")
if JXL_SUPPORTED:
    IMAGE_EXTENSIONS.append(".jxl")

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
    """Image files directly in `directory` (not recursive), sorted, any extension case.

    `.jxl` files are skipped with one warning when the JPEG XL plugin is not installed.
    """
    files = [p for p in directory.iterdir() if p.is_file()]
    if ".jxl" not in IMAGE_EXTENSIONS:
        skipped = [p for p in files if p.suffix.lower() == ".jxl"]
        if skipped:
            logger.warning("%d .jxl image(s) in %s are skipped: reading JPEG XL needs the Pillow plugin "
                           "(pip install pillow-jxl-plugin)", len(skipped), directory)
    return sorted(p for p in files if is_image_file(p))


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


@dataclass(frozen=True)
class CropPlan:
    """Resize the whole image to `resized` (W, H), then keep the window at (left, top) of size `size` (W, H)."""

    resized: Size
    left: int
    top: int
    size: Size


@dataclass(frozen=True)
class FaceBox:
    """Face centre and size in original-image pixels, from a file name `name_cx_cy_w_h`."""

    cx: int
    cy: int
    width: int
    height: int


def face_box_from_stem(stem: str) -> FaceBox | None:
    """The face box in a stem whose last four `_` parts are integers cx, cy, w, h (w, h > 0), else None."""
    parts = stem.split("_")
    if len(parts) < 5:
        return None
    try:
        cx, cy, width, height = (int(p) for p in parts[-4:])
    except ValueError:
        return None
    if width <= 0 or height <= 0:
        return None
    return FaceBox(cx, cy, width, height)


def plan_bucket_crop(resized: Size, bucket: Size, crop_rng: random.Random | None) -> CropPlan:
    """Cover-resize to `resized`, then crop to `bucket`: centred, or at a uniform random offset with crop_rng."""
    excess_w, excess_h = resized[0] - bucket[0], resized[1] - bucket[1]
    if excess_w < 0 or excess_h < 0:
        raise ValueError(f"resized image {resized[0]}x{resized[1]} is smaller than its bucket {bucket[0]}x{bucket[1]}")
    left = crop_rng.randint(0, excess_w) if crop_rng is not None else excess_w // 2
    top = crop_rng.randint(0, excess_h) if crop_rng is not None else excess_h // 2
    return CropPlan(tuple(resized), left, top, tuple(bucket))


def plan_face_crop(image_size: Size, target: Size, face: FaceBox, face_range: tuple[float, float],
                   random_crop: bool, rng: random.Random) -> CropPlan:
    """A `target`-sized window centred on the face, after scaling so the face's larger side is about
    min(target) / r for a random r in `face_range`.

    The scale never goes below what covers the target, and never above 1 unless covering needs it. The window
    is jittered: with `random_crop` by a triangular offset up to the face's distance from the far edge (so
    background is seen too); otherwise, when the range is not a single value and the face is at least 40 px,
    by up to 1/20 of the face size.
    """
    width, height = image_size
    face_size = max(face.width, face.height)
    short_side = min(target)
    cover = max(target[0] / width, target[1] / height)
    ceiling = max(1.0, cover)
    smallest = min(ceiling, max(cover, short_side / (face_size * face_range[1])))
    largest = min(ceiling, max(smallest, short_side / (face_size * face_range[0])))
    scale = rng.uniform(smallest, largest) if largest > smallest else smallest
    resized = (max(target[0], int(width * scale + 0.5)), max(target[1], int(height * scale + 0.5)))
    face_px = face_size * scale
    offsets = []
    for length, window, centre in ((resized[0], target[0], face.cx * scale), (resized[1], target[1], face.cy * scale)):
        centre = int(centre + 0.5)
        start = centre - window // 2
        if random_crop:
            spread = max(length - centre, centre, 0)
            start += rng.randint(0, spread) + rng.randint(0, spread) - spread
        elif face_range[0] != face_range[1] and face_px >= 40 and face_px > short_side / 10:
            jitter = int(face_px) // 20
            start += rng.randint(-jitter, jitter)
        offsets.append(max(0, min(start, length - window)))
    return CropPlan(resized, offsets[0], offsets[1], tuple(target))


def apply_crop_plan(image: np.ndarray, plan: CropPlan, interpolation: str | None) -> np.ndarray:
    """Resize [H, W, C] to plan.resized (any input size; a mask image may differ from its image), then crop."""
    height, width = image.shape[:2]
    if (width, height) != tuple(plan.resized):
        shrinking = plan.resized[0] < width and plan.resized[1] < height
        name = interpolation or ("area" if shrinking else "lanczos")
        mode = "RGBA" if image.shape[2] == 4 else "RGB"
        image = np.asarray(Image.fromarray(image, mode).resize(tuple(plan.resized), _PIL_FILTERS[name]),
                           dtype=np.uint8)
    out = image[plan.top: plan.top + plan.size[1], plan.left: plan.left + plan.size[0]]
    if out.shape[:2] != (plan.size[1], plan.size[0]):
        raise ValueError(f"crop {plan} does not fit the resized image {image.shape[1]}x{image.shape[0]}")
    return out


def same_aspect(size_a: Size, size_b: Size, tolerance: float = 0.01) -> bool:
    """Whether two (W, H) sizes have the same aspect ratio within a relative tolerance."""
    return math.isclose(size_a[0] / size_a[1], size_b[0] / size_b[1], rel_tol=tolerance)


def load_image_and_mask(path: Path, plan: CropPlan, interpolation: str | None, *, alpha_mask: bool,
                        conditioning_path: Path | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The sample's pixels and loss mask, both through the same `plan`.

    Returns (rgb uint8 [H, W, 3], mask float32 [H, W] in [0, 1] or None). The mask is the alpha channel when
    `alpha_mask`, or the red channel of the conditioning image (0 -> 0, 255 -> 1). Raises BadImageError.
    """
    pixels = apply_crop_plan(load_image(path, keep_alpha=alpha_mask), plan, interpolation)
    rgb, alpha = split_alpha(pixels)
    mask = alpha if alpha_mask else None
    if conditioning_path is not None:
        try:
            conditioning = apply_crop_plan(load_image(conditioning_path, keep_alpha=False), plan, interpolation)
        except BadImageError as exc:
            raise BadImageError(f"conditioning image {conditioning_path}: {exc}") from exc
        mask = conditioning_image_to_mask(to_tensor(conditioning)[None])[0, 0].numpy()
    return rgb, mask


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


def conditioning_image_to_mask(conditioning_images: torch.Tensor) -> torch.Tensor:
    """`--masked_loss` with conditioning images: the R channel of [B, 3, H, W] in [−1, 1] → mask [B, 1, H, W] in [0, 1]."""
    return conditioning_images[:, :1].float() / 2 + 0.5

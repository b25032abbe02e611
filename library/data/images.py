"""Image files: discovery, a cheap integrity check, loading, resize + crop to a bucket, augmentations, tensors.

Images are handled as uint8 numpy arrays [H, W, C] (C = 3, or 4 when the alpha channel is kept) until the
final conversion to a float tensor [3, H, W] in [-1, 1].

Geometry is planned first (`CropPlan`: resize to a size, then cut a window) and then applied, so an image and
its conditioning (mask) image get exactly the same resize, crop and flip.

JPEG XL (`.jxl`) is read when the optional Pillow plugin `pillow-jxl-plugin` is installed; otherwise `.jxl` files
are skipped with a warning.

Decoding applies the EXIF orientation (the picture as a viewer shows it) and brings high-bit-depth images to
8 bits per channel: 16-bit RGB(A) and grey+alpha through Pillow (the top 8 bits), 16-/32-bit grey (Pillow modes
`I;16*`, `I`) by the same top-8-bit rule on 0..65535, floating-point grey (`F`) as 0..1.

Resizing follows sd-scripts' `resize_image`: `lanczos` and `box` use Pillow (LANCZOS, BOX); `area`, `bilinear`/
`linear`, `bicubic`/`cubic` and `nearest` use OpenCV (INTER_AREA, INTER_LINEAR, INTER_CUBIC, INTER_NEAREST_EXACT).
Without a choice, `area` is used when neither side grows and `lanczos` otherwise.
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import cv2
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

# Which library resizes with which filter, exactly as sd-scripts does (its `resize_image`).
_PIL_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}
_CV2_FILTERS = {
    "nearest": cv2.INTER_NEAREST_EXACT,
    "bilinear": cv2.INTER_LINEAR,
    "linear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "cubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
}

# Recorded in the latent-cache provenance: a change to decoding or resizing re-encodes older cache entries.
PIXEL_PIPELINE = "exif+8bit+sd-scripts-resize+over-255-normalize"

# EXIF orientation -> the transpose that shows the picture upright (the EXIF standard's table); 5-8 turn it by
# 90 degrees, so width and height swap.
_EXIF_ORIENTATION_TAG = 0x0112
_UPRIGHT_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIDEWAYS_ORIENTATIONS = (5, 6, 7, 8)
# Pillow modes whose values are not 0..255 and that Image.convert("RGB") would clip (mostly to white).
_SIXTEEN_BIT_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

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


@dataclass(frozen=True)
class ImageHeader:
    """What the file header says: the stored pixel size and the EXIF orientation (1 = upright)."""

    stored_size: Size  # (W, H) of the pixels as stored in the file
    orientation: int = 1

    @property
    def size(self) -> Size:
        """(W, H) of the picture as shown, after the EXIF orientation; the size every later step uses."""
        return oriented_size(self.stored_size, self.orientation)


def oriented_size(stored_size: Size, orientation: int) -> Size:
    """The (W, H) of a stored (W, H) after EXIF `orientation` (5-8 swap the sides)."""
    width, height = stored_size
    return (height, width) if orientation in _SIDEWAYS_ORIENTATIONS else (width, height)


def check_image_file(path: Path) -> Size:
    """(width, height) as shown (EXIF orientation applied), after the cheap check of `read_image_header`."""
    return read_image_header(path).size


def read_image_header(path: Path) -> ImageHeader:
    """The header after a cheap check: it parses and the file is not cut short.

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
            orientation = _exif_orientation(image)
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
    return ImageHeader((width, height), orientation)


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1..8), 1 when absent or invalid. Reads only the header.

    For PNG only an eXIf chunk before the pixel data counts (where the PNG extension puts it): Pillow's
    getexif() would decode the whole image to look for one after it (22 ms instead of 0.04 ms for a 768 px
    PNG header). The header check and the decoder use this same function, so sizes and pixels always agree.
    """
    try:
        if image.format == "PNG":
            raw = image.info.get("exif")
            if raw is None:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = image.getexif()
        value = int(exif.get(_EXIF_ORIENTATION_TAG, 1))
    except (TypeError, ValueError, SyntaxError, OSError, KeyError):  # a damaged EXIF block: treat it as upright
        return 1
    return value if 1 <= value <= 8 else 1


def load_image(path: Path, keep_alpha: bool) -> np.ndarray:
    """Decode an image to uint8 [H, W, 3] (RGB) or [H, W, 4] (RGBA when `keep_alpha`), upright as shown (EXIF
    orientation applied) and with high-bit-depth values scaled to 8 bits. Raises BadImageError."""
    try:
        with Image.open(path) as image:
            orientation = _exif_orientation(image)
            upright = image.transpose(_UPRIGHT_TRANSPOSE[orientation]) if orientation != 1 else image
            converted = to_8bit(upright).convert("RGBA" if keep_alpha else "RGB")
            return np.asarray(converted, dtype=np.uint8).copy()
    except Exception as exc:
        raise BadImageError(f"cannot decode ({type(exc).__name__}: {exc})") from exc


def to_8bit(image: Image.Image) -> Image.Image:
    """An image whose mode Pillow converts to RGB(A) without clipping: 16-/32-bit grey (0..65535) and float grey
    (0..1) become 8-bit grey `L`; every other mode is returned unchanged (Pillow scales 16-bit RGB(A) itself)."""
    if image.mode in _SIXTEEN_BIT_GREY_MODES:
        values = np.asarray(image).astype(np.int64)  # [H, W]
        return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L")
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        return Image.fromarray(np.clip(np.floor(values * 255.0 + 0.5), 0, 255).astype(np.uint8), "L")
    return image


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


def plan_bucket_crop(resized: Size, bucket: Size, crop_rng: random.Random | None, *,
                     height_first: bool = False) -> CropPlan:
    """Cover-resize to `resized`, then crop to `bucket`: centred, or at a uniform random offset with crop_rng.

    As in sd-scripts, a random offset is drawn only along a side with slack, the width's first (the height's first
    with `height_first`, sd-scripts' order for crops of unscaled images without bucketing)."""
    excess_w, excess_h = resized[0] - bucket[0], resized[1] - bucket[1]
    if excess_w < 0 or excess_h < 0:
        raise ValueError(f"resized image {resized[0]}x{resized[1]} is smaller than its bucket {bucket[0]}x{bucket[1]}")
    if crop_rng is None:
        return CropPlan(tuple(resized), excess_w // 2, excess_h // 2, tuple(bucket))
    offsets = {}
    for axis in ("h", "w") if height_first else ("w", "h"):
        excess = excess_h if axis == "h" else excess_w
        offsets[axis] = crop_rng.randint(0, excess) if excess > 0 else 0
    return CropPlan(tuple(resized), offsets["w"], offsets["h"], tuple(bucket))


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


def resize_pixels(image: np.ndarray, size: Size, interpolation: str | None) -> np.ndarray:
    """uint8 [H, W, C] (C = 3 or 4) -> uint8 [size[1], size[0], C], the way sd-scripts resizes.

    `interpolation` None: `area` when neither side grows, else `lanczos`.
    """
    height, width = image.shape[:2]
    if (width, height) == tuple(size):
        return image
    name = interpolation or ("area" if size[0] <= width and size[1] <= height else "lanczos")
    if name in _PIL_FILTERS:
        mode = "RGBA" if image.shape[2] == 4 else "RGB"
        return np.asarray(Image.fromarray(image, mode).resize(tuple(size), _PIL_FILTERS[name]), dtype=np.uint8)
    resized = cv2.resize(np.ascontiguousarray(image), tuple(size), interpolation=_CV2_FILTERS[name])
    return resized.reshape(size[1], size[0], image.shape[2])  # cv2 drops a channel axis of length 1


def apply_crop_plan(image: np.ndarray, plan: CropPlan, interpolation: str | None) -> np.ndarray:
    """Resize [H, W, C] to plan.resized (any input size; a mask image may differ from its image), then crop."""
    image = resize_pixels(image, plan.resized, interpolation)
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


COLOR_AUG_PROBABILITY = 0.33
HUE_SHIFT_LIMIT = 8.0  # OpenCV hue units: the circle is 0..180
GAMMA_RANGE = (0.95, 1.05)


def apply_color_aug(rgb: np.ndarray, rng: random.Random) -> np.ndarray:
    """sd-scripts' colour augmentation. With probability 0.33, one of (even odds):

    * a hue shift, uniform in +-8 OpenCV hue units (of 180), on the uint8 HSV image (the new hue truncated);
    * a gamma in [0.95, 1.05] applied to the raw 0..255 values (v ** gamma, clipped, truncated), so it also
      brightens or darkens mid-tones by up to about a quarter (128 ** 1.05 = 163, 128 ** 0.95 = 100).
    """
    if rng.random() > COLOR_AUG_PROBABILITY:
        return rgb
    if rng.random() > 0.5:
        # Converted as if the RGB array were BGR, as sd-scripts does: that only turns the (symmetric) shift the
        # other way round the hue circle, and keeps the pixels identical to sd-scripts' for the same draws.
        hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_BGR2HSV)  # uint8, hue in 0..179
        shift = rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT)
        if shift < 0:  # the same float operations as sd-scripts, so the truncated hues match to the bit
            shift += 180.0
        hsv[..., 0] = ((hsv[..., 0] + shift) % 180.0).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    gamma = rng.uniform(*GAMMA_RANGE)
    return np.clip(rgb.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)


def split_alpha(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[H, W, 4] or [H, W, 3] uint8 -> (rgb [H, W, 3] uint8, alpha mask [H, W] float32 in [0, 1])."""
    if image.shape[2] == 4:
        return image[..., :3], image[..., 3].astype(np.float32) / 255.0
    return image, np.ones(image.shape[:2], dtype=np.float32)


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1] as (v / 255 - 0.5) / 0.5, each step rounded to float32:
    sd-scripts' ToTensor + Normalize([0.5], [0.5]). (v * (1 / 127.5) - 1 rounds 111 of the 256 values otherwise.)"""
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)  # a fresh, writable copy
    chw /= np.float32(255)
    chw -= np.float32(0.5)
    chw /= np.float32(0.5)
    return torch.from_numpy(chw)


def file_fingerprint(path: str | os.PathLike) -> dict[str, int]:
    """Size and modification time of a file, for cache provenance."""
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def conditioning_image_to_mask(conditioning_images: torch.Tensor) -> torch.Tensor:
    """`--masked_loss` with conditioning images: the R channel of [B, 3, H, W] in [−1, 1] → mask [B, 1, H, W] in [0, 1]."""
    return conditioning_images[:, :1].float() / 2 + 0.5

"""Aspect-ratio bucketing: the bucket list for a resolution, and which bucket (and resize) each image gets.

Sizes are (width, height) tuples everywhere in this module.

Two modes, as in sd-scripts:
* upscale mode (default): a fixed list of buckets whose area is at most the resolution's area; every image is
  scaled to cover the bucket with the closest aspect ratio (small images are enlarged) and the excess is cropped;
* no-upscale mode: the bucket is made per image. Images larger than the area budget are shrunk to it; smaller
  ones keep their size. The bucket is the resized size floored to a multiple of the step.

One deliberate difference: in no-upscale mode an image side shorter than one step would give a zero-size bucket
upstream. Here such a side gets a bucket of one step and the image is enlarged just enough to cover it.
"""

from __future__ import annotations

import logging
import math

from library.errors import AnimaError

logger = logging.getLogger(__name__)

Size = tuple[int, int]


def make_bucket_resolutions(resolution: Size, min_size: int, max_size: int, step: int) -> list[Size]:
    """All buckets for `resolution` (W, H): the square plus every (w, h) pair within [min_size, max_size].

    Each bucket's area is at most W*H; sides are multiples of `step`. Sorted, without duplicates.
    """
    area = resolution[0] * resolution[1]
    square = int(math.sqrt(area) // step) * step
    buckets = {(square, square)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((area // width) // step) * step)
        if height >= min_size:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def round_to_steps(value: float, step: int) -> int:
    """Round half up to an integer, then floor to a multiple of `step`."""
    return int((int(value + 0.5) // step) * step)


def prepare_bucket_range(resolution: Size, min_size: int, max_size: int, step: int, where: str) -> tuple[int, int]:
    """Round min down and max up to multiples of `step` (with a warning) and check they bracket `resolution`.

    `where` names the dataset in error messages.
    """
    if step <= 0:
        raise AnimaError(f"{where}: bucket_reso_steps must be positive, got {step}")
    if min_size % step != 0:
        rounded = min_size - min_size % step
        logger.warning("%s: min_bucket_reso %d rounded down to %d (a multiple of bucket_reso_steps %d)",
                       where, min_size, rounded, step)
        min_size = rounded
    if max_size % step != 0:
        rounded = max_size + step - max_size % step
        logger.warning("%s: max_bucket_reso %d rounded up to %d (a multiple of bucket_reso_steps %d)",
                       where, max_size, rounded, step)
        max_size = rounded
    if min_size < step:
        raise AnimaError(f"{where}: min_bucket_reso ({min_size}) must be at least bucket_reso_steps ({step})")
    if min(resolution) < min_size:
        raise AnimaError(f"{where}: min_bucket_reso ({min_size}) is larger than the smaller resolution side "
                         f"({min(resolution)}); lower min_bucket_reso")
    if max(resolution) > max_size:
        raise AnimaError(f"{where}: max_bucket_reso ({max_size}) is smaller than the larger resolution side "
                         f"({max(resolution)}); raise max_bucket_reso")
    return min_size, max_size


class BucketManager:
    """Chooses a bucket and a resize size for each image size.

    With `bucket_list` the predefined (upscale) mode is used; with `no_upscale=True` buckets are made per image.
    Without bucketing, build it with `fixed_resolution`: every image goes to that single bucket (cover-resized
    and cropped, identically for the live loader and the latent cache).
    """

    def __init__(self, resolution: Size, step: int | None, *, no_upscale: bool = False,
                 min_size: int | None = None, max_size: int | None = None, fixed: bool = False) -> None:
        self.resolution = resolution
        self.step = step
        self.no_upscale = no_upscale and not fixed
        self.fixed = fixed
        self.area = resolution[0] * resolution[1]
        if fixed:
            self.predefined: list[Size] = [resolution]
        elif no_upscale:
            self.predefined = []
        else:
            assert step is not None and min_size is not None and max_size is not None
            self.predefined = make_bucket_resolutions(resolution, min_size, max_size, step)
        self._predefined_set = set(self.predefined)
        self._predefined_ratios = [w / h for w, h in self.predefined]

    def select_bucket(self, width: int, height: int) -> tuple[Size, Size, float]:
        """Return (bucket size, resized image size, |bucket aspect - image aspect|) for an image of this size."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        aspect = width / height
        if self.no_upscale:
            bucket, resized = self._select_no_upscale(width, height, aspect)
        else:
            bucket = self._closest_predefined(width, height, aspect)
            resized = cover_size((width, height), bucket)
        return bucket, resized, abs(bucket[0] / bucket[1] - aspect)

    def _closest_predefined(self, width: int, height: int, aspect: float) -> Size:
        if (width, height) in self._predefined_set:
            return (width, height)
        errors = [abs(ratio - aspect) for ratio in self._predefined_ratios]
        return self.predefined[errors.index(min(errors))]  # first on ties, in sorted order

    def _select_no_upscale(self, width: int, height: int, aspect: float) -> tuple[Size, Size]:
        step = self.step
        assert step is not None
        if width * height > self.area:
            # Shrink to about the area budget, choosing whichever rounded side keeps the aspect ratio best.
            ideal_w = math.sqrt(self.area * aspect)
            ideal_h = self.area / ideal_w
            # Each candidate's aspect error is judged with both sides rounded to steps.
            by_width = round_to_steps(ideal_w, step)
            by_height = round_to_steps(ideal_h, step)
            height_for_w = round_to_steps(by_width / aspect, step)
            width_for_h = round_to_steps(by_height * aspect, step)
            error_w = abs(by_width / height_for_w - aspect) if by_width > 0 and height_for_w > 0 else math.inf
            error_h = abs(width_for_h / by_height - aspect) if by_height > 0 and width_for_h > 0 else math.inf
            if error_w < error_h:
                resized = (by_width, int(by_width / aspect + 0.5))
            elif by_height > 0:
                resized = (int(by_height * aspect + 0.5), by_height)
            else:  # extreme aspect ratios: keep the area budget without rounding to steps
                resized = (max(1, int(ideal_w + 0.5)), max(1, int(ideal_h + 0.5)))
        else:
            resized = (width, height)
        bucket = (max(step, resized[0] - resized[0] % step), max(step, resized[1] - resized[1] % step))
        if bucket[0] > resized[0] or bucket[1] > resized[1]:
            # A side shorter than one step: enlarge just enough to cover the one-step bucket.
            resized = cover_size(resized, bucket)
        return bucket, resized


def cover_size(image_size: Size, bucket: Size) -> Size:
    """The size that scales `image_size` to cover `bucket` (one side equal, the other at least as large)."""
    width, height = image_size
    bucket_w, bucket_h = bucket
    if width / height > bucket_w / bucket_h:  # wider than the bucket: match heights
        scale = bucket_h / height
    else:
        scale = bucket_w / width
    resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    # Guard against rounding just below the bucket on the matched side.
    return (max(resized[0], bucket_w), max(resized[1], bucket_h))

"""Resize cost and difference: the trainer's resize (sd-scripts' filters) against Pillow's box filter, which the
trainer used for `area` before.

    python bench/bench_resize.py [--repeats 50]

For a few typical downscales (bucket cover sizes of photos) it reports the CPU time per resize (process time, so
other processes on the machine matter less) of `library.data.images.resize_pixels` with the default filter and
of Pillow BOX, and the mean / largest difference between the two in grey levels. Numbers only; nothing is
asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.data.images import resize_pixels  # noqa: E402

CASES = [((1920, 1080), (1365, 768)), ((1000, 750), (683, 512)), ((1537, 911), (864, 512)),
         ((999, 1333), (768, 1025))]


def photo_like(width: int, height: int, seed: int) -> np.ndarray:
    """Gradients, mild noise and one sharp bright edge: enough structure for filters to differ."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = (xs * 255.0 / (width - 1) + ys * 128.0 / (height - 1))[..., None] + rng.normal(0, 8, (height, width, 3))
    pixels[:, width // 3: width // 3 + 3] = 255.0
    return np.clip(pixels, 0, 255).astype(np.uint8)


def cpu_ms(function, repeats: int) -> float:
    start = time.process_time()
    for _ in range(repeats):
        function()
    return (time.process_time() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    print(f"{'image -> resized':<24} {'ours ms':>8} {'box ms':>8} {'mean diff':>10} {'max diff':>9}")
    for (width, height), size in CASES:
        pixels = photo_like(width, height, width)
        ours = resize_pixels(pixels, size, None)
        box = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))
        difference = np.abs(ours.astype(int) - box.astype(int))
        ours_ms = cpu_ms(lambda p=pixels, s=size: resize_pixels(p, s, None), args.repeats)
        box_ms = cpu_ms(lambda p=pixels, s=size: Image.fromarray(p).resize(s, Image.Resampling.BOX), args.repeats)
        label = f"{width}x{height} -> {size[0]}x{size[1]}"
        print(f"{label:<24} {ours_ms:8.2f} {box_ms:8.2f} {difference.mean():10.2f} {difference.max():9d}")


if __name__ == "__main__":
    main()

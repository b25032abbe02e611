"""Dataset pipeline speed on CPU: bucketing (+ header checks), batch loading, and latent caching.

    python bench/bench_dataset.py [--images 200] [--size 768] [--no_real_vae] [--masked_loss]

Creates synthetic JPEG/PNG/WebP images in a temporary folder, then reports
  * images/s for building the dataset (image discovery, header/truncation checks, captions, buckets),
  * images/s for producing training batches (decode, resize, crop, flip, to tensor); with --masked_loss every
    image also has a conditioning (mask) image that is decoded, resized and cropped the same way,
  * latents/s for caching with a tiny stand-in VAE (8x average pool) and, if the golden tiny Qwen-Image VAE is
    found (ANIMA_SHARED_DIR or ../shared), with it too. Numbers only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.data.config import add_dataset_arguments, build_dataset_groups  # noqa: E402
from library.data.latent_cache import cache_group_latents  # noqa: E402


class PoolVAE(torch.nn.Module):
    device = torch.device("cpu")
    dtype = torch.float32

    def encode_pixels_to_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)
        return torch.cat([pooled] * 5 + [pooled[:, :1]], dim=1)


def make_masks(images: Path, masks: Path) -> None:
    """A PNG mask (left half 0, right half 255) the size of every image, with the image's stem."""
    masks.mkdir(parents=True)
    for path in images.iterdir():
        if path.suffix != ".txt":
            with Image.open(path) as image:
                width, height = image.size
            mask = np.zeros((height, width, 3), dtype=np.uint8)
            mask[:, width // 2:] = 255
            Image.fromarray(mask).save(masks / f"{path.stem}.png")


def make_images(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    formats = [("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp")]
    for i in range(count):
        aspect = rng.uniform(0.5, 2.0)
        width, height = int(size * aspect ** 0.5), int(size / aspect ** 0.5)
        # Smooth content so compressed sizes are realistic.
        small = rng.integers(0, 255, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
        fmt, ext = formats[i % 3]
        image.save(folder / f"img{i:05d}{ext}", format=fmt, quality=90)
        (folder / f"img{i:05d}.txt").write_text(f"tag{i % 7}, tag{i % 11}, scenery", encoding="utf-8")


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--images", type=int, default=200)
    cli.add_argument("--size", type=int, default=768, help="approximate image side in pixels")
    cli.add_argument("--resolution", type=int, default=512)
    cli.add_argument("--batch_size", type=int, default=4)
    cli.add_argument("--vae_batch_size", type=int, default=4)
    cli.add_argument("--no_real_vae", action="store_true", help="skip the (slow) golden tiny Qwen-Image VAE")
    cli.add_argument("--masked_loss", action="store_true", help="give every image a conditioning (mask) image")
    options = cli.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        images = root / "train" / "1_bench"
        images.mkdir(parents=True)
        make_images(images, options.images, options.size)
        mask_flags = []
        if options.masked_loss:
            make_masks(images, root / "masks")
            mask_flags = ["--conditioning_data_dir", str(root / "masks")]
        parser = argparse.ArgumentParser()
        add_dataset_arguments(parser)
        args = parser.parse_args(["--train_data_dir", str(root / "train"), "--resolution", str(options.resolution),
                                  "--enable_bucket", "--caption_extension", ".txt", "--flip_aug",
                                  "--max_bucket_reso", str(options.resolution * 2), *mask_flags])
        args.seed, args.train_batch_size = 0, options.batch_size
        args.masked_loss = options.masked_loss

        start = time.perf_counter()
        train, _ = build_dataset_groups(args)
        build_s = time.perf_counter() - start
        print(f"build (discover + header check + captions + buckets): {options.images / build_s:8.1f} images/s")

        start = time.perf_counter()
        count = sum(len(train[i]["image_keys"]) for i in range(len(train)))
        load_s = time.perf_counter() - start
        print(f"batch loading (decode, resize, crop, flip, tensor):   {count / load_s:8.1f} images/s")

        vaes = [("8x avg-pool stand-in VAE", PoolVAE(), "pool")]
        shared = Path(os.environ.get("ANIMA_SHARED_DIR", Path(__file__).resolve().parent.parent.parent / "shared"))
        tiny = shared / "golden" / "vae_tiny.safetensors"
        if tiny.is_file() and not options.no_real_vae:
            from library.models.vae import load_vae
            vaes.append(("golden tiny Qwen-Image VAE", load_vae(tiny, device="cpu", dtype=torch.float32), "tiny"))
        for name, vae, identity in vaes:
            train, _ = build_dataset_groups(args)
            start = time.perf_counter()
            cache_group_latents(train, vae, identity, batch_size=options.vae_batch_size, to_disk=True, skip_check=False)
            cache_s = time.perf_counter() - start
            print(f"latent caching to disk, {name} (x2 with flip): {options.images / cache_s:8.1f} latents/s")
            start = time.perf_counter()
            cache_group_latents(train, vae, identity, batch_size=options.vae_batch_size, to_disk=True, skip_check=False)
            check_s = time.perf_counter() - start
            print(f"  re-run, all caches valid (provenance check):   {options.images / check_s:8.1f} images/s")
            for npz in images.glob("*_anima.npz"):
                npz.unlink()


if __name__ == "__main__":
    main()

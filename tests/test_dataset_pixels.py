"""Training pixels as sd-scripts makes them: OpenCV/Pillow resizes, its colour augmentation; and the decoding
fixes on top (EXIF orientation, 16-bit grey), the cache bookkeeping that goes with them, and the warnings for
images that fit their bucket badly."""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from library.data import images as image_io
from library.data.cache_files import latents_npz_path
from library.data.config import add_dataset_arguments, build_dataset_groups, cache_only_main

GREY_LEVEL = 1.0 / 255.0


def make_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    args = parser.parse_args(list(argv))
    args.seed = 3
    args.train_batch_size = 1
    return args


def dataset_from_toml(tmp_path: Path, dataset_keys: str, subset_keys: str = "", *argv: str):
    path = tmp_path / "ds.toml"
    path.write_text(f"[[datasets]]\n{dataset_keys}\n  [[datasets.subsets]]\n  image_dir = '{tmp_path / 'img'}'\n"
                    f"{subset_keys}\n", encoding="utf-8")
    return build_dataset_groups(make_args("--dataset_config", str(path), *argv))


def random_pixels(width: int, height: int, seed: int, channels: int = 3) -> np.ndarray:
    """Smooth gradients plus noise and a sharp edge, so every filter gives visibly different results."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = (xs * 255.0 / max(1, width - 1) + ys * 128.0 / max(1, height - 1))[..., None]
    pixels = base + rng.normal(0, 40, (height, width, channels))
    pixels[:, width // 3: width // 3 + 2] = 255.0
    return np.clip(pixels, 0, 255).astype(np.uint8)


def training_pixels(batch_images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] grey levels 0..255 (float)."""
    return ((batch_images + 1.0) * 127.5).permute(0, 2, 3, 1)


def reference_resize(pixels: np.ndarray, size: tuple[int, int], name: str) -> np.ndarray:
    """The filter sd-scripts' resize_image applies for `name`, called directly."""
    if name == "lanczos":
        return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))
    flags = {"area": cv2.INTER_AREA, "cubic": cv2.INTER_CUBIC, "linear": cv2.INTER_LINEAR,
             "nearest": cv2.INTER_NEAREST_EXACT}
    return cv2.resize(pixels, size, interpolation=flags[name])


# Odd sizes: non-integer scale factors in both directions, shrinking and enlarging, one side unchanged.
ODD_SIZES = [(173, 111), (97, 203), (61, 45), (333, 64), (47, 29), (250, 97)]


@pytest.mark.parametrize("interpolation", ["area", "cubic", "linear", "nearest", "lanczos", None])
def test_resized_training_tensors_match_opencv_and_pillow_called_directly(tmp_path, interpolation):
    originals = {}
    for index, (width, height) in enumerate(ODD_SIZES):
        originals[f"{index}.png"] = pixels = random_pixels(width, height, seed=index)
        (tmp_path / "img").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / "img" / f"{index}.png")
    keys = "resolution = 64\nenable_bucket = true\nmin_bucket_reso = 32\nmax_bucket_reso = 128\nbucket_reso_steps = 16"
    if interpolation is not None:
        keys += f"\nresize_interpolation = '{interpolation}'"
    train, _ = dataset_from_toml(tmp_path, keys)
    dataset = train.datasets[0]
    shrunk = enlarged = 0
    for slot in range(len(train)):
        batch = train[slot]
        info = next(i for i in dataset.infos if i.key == batch["image_keys"][0])
        pixels = originals[info.path.name]
        (width, height), (resized_w, resized_h) = info.image_size, info.resized
        grows = resized_w > width or resized_h > height
        shrunk, enlarged = shrunk + (not grows), enlarged + grows
        # sd-scripts' default: area when no side grows, lanczos otherwise.
        name = interpolation or ("lanczos" if grows else "area")
        expected = reference_resize(pixels, info.resized, name)
        left, top = (resized_w - info.bucket[0]) // 2, (resized_h - info.bucket[1]) // 2
        expected = expected[top: top + info.bucket[1], left: left + info.bucket[0]]
        difference = (training_pixels(batch["images"])[0] - torch.from_numpy(expected.copy()).float()).abs().max()
        assert difference <= 1.0, (info.path.name, info.resized, name, float(difference))  # <= 1/255 of full scale
    assert shrunk and enlarged  # both default branches were exercised


def test_random_crop_without_buckets_cuts_an_unscaled_window_of_a_large_image(tmp_path):
    # As in sd-scripts: without bucketing, random_crop takes a resolution-sized window of the image at its own
    # scale (no resize first); the offsets are drawn height first, each only along a side with slack.
    pixels = random_pixels(100, 80, seed=5)
    (tmp_path / "img").mkdir()
    Image.fromarray(pixels).save(tmp_path / "img" / "a.png")
    train, _ = dataset_from_toml(tmp_path, "resolution = 64", "random_crop = true")
    dataset = train.datasets[0]
    info, subset = dataset.infos[0], dataset.subsets[0]
    offsets = set()
    for seed in range(6):
        rng, ref = random.Random(seed), random.Random(seed)
        image, _ = dataset._load_pixels(info, subset, False, rng)
        top, left = ref.randint(0, 80 - 64), ref.randint(0, 100 - 64)
        window = torch.from_numpy(pixels[top: top + 64, left: left + 64].copy()).float()
        assert torch.equal(training_pixels(image[None])[0].round(), window)
        offsets.add((left, top))
    assert len(offsets) > 1
    rng, ref = random.Random(1), random.Random(1)
    plan = image_io.plan_bucket_crop((80, 64), (64, 64), rng)  # bucket crop: slack in the width only
    assert (plan.left, plan.top) == (ref.randint(0, 16), 0) and rng.random() == ref.random()


def test_default_downscale_uses_area_when_one_side_keeps_its_size():
    pixels = random_pixels(64, 90, seed=4)
    ours = image_io.resize_pixels(pixels, (64, 45), None)
    assert np.array_equal(ours, cv2.resize(pixels, (64, 45), interpolation=cv2.INTER_AREA))
    # Pillow's box filter, used before, differs on a non-integer scale.
    box = np.asarray(Image.fromarray(pixels).resize((64, 37), Image.Resampling.BOX)).astype(int)
    assert np.abs(image_io.resize_pixels(pixels, (64, 37), None).astype(int) - box).max() > 2


def test_rgba_and_conditioning_resizes_keep_their_channels():
    rgba = random_pixels(77, 51, seed=5, channels=4)
    for name in ("area", "cubic", "lanczos", None):
        out = image_io.resize_pixels(rgba, (40, 26), name)
        assert out.shape == (26, 40, 4) and out.dtype == np.uint8


# ---- colour augmentation ----------------------------------------------------------------------------------------


def sd_scripts_color_aug(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """sd-scripts' AugHelper.color_aug, written from its description, drawing from `rng` in the same order."""
    if rng.random() <= 0.33:
        if rng.random() > 0.5:
            hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)  # sd-scripts converts the RGB array as if it were BGR
            shift = rng.uniform(-8, 8)
            if shift < 0:
                shift = 180 + shift
            hsv[:, :, 0] = (hsv[:, :, 0] + shift) % 180
            return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        gamma = rng.uniform(0.95, 1.05)
        return np.clip(image ** gamma, 0, 255).astype(np.uint8)
    return image


def test_color_aug_gives_sd_scripts_pixels_for_the_same_draws():
    image = random_pixels(48, 32, seed=6)
    changed = 0
    for seed in range(60):
        ours = image_io.apply_color_aug(image.copy(), random.Random(seed))
        theirs = sd_scripts_color_aug(image.copy(), random.Random(seed))
        assert np.array_equal(ours, theirs), seed
        changed += not np.array_equal(ours, image)
    assert 10 <= changed <= 32  # applied about a third of the time


def test_color_aug_gamma_acts_on_0_to_255_values_so_mid_tones_move_about_a_quarter():
    grey = np.full((8, 8, 3), 128, dtype=np.uint8)
    changes = []
    for seed in range(400):
        out = image_io.apply_color_aug(grey, random.Random(seed))
        changes.append(abs(float(out.mean()) - 128.0) / 128.0)
    # 128 ** 1.05 = 163 (+27 %), 128 ** 0.95 = 100 (-22 %); a gamma on 0..1 values would move it at most 3.5 %.
    assert max(changes) > 0.2


# ---- decoding ---------------------------------------------------------------------------------------------------


def save_with_orientation(path: Path, pixels: np.ndarray, orientation: int, fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_to_sizes_pixels_and_buckets(tmp_path, orientation):
    pixels = random_pixels(96, 48, seed=7)
    path = tmp_path / "img" / "phone.png"
    save_with_orientation(path, pixels, orientation, "PNG")
    with Image.open(path) as image:
        upright = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    assert image_io.check_image_file(path) == (upright.shape[1], upright.shape[0])
    assert np.array_equal(image_io.load_image(path, keep_alpha=False), upright)
    train, _ = dataset_from_toml(tmp_path, "resolution = [48, 96]\nenable_bucket = true\nmin_bucket_reso = 32\n"
                                           "max_bucket_reso = 128\nbucket_reso_steps = 16")
    info = train.datasets[0].infos[0]
    sideways = orientation in (6, 8)
    assert info.image_size == ((48, 96) if sideways else (96, 48))
    batch = train[0]
    assert batch["images"].shape[-2:] == (info.bucket[1], info.bucket[0])
    expected = cv2.resize(upright, info.resized, interpolation=cv2.INTER_AREA)
    left, top = (info.resized[0] - info.bucket[0]) // 2, (info.resized[1] - info.bucket[1]) // 2
    expected = expected[top: top + info.bucket[1], left: left + info.bucket[0]]
    assert (training_pixels(batch["images"])[0] - torch.from_numpy(expected.copy()).float()).abs().max() <= 1.0


def test_cache_info_keeps_stored_sizes_for_sd_scripts_and_the_orientation_for_us(tmp_path):
    path = tmp_path / "img" / "phone.jpg"
    save_with_orientation(path, random_pixels(80, 48, seed=8), 6, "JPEG")
    dataset_from_toml(tmp_path, "resolution = 64", "cache_info = true")
    cache_file = tmp_path / "img" / "metadata_cache.json"
    entry = json.loads(cache_file.read_text(encoding="utf-8"))[str(path)]
    assert entry["resolution"] == [80, 48] and entry["orientation"] == 6  # sd-scripts reads "resolution"
    again, _ = dataset_from_toml(tmp_path, "resolution = 64", "cache_info = true")
    assert again.datasets[0].infos[0].image_size == (48, 80)
    # A file written by sd-scripts (no orientation) is not trusted: the folder is scanned and the file rewritten.
    cache_file.write_text(json.dumps({str(path): {"caption": "", "resolution": [80, 48]}}), encoding="utf-8")
    rescanned, _ = dataset_from_toml(tmp_path, "resolution = 64", "cache_info = true")
    assert rescanned.datasets[0].infos[0].image_size == (48, 80)
    assert json.loads(cache_file.read_text(encoding="utf-8"))[str(path)]["orientation"] == 6


def test_sixteen_bit_grey_png_keeps_its_tones_instead_of_turning_white(tmp_path):
    values = np.linspace(0, 65535, 32 * 24).reshape(24, 32).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as image:
        assert image.mode == "I;16"
        clipped = np.asarray(image.convert("RGB"))
    assert clipped.mean() > 250  # what a plain convert gives
    decoded = image_io.load_image(path, keep_alpha=False)
    expected = (values >> 8).astype(np.uint8)
    assert decoded.shape == (24, 32, 3)
    assert np.array_equal(decoded[..., 0], expected) and np.array_equal(decoded[..., 2], expected)


def test_sixteen_bit_rgb_and_rgba_pngs_are_scaled_to_8_bits(tmp_path):
    rng = np.random.default_rng(9)
    rgb = rng.integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    rgba = rng.integers(0, 65536, (20, 30, 4), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb[..., ::-1])  # OpenCV writes BGR(A)
    cv2.imwrite(str(tmp_path / "rgba16.png"), rgba[..., [2, 1, 0, 3]])
    decoded_rgb = image_io.load_image(tmp_path / "rgb16.png", keep_alpha=False).astype(int)
    decoded_rgba = image_io.load_image(tmp_path / "rgba16.png", keep_alpha=True).astype(int)
    assert np.abs(decoded_rgb - rgb / 257.0).max() <= 1.0
    assert np.abs(decoded_rgba - rgba / 257.0).max() <= 1.0


def test_32_bit_integer_and_float_grey_modes_are_scaled_not_clipped():
    values = np.array([[0, 32768, 65535]], dtype=np.int32)
    as_int = image_io.to_8bit(Image.fromarray(values, "I"))
    assert as_int.mode == "L" and np.asarray(as_int).tolist() == [[0, 128, 255]]
    as_float = image_io.to_8bit(Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0]], dtype=np.float32), "F"))
    assert as_float.mode == "L" and np.asarray(as_float).tolist() == [[0, 128, 255, 255]]
    rgb = Image.new("RGB", (2, 2))
    assert image_io.to_8bit(rgb) is rgb


class CountingVAE:
    def __init__(self) -> None:
        self.encoded = 0
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def encode_pixels_to_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        self.encoded += pixels.shape[0]
        return torch.nn.functional.avg_pool2d(pixels, 8).repeat(1, 6, 1, 1)[:, :16]


def test_latent_cache_of_a_turned_image_is_reused_and_older_pixel_pipelines_are_re_encoded(tmp_path):
    path = tmp_path / "img" / "phone.png"
    save_with_orientation(path, random_pixels(64, 32, seed=10), 6, "PNG")
    toml = tmp_path / "ds.toml"
    toml.write_text(f"[[datasets]]\nresolution = [32, 64]\n  [[datasets.subsets]]\n  image_dir = '{path.parent}'\n",
                    encoding="utf-8")
    args = ("--dataset_config", str(toml), "--cache_latents_to_disk")
    vae = CountingVAE()
    cache_only_main(make_args(*args), load_vae=lambda: (vae, "vae"))
    cache_file = Path(latents_npz_path(path, (32, 64)))  # the size as shown
    assert vae.encoded == 1 and cache_file.is_file()
    cache_only_main(make_args(*args), load_vae=lambda: (vae, "vae"))
    assert vae.encoded == 1  # fingerprint matches: reused
    with np.load(cache_file) as data:
        arrays = {key: data[key] for key in data.files}
    provenance_key = next(key for key in arrays if key.startswith("provenance"))
    provenance = json.loads(str(arrays[provenance_key]))
    assert provenance["pixels"] == image_io.PIXEL_PIPELINE
    del provenance["pixels"]  # as written before decoding and resizing changed
    arrays[provenance_key] = np.array(json.dumps(provenance, sort_keys=True))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    cache_file.write_bytes(buffer.getvalue())
    cache_only_main(make_args(*args), load_vae=lambda: (vae, "vae"))
    assert vae.encoded == 2


# ---- images that fit their bucket badly -------------------------------------------------------------------------


def test_tiny_and_extreme_aspect_images_are_listed_in_one_warning_each(tmp_path, caplog):
    img = tmp_path / "img"
    img.mkdir()
    for name, (width, height) in {"dot.png": (1, 1), "strip.png": (4000, 16), "small.png": (100, 100),
                                  "fine.png": (512, 512), "slightly_small.png": (300, 300)}.items():
        Image.fromarray(random_pixels(width, height, seed=width)).save(img / name)
    with caplog.at_level(logging.WARNING):
        train, _ = dataset_from_toml(tmp_path, "resolution = 512\nenable_bucket = true\nmin_bucket_reso = 256\n"
                                               "max_bucket_reso = 1024")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    enlarged = [w for w in warnings if "far below the bucket resolution" in w]
    cropped = [w for w in warnings if "aspect ratio beyond the bucket range" in w]
    assert len(enlarged) == 1 and len(cropped) == 1
    assert "3 image(s)" in enlarged[0] and "dot.png (1x1, enlarged x512)" in enlarged[0]
    assert "small.png (100x100" in enlarged[0] and "strip.png (4000x16, enlarged x16)" in enlarged[0]
    assert "slightly_small" not in enlarged[0]
    assert "1 image(s)" in cropped[0] and "strip.png (4000x16 in bucket 1024x256" in cropped[0]
    assert "fine.png" not in enlarged[0] + cropped[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train.datasets[0].drop_images({str(img.resolve() / "small.png")})  # rebuilding buckets does not repeat it
    assert not any("far below" in r.getMessage() for r in caplog.records)


def test_pixels_become_v_over_255_minus_half_over_half_rounded_as_sd_scripts_rounds_them():
    """sd-scripts' ToTensor + Normalize([0.5], [0.5]) in float32: divide by 255, subtract 0.5, divide by 0.5, each
    rounded. Every grey level is compared; 1/127.5 - 1 would round 111 of the 256 differently."""
    levels = np.arange(256, dtype=np.uint8)
    rgb = np.stack([levels, levels[::-1], levels], axis=-1).reshape(16, 16, 3)
    expected = torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float().div(255)
    expected = expected.sub(torch.tensor([0.5])).div(torch.tensor([0.5]))
    tensor = image_io.to_tensor(rgb)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 16, 16)
    assert torch.equal(tensor, expected)
    assert tensor[0].min().item() == -1.0 and tensor[0].max().item() == 1.0

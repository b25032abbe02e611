"""Face-crop augmentation (face box in the file name) and masked loss with conditioning images."""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.data import images as image_io
from library.data.cache_files import latents_npz_path
from library.data.config import add_dataset_arguments, build_dataset_groups
from library.data.latent_cache import cache_group_latents
from library.data.metadata import group_metadata
from library.errors import AnimaError
from library.io.npz import read_npz


class FakeVAE:
    """8x average pool, 3 -> 16 channels; counts encoded images."""

    def __init__(self) -> None:
        self.encoded = 0
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def encode_pixels_to_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        self.encoded += pixels.shape[0]
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)
        return torch.cat([pooled] * 5 + [pooled[:, :1]], dim=1)


def save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def noise(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def make_args(*argv: str, masked_loss: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    args = parser.parse_args(list(argv))
    args.seed = 11
    args.train_batch_size = 1
    args.masked_loss = masked_loss  # a trainer flag; the dataset reads it
    return args


def toml_args(tmp_path: Path, dataset_keys: str, subset_keys: str, *argv: str,
              masked_loss: bool = False) -> argparse.Namespace:
    path = tmp_path / "ds.toml"
    path.write_text(f"[[datasets]]\n{dataset_keys}\n  [[datasets.subsets]]\n  image_dir = '{tmp_path / 'img'}'\n"
                    f"{subset_keys}\n", encoding="utf-8")
    return make_args("--dataset_config", str(path), *argv, masked_loss=masked_loss)


# --- face crop ---------------------------------------------------------------------------------------------------


def test_face_box_is_read_from_the_last_four_name_parts():
    assert image_io.face_box_from_stem("girl_smile_200_150_40_30") == image_io.FaceBox(200, 150, 40, 30)
    assert image_io.face_box_from_stem("a_1_2_3") is None  # too few parts
    assert image_io.face_box_from_stem("my_cat_photo_from_2020") is None  # not integers
    assert image_io.face_box_from_stem("x_10_10_0_5") is None  # empty face


def test_fixed_face_range_scales_the_face_and_centres_it():
    # min(target) / (face * r) = 64 / (40 * 2) = 0.8; face centre (200, 150) -> (160, 120).
    plan = image_io.plan_face_crop((400, 300), (64, 64), image_io.FaceBox(200, 150, 40, 40), (2.0, 2.0), False,
                                   random.Random(0))
    assert plan == image_io.CropPlan((320, 240), 160 - 32, 120 - 32, (64, 64))


def test_face_scale_never_drops_below_covering_the_target():
    plan = image_io.plan_face_crop((400, 300), (64, 64), image_io.FaceBox(200, 150, 300, 300), (4.0, 4.0), False,
                                   random.Random(0))
    assert plan.resized == (85, 64) and plan.top == 0 and 0 <= plan.left <= 85 - 64


def test_face_range_draws_scales_within_the_range_and_keeps_the_face_in_view():
    face = image_io.FaceBox(500, 400, 100, 100)
    scales = set()
    for seed in range(40):
        plan = image_io.plan_face_crop((1000, 800), (128, 128), face, (1.5, 4.0), False, random.Random(seed))
        scale = plan.resized[0] / 1000
        assert 128 / (100 * 4.0) - 0.01 <= scale <= 128 / (100 * 1.5) + 0.01
        scales.add(round(scale, 3))
        centre_x, centre_y = face.cx * scale - plan.left, face.cy * scale - plan.top
        assert 0 <= centre_x <= 128 and 0 <= centre_y <= 128
        assert plan == image_io.plan_face_crop((1000, 800), (128, 128), face, (1.5, 4.0), False, random.Random(seed))
    assert len(scales) > 10


def face_image(tmp_path: Path) -> Path:
    pixels = np.zeros((300, 400, 3), dtype=np.uint8)
    pixels[130:170, 180:220] = 255  # a 40x40 white "face" centred at (200, 150)
    path = save(tmp_path / "img" / "girl_200_150_40_40.png", pixels)
    (tmp_path / "img" / "girl.caption").write_text("1girl", encoding="utf-8")
    return path


def test_face_crop_from_the_command_line_centres_the_named_face(tmp_path):
    face_image(tmp_path)
    train, _ = build_dataset_groups(toml_args(tmp_path, "resolution = 64", "", "--face_crop_aug_range", "2,2"))
    batch = train[0]
    assert batch["captions"] == ["1girl"]
    face = (batch["images"][0] + 1) / 2  # [3, 64, 64] in [0, 1]; face scaled to 32x32 at the centre
    assert torch.all(face[:, 18:46, 18:46] > 0.9)
    assert torch.all(face[:, :12] < 0.1) and torch.all(face[:, 52:] < 0.1)


def test_face_crop_with_random_crop_is_seeded_and_varies_by_epoch(tmp_path):
    face_image(tmp_path)
    train, _ = build_dataset_groups(toml_args(tmp_path, "resolution = 64",
                                              "face_crop_aug_range = [1.5, 3.0]\nrandom_crop = true"))
    samples = []
    for epoch in range(1, 6):
        train.set_current_epoch(epoch)
        samples.append(train[0]["images"])
    train.set_current_epoch(1)
    assert torch.equal(train[0]["images"], samples[0])
    assert any(not torch.equal(s, samples[0]) for s in samples[1:])


def test_face_crop_rejects_latent_caching_and_bad_ranges(tmp_path):
    face_image(tmp_path)
    with pytest.raises(AnimaError, match="face_crop_aug_range changes the pixels .* --cache_latents"):
        build_dataset_groups(toml_args(tmp_path, "resolution = 64", "face_crop_aug_range = [2.0, 3.0]",
                                       "--cache_latents"))
    for value, message in (("3,2", "0 < a <= b"), ("two", 'two numbers "a,b"'), ("1,2,3", "two numbers")):
        with pytest.raises(AnimaError, match=message) as info:
            build_dataset_groups(toml_args(tmp_path, "resolution = 64", "", "--face_crop_aug_range", value))
        assert "face_crop_aug_range" in str(info.value) and "\n" not in str(info.value)


def test_face_crop_warns_for_names_without_a_face_and_with_buckets(tmp_path, caplog):
    face_image(tmp_path)
    save(tmp_path / "img" / "plain.png", noise(64, 64, 1))
    with caplog.at_level(logging.WARNING):
        train, _ = build_dataset_groups(toml_args(
            tmp_path, "resolution = 64\nenable_bucket = true\nmin_bucket_reso = 32\nmax_bucket_reso = 128\n"
            "bucket_reso_steps = 16", "face_crop_aug_range = [2.0, 2.0]", "--cache_latents"))
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "1 image(s) have no face box in their name" in messages and "plain.png" in messages
    assert "face_crop_aug_range only applies without bucketing" in messages
    assert train.num_train_images == 2  # bucketed: the face crop is off, so latent caching is allowed


# --- masked loss with conditioning images ------------------------------------------------------------------------


def test_conditioning_mask_is_the_red_channel_cropped_like_the_image(tmp_path):
    save(tmp_path / "img" / "a.png", noise(96, 64, 1))
    mask = np.zeros((64, 96, 3), dtype=np.uint8)
    mask[:, 48:, 0] = 255  # right half counts; green/blue are ignored
    mask[:, :48, 1:] = 255
    save(tmp_path / "cond" / "a.png", mask)
    args = toml_args(tmp_path, "resolution = 64", f"conditioning_data_dir = '{tmp_path / 'cond'}'", masked_loss=True)
    batch = build_dataset_groups(args)[0][0]
    masks = batch["loss_masks"]
    assert masks.shape == (1, 1, 64, 64) and masks.dtype == torch.float32
    # Centre crop of the 96-wide image starts at x = 16, so the mask edge moves from 48 to 32.
    assert torch.all(masks[0, 0, :, :32] == 0) and torch.all(masks[0, 0, :, 32:] == 1)


def test_conditioning_mask_follows_random_crop_flip_and_resize_exactly(tmp_path):
    for i, (width, height) in enumerate(((150, 100), (100, 140), (90, 90))):
        pixels = noise(width, height, 10 + i)
        save(tmp_path / "img" / f"{i}.png", pixels)
        save(tmp_path / "cond" / f"{i}.png", pixels)  # the mask is the image's own red channel
    args = toml_args(tmp_path, "resolution = 64\nbatch_size = 3",
                     f"conditioning_data_dir = '{tmp_path / 'cond'}'\nrandom_crop = true\nflip_aug = true",
                     masked_loss=True)
    train, _ = build_dataset_groups(args)
    for epoch in range(1, 5):
        train.set_current_epoch(epoch)
        batch = train[0]
        red = (batch["images"][:, :1] + 1) / 2
        torch.testing.assert_close(batch["loss_masks"], red, atol=1e-6, rtol=0)


def test_smaller_conditioning_image_with_the_same_aspect_is_scaled(tmp_path):
    save(tmp_path / "img" / "a.png", noise(128, 128, 1))
    save(tmp_path / "cond" / "a.png", np.full((32, 32, 3), 255, dtype=np.uint8))
    args = toml_args(tmp_path, "resolution = 64", f"conditioning_data_dir = '{tmp_path / 'cond'}'", masked_loss=True)
    assert torch.all(build_dataset_groups(args)[0][0]["loss_masks"] == 1)


def test_missing_or_mismatched_conditioning_image_is_one_clear_error(tmp_path):
    image = save(tmp_path / "img" / "a.png", noise(64, 64, 1))
    (tmp_path / "cond").mkdir()
    args = toml_args(tmp_path, "resolution = 64", f"conditioning_data_dir = '{tmp_path / 'cond'}'", masked_loss=True)
    with pytest.raises(AnimaError) as info:
        build_dataset_groups(args)
    message = str(info.value)
    assert str(image.resolve()) in message and str(tmp_path / "cond" / "a") in message and "\n" not in message
    save(tmp_path / "cond" / "a.png", noise(64, 32, 2))
    with pytest.raises(AnimaError, match="must have the image's aspect ratio"):
        build_dataset_groups(args)


def test_conditioning_data_dir_needs_masked_loss_and_excludes_alpha_mask(tmp_path):
    save(tmp_path / "img" / "a.png", noise(64, 64, 1))
    save(tmp_path / "cond" / "a.png", noise(64, 64, 2))
    keys = f"conditioning_data_dir = '{tmp_path / 'cond'}'"
    with pytest.raises(AnimaError, match="need --masked_loss"):
        build_dataset_groups(toml_args(tmp_path, "resolution = 64", keys))
    with pytest.raises(AnimaError, match="--alpha_mask cannot be combined with conditioning_data_dir"):
        build_dataset_groups(toml_args(tmp_path, "resolution = 64", keys, "--alpha_mask", masked_loss=True))


def test_command_line_conditioning_data_dir_applies_to_every_folder(tmp_path):
    save(tmp_path / "train" / "2_sks" / "a.png", noise(64, 64, 1))
    save(tmp_path / "train" / "1_other" / "b.png", noise(64, 64, 2))
    save(tmp_path / "masks" / "a.png", np.zeros((64, 64, 3), dtype=np.uint8))
    save(tmp_path / "masks" / "b.png", np.full((64, 64, 3), 255, dtype=np.uint8))
    base = ("--train_data_dir", str(tmp_path / "train"), "--resolution", "64",
            "--conditioning_data_dir", str(tmp_path / "masks"))
    train, _ = build_dataset_groups(make_args(*base, masked_loss=True))
    means = {Path(train[i]["image_keys"][0]).name: float(train[i]["loss_masks"].mean()) for i in range(len(train))}
    assert means == {"a.png": 0.0, "b.png": 1.0} and train.num_train_images == 3
    save(tmp_path / "reg" / "1_x" / "r.png", noise(64, 64, 3))
    with pytest.raises(AnimaError, match="--conditioning_data_dir works with --train_data_dir alone"):
        build_dataset_groups(make_args(*base, "--reg_data_dir", str(tmp_path / "reg"), masked_loss=True))


def test_masked_loss_without_any_mask_source_warns(tmp_path, caplog):
    save(tmp_path / "img" / "a.png", noise(64, 64, 1))
    with caplog.at_level(logging.WARNING):
        train, _ = build_dataset_groups(toml_args(tmp_path, "resolution = 64", "", masked_loss=True))
    assert any("the loss is not masked" in r.getMessage() for r in caplog.records)
    assert train[0]["loss_masks"] is None


def mask_dataset(tmp_path: Path, *argv: str) -> argparse.Namespace:
    save(tmp_path / "img" / "a.png", noise(96, 64, 1))
    mask = np.zeros((64, 96, 3), dtype=np.uint8)
    mask[:, 60:, 0] = 255
    save(tmp_path / "cond" / "a.png", mask)
    return toml_args(tmp_path, "resolution = 64", f"conditioning_data_dir = '{tmp_path / 'cond'}'\nflip_aug = true",
                     *argv, masked_loss=True)


def live_and_cached_batches(args: argparse.Namespace, to_disk: bool):
    """(live, latent-cached) first batches of the same dataset over six epochs (each epoch flips anew); the cached
    batch has no pixels and the live batch's loss masks."""
    live, _ = build_dataset_groups(args)
    cached, _ = build_dataset_groups(args)
    cache_group_latents(cached, FakeVAE(), "vae", batch_size=1, to_disk=to_disk, skip_check=False)
    for epoch in range(1, 7):
        live.set_current_epoch(epoch)
        cached.set_current_epoch(epoch)
        live_batch, cached_batch = live[0], cached[0]
        assert cached_batch["images"] is None
        assert torch.equal(cached_batch["loss_masks"], live_batch["loss_masks"])
        yield live_batch, cached_batch


@pytest.mark.parametrize("to_disk", [False, True])
def test_latent_cache_keeps_the_conditioning_mask_and_flips_it(tmp_path, to_disk):
    assert len(list(live_and_cached_batches(mask_dataset(tmp_path), to_disk))) == 6
    if to_disk:
        data = read_npz(latents_npz_path(tmp_path / "img" / "a.png", (96, 64)))
        assert data["conditioning_mask_8x8"].shape == (64, 64) and "alpha_mask_8x8" not in data


def alpha_dataset(tmp_path: Path, subset_keys: str) -> argparse.Namespace:
    """RGBA images whose alpha channel is a copy of their red channel, larger than their buckets (so they are
    shrunk with area filtering, which treats every channel alike)."""
    for i, (width, height) in enumerate(((150, 100), (100, 140), (90, 90))):
        rgb = noise(width, height, 20 + i)
        save(tmp_path / "img" / f"{i}.png", np.dstack([rgb, rgb[..., 0]]))
    return toml_args(tmp_path, "resolution = 64\nbatch_size = 3", f"alpha_mask = true\n{subset_keys}")


def test_alpha_mask_follows_random_crop_flip_and_resize_exactly(tmp_path):
    train, _ = build_dataset_groups(alpha_dataset(tmp_path, "random_crop = true\nflip_aug = true"))
    for epoch in range(1, 5):
        train.set_current_epoch(epoch)
        batch = train[0]
        red = (batch["images"][:, :1] + 1) / 2
        torch.testing.assert_close(batch["loss_masks"], red, atol=1e-6, rtol=0)


@pytest.mark.parametrize("to_disk", [False, True])
def test_latent_cache_keeps_the_alpha_mask_and_flips_it_with_the_latent(tmp_path, to_disk):
    for live_batch, cached_batch in live_and_cached_batches(alpha_dataset(tmp_path, "flip_aug = true"), to_disk):
        # FakeVAE pools 8x8 blocks: the latent's first channel is the pooled red channel, i.e. the pooled mask.
        pooled = torch.nn.functional.avg_pool2d(live_batch["loss_masks"] * 2 - 1, 8)[:, 0]
        torch.testing.assert_close(cached_batch["latents"][:, 0], pooled, atol=1e-5, rtol=0)
    if to_disk:
        data = read_npz(latents_npz_path(tmp_path / "img" / "0.png", (150, 100)))
        assert data["alpha_mask_8x8"].shape == (64, 64)


def test_changed_conditioning_image_reencodes_the_disk_cache(tmp_path):
    args = mask_dataset(tmp_path)
    train, _ = build_dataset_groups(args)
    cache_group_latents(train, FakeVAE(), "vae", batch_size=1, to_disk=True, skip_check=False)
    vae = FakeVAE()
    train, _ = build_dataset_groups(args)
    cache_group_latents(train, vae, "vae", batch_size=1, to_disk=True, skip_check=False)
    assert vae.encoded == 0
    save(tmp_path / "cond" / "a.png", np.full((64, 96, 3), 255, dtype=np.uint8))
    train, _ = build_dataset_groups(args)
    cache_group_latents(train, vae, "vae", batch_size=1, to_disk=True, skip_check=False)
    assert vae.encoded == 2  # image + mirrored image
    assert torch.all(train[0]["loss_masks"] == 1)


def test_metadata_names_the_conditioning_folder_and_face_range(tmp_path):
    import json

    face_image(tmp_path)
    (tmp_path / "cond").mkdir()
    save(tmp_path / "cond" / "girl_200_150_40_40.png", noise(400, 300, 5))
    args = toml_args(tmp_path, "resolution = 64",
                     f"conditioning_data_dir = '{tmp_path / 'cond'}'\nface_crop_aug_range = [2.0, 3.0]",
                     masked_loss=True)
    datasets = json.loads(group_metadata(build_dataset_groups(args)[0])["ss_datasets"])
    assert datasets[0]["is_dreambooth"] is False
    subset = datasets[0]["subsets"][0]
    assert subset["conditioning_data_dir"] == "cond" and subset["face_crop_aug_range"] == [2.0, 3.0]


def test_conditioning_mask_follows_the_face_crop(tmp_path):
    pixels = noise(400, 300, 6)
    save(tmp_path / "img" / "x_200_150_40_40.png", pixels)
    save(tmp_path / "cond" / "x_200_150_40_40.png", pixels)
    args = toml_args(tmp_path, "resolution = 64",
                     f"conditioning_data_dir = '{tmp_path / 'cond'}'\nface_crop_aug_range = [1.5, 3.0]\n"
                     "random_crop = true\nflip_aug = true", masked_loss=True)
    train, _ = build_dataset_groups(args)
    for epoch in range(1, 4):
        train.set_current_epoch(epoch)
        batch = train[0]
        torch.testing.assert_close(batch["loss_masks"], (batch["images"][:, :1] + 1) / 2, atol=1e-6, rtol=0)

"""Every dataset flag does what its help says: --debug_dataset, --cache_info, --resize_interpolation, worker
flags, --text_encoder_batch_size, --skip_cache_check and `.jxl` handling."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from library.data import images as image_io
from library.data.cache_files import latents_npz_path
from library.data.config import (
    add_dataset_arguments,
    build_dataset_groups,
    cache_only_main,
    debug_dataset_main,
    make_dataloader,
    text_encoder_batch_size,
)
from library.data.records import RESIZE_INTERPOLATIONS


def write_image(path: Path, width: int, height: int, seed: int = 0, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def make_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    args = parser.parse_args(list(argv))
    args.seed = 5
    args.train_batch_size = 2
    return args


def folder_args(tmp_path: Path, *argv: str) -> argparse.Namespace:
    return make_args("--train_data_dir", str(tmp_path / "train"), "--resolution", "64", *argv)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "train" / "2_sks dog"
    write_image(images / "a.png", 64, 64, seed=1)
    write_image(images / "b.png", 96, 64, seed=2)
    (images / "a.caption").write_text("a dog, grass", encoding="utf-8")
    return images


def test_debug_dataset_prints_buckets_keys_and_captions_and_writes_nothing(tmp_path, folder):
    before = sorted(p.name for p in folder.iterdir())
    lines: list[str] = []
    train, _ = debug_dataset_main(folder_args(tmp_path, "--debug_dataset", "--cache_info"), write=lines.append)
    text = "\n".join(lines)
    assert "dataset 0: 4 train + 0 reg samples, 2 batches of up to 2" in text
    assert "bucket 64x64: 4 samples" in text
    assert "batch 0: 2 image(s), tensor 64x64" in text and "batch 1:" in text
    assert str(folder / "a.png") in text and "'a dog, grass'" in text and "'sks dog'" in text
    assert sorted(p.name for p in folder.iterdir()) == before  # no metadata_cache.json, no caches
    assert train.num_train_images == 4


def test_cache_info_flag_writes_the_size_file(tmp_path, folder):
    build_dataset_groups(folder_args(tmp_path, "--cache_info"))
    assert (folder / "metadata_cache.json").is_file()
    build_dataset_groups(folder_args(tmp_path))
    assert len(list(folder.glob("metadata_cache.json"))) == 1


# The filters sd-scripts' resize_image uses for each name: Pillow for lanczos/box, OpenCV for the rest.
SD_SCRIPTS_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX,
                      "nearest": cv2.INTER_NEAREST_EXACT, "bilinear": cv2.INTER_LINEAR, "linear": cv2.INTER_LINEAR,
                      "bicubic": cv2.INTER_CUBIC, "cubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA}


def sd_scripts_resize(pixels: np.ndarray, size: tuple[int, int], name: str) -> np.ndarray:
    choice = SD_SCRIPTS_FILTERS[name]
    if isinstance(choice, Image.Resampling):
        return np.asarray(Image.fromarray(pixels).resize(size, choice))
    return cv2.resize(pixels, size, interpolation=choice)


def test_every_resize_interpolation_name_has_an_sd_scripts_filter():
    assert set(SD_SCRIPTS_FILTERS) == set(RESIZE_INTERPOLATIONS)


@pytest.mark.parametrize("name", RESIZE_INTERPOLATIONS)
def test_resize_interpolation_flag_selects_the_filter(tmp_path, name):
    pixels = np.random.default_rng(3).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    (tmp_path / "train" / "1_x").mkdir(parents=True)
    Image.fromarray(pixels).save(tmp_path / "train" / "1_x" / "a.png")
    train, _ = build_dataset_groups(folder_args(tmp_path, "--resize_interpolation", name))
    expected = sd_scripts_resize(pixels, (64, 64), name)
    torch.testing.assert_close(train[0]["images"][0], image_io.to_tensor(expected))
    # Different filters give different pixels, so the flag really reaches the resize.
    other = "nearest" if name != "nearest" else "lanczos"
    assert np.abs(expected.astype(int) - sd_scripts_resize(pixels, (64, 64), other)).max() > 8


def test_worker_flags_reach_the_data_loader(tmp_path, folder):
    args = folder_args(tmp_path, "--max_data_loader_n_workers", "1", "--persistent_data_loader_workers")
    train, _ = build_dataset_groups(args)
    loader = make_dataloader(train, num_workers=args.max_data_loader_n_workers,
                             persistent_workers=args.persistent_data_loader_workers, seed=args.seed)
    assert loader.num_workers == 1 and loader.persistent_workers
    first = [b["image_keys"] for b in loader]
    second = [b["image_keys"] for b in loader]  # the same worker serves the next epoch
    assert sorted(map(tuple, first)) == sorted(map(tuple, second)) and len(first) == 2
    defaults = make_args()
    assert defaults.max_data_loader_n_workers == 8 and not defaults.persistent_data_loader_workers
    loader = make_dataloader(train, num_workers=0, persistent_workers=True, seed=0)
    assert loader.num_workers == 0 and not loader.persistent_workers



def test_loader_workers_are_capped_at_the_cpu_count(tmp_path, folder, monkeypatch):
    import library.data.datasets as datasets

    train, _ = build_dataset_groups(folder_args(tmp_path))
    monkeypatch.setattr(datasets.os, "cpu_count", lambda: 1)
    assert make_dataloader(train, num_workers=8, persistent_workers=False, seed=0).num_workers == 1
    assert make_dataloader(train, num_workers=0, persistent_workers=False, seed=0).num_workers == 0
    monkeypatch.setattr(datasets.os, "cpu_count", lambda: None)  # unknown: one worker
    assert make_dataloader(train, num_workers=8, persistent_workers=False, seed=0).num_workers == 1

class CountingTextEncoding:
    identity = "counting-te"

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.batch_sizes.append(len(captions))
        batch = len(captions)
        return {"qwen3_embeds": torch.zeros(batch, 4, 2), "qwen3_mask": torch.ones(batch, 4, dtype=torch.int64),
                "t5_ids": torch.ones(batch, 3, dtype=torch.int64), "t5_mask": torch.ones(batch, 3, dtype=torch.int64)}


def test_text_encoder_batch_size_sets_the_caching_batch(tmp_path, folder):
    write_image(folder / "c.png", 64, 64, seed=4)
    encoding = CountingTextEncoding()
    cache_only_main(folder_args(tmp_path, "--cache_text_encoder_outputs_to_disk", "--text_encoder_batch_size", "1"),
                    load_text_encoding=lambda: encoding)
    assert max(encoding.batch_sizes) == 1 and sum(encoding.batch_sizes) >= 3
    for name in ("a", "b", "c"):
        (folder / f"{name}_anima_te.npz").unlink()
    encoding = CountingTextEncoding()
    cache_only_main(folder_args(tmp_path, "--cache_text_encoder_outputs_to_disk"), load_text_encoding=lambda: encoding)
    assert max(encoding.batch_sizes) == 2  # default: the dataset batch size


def test_text_encoder_batch_size_defaults_to_the_dataset_batch_size_not_train_batch_size(tmp_path, folder):
    toml = tmp_path / "ds.toml"
    toml.write_text(f"[[datasets]]\nresolution = 64\nbatch_size = 3\n  [[datasets.subsets]]\n  image_dir = '{folder}'\n"
                    f"[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = '{folder}'\n",
                    encoding="utf-8")
    args = make_args("--dataset_config", str(toml))
    args.train_batch_size = 1  # the second dataset's batch size
    train, _ = build_dataset_groups(args)
    assert text_encoder_batch_size(args, train) == 3  # the largest dataset batch size of the group
    args.text_encoder_batch_size = 2
    assert text_encoder_batch_size(args, train) == 2


class FakeVAE:
    def __init__(self) -> None:
        self.encoded = 0
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def encode_pixels_to_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        self.encoded += pixels.shape[0]
        return torch.nn.functional.avg_pool2d(pixels, 8).repeat(1, 6, 1, 1)[:, :16]


def test_skip_cache_check_flag_reuses_foreign_latent_caches(tmp_path, folder):
    path = latents_npz_path(folder / "a.png", (64, 64))
    np.savez(path, latents_8x8=np.full((16, 8, 8), 3, dtype=np.float32))  # no provenance: another tool's file
    write_image(folder / "b.png", 64, 64, seed=2)
    np.savez(latents_npz_path(folder / "b.png", (64, 64)), latents_8x8=np.full((16, 8, 8), 4, dtype=np.float32))
    vae = FakeVAE()
    cache_only_main(folder_args(tmp_path, "--cache_latents_to_disk", "--skip_cache_check"),
                    load_vae=lambda: (vae, "vae"))
    assert vae.encoded == 0
    cache_only_main(folder_args(tmp_path, "--cache_latents_to_disk"), load_vae=lambda: (vae, "vae"))
    assert vae.encoded == 2 and os.path.exists(path)


def test_jxl_files_are_skipped_with_one_warning_without_the_plugin(tmp_path, folder, monkeypatch, caplog):
    monkeypatch.setattr(image_io, "IMAGE_EXTENSIONS", [e for e in image_io.IMAGE_EXTENSIONS if e != ".jxl"])
    (folder / "c.jxl").write_bytes(b"\xff\x0a not decoded")
    (folder / "d.JXL").write_bytes(b"\xff\x0a not decoded")
    with caplog.at_level(logging.WARNING):
        train, _ = build_dataset_groups(folder_args(tmp_path))
    warnings = [r.getMessage() for r in caplog.records if ".jxl" in r.getMessage()]
    assert len(warnings) == 1 and "2 .jxl image(s)" in warnings[0] and "pip install pillow-jxl-plugin" in warnings[0]
    assert "\n" not in warnings[0]
    assert sorted(Path(i.key).name for i in train.datasets[0].infos) == ["a.png", "b.png"]


@pytest.mark.skipif(not image_io.JXL_SUPPORTED, reason="the optional pillow-jxl-plugin is not installed")
def test_jxl_images_load_when_the_plugin_is_installed(tmp_path, folder):
    pixels = np.random.default_rng(9).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "c.jxl", lossless=True)
    train, _ = build_dataset_groups(folder_args(tmp_path))
    assert "c.jxl" in [Path(i.key).name for i in train.datasets[0].infos]
    decoded = image_io.load_image(folder / "c.jxl", keep_alpha=False)
    assert np.array_equal(decoded, pixels)


def test_caption_separator_and_token_warmup_flags_shape_the_live_caption(tmp_path, folder):
    (folder / "a.caption").write_text("head;t1;t2;t3;t4", encoding="utf-8")
    args = folder_args(tmp_path, "--caption_separator", ";", "--keep_tokens", "1", "--token_warmup_min", "2",
                       "--token_warmup_step", "100")
    train, _ = build_dataset_groups(args)
    train.set_max_train_steps(100)
    train.set_current_step(0)
    captions = {c for i in range(len(train)) for c in train[i]["captions"]}
    # Split on ";", the kept head plus the first token_warmup_min flexible tags, joined with ", ".
    assert "head, t1, t2" in captions


class BatchRecordingVAE(FakeVAE):
    def __init__(self) -> None:
        super().__init__()
        self.batch_sizes: list[int] = []

    def encode_pixels_to_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(pixels.shape[0])
        return super().encode_pixels_to_latents(pixels)


def test_vae_batch_size_flag_sets_the_latent_caching_batch(tmp_path, folder):
    write_image(folder / "b.png", 64, 64, seed=2)
    write_image(folder / "c.png", 64, 64, seed=3)
    vae = BatchRecordingVAE()
    cache_only_main(folder_args(tmp_path, "--cache_latents_to_disk", "--vae_batch_size", "2"),
                    load_vae=lambda: (vae, "vae"))
    assert vae.batch_sizes == [2, 1]

"""Latent and text-encoder caches: round trip, provenance-based invalidation, foreign and broken cache files."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.cache_files import latents_npz_path, load_cached_latents, load_cached_text, text_npz_path
from library.data.config import add_dataset_arguments, build_dataset_groups, cache_only_main
from library.data.latent_cache import cache_group_latents
from library.data.text_cache import cache_group_text
from library.errors import AnimaError
from library.io.npz import read_npz


class FakeVAE(torch.nn.Module):
    """8x average pool, 3 -> 16 channels by repetition; counts encoded images."""

    def __init__(self) -> None:
        super().__init__()
        self.encoded = 0
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def encode_pixels_to_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        self.encoded += pixels.shape[0]
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)  # [B, 3, H/8, W/8]
        return torch.cat([pooled] * 5 + [pooled[:, :1]], dim=1)  # [B, 16, H/8, W/8]


class FakeTextEncoding:
    """Deterministic encode: embeddings from character codes; records the captions it saw."""

    def __init__(self, identity: str = "fake-te|qwen3=8|t5=6", length: int = 8) -> None:
        self.identity = identity
        self.length = length
        self.seen: list[str] = []

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.seen.extend(captions)
        batch = len(captions)
        embeds = torch.zeros(batch, self.length, 4)
        mask = torch.zeros(batch, self.length, dtype=torch.int64)
        for row, caption in enumerate(captions):
            codes = [ord(c) for c in caption[: self.length]]
            if codes:
                embeds[row, : len(codes)] = torch.tensor(codes, dtype=torch.float32)[:, None]
                mask[row, : len(codes)] = 1
        t5_ids = torch.zeros(batch, 6, dtype=torch.int64)
        t5_ids[:, 0] = 1
        return {"qwen3_embeds": embeds, "qwen3_mask": mask, "t5_ids": t5_ids, "t5_mask": (t5_ids > 0).long()}


def write_image(path: Path, width: int, height: int, seed: int = 0, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def make_args(tmp_path: Path, *argv: str, subset_keys: str = "") -> argparse.Namespace:
    toml = tmp_path / "ds.toml"
    toml.write_text(f"[[datasets]]\nresolution = 64\nenable_bucket = true\nmin_bucket_reso = 32\nmax_bucket_reso = 128\n"
                    f"bucket_reso_steps = 16\nbatch_size = 2\n  [[datasets.subsets]]\n  image_dir = '{tmp_path / 'img'}'\n"
                    f"  caption_extension = '.txt'\n{subset_keys}\n", encoding="utf-8")
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    args = parser.parse_args(["--dataset_config", str(toml), *argv])
    args.seed = 3
    args.train_batch_size = 1
    return args


@pytest.fixture
def images(tmp_path: Path) -> Path:
    img = tmp_path / "img"
    write_image(img / "a.png", 64, 64, seed=1)
    write_image(img / "b.jpg", 128, 64, seed=2, fmt="JPEG")
    write_image(img / "c.webp", 64, 96, seed=3, fmt="WEBP")
    for name, caption in (("a", "red, apple"), ("b", "blue, car"), ("c", "green, tree")):
        (img / f"{name}.txt").write_text(caption, encoding="utf-8")
    return img


def cache_latents(args: argparse.Namespace, vae: FakeVAE, identity: str = "vae-1", **kw):
    train, _ = build_dataset_groups(args)
    cache_group_latents(train, vae, identity, batch_size=kw.pop("batch_size", 2), to_disk=kw.pop("to_disk", True),
                        skip_check=kw.pop("skip_check", False), **kw)
    return train


def test_memory_latent_cache_matches_encoding_the_live_images(tmp_path, images):
    args = make_args(tmp_path)
    live, _ = build_dataset_groups(args)
    vae = FakeVAE()
    cached = cache_latents(args, vae, to_disk=False)
    assert vae.encoded == 3
    for index in range(len(live)):
        live_batch, cached_batch = live[index], cached[index]
        assert cached_batch["images"] is None and live_batch["latents"] is None
        assert live_batch["image_keys"] == cached_batch["image_keys"]
        expected = FakeVAE().encode_pixels_to_latents(live_batch["images"])
        torch.testing.assert_close(cached_batch["latents"], expected)
    assert not list(images.glob("*.npz"))


def test_disk_latent_cache_round_trip_names_and_reuse(tmp_path, images):
    args = make_args(tmp_path, "--cache_latents_to_disk", subset_keys="flip_aug = true")
    vae = FakeVAE()
    train = cache_latents(args, vae)
    assert vae.encoded == 6  # plus the mirrored images
    path = latents_npz_path(images / "b.jpg", (128, 64))
    assert path.endswith("b_0128x0064_anima.npz") and os.path.exists(path)
    data = read_npz(path)
    assert data["latents_6x10"].shape == (16, 6, 10) and data["latents_6x10"].dtype == np.float32
    assert "latents_flipped_6x10" in data and list(data["original_size_6x10"]) == [128, 64]
    batch = train[0]
    assert batch["latents"].shape[1] == 16 and batch["images"] is None

    vae_again = FakeVAE()
    again = cache_latents(args, vae_again)
    assert vae_again.encoded == 0
    torch.testing.assert_close(again[0]["latents"], train[0]["latents"])


def test_changed_image_is_reencoded_and_touched_image_is_not(tmp_path, images, caplog):
    args = make_args(tmp_path, "--cache_latents_to_disk")
    cache_latents(args, FakeVAE())
    write_image(images / "a.png", 64, 64, seed=99)  # new pixels, same size
    stat = (images / "b.jpg").stat()
    os.utime(images / "b.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # touch only
    vae = FakeVAE()
    with caplog.at_level(logging.INFO):
        train = cache_latents(args, vae)
    assert vae.encoded == 1
    assert any("image changed" in r.getMessage() for r in caplog.records)
    fresh = FakeVAE().encode_pixels_to_latents(
        torch.from_numpy(np.asarray(Image.open(images / "a.png"), dtype=np.float32)).permute(2, 0, 1)[None]
        / 127.5 - 1)
    index = next(i for i in range(len(train)) if str(images / "a.png") in train[i]["image_keys"])
    batch = train[index]
    torch.testing.assert_close(batch["latents"][batch["image_keys"].index(str(images / "a.png"))], fresh[0])


def test_changed_vae_or_resolution_reencodes(tmp_path, images):
    args = make_args(tmp_path, "--cache_latents_to_disk")
    cache_latents(args, FakeVAE(), "vae-1")
    vae = FakeVAE()
    cache_latents(args, vae, "vae-2")
    assert vae.encoded == 3
    # A second resolution lives beside the first in the same file.
    toml = Path(args.dataset_config)
    toml.write_text(toml.read_text().replace("resolution = 64", "resolution = 96"), encoding="utf-8")
    vae = FakeVAE()
    cache_latents(args, vae, "vae-2")
    assert vae.encoded == 3
    keys = read_npz(latents_npz_path(images / "a.png", (64, 64)))
    assert {"latents_8x8", "latents_12x12"} <= set(keys)


def test_foreign_cache_without_provenance_is_reencoded_unless_skip_cache_check(tmp_path, images, caplog):
    args = make_args(tmp_path, "--cache_latents_to_disk")
    path = latents_npz_path(images / "a.png", (64, 64))
    np.savez(path, latents_8x8=np.full((16, 8, 8), 7, dtype=np.float32))  # what another tool would write
    vae = FakeVAE()
    with caplog.at_level(logging.INFO):
        cache_latents(args, vae)
    assert vae.encoded == 3 and any("no provenance" in r.getMessage() for r in caplog.records)

    np.savez(path, latents_8x8=np.full((16, 8, 8), 7, dtype=np.float32))
    args.skip_cache_check = True
    vae = FakeVAE()
    train = cache_latents(args, vae, skip_check=True)
    assert vae.encoded == 0
    index = next(i for i in range(len(train)) if str(images / "a.png") in train[i]["image_keys"])
    batch = train[index]
    assert torch.all(batch["latents"][batch["image_keys"].index(str(images / "a.png"))] == 7)


def test_truncated_or_foreign_cache_file_is_replaced_not_trusted(tmp_path, images):
    args = make_args(tmp_path, "--cache_latents_to_disk")
    cache_latents(args, FakeVAE())
    path = latents_npz_path(images / "a.png", (64, 64))
    content = Path(path).read_bytes()
    Path(path).write_bytes(content[: len(content) // 2])
    vae = FakeVAE()
    cache_latents(args, vae)
    assert vae.encoded == 1 and read_npz(path)["latents_8x8"].shape == (16, 8, 8)
    # A cache written for another model (different latent shape) is rebuilt too.
    data = read_npz(path)
    data["latents_8x8"] = np.zeros((4, 8, 8), dtype=np.float32)
    np.savez(path, **data)
    vae = FakeVAE()
    cache_latents(args, vae)
    assert vae.encoded == 1


def test_cache_deleted_during_training_gives_clear_error(tmp_path, images):
    args = make_args(tmp_path, "--cache_latents_to_disk")
    train = cache_latents(args, FakeVAE())
    for npz in images.glob("*_anima.npz"):
        npz.unlink()
    with pytest.raises(AnimaError, match="latent cache .* cannot be read"):
        for index in range(len(train)):
            train[index]
    assert sorted(p.name for p in images.iterdir()) == ["a.png", "a.txt", "b.jpg", "b.txt", "c.txt", "c.webp"]


def test_non_main_process_never_writes(tmp_path, images):
    args = make_args(tmp_path, "--cache_latents_to_disk")
    train = cache_latents(args, FakeVAE(), is_main_process=False)
    assert not list(images.glob("*.npz"))
    assert train[0]["latents"] is not None


def test_undecodable_image_found_while_caching_is_dropped(tmp_path, images, caplog):
    # Valid header and end marker, broken data in the middle: only a full decode notices.
    data = bytearray((images / "b.jpg").read_bytes())
    data[200:-10] = b"\x00" * (len(data) - 210)
    (images / "b.jpg").write_bytes(bytes(data))
    args = make_args(tmp_path, "--cache_latents")
    train, _ = build_dataset_groups(args)
    with caplog.at_level(logging.WARNING):
        cache_group_latents(train, FakeVAE(), "v", batch_size=4, to_disk=False, skip_check=False)
    keys = [k for i in range(len(train)) for k in train[i]["image_keys"]]
    if str(images / "b.jpg") in keys:
        pytest.skip("this Pillow build decodes the damaged JPEG without an error")
    assert sorted(Path(k).name for k in keys) == ["a.png", "c.webp"]


def test_text_cache_round_trip_and_dropout_uses_the_empty_encoding(tmp_path, images):
    args = make_args(tmp_path, "--cache_text_encoder_outputs_to_disk", subset_keys="caption_dropout_rate = 0.5\n"
                     "caption_prefix = 'photo,'")
    train, _ = build_dataset_groups(args)
    encoding = FakeTextEncoding()
    cache_group_text(train, encoding, batch_size=2, to_disk=True, skip_check=False)
    assert encoding.seen[0] == "" and sorted(encoding.seen[1:]) == ["photo, blue, car", "photo, green, tree",
                                                                    "photo, red, apple"]
    data = read_npz(text_npz_path(images / "a.png"))
    assert data["prompt_embeds"].dtype == np.float32 and data["t5_input_ids"].dtype == np.int32
    assert float(data["caption_dropout_rate"]) == 0.5
    empty = FakeTextEncoding().encode([""])
    dropped = kept = 0
    for epoch in range(1, 6):
        train.set_current_epoch(epoch)
        for index in range(len(train)):
            batch = train[index]
            text = batch["text"]
            assert text["t5_ids"].dtype == torch.int64 and text["qwen3_embeds"].shape[1:] == (8, 4)
            for row, caption in enumerate(batch["captions"]):
                if caption == "":
                    dropped += 1
                    torch.testing.assert_close(text["qwen3_embeds"][row], empty["qwen3_embeds"][0])
                else:
                    kept += 1
                    torch.testing.assert_close(text["qwen3_embeds"][row],
                                               FakeTextEncoding().encode([caption])["qwen3_embeds"][0])
    assert dropped and kept


def test_text_cache_invalidated_by_caption_edit_and_max_length(tmp_path, images, caplog):
    args = make_args(tmp_path, "--cache_text_encoder_outputs_to_disk")
    train, _ = build_dataset_groups(args)
    cache_group_text(train, FakeTextEncoding(), batch_size=4, to_disk=True, skip_check=False)

    (images / "a.txt").write_text("red, pear", encoding="utf-8")
    train, _ = build_dataset_groups(args)
    encoding = FakeTextEncoding()
    with caplog.at_level(logging.INFO):
        cache_group_text(train, encoding, batch_size=4, to_disk=True, skip_check=False)
    assert encoding.seen == ["red, pear"]  # no subset drops captions: "" is not encoded
    assert any("caption changed" in r.getMessage() for r in caplog.records)

    longer = FakeTextEncoding(identity="fake-te|qwen3=16|t5=6", length=16)
    train, _ = build_dataset_groups(args)
    cache_group_text(train, longer, batch_size=4, to_disk=True, skip_check=False)
    assert len(longer.seen) == 3
    assert read_npz(text_npz_path(images / "a.png"))["prompt_embeds"].shape == (16, 4)


def test_caption_dropout_every_n_epochs_applies_with_cached_text(tmp_path, images):
    args = make_args(tmp_path, "--cache_text_encoder_outputs", subset_keys="caption_dropout_every_n_epochs = 2")
    train, _ = build_dataset_groups(args)
    cache_group_text(train, FakeTextEncoding(), batch_size=4, to_disk=False, skip_check=False)
    train.set_current_epoch(2)
    assert all(c == "" for i in range(len(train)) for c in train[i]["captions"])
    train.set_current_epoch(3)
    assert all(c != "" for i in range(len(train)) for c in train[i]["captions"])


def test_cache_only_mode_writes_both_caches_then_training_reuses_them(tmp_path, images):
    args = make_args(tmp_path, "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk")
    vae, encoding = FakeVAE(), FakeTextEncoding()
    cache_only_main(args, load_vae=lambda: (vae, "vae-1"), load_text_encoding=lambda: encoding)
    assert vae.encoded == 3 and len(encoding.seen) == 3
    assert len(list(images.glob("*_anima.npz"))) == 3 and len(list(images.glob("*_anima_te.npz"))) == 3
    train, _ = build_dataset_groups(args)
    vae2, encoding2 = FakeVAE(), FakeTextEncoding()
    cache_group_latents(train, vae2, "vae-1", batch_size=2, to_disk=True, skip_check=False)
    cache_group_text(train, encoding2, batch_size=2, to_disk=True, skip_check=False)
    assert vae2.encoded == 0 and encoding2.seen == []
    batch = train[0]
    assert batch["latents"] is not None and batch["text"] is not None


def test_cache_only_needs_a_disk_cache_flag(tmp_path, images):
    with pytest.raises(AnimaError, match="--cache_only writes disk caches"):
        cache_only_main(make_args(tmp_path, "--cache_latents"))


def test_same_stem_images_cannot_share_a_disk_cache(tmp_path, images):
    write_image(images / "a.jpg", 64, 64, fmt="JPEG")
    args = make_args(tmp_path, "--cache_text_encoder_outputs_to_disk")
    train, _ = build_dataset_groups(args)
    with pytest.raises(AnimaError, match="would share the cache file"):
        cache_group_text(train, FakeTextEncoding(), batch_size=2, to_disk=True, skip_check=False)


def test_real_tiny_vae_latents_cached_equal_a_direct_encode(tmp_path, images, golden_dir):
    load_vae = pytest.importorskip("library.models.vae").load_vae
    vae = load_vae(golden_dir / "vae_tiny.safetensors", device="cpu", dtype=torch.float32)
    args = make_args(tmp_path, "--cache_latents_to_disk")
    live, _ = build_dataset_groups(args)
    cached = cache_latents(args, vae, "vae_tiny")
    for index in range(len(live)):
        pixels = live[index]["images"]
        with torch.no_grad():
            expected = vae.encode_pixels_to_latents(pixels)
        got = cached[index]["latents"]
        assert got.shape == (pixels.shape[0], 16, pixels.shape[2] // 8, pixels.shape[3] // 8)
        torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)


def test_latent_cache_crop_ltrb_holds_sd_scripts_letterbox_numbers(tmp_path, images):
    # 90x64 (aspect 1.40625) lands in the 80x48 bucket, which is wider: the letterboxed image is 48 high and
    # 48 * 1.40625 = 67.5 wide, and the left margin (80 - 67.5) / 2 = 6.25 is rounded down to 6.
    write_image(images / "d.png", 90, 64, seed=4)
    (images / "d.txt").write_text("wide", encoding="utf-8")
    cache_latents(make_args(tmp_path, "--cache_latents_to_disk"), FakeVAE())
    data = read_npz(latents_npz_path(images / "d.png", (90, 64)))
    crop = data["crop_ltrb_6x10"]
    assert crop.dtype == np.float64 and crop.tolist() == [6.0, 0.0, 73.5, 48.0]
    assert read_npz(latents_npz_path(images / "a.png", (64, 64)))["crop_ltrb_8x8"].tolist() == [0.0, 0.0, 64.0, 64.0]


def shared_folder_args(tmp_path: Path, first: str, second: str) -> argparse.Namespace:
    """Two datasets at the same resolution over the same image folder, with subset keys `first` / `second`."""
    dataset = ("[[datasets]]\nresolution = 64\nenable_bucket = true\nmin_bucket_reso = 32\nmax_bucket_reso = 128\n"
               "bucket_reso_steps = 16\nbatch_size = 2\n  [[datasets.subsets]]\n"
               f"  image_dir = '{tmp_path / 'img'}'\n  caption_extension = '.txt'\n")
    toml = tmp_path / "shared.toml"
    toml.write_text(f"{dataset}  {first}\n{dataset}  {second}\n", encoding="utf-8")
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    args = parser.parse_args(["--dataset_config", str(toml), "--cache_latents_to_disk"])
    args.seed = 3
    args.train_batch_size = 1
    return args


def test_image_in_two_datasets_with_different_resize_interpolation_trains_on_its_own_latents(tmp_path, images,
                                                                                               caplog):
    # b.jpg (128x64) and c.webp (64x96) are resized into their buckets, so bilinear and lanczos give other latents;
    # one disk entry cannot hold both, and the second dataset's copies are kept in memory.
    args = shared_folder_args(tmp_path, "resize_interpolation = 'lanczos'", "resize_interpolation = 'bilinear'")
    for run in range(2):
        vae = FakeVAE()
        with caplog.at_level(logging.WARNING, logger="library.data.latent_cache"):
            disk = cache_latents(args, vae)
        memory = cache_latents(args, FakeVAE(), to_disk=False)
        assert vae.encoded == (6 if run == 0 else 3)  # the next run re-encodes only the in-memory copies
        for (_, cached), (_, expected) in zip(disk.image_infos(), memory.image_infos()):
            got, _ = load_cached_latents(cached, False, None)
            torch.testing.assert_close(got, expected.latents)
        assert [info.latents_npz is None for _, info in disk.image_infos()] == [False] * 3 + [True] * 3
    assert "resize_interpolation lanczos vs bilinear" in caplog.text
    assert not any("re-encoding" in r.getMessage() for r in caplog.records)


def test_image_in_a_flipping_and_a_plain_dataset_shares_one_disk_entry(tmp_path, images):
    args = shared_folder_args(tmp_path, "flip_aug = true", "flip_aug = false")
    vae = FakeVAE()
    first = cache_latents(args, vae)
    assert vae.encoded == 6  # each image and its mirror once: the entries are shared
    assert all(info.latents_npz is not None for _, info in first.image_infos())
    assert "latents_flipped_8x8" in read_npz(latents_npz_path(images / "a.png", (64, 64)))
    again = FakeVAE()
    cache_latents(args, again)
    assert again.encoded == 0


def test_image_in_two_datasets_with_different_caption_prefixes_keeps_each_caption_with_text_cache(tmp_path, images):
    args = shared_folder_args(tmp_path, "caption_prefix = 'one, '", "caption_prefix = 'two, '")
    args.cache_latents_to_disk = False
    for run in range(2):
        encoding = FakeTextEncoding(length=3)
        train, _ = build_dataset_groups(args)
        cache_group_text(train, encoding, batch_size=2, to_disk=True, skip_check=False)
        # The first dataset's captions own the files; the second's are encoded again in every run (memory).
        assert sorted(caption[:3] for caption in encoding.seen) == ["one"] * 3 * (run == 0) + ["two"] * 3
        firsts = [chr(int(load_cached_text(info)["qwen3_embeds"][0, 0])) for _, info in train.image_infos()]
        assert firsts == ["o"] * 3 + ["t"] * 3


def test_image_in_two_datasets_with_the_same_caption_is_text_encoded_once(tmp_path, images):
    args = shared_folder_args(tmp_path, "flip_aug = true", "flip_aug = false")
    encoding = FakeTextEncoding()
    train, _ = build_dataset_groups(args)
    cache_group_text(train, encoding, batch_size=2, to_disk=True, skip_check=False)
    assert len(encoding.seen) == 3  # each caption once (no caption dropout, so no "")
    assert len({info.text_npz for _, info in train.image_infos()}) == 3


def test_read_only_folder_of_foreign_caches_is_one_error_line_before_encoding_or_used_with_skip_cache_check(
        tmp_path, images, monkeypatch):
    import library.data.cache_files as cache_files

    args = make_args(tmp_path, "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk")
    cache_latents(args, FakeVAE())
    train, _ = build_dataset_groups(args)
    cache_group_text(train, FakeTextEncoding(), batch_size=2, to_disk=True, skip_check=False)
    for npz in images.glob("*.npz"):  # as another tool writes them: the same arrays without a provenance record
        arrays = {k: v for k, v in read_npz(str(npz)).items() if not k.startswith("provenance")}
        np.savez(npz, **arrays)
    real_access = os.access
    # Root can write anywhere, so the permission is simulated where the cache asks.
    monkeypatch.setattr(cache_files.os, "access",
                        lambda path, mode: False if Path(path) == images else real_access(path, mode))
    vae = FakeVAE()
    with pytest.raises(AnimaError) as latent_error:
        cache_latents(args, vae)
    assert vae.encoded == 0
    message = str(latent_error.value)
    assert f"cache folder {images} is not writable" in message and "no provenance recorded" in message
    assert "--skip_cache_check" in message and "\n" not in message
    train, _ = build_dataset_groups(args)
    encoding = FakeTextEncoding()
    with pytest.raises(AnimaError, match="text-encoder cache .*_anima_te.npz must be written there"):
        cache_group_text(train, encoding, batch_size=2, to_disk=True, skip_check=False)
    assert encoding.seen == []

    trusted = cache_latents(args, vae, skip_check=True)
    trusted_encoding = FakeTextEncoding()
    cache_group_text(trusted, trusted_encoding, batch_size=2, to_disk=True, skip_check=True)
    assert vae.encoded == 0 and trusted_encoding.seen == []  # nothing encoded again
    assert trusted[0]["latents"] is not None


def test_latents_rewritten_by_another_tool_under_our_record_are_reencoded(tmp_path, images, caplog):
    # sd-scripts adds or replaces an entry's arrays and keeps the file's other keys, our provenance record included.
    args = make_args(tmp_path, "--cache_latents_to_disk")
    cache_latents(args, FakeVAE())
    path = latents_npz_path(images / "a.png", (64, 64))
    arrays = read_npz(path)
    arrays["latents_8x8"] = arrays["latents_8x8"] + 0.5
    np.savez(path, **arrays)
    vae = FakeVAE()
    with caplog.at_level(logging.INFO, logger="library.data.latent_cache"):
        cache_latents(args, vae)
    assert vae.encoded == 1 and "latents rewritten by another tool" in caplog.text
    again = FakeVAE()
    cache_latents(args, again)
    assert again.encoded == 0


class OverflowingTextEncoding(FakeTextEncoding):
    """A float16 encoder whose output for one caption overflowed to inf."""

    dtype = torch.float16

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        outputs = super().encode(captions)
        for row, caption in enumerate(captions):
            if caption == "blue, car":
                outputs["qwen3_embeds"][row, 0] = float("inf")
        return outputs


def test_text_cache_refuses_non_finite_encoder_outputs_naming_the_image_and_writes_nothing(tmp_path, images):
    args = make_args(tmp_path, "--cache_text_encoder_outputs_to_disk")
    train, _ = build_dataset_groups(args)
    with pytest.raises(AnimaError) as error:
        cache_group_text(train, OverflowingTextEncoding(), batch_size=4, to_disk=True, skip_check=False)
    message = str(error.value)
    assert "NaN/inf" in message and str(images / "b.jpg") in message and "'blue, car'" in message
    assert "in float16" in message and "--mixed_precision bf16" in message
    assert not list(images.glob("*_anima_te.npz"))

"""Image discovery, bad images, batches per bucket, seeded per-epoch shuffling, augmentations, validation split."""

from __future__ import annotations

import argparse
import logging
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.config import add_dataset_arguments, build_dataset_groups, make_dataloader
from library.data.metadata import group_metadata
from library.errors import AnimaError


def write_image(path: Path, width: int, height: int, fmt: str | None = None, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = 4 if mode == "RGBA" else 3
    pixels = np.random.default_rng(width * 7 + height).integers(0, 255, (height, width, channels), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path, format=fmt)
    return path


def make_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    args = parser.parse_args(list(argv))
    args.seed = 7
    args.train_batch_size = 1
    return args


def toml_group(tmp_path: Path, dataset_keys: str = "", subset_keys: str = "", *argv: str):
    path = tmp_path / "ds.toml"
    path.write_text(f"[[datasets]]\n{dataset_keys}\n  [[datasets.subsets]]\n  image_dir = '{tmp_path / 'img'}'\n"
                    f"{subset_keys}\n", encoding="utf-8")
    return build_dataset_groups(make_args("--dataset_config", str(path), *argv))


def test_corrupt_and_truncated_images_are_skipped_with_a_warning_listing_them(tmp_path, caplog):
    img = tmp_path / "img"
    write_image(img / "good.png", 64, 64)
    good_jpeg = write_image(img / "cut.jpg", 64, 64, "JPEG").read_bytes()
    (img / "cut.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    good_png = write_image(img / "cut.png", 64, 64).read_bytes()
    (img / "cut.png").write_bytes(good_png[: len(good_png) - 20])
    good_webp = write_image(img / "cut.webp", 64, 64, "WEBP").read_bytes()
    (img / "cut.webp").write_bytes(good_webp[: len(good_webp) // 2])
    (img / "garbage.png").write_bytes(b"not an image at all")
    (img / "zero.jpg").write_bytes(b"")
    before = {p.name: p.read_bytes() for p in img.iterdir()}
    with caplog.at_level(logging.WARNING):
        train, _ = toml_group(tmp_path, "resolution = 64")
    assert [Path(i.key).name for i in train.datasets[0].infos] == ["good.png"]
    warning = next(r.getMessage() for r in caplog.records if "unusable image" in r.getMessage())
    for name in ("cut.jpg", "cut.png", "cut.webp", "garbage.png", "zero.jpg"):
        assert name in warning
    assert {p.name: p.read_bytes() for p in img.iterdir()} == before  # training data never modified


def test_strict_images_stops_on_the_first_bad_image(tmp_path):
    write_image(tmp_path / "img" / "good.png", 64, 64)
    (tmp_path / "img" / "bad.png").write_bytes(b"junk")
    with pytest.raises(AnimaError, match="bad image .*bad.png"):
        toml_group(tmp_path, "resolution = 64", "", "--strict_images")


def test_missing_captions_warn_and_suggest_the_other_extension(tmp_path, caplog):
    write_image(tmp_path / "img" / "a.png", 64, 64)
    (tmp_path / "img" / "a.txt").write_text("a caption", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        train, _ = toml_group(tmp_path, "resolution = 64")  # default extension .caption
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "have no .caption caption file" in messages and "caption_extension = '.txt'" in messages
    assert train.datasets[0].infos[0].caption == ""


def test_batches_never_mix_buckets_and_respect_batch_size(tmp_path):
    for i in range(5):
        write_image(tmp_path / "img" / f"wide{i}.png", 128, 64)
    for i in range(3):
        write_image(tmp_path / "img" / f"tall{i}.png", 64, 128)
    train, _ = toml_group(tmp_path, "resolution = 64\nbatch_size = 2\nenable_bucket = true\nmin_bucket_reso = 32\n"
                          "max_bucket_reso = 128\nbucket_reso_steps = 16")
    sizes = []
    for index in range(len(train)):
        batch = train[index]
        images = batch["images"]
        assert images.dtype == torch.float32 and images.min() >= -1 and images.max() <= 1
        assert len(batch["image_keys"]) == images.shape[0] <= 2
        assert len({Path(k).name[:4] for k in batch["image_keys"]}) == 1
        sizes.append(images.shape[0])
    assert len(train) == 3 + 2 and sum(sizes) == 8
    assert train[0]["latents"] is None and train[0]["text"] is None and train[0]["loss_masks"] is None


def test_epoch_shuffle_is_seeded_and_changes_between_epochs(tmp_path):
    for i in range(8):
        write_image(tmp_path / "img" / f"{i}.png", 64, 64)

    def order(epoch: int) -> list[list[str]]:
        train, _ = toml_group(tmp_path, "resolution = 64\nbatch_size = 2")
        train.set_current_epoch(epoch)
        return [train[i]["image_keys"] for i in range(len(train))]

    assert order(1) == order(1)
    assert order(1) != order(2)


def test_dataloader_workers_see_the_epoch_and_match_in_process_batches(tmp_path):
    for i in range(6):
        write_image(tmp_path / "img" / f"{i}.png", 64, 64)
    (tmp_path / "img" / "0.caption").write_text("x", encoding="utf-8")
    train, _ = toml_group(tmp_path, "resolution = 64\nbatch_size = 2", "flip_aug = true")
    expected = {}
    train.set_current_epoch(3)
    for i in range(len(train)):
        batch = train[i]
        expected[tuple(batch["image_keys"])] = batch["images"]
    loader = make_dataloader(train, num_workers=2, persistent_workers=False, seed=0)
    train.set_current_epoch(3)
    got = {tuple(b["image_keys"]): b["images"] for b in loader}
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_flip_aug_mirrors_some_samples(tmp_path):
    write_image(tmp_path / "img" / "a.png", 64, 64)
    train, _ = toml_group(tmp_path, "resolution = 64", "flip_aug = true\nnum_repeats = 1")
    seen = []
    for epoch in range(1, 9):
        train.set_current_epoch(epoch)
        seen.append(train[0]["images"])
    plain = [s for s in seen if torch.equal(s, seen[0])]
    mirrored = [s for s in seen if torch.equal(s, seen[0].flip(-1))]
    assert plain and mirrored and len(plain) + len(mirrored) == len(seen)


def test_alpha_mask_comes_from_the_alpha_channel(tmp_path):
    path = tmp_path / "img" / "a.png"
    path.parent.mkdir(parents=True)
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:, :32, 3] = 0
    Image.fromarray(rgba, "RGBA").save(path)
    write_image(tmp_path / "img" / "b.jpg", 64, 64, "JPEG")
    train, _ = toml_group(tmp_path, "resolution = 64\nbatch_size = 2", "alpha_mask = true")
    batch = train[0]
    masks = dict(zip([Path(k).name for k in batch["image_keys"]], batch["loss_masks"]))
    assert batch["loss_masks"].shape == (2, 1, 64, 64)
    assert masks["a.png"][0, :, :32].sum() == 0 and torch.all(masks["a.png"][0, :, 32:] == 1)
    assert torch.all(masks["b.jpg"] == 1)


def test_images_of_any_size_are_resized_and_cropped_to_the_resolution_without_buckets(tmp_path):
    write_image(tmp_path / "img" / "big.png", 300, 100)
    write_image(tmp_path / "img" / "tiny.png", 5, 3)
    train, _ = toml_group(tmp_path, "resolution = [64, 32]\nbatch_size = 2")
    assert train[0]["images"].shape == (2, 3, 32, 64)


def test_random_crop_and_color_aug_change_pixels_deterministically(tmp_path):
    write_image(tmp_path / "img" / "a.png", 160, 64)
    train, _ = toml_group(tmp_path, "resolution = 64", "random_crop = true\ncolor_aug = true")
    samples = []
    for epoch in range(1, 7):
        train.set_current_epoch(epoch)
        samples.append(train[0]["images"])
    train.set_current_epoch(1)
    assert torch.equal(train[0]["images"], samples[0])
    assert any(not torch.equal(s, samples[0]) for s in samples[1:])


def test_validation_split_is_seeded_and_excludes_reg(tmp_path):
    for i in range(10):
        write_image(tmp_path / "img" / f"{i}.png", 64, 64)
    for i in range(2):
        write_image(tmp_path / "reg" / f"r{i}.png", 64, 64)
    path = tmp_path / "ds.toml"
    path.write_text(f"""[[datasets]]
resolution = 64
validation_split = 0.2
validation_seed = 5
  [[datasets.subsets]]
  image_dir = '{tmp_path / 'img'}'
  num_repeats = 2
  [[datasets.subsets]]
  image_dir = '{tmp_path / 'reg'}'
  is_reg = true
""", encoding="utf-8")
    train, val = build_dataset_groups(make_args("--dataset_config", str(path)))
    again_train, again_val = build_dataset_groups(make_args("--dataset_config", str(path)))
    val_keys = sorted(i.key for i in val.datasets[0].infos)
    assert val_keys == sorted(i.key for i in again_val.datasets[0].infos)
    assert len(val_keys) == 2 and val.num_train_images == 2  # validation uses one repeat
    train_keys = {i.key for i in train.datasets[0].infos if not i.is_reg}
    assert len(train_keys) == 8 and not train_keys & set(val_keys)
    assert all("reg" not in Path(k).parent.name for k in val_keys)
    assert train.num_train_images == 16 and train.num_reg_images == 16


def test_validation_split_without_seed_shuffles_subsets_in_turn_and_holds_out_the_rest(tmp_path):
    # No validation_seed: one generator seeded with the run's seed (7) shuffles each subset's sorted images in turn,
    # as sd-scripts' global generator does; training keeps the first ceil(n * (1 - split)), validation the rest.
    # With n = 10 and split 0.15 that is 9 and 1 (sd-scripts' round(1.5) = 2 would also validate a trained image).
    folders = {"a": 10, "b": 7}
    for name, count in folders.items():
        for i in range(count):
            write_image(tmp_path / name / f"{name}{i}.png", 64 + i, 64)
    subsets = "".join(f"  [[datasets.subsets]]\n  image_dir = '{tmp_path / name}'\n" for name in folders)
    path = tmp_path / "ds.toml"
    path.write_text(f"[[datasets]]\nresolution = 64\nvalidation_split = 0.15\n{subsets}", encoding="utf-8")
    train, val = build_dataset_groups(make_args("--dataset_config", str(path)))
    stream = random.Random(7)
    expected_train, expected_val = set(), set()
    for name, count in folders.items():
        keys = sorted(str(tmp_path / name / f"{name}{i}.png") for i in range(count))
        stream.shuffle(keys)
        n_train = math.ceil(count * (1 - 0.15))
        expected_train |= set(keys[:n_train])
        expected_val |= set(keys[n_train:])
    assert {i.key for i in train.datasets[0].infos} == expected_train
    assert {i.key for i in val.datasets[0].infos} == expected_val
    assert len(expected_train) == 9 + 6 and len(expected_val) == 1 + 1


def test_metadata_from_config_lists_datasets_tags_and_buckets(tmp_path):
    write_image(tmp_path / "img" / "a.png", 64, 64)
    (tmp_path / "img" / "a.caption").write_text("red, blue", encoding="utf-8")
    train, _ = toml_group(tmp_path, "resolution = 64\nenable_bucket = true\nmin_bucket_reso = 64\nbucket_reso_steps = 64", "num_repeats = 3")
    import json
    meta = group_metadata(train)
    datasets = json.loads(meta["ss_datasets"])
    assert datasets[0]["num_train_images"] == 3 and datasets[0]["subsets"][0]["num_repeats"] == 3
    assert json.loads(meta["ss_tag_frequency"]) == {"img": {"red": 1, "blue": 1}}  # each image once
    assert datasets[0]["bucket_info"]["buckets"]["0"]["count"] == 3
    assert meta["ss_num_train_images"] == "3"


def test_metadata_without_bucketing_records_no_bucket_table(tmp_path):
    import json
    write_image(tmp_path / "img" / "a.png", 64, 64)
    train, _ = toml_group(tmp_path, "resolution = 64\nenable_bucket = false")
    assert json.loads(group_metadata(train)["ss_datasets"])[0]["bucket_info"] is None
    write_image(tmp_path / "dirs" / "1_cat" / "a.png", 64, 64)
    train, _ = build_dataset_groups(make_args("--train_data_dir", str(tmp_path / "dirs"), "--resolution", "64"))
    assert json.loads(group_metadata(train)["ss_bucket_info"]) is None


def test_tag_frequency_counts_each_caption_once_lower_cased_at_commas_and_fine_tuning_tags_only(tmp_path):
    import json
    for name, caption in (("a", "Red, blue; green"), ("b", "red,  BLUE")):
        write_image(tmp_path / "img" / f"{name}.png", 64, 64)
        (tmp_path / "img" / f"{name}.txt").write_text(caption, encoding="utf-8")
    records = {"a.png": {"caption": "a photo", "tags": "Cat, dog"}, "b.png": {"caption": "cat, fish"}}
    (tmp_path / "meta.json").write_text(json.dumps(records), encoding="utf-8")
    path = tmp_path / "ds.toml"
    path.write_text(f"""[[datasets]]
resolution = 64
caption_separator = ";"
  [[datasets.subsets]]
  image_dir = '{tmp_path / 'img'}'
  caption_extension = ".txt"
  num_repeats = 4
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = '{tmp_path / 'img'}'
  metadata_file = '{tmp_path / 'meta.json'}'
""", encoding="utf-8")
    train, _ = build_dataset_groups(make_args("--dataset_config", str(path)))
    frequency = json.loads(group_metadata(train)["ss_tag_frequency"])
    assert frequency == {"img": {"red": 2, "blue; green": 1, "blue": 1}, "meta.json": {"cat": 1, "dog": 1}}


def test_reg_image_count_in_the_metadata_is_before_balancing(tmp_path):
    import json
    for i in range(4):
        write_image(tmp_path / "img" / f"t{i}.png", 64, 64)
    write_image(tmp_path / "reg" / "r0.png", 64, 64)
    path = tmp_path / "ds.toml"
    path.write_text(f"""[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = '{tmp_path / 'img'}'
  num_repeats = 2
  [[datasets.subsets]]
  image_dir = '{tmp_path / 'reg'}'
  is_reg = true
  num_repeats = 3
""", encoding="utf-8")
    train, _ = build_dataset_groups(make_args("--dataset_config", str(path)))
    assert train.num_reg_images == 8  # samples per epoch: the one reg image repeated to match the 8 training ones
    meta = group_metadata(train)
    assert meta["ss_num_reg_images"] == "3" and json.loads(meta["ss_datasets"])[0]["num_reg_images"] == 3


def test_cache_info_writes_sizes_once_and_reuses_them(tmp_path):
    write_image(tmp_path / "img" / "a.png", 64, 48)
    train, _ = toml_group(tmp_path, "resolution = 64", "cache_info = true")
    info_file = tmp_path / "img" / "metadata_cache.json"
    import json
    stored = json.loads(info_file.read_text(encoding="utf-8"))
    assert stored[str(tmp_path / "img" / "a.png")]["resolution"] == [64, 48]
    stored[str(tmp_path / "img" / "a.png")]["resolution"] = [96, 48]  # proves the file is read, not the image
    info_file.write_text(json.dumps(stored), encoding="utf-8")
    train, _ = toml_group(tmp_path, "resolution = 64", "cache_info = true")
    assert train.datasets[0].infos[0].image_size == (96, 48)
    info_file.write_text("{broken", encoding="utf-8")
    with pytest.raises(AnimaError, match="metadata_cache.json"):
        toml_group(tmp_path, "resolution = 64", "cache_info = true")


def _bucketed_run_group(tmp_path: Path):
    """Two subsets with repeats and a regularisation subset, three aspect ratios, batches of 3, caption and
    flip augmentation."""
    sizes = [(64, 64), (96, 64), (64, 96)]
    for folder, count in (("a", 4), ("b", 3), ("reg", 2)):
        for i in range(count):
            write_image(tmp_path / folder / f"{folder}{i}.png", *sizes[i % 3])
            (tmp_path / folder / f"{folder}{i}.caption").write_text(f"{folder}{i}, red, blue, green", encoding="utf-8")
    toml = tmp_path / "ds.toml"
    toml.write_text(
        "[[datasets]]\nresolution = 64\nbatch_size = 3\nenable_bucket = true\nmin_bucket_reso = 32\n"
        "max_bucket_reso = 128\nbucket_reso_steps = 16\n"
        f"  [[datasets.subsets]]\n  image_dir = '{tmp_path / 'a'}'\n  num_repeats = 2\n  flip_aug = true\n"
        "  shuffle_caption = true\n  keep_tokens = 1\n"
        f"  [[datasets.subsets]]\n  image_dir = '{tmp_path / 'b'}'\n  num_repeats = 3\n  caption_dropout_rate = 0.5\n"
        f"  [[datasets.subsets]]\n  image_dir = '{tmp_path / 'reg'}'\n  is_reg = true\n", encoding="utf-8")
    return build_dataset_groups(make_args("--dataset_config", str(toml)))[0]


def _trainer_batches(group, workers: int, persistent: bool, epochs: int, start: tuple[int, int] = (0, 0)):
    """(epoch, image names, captions, pixels) of every batch, iterated as the trainer iterates its loader."""
    from anima_train_network import AnimaNetworkTrainer
    from library.training.args import parse_args

    trainer = AnimaNetworkTrainer()
    trainer.seed = 7
    accelerator = trainer.setup_accelerator(parse_args(["--seed", "7"])[0])
    loader = accelerator.prepare(make_dataloader(group, num_workers=workers, persistent_workers=persistent, seed=7))
    first_epoch, skip = start
    batches = []
    for epoch in range(first_epoch, epochs):
        group.set_current_epoch(epoch + 1)
        loader.set_epoch(epoch)
        for batch in accelerator.skip_first_batches(loader, skip) if skip and epoch == first_epoch else loader:
            batches.append((epoch, [Path(k).name for k in batch["image_keys"]], batch["captions"], batch["images"]))
    return batches


def _same_batches(one, other) -> bool:
    return len(one) == len(other) and all(a[:3] == b[:3] and torch.equal(a[3], b[3]) for a, b in zip(one, other))


def test_each_epoch_holds_every_image_num_repeats_times_in_one_bucket_batches(tmp_path):
    group = _bucketed_run_group(tmp_path)
    batches = _trainer_batches(group, workers=0, persistent=False, epochs=3)
    expected = {**{f"a{i}.png": 2 for i in range(4)}, **{f"b{i}.png": 3 for i in range(3)}}
    expected.update({"reg0.png": 9, "reg1.png": 8})  # 17 regularisation samples: as many as training samples
    orders = []
    for epoch in range(3):
        epoch_batches = [b for b in batches if b[0] == epoch]
        assert len(epoch_batches) == len(group)
        counts: dict[str, int] = {}
        for _, names, captions, images in epoch_batches:
            assert 1 <= len(names) <= 3 and images.shape[0] == len(names)  # one bucket per batch
            for name, caption in zip(names, captions):
                counts[name] = counts.get(name, 0) + 1
                tags = caption.split(", ")
                if name.startswith("a"):  # keep_tokens = 1: the first tag stays first, the rest are shuffled
                    assert tags[0] == name[:-4] and sorted(tags[1:]) == ["blue", "green", "red"]
                elif caption:  # b: dropped (empty) or unchanged
                    assert caption == f"{name[:-4]}, red, blue, green"
        assert counts == expected
        orders.append([b[1] for b in epoch_batches])
    assert orders[0] != orders[1] != orders[2]


def test_batches_are_the_same_with_any_loader_workers_and_a_resumed_epoch_continues_them(tmp_path):
    group = _bucketed_run_group(tmp_path)
    reference = _trainer_batches(group, workers=0, persistent=False, epochs=3)
    assert _same_batches(_trainer_batches(group, workers=2, persistent=False, epochs=3), reference)
    assert _same_batches(_trainer_batches(group, workers=2, persistent=True, epochs=3), reference)
    per_epoch = len(group)
    # A run resumed after 4 batches of its second epoch sees the rest of the uninterrupted sequence.
    assert _same_batches(_trainer_batches(group, workers=0, persistent=False, epochs=3, start=(1, 4)),
                         reference[per_epoch + 4:])
    assert _same_batches(_trainer_batches(group, workers=2, persistent=True, epochs=3, start=(1, 4)),
                         reference[per_epoch + 4:])

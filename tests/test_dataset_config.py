"""Dataset config: the spec's example TOMLs, the fallback chain, the command-line mode and bad-input messages."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.data.config import add_dataset_arguments, build_dataset_groups
from library.errors import AnimaError


def write_image(path: Path, width: int, height: int, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(width * 1000 + height).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def make_args(*argv: str, **overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    args = parser.parse_args(list(argv))
    args.seed = 42
    args.train_batch_size = 1
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dataset.toml"
    path.write_text(text, encoding="utf-8")
    return path


def toml_path(path: Path) -> str:
    return "'" + str(path) + "'"  # literal string, as the docs advise for Windows paths


def build(tmp_path: Path, text: str, *argv: str):
    return build_dataset_groups(make_args("--dataset_config", str(write_toml(tmp_path, text)), *argv))


def test_example_a_mixed_dreambooth_and_finetuning(tmp_path):
    hoge, fuga, reg, piyo = (tmp_path / n for n in ("hoge", "fuga", "reg", "piyo"))
    for folder, count in ((hoge, 2), (fuga, 1), (reg, 5)):
        for i in range(count):
            write_image(folder / f"{i}.png", 64, 64)
    (hoge / "0.txt").write_text("hoge caption", encoding="utf-8")
    write_image(piyo / "p.png", 96, 96)
    (piyo / "piyo_md.json").write_text(json.dumps({"p": {"caption": "piyo", "tags": "x, y"}}), encoding="utf-8")
    text = f"""
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = {toml_path(hoge)}
  class_tokens = 'hoge girl'

  [[datasets.subsets]]
  image_dir = {toml_path(fuga)}
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = {toml_path(reg)}
  class_tokens = 'human'
  keep_tokens = 1

[[datasets]]
resolution = [768, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = {toml_path(piyo)}
  metadata_file = {toml_path(piyo / 'piyo_md.json')}
"""
    train, val = build(tmp_path, text)
    assert val is None
    db, ft = train.datasets
    assert db.config.is_dreambooth and not ft.config.is_dreambooth
    assert (db.config.resolution, db.config.batch_size) == ((512, 512), 4)
    assert (ft.config.resolution, ft.config.batch_size) == ((768, 768), 2)
    assert [s.captions.keep_tokens for s in db.subsets] == [2, 3, 1]
    assert ft.subsets[0].captions.keep_tokens == 1
    assert all(s.captions.shuffle_caption for s in db.subsets + ft.subsets)
    captions = {i.key: i.caption for i in db.infos}
    assert captions[str(hoge / "0.png")] == "hoge caption" and captions[str(hoge / "1.png")] == "hoge girl"
    assert captions[str(fuga / "0.png")] == "fuga boy"
    assert ft.infos[0].caption == "piyo,x, y"
    # 3 train samples -> only 3 of the 5 reg images are used, each once.
    assert (db.num_train_images, db.num_reg_images) == (3, 3)
    assert train.num_train_images == 4 and train.num_reg_images == 3


def test_example_b_same_directory_in_two_datasets(tmp_path):
    hoge = tmp_path / "hoge"
    write_image(hoge / "a.png", 800, 600)
    text = f"""
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = {toml_path(hoge)}

[[datasets]]
resolution = 768
  [[datasets.subsets]]
  image_dir = {toml_path(hoge)}
"""
    train, _ = build(tmp_path, text)
    assert [d.config.resolution for d in train.datasets] == [(512, 512), (768, 768)]
    assert [d.infos[0].bucket for d in train.datasets] == [(512, 512), (768, 768)]
    assert train.datasets[0].subsets[0].caption_extension == ".caption"


def test_example_c_separators_wildcard_and_buckets(tmp_path):
    images = tmp_path / "images"
    write_image(images / "a.png", 1920, 1080)
    write_image(images / "b.webp", 800, 1200, "WEBP")
    write_image(images / "c.jpg", 640, 480, "JPEG")
    (images / "a.txt").write_text("smile, sky;;;cloud", encoding="utf-8")
    text = f"""
[general]
flip_aug = true
color_aug = false
resolution = [1024, 1024]

[[datasets]]
batch_size = 6
enable_bucket = true
bucket_no_upscale = true
caption_extension = ".txt"
keep_tokens_separator = "|||"
shuffle_caption = true
caption_tag_dropout_rate = 0.1
secondary_separator = ";;;"
enable_wildcard = true

  [[datasets.subsets]]
  image_dir = {toml_path(images)}
  num_repeats = 1
  caption_prefix = "1girl, hatsune miku, vocaloid |||"
  caption_suffix = ", anime screencap ||| masterpiece, rating: general"
"""
    train, _ = build(tmp_path, text)
    dataset = train.datasets[0]
    subset = dataset.subsets[0]
    assert subset.flip_aug and not subset.color_aug and subset.captions.secondary_separator == ";;;"
    assert dataset.config.bucket_no_upscale and dataset.config.batch_size == 6
    buckets = {Path(i.key).name: i.bucket for i in dataset.infos}
    assert buckets == {"a.png": (1344, 768), "b.webp": (768, 1152), "c.jpg": (640, 448)}
    batch = train[0]
    assert len(batch["captions"]) == 1
    assert batch["captions"][0].startswith("1girl, hatsune miku, vocaloid")


def test_config_values_beat_command_line_values(tmp_path):
    write_image(tmp_path / "img" / "a.png", 64, 64)
    text = f"""
[general]
flip_aug = false
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = {toml_path(tmp_path / 'img')}
"""
    train, _ = build(tmp_path, text, "--flip_aug", "--caption_extension", "txt", "--keep_tokens", "4")
    subset = train.datasets[0].subsets[0]
    assert not subset.flip_aug  # [general] wins over the command line
    assert subset.captions.keep_tokens == 4  # command line fills what the config leaves unset
    assert subset.caption_extension == ".txt"  # leading dot added


@pytest.mark.parametrize(("body", "message"), [
    ("[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = 'IMG'\n  captoin_extension = '.txt'\n",
     "unknown key 'captoin_extension' in \\[\\[datasets.subsets\\]\\]; did you mean 'caption_extension'"),
    ("[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = 'IMG'\n  batch_size = 2\n",
     "key 'batch_size' is not allowed in \\[\\[datasets.subsets\\]\\]; it belongs in \\[\\[datasets\\]\\]"),
    ("[general]\nis_reg = true\n[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = 'IMG'\n",
     "'is_reg' is not allowed in \\[general\\]"),
    ("[[datasets]]\nresolution = 64\nbatch_size = '4'\n  [[datasets.subsets]]\n  image_dir = 'IMG'\n",
     "datasets\\[0\\]: batch_size must be an integer, got '4'"),
    ("[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = 'IMG'\n  num_repeats = true\n",
     "num_repeats must be an integer"),
    ("[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  class_tokens = 'x'\n",
     "subsets\\[0\\]: required key 'image_dir' is missing"),
    ("[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = 'IMG'\n"
     "  [[datasets.subsets]]\n  metadata_file = 'm.json'\n", "cannot be mixed"),
    ("[[datasets]]\nresolution = 64\nprior_loss_weight = 1.0\n  [[datasets.subsets]]\n  image_dir = 'IMG'\n",
     "command-line option \\(--prior_loss_weight\\)"),
    ("[dataset]\nresolution = 64\n", "unknown key 'dataset' in the top level; did you mean 'datasets'"),
    ("[[datasets]]\n  [[datasets.subsets]]\n  image_dir = 'IMG'\n", "resolution is required"),
    ("[[datasets]]\nresolution = 64\nenable_bucket = true\nbucket_reso_steps = 8\nmin_bucket_reso = 32\n"
     "  [[datasets.subsets]]\n  image_dir = 'IMG'\n", "bucket_reso_steps must be a multiple of 16"),
    ("[[datasets]]\nresolution = 72\n  [[datasets.subsets]]\n  image_dir = 'IMG'\n", "multiples of 16"),
    ("[[datasets]]\nresolution = 64\nvalidation_split = 1.5\n  [[datasets.subsets]]\n  image_dir = 'IMG'\n",
     "validation_split must be between 0 and 1"),
    ("[[datasets]]\nresolution = 64\nresize_interpolation = 'fancy'\n  [[datasets.subsets]]\n  image_dir = 'IMG'\n",
     "resize_interpolation 'fancy' is not one of"),
    ("[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = 'IMG'\n  face_crop_aug_range = [4.0, 2.0]\n",
     "face_crop_aug_range \\[4.0, 2.0\\] must satisfy 0 < a <= b"),
    ("[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = 'IMG'\n  face_crop_aug_range = [2.0]\n",
     "face_crop_aug_range must be a list of two numbers"),
    ("[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = 'IMG'\n  caption_dropout_rate = 2\n",
     "caption_dropout_rate must be between 0 and 1"),
    ("[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = 'IMG'\n  conditioning_data_dir = 'c'\n",
     "conditioning_data_dir gives loss masks, which need --masked_loss"),
    ("[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = 'IMG'\n  conditioning_data_dir = 'c'\n"
     "  [[datasets.subsets]]\n  image_dir = 'IMG2'\n", "every subset of a dataset has conditioning_data_dir"),
    ("[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = 'IMG'\n  conditioning_data_dir = 'c'\n"
     "  is_reg = true\n", "is_reg cannot be used with conditioning_data_dir"),
    ("[[datasets]]\nresolution = 64\nconditioning_data_dir = 'c'\n  [[datasets.subsets]]\n  image_dir = 'IMG'\n",
     "'conditioning_data_dir' is not allowed in \\[\\[datasets\\]\\]; it belongs in \\[\\[datasets.subsets\\]\\]"),
    ("[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = 'NOPE'\n",
     "image_dir .*NOPE does not exist"),
    ("[[datasets]\nresolution = 64\n", "cannot be parsed"),
])
def test_bad_configs_fail_with_one_clear_line(tmp_path, body, message):
    images = tmp_path / "IMG"
    write_image(images / "a.png", 64, 64)
    text = body.replace("'IMG'", toml_path(images)).replace("'NOPE'", toml_path(tmp_path / "NOPE"))
    with pytest.raises(AnimaError, match=message) as info:
        build(tmp_path, text)
    assert "\n" not in str(info.value)


def test_missing_config_file_and_wrong_extension(tmp_path):
    with pytest.raises(AnimaError, match="not found"):
        build_dataset_groups(make_args("--dataset_config", str(tmp_path / "none.toml")))
    (tmp_path / "ds.yaml").write_text("a: 1", encoding="utf-8")
    with pytest.raises(AnimaError, match="use a .toml or .json"):
        build_dataset_groups(make_args("--dataset_config", str(tmp_path / "ds.yaml")))


def test_json_config_accepts_int_for_float_keys(tmp_path):
    write_image(tmp_path / "img" / "a.png", 64, 64)
    config = {"datasets": [{"resolution": 64, "validation_split": 0,
                            "subsets": [{"image_dir": str(tmp_path / "img")}]}]}
    (tmp_path / "ds.json").write_text(json.dumps(config), encoding="utf-8")
    train, val = build_dataset_groups(make_args("--dataset_config", str(tmp_path / "ds.json")))
    assert train.num_train_images == 1 and val is None


def test_empty_folder_gives_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    text = f"[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = {toml_path(tmp_path / 'empty')}\n"
    with pytest.raises(AnimaError, match="no training images found"):
        build(tmp_path, text)


def test_command_line_dreambooth_folders_with_reg(tmp_path):
    write_image(tmp_path / "train" / "3_sks dog" / "a.png", 64, 64)
    write_image(tmp_path / "train" / "3_sks dog" / "b.png", 64, 64)
    write_image(tmp_path / "train" / "notes" / "x.png", 64, 64)  # no repeats prefix: skipped
    write_image(tmp_path / "reg" / "1_dog" / "r.png", 64, 64)
    args = make_args("--train_data_dir", str(tmp_path / "train"), "--reg_data_dir", str(tmp_path / "reg"),
                     "--resolution", "64", "--prior_loss_weight", "0.5")
    train, _ = build_dataset_groups(args)
    dataset = train.datasets[0]
    assert [s.class_tokens for s in dataset.subsets] == ["sks dog", "dog"]
    assert [s.num_repeats for s in dataset.subsets] == [3, 1]
    assert train.num_train_images == 6 and train.num_reg_images == 6  # the one reg image repeated to balance
    weights = sorted(float(train[i]["loss_weights"][0]) for i in range(len(train)))
    assert weights == [0.5] * 6 + [1.0] * 6
    assert {i.caption for i in dataset.infos} == {"sks dog", "dog"}


def test_prior_loss_weight_zero_gives_regularization_images_zero_weight(tmp_path):
    # 0 is a weight like any other: the reg samples stay in the batches and add nothing to the loss.
    write_image(tmp_path / "train" / "2_sks" / "a.png", 64, 64)
    write_image(tmp_path / "reg" / "1_dog" / "r.png", 64, 64)
    args = make_args("--train_data_dir", str(tmp_path / "train"), "--reg_data_dir", str(tmp_path / "reg"),
                     "--resolution", "64", "--prior_loss_weight", "0")
    train, _ = build_dataset_groups(args)
    weights = sorted(float(train[i]["loss_weights"][0]) for i in range(len(train)))
    assert weights == [0.0, 0.0, 1.0, 1.0]


def test_prior_loss_weight_without_regularization_images_warns(tmp_path, caplog):
    write_image(tmp_path / "train" / "2_sks" / "a.png", 64, 64)
    base = ("--train_data_dir", str(tmp_path / "train"), "--resolution", "64")
    with caplog.at_level(logging.WARNING):
        build_dataset_groups(make_args(*base))
    assert not any("--prior_loss_weight" in r.getMessage() for r in caplog.records)
    with caplog.at_level(logging.WARNING):
        build_dataset_groups(make_args(*base, "--prior_loss_weight", "0.5"))
    assert any("--prior_loss_weight 0.5 has no effect" in r.getMessage() for r in caplog.records)


def test_folder_repeats_are_the_integer_before_the_first_underscore(tmp_path):
    # sd-scripts reads "<repeats>_<class tokens>" with int() on the text before the first "_" (so "+3" and "5 " are
    # numbers) and keeps the rest, underscores included, as the class tokens.
    for name in ("+3_red hair", "5 _sks", "2_a_b", "7", "1_", "x_1", "0_zero"):
        write_image(tmp_path / "train" / name / "i.png", 64, 64)
    train, _ = build_dataset_groups(make_args("--train_data_dir", str(tmp_path / "train"), "--resolution", "64"))
    subsets = {Path(s.image_dir).name: (s.num_repeats, s.class_tokens) for s in train.datasets[0].subsets}
    assert subsets == {"+3_red hair": (3, "red hair"), "5 _sks": (5, "sks"), "2_a_b": (2, "a_b"), "7": (7, ""),
                       "1_": (1, "")}


def test_command_line_finetuning_with_in_json(tmp_path):
    write_image(tmp_path / "imgs" / "a.png", 64, 64)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a": {"caption": "cap", "image_size": [64, 64]}}), encoding="utf-8")
    args = make_args("--train_data_dir", str(tmp_path / "imgs"), "--in_json", str(meta), "--resolution", "64",
                     "--dataset_repeats", "2")
    train, _ = build_dataset_groups(args)
    assert train.num_train_images == 2 and train.datasets[0].infos[0].caption == "cap"


def test_unreadable_metadata_json(tmp_path):
    write_image(tmp_path / "imgs" / "a.png", 64, 64)
    meta = tmp_path / "meta.json"
    meta.write_text("{not json", encoding="utf-8")
    args = make_args("--train_data_dir", str(tmp_path / "imgs"), "--in_json", str(meta), "--resolution", "64")
    with pytest.raises(AnimaError, match="cannot read metadata_file .*meta.json"):
        build_dataset_groups(args)


def test_legacy_caption_extention_flag(tmp_path):
    write_image(tmp_path / "train" / "1_x" / "a.png", 64, 64)
    (tmp_path / "train" / "1_x" / "a.tags").write_text("tagged", encoding="utf-8")
    args = make_args("--train_data_dir", str(tmp_path / "train"), "--resolution", "64", "--caption_extention",
                     ".tags")
    train, _ = build_dataset_groups(args)
    assert train.datasets[0].infos[0].caption == "tagged"


def test_no_dataset_at_all():
    with pytest.raises(AnimaError, match="no dataset"):
        build_dataset_groups(make_args())


def test_caching_conflicts_are_rejected_at_build(tmp_path):
    write_image(tmp_path / "train" / "1_x" / "a.png", 64, 64)
    base = ("--train_data_dir", str(tmp_path / "train"), "--resolution", "64")
    with pytest.raises(AnimaError, match="random_crop .* --cache_latents"):
        build_dataset_groups(make_args(*base, "--random_crop", "--cache_latents_to_disk"))
    with pytest.raises(AnimaError, match="shuffle_caption .* --cache_text_encoder_outputs"):
        build_dataset_groups(make_args(*base, "--shuffle_caption", "--cache_text_encoder_outputs"))
    with pytest.raises(AnimaError, match="token_warmup_step"):
        build_dataset_groups(make_args(*base, "--token_warmup_step", "5", "--cache_text_encoder_outputs_to_disk"))
    with pytest.raises(AnimaError, match="caption_tag_dropout_rate"):
        build_dataset_groups(make_args(*base, "--caption_tag_dropout_rate", "0.1", "--cache_text_encoder_outputs"))
    train, _ = build_dataset_groups(make_args(*base, "--caption_dropout_rate", "0.1", "--cache_text_encoder_outputs"))
    assert train.num_train_images == 1

"""Dataset inputs sd-scripts accepts (a bare `<repeats>` folder, an empty fine-tuning caption with tags) and the
messages for inputs that cannot work (num_repeats, a folder as --dataset_config, --network_dropout)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import anima_train_network
from anima_train_network import AnimaNetworkTrainer
from library.data.config import add_dataset_arguments, build_dataset_groups, load_dataset_config
from library.errors import AnimaError


def write_image(path: Path, size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(size).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def make_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    args = parser.parse_args(list(argv))
    args.seed = 1
    args.train_batch_size = 1
    return args


def toml_args(tmp_path: Path, subsets: list[str], *argv: str) -> argparse.Namespace:
    body = "[[datasets]]\nresolution = 64\n" + "".join(f"  [[datasets.subsets]]\n{s}\n" for s in subsets)
    path = tmp_path / "ds.toml"
    path.write_text(body, encoding="utf-8")
    return make_args("--dataset_config", str(path), *argv)


def test_a_folder_named_just_a_number_is_a_subset_with_that_many_repeats_and_no_class_tokens(tmp_path, caplog):
    write_image(tmp_path / "train" / "5" / "a.png")
    write_image(tmp_path / "train" / "2_sks dog" / "b.png")
    with caplog.at_level(logging.WARNING):
        train, _ = build_dataset_groups(make_args("--train_data_dir", str(tmp_path / "train"), "--resolution", "64"))
    infos = {Path(i.key).name: i for i in train.datasets[0].infos}
    assert infos["a.png"].num_repeats == 5 and infos["a.png"].caption == ""
    assert infos["b.png"].num_repeats == 2 and infos["b.png"].caption == "sks dog"
    assert not any("is skipped" in r.getMessage() for r in caplog.records)


def test_fine_tuning_record_with_an_empty_caption_uses_the_tags_without_a_leading_separator(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    write_image(tmp_path / "images" / "b.png", 48)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a": {"caption": "", "tags": "1girl, solo"},
                                "b": {"caption": "a photo", "tags": "1girl"}}), encoding="utf-8")
    train, _ = build_dataset_groups(make_args("--in_json", str(meta), "--train_data_dir", str(tmp_path / "images"),
                                              "--resolution", "64"))
    captions = {i.key: i.caption for i in train.datasets[0].infos}
    assert captions == {"a": "1girl, solo", "b": "a photo,1girl"}
    wildcard, _ = build_dataset_groups(make_args("--in_json", str(meta), "--train_data_dir", str(tmp_path / "images"),
                                                 "--resolution", "64", "--enable_wildcard"))
    assert {i.key: i.caption for i in wildcard.datasets[0].infos}["a"] == "1girl, solo"


@pytest.mark.parametrize("value", [-1, -7])
def test_negative_num_repeats_is_an_error_naming_the_subset_key(tmp_path, value):
    write_image(tmp_path / "img" / "a.png")
    args = toml_args(tmp_path, [f"  image_dir = '{tmp_path / 'img'}'\n  num_repeats = {value}"])
    with pytest.raises(AnimaError) as caught:
        build_dataset_groups(args)
    message = str(caught.value)
    assert "datasets[0].subsets[0]: num_repeats must be at least 1" in message and str(value) in message
    assert "no training images found" not in message


def test_negative_dataset_repeats_names_the_flag(tmp_path):
    with pytest.raises(AnimaError, match=r"--dataset_repeats must be at least 1 .* got -1"):
        build_dataset_groups(make_args("--in_json", str(tmp_path / "meta.json"), "--dataset_repeats", "-1"))


def test_num_repeats_zero_skips_a_subset_and_names_the_key_when_nothing_is_left(tmp_path, caplog):
    write_image(tmp_path / "img" / "a.png")
    write_image(tmp_path / "other" / "b.png")
    with caplog.at_level(logging.WARNING):
        train, _ = build_dataset_groups(toml_args(tmp_path, [f"  image_dir = '{tmp_path / 'img'}'\n  num_repeats = 0",
                                                             f"  image_dir = '{tmp_path / 'other'}'"]))
    assert [Path(i.key).name for i in train.datasets[0].infos] == ["b.png"]
    assert any("subsets[0]: num_repeats = 0, this subset is skipped" in r.getMessage() for r in caplog.records)
    with pytest.raises(AnimaError, match=r"num_repeats = 0 skips .*subsets\[0\].*set num_repeats to 1 or more"):
        build_dataset_groups(toml_args(tmp_path, [f"  image_dir = '{tmp_path / 'img'}'\n  num_repeats = 0"]))


def test_a_folder_given_as_dataset_config_says_it_is_a_folder_and_names_the_files_inside(tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "character.toml").write_text("", encoding="utf-8")
    with pytest.raises(AnimaError) as caught:
        load_dataset_config(folder)
    message = str(caught.value)
    assert "is a folder" in message and ".toml or .json file" in message and "character.toml" in message
    assert "not found" not in message


def cli_argv(tiny, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(tiny.dit), "--qwen3", str(tiny.qwen3_dir), "--vae", str(tiny.vae),
            "--t5_tokenizer_path", str(tiny.t5_tokenizer_dir), "--dataset_config", str(tiny.dataset_toml),
            "--output_dir", str(out), "--network_module", "networks.lora_anima", "--network_dim", "4",
            "--max_train_steps", "1", *extra]


def _must_not_run(*_args, **_kwargs):
    raise AssertionError("models were loaded before the bad input was reported")


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_network_dropout_out_of_range_is_reported_as_that_flag(tiny_setup, tmp_path, monkeypatch, capsys, value):
    monkeypatch.setattr(AnimaNetworkTrainer, "load_frozen_models", _must_not_run)
    assert anima_train_network.main(cli_argv(tiny_setup, tmp_path / "out", "--network_dropout", value)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --network_dropout {value}: expected"), err
    assert "--network_args" not in err[0]


def test_a_folder_as_dataset_config_is_one_error_line_from_the_trainer(tiny_setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(AnimaNetworkTrainer, "load_frozen_models", _must_not_run)
    argv = cli_argv(tiny_setup, tmp_path / "out")
    argv[argv.index("--dataset_config") + 1] = str(Path(tiny_setup.dataset_toml).parent)
    assert anima_train_network.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --dataset_config") and "is a folder" in err[0], err

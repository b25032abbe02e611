"""Bad input files, case by case: dataset TOML, image folders, captions, model checkpoints, LoRA files, prompt
files and config files. Each case ends with exactly one `error:` line that names the file or flag, exit code 2,
before any model is loaded, and leaves the output, cache and dataset folders exactly as they were."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import toml

import anima_train_network
from library.models import dit_loading, qwen3, vae

Case = Callable[[Path, "Inputs"], list[str]]


class Inputs:
    """A private copy of the tiny setup's files for one case, so a case may damage them freely."""

    def __init__(self, tiny, root: Path) -> None:
        self.root = root
        self.images = root / "images"
        shutil.copytree(tiny.image_dir, self.images)
        self.dit, self.vae = tiny.dit, tiny.vae
        self.qwen3_dir, self.t5_dir = tiny.qwen3_dir, tiny.t5_tokenizer_dir
        self.out = root / "out"
        self.prompts = tiny.sample_prompts

    def dataset(self, **dataset_keys) -> Path:
        """A dataset TOML over the copied images; keys given here replace the dataset's (subset keys under
        `subset=`)."""
        subset = {"image_dir": str(self.images), "num_repeats": 1}
        subset.update(dataset_keys.pop("subset", {}))
        dataset = {"resolution": 64, "batch_size": 2, "enable_bucket": True, "min_bucket_reso": 32,
                   "max_bucket_reso": 128, "bucket_reso_steps": 16, "subsets": [subset]}
        dataset.update(dataset_keys)
        path = self.root / "dataset.toml"
        path.write_text(toml.dumps({"general": {"caption_extension": ".txt"}, "datasets": [dataset]}),
                        encoding="utf-8")
        return path

    def argv(self, *extra: str, dataset: Path | None = None, **replace: str) -> list[str]:
        flags = {
            "--pretrained_model_name_or_path": str(self.dit), "--qwen3": str(self.qwen3_dir), "--vae": str(self.vae),
            "--t5_tokenizer_path": str(self.t5_dir), "--dataset_config": str(dataset or self.dataset()),
            "--output_dir": str(self.out), "--network_module": "networks.lora_anima", "--network_dim": "4",
            "--max_train_steps": "2", "--max_data_loader_n_workers": "0",
        }
        flags.update({f"--{k}": v for k, v in replace.items()})
        argv = [item for pair in flags.items() for item in pair if item is not None]
        return argv + ["--cache_latents", "--cache_latents_to_disk", *extra]


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def _truncated_copy(src: Path, dst: Path, keep: float = 0.5) -> Path:
    data = src.read_bytes()
    return _write(dst, data[: int(len(data) * keep)])


# case name -> (builder of the command line, text the error line must contain)
CASES: dict[str, tuple[Case, str]] = {
    # dataset TOML
    "toml_syntax_error": (lambda r, i: i.argv(dataset=_write(r / "bad.toml", "[[datasets]\nresolution = 64")),
                          "bad.toml"),
    "toml_unknown_dataset_key": (lambda r, i: i.argv(dataset=i.dataset(resolutoin=64)), "resolutoin"),
    "toml_unknown_subset_key": (lambda r, i: i.argv(dataset=i.dataset(subset={"num_repeat": 2})), "num_repeat"),
    "toml_wrong_type": (lambda r, i: i.argv(dataset=i.dataset(batch_size="two")), "batch_size"),
    "toml_zero_batch_size": (lambda r, i: i.argv(dataset=i.dataset(batch_size=0)), "batch_size"),
    "toml_missing_image_dir": (lambda r, i: i.argv(dataset=i.dataset(subset={"image_dir": str(r / "nowhere")})),
                               "nowhere"),
    "toml_image_dir_is_a_file": (lambda r, i: i.argv(dataset=i.dataset(
        subset={"image_dir": str(_write(r / "file.txt", "x"))})), "file.txt"),
    "toml_bad_resolution": (lambda r, i: i.argv(dataset=i.dataset(resolution="big")), "resolution"),
    "toml_min_bucket_above_max": (lambda r, i: i.argv(dataset=i.dataset(min_bucket_reso=256, max_bucket_reso=64)),
                                  "bucket_reso"),
    "toml_missing_file": (lambda r, i: i.argv(dataset=r / "missing.toml"), "missing.toml"),
    "toml_no_datasets": (lambda r, i: i.argv(dataset=_write(r / "empty.toml", "[general]\nshuffle_caption = false\n")),
                         "empty.toml"),
    "toml_bad_interpolation": (lambda r, i: i.argv(dataset=i.dataset(resize_interpolation="sharpest")),
                               "resize_interpolation"),
    "toml_in_json_missing": (lambda r, i: i.argv(dataset=i.dataset(subset={"metadata_file": str(r / "meta.json")})),
                             "meta.json"),
    # images and captions
    "empty_image_folder": (lambda r, i: i.argv(dataset=i.dataset(
        subset={"image_dir": str((r / "empty").mkdir() or r / "empty")})), "empty"),
    "corrupt_image_with_strict_images": (
        lambda r, i: [*i.argv("--strict_images"), *([] if _write(i.images / "broken.png", b"not a png") else [])],
        "broken.png"),
    "only_regularisation_subsets": (lambda r, i: i.argv(dataset=i.dataset(subset={"is_reg": True})),
                                    "no training images"),
    # model checkpoints
    "dit_missing": (lambda r, i: i.argv(pretrained_model_name_or_path=str(r / "dit.safetensors")),
                    "--pretrained_model_name_or_path"),
    "dit_truncated": (lambda r, i: i.argv(pretrained_model_name_or_path=str(
        _truncated_copy(i.dit, r / "dit.safetensors", keep=0.001))), "--pretrained_model_name_or_path"),
    "dit_is_text": (lambda r, i: i.argv(pretrained_model_name_or_path=str(_write(r / "dit.safetensors", "hello"))),
                    "--pretrained_model_name_or_path"),
    "vae_missing": (lambda r, i: i.argv(vae=str(r / "vae.safetensors")), "--vae"),
    "vae_truncated": (lambda r, i: i.argv(vae=str(_truncated_copy(i.vae, r / "vae.safetensors", keep=0.001))),
                      "--vae"),
    "qwen3_missing": (lambda r, i: i.argv(qwen3=str(r / "qwen3")), "--qwen3"),
    "qwen3_folder_without_weights": (lambda r, i: i.argv(qwen3=str((r / "q").mkdir() or r / "q")), "--qwen3"),
    "t5_tokenizer_folder_empty": (lambda r, i: i.argv(t5_tokenizer_path=str((r / "t5").mkdir() or r / "t5")),
                                  "t5"),
    # LoRA files
    "network_weights_missing": (lambda r, i: i.argv("--network_weights", str(r / "lora.safetensors")),
                                "--network_weights"),
    "network_weights_truncated": (lambda r, i: i.argv("--network_weights", str(
        _truncated_copy(i.dit, r / "lora.safetensors", keep=0.001))), "--network_weights"),
    "network_weights_is_text": (lambda r, i: i.argv("--network_weights", str(_write(r / "lora.safetensors", "x"))),
                                "--network_weights"),
    "base_weights_missing": (lambda r, i: i.argv("--base_weights", str(r / "base.safetensors")), "--base_weights"),
    "dim_from_weights_without_weights": (lambda r, i: i.argv("--dim_from_weights"), "--dim_from_weights"),
    # prompt and config files
    "sample_prompts_missing": (lambda r, i: i.argv("--sample_prompts", str(r / "prompts.txt")), "prompts.txt"),
    "sample_prompt_unknown_option": (lambda r, i: i.argv("--sample_prompts", str(
        _write(r / "prompts.txt", "a cat --zz 3\n"))), "prompts.txt"),
    "config_file_missing": (lambda r, i: i.argv("--config_file", str(r / "run.toml")), "run.toml"),
    "config_file_syntax_error": (lambda r, i: i.argv("--config_file", str(_write(r / "run.toml", "lr = = 1"))),
                                 "run.toml"),
    "config_file_unknown_key": (lambda r, i: i.argv("--config_file", str(_write(r / "run.toml",
                                                                              "learning_rat = 1e-4\n"))),
                                "learning_rat"),
    "network_module_unknown": (lambda r, i: i.argv(network_module="networks.no_such_module"), "--network_module"),
}


def _snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file below the folders with its size and modification time."""
    files = {}
    for folder in folders:
        if folder.exists():
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    stat = path.stat()
                    files[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return files


def _must_not_run(*_args, **_kwargs):
    raise AssertionError("a model was loaded before the bad input was reported")


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_file_is_one_error_line_before_any_model_load_and_changes_nothing(
    case, tiny_setup, tmp_path, monkeypatch, capsys
):
    build, expected = CASES[case]
    inputs = Inputs(tiny_setup, tmp_path)
    argv = build(tmp_path, inputs)
    for module, name in ((dit_loading, "load_anima_model"), (vae, "load_vae"),
                         (qwen3, "load_qwen3_text_encoder")):
        real = getattr(module, name)
        # Header checks load onto the meta device; anything else is real work.
        monkeypatch.setattr(module, name, lambda *a, _real=real, **k: _real(*a, **k) if str(k.get("device")) == "meta"
                            else _must_not_run())
    before = _snapshot(inputs.images, inputs.out, tmp_path)
    code = anima_train_network.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (code, err)
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and err[-1] == errors[0], err  # warnings may come first; the error line ends it
    assert expected in errors[0], errors[0]
    assert not any("Traceback" in line for line in err), err
    assert _snapshot(inputs.images, inputs.out, tmp_path) == before

"""Bad model files, network options and resume folders end with one `error:` line naming the flag, before any
image is scanned, any model is loaded or any cache file is written (the trainer's up-front input check)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import anima_train_network
from anima_train_network import AnimaNetworkTrainer
from library.errors import AnimaError
from library.io import checkpoints as checkpoint_io
from library.models.dit_loading import load_anima_model
from library.models.qwen3 import load_qwen3_text_encoder
from library.models.vae import load_vae
from networks.lora_anima import create_network


@pytest.fixture(scope="module")
def rank4_lora(tiny_setup, tmp_path_factory) -> Path:
    """A LoRA of rank 4 for the tiny DiT (built on a weightless DiT: only the LoRA holds data)."""
    dit = load_anima_model(tiny_setup.dit, device="meta")
    network = create_network(1.0, 4, 4, None, [], dit)
    path = tmp_path_factory.mktemp("lora") / "rank4.safetensors"
    network.save_weights(str(path))
    return path


def argv_for(tiny, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(tiny.dit), "--qwen3", str(tiny.qwen3_dir), "--vae", str(tiny.vae),
        "--t5_tokenizer_path", str(tiny.t5_tokenizer_dir), "--dataset_config", str(tiny.dataset_toml),
        "--output_dir", str(out), "--network_module", "networks.lora_anima", "--network_dim", "4",
        "--max_train_steps", "2", "--cache_latents", "--cache_latents_to_disk", *extra,
    ]


def _must_not_run(*_args, **_kwargs):
    raise AssertionError("long work started before the bad input was reported")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("lora_as_dit", "--pretrained_model_name_or_path"),
        ("vae_as_dit", "--pretrained_model_name_or_path"),
        ("dit_as_vae", "--vae"),
        ("dit_as_qwen3", "--qwen3"),
        ("unknown_network_arg", "--network_args"),
        ("network_weights_of_other_rank", "--network_weights"),
        ("dit_as_network_weights", "--network_weights"),
        ("dit_as_base_weights", "--base_weights"),
        ("resume_of_foreign_folder", "--resume"),
        ("output_dir_under_a_file", "--output_dir"),
    ],
)
def test_bad_input_is_one_error_line_before_datasets_models_and_caches(
    case, expected, tiny_setup, rank4_lora, tmp_path, monkeypatch, capsys
):
    tiny = tiny_setup
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a state folder")
    replace = {
        "lora_as_dit": ("--pretrained_model_name_or_path", str(rank4_lora)),
        "vae_as_dit": ("--pretrained_model_name_or_path", str(tiny.vae)),
        "dit_as_vae": ("--vae", str(tiny.dit)),
        "dit_as_qwen3": ("--qwen3", str(tiny.dit)),
    }
    extra = {
        "unknown_network_arg": ["--network_args", "no_such_option=1"],
        "network_weights_of_other_rank": ["--network_weights", str(rank4_lora), "--network_dim", "8"],
        "dit_as_network_weights": ["--network_weights", str(tiny.dit)],
        "dit_as_base_weights": ["--base_weights", str(tiny.dit)],
        "resume_of_foreign_folder": ["--resume", str(foreign)],
    }.get(case, [])
    out = tmp_path / "out"
    if case == "output_dir_under_a_file":
        out = foreign / "notes.txt" / "out"
    argv = argv_for(tiny, out, *extra)
    if case in replace:
        flag, value = replace[case]
        argv[argv.index(flag) + 1] = value
        if flag == "--qwen3":  # a single-file --qwen3 has no tokenizer: take it from the tiny folder
            argv += ["--qwen3_tokenizer_path", str(tiny.qwen3_dir)]
    monkeypatch.setattr(AnimaNetworkTrainer, "build_datasets", _must_not_run)
    monkeypatch.setattr(AnimaNetworkTrainer, "load_frozen_models", _must_not_run)
    monkeypatch.setattr(AnimaNetworkTrainer, "write_caches_only", _must_not_run)

    assert anima_train_network.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not out.exists()
    assert not list(Path(tiny.dataset_toml).parent.rglob("*_anima.npz"))


def test_meta_device_loads_check_headers_and_read_no_weights(tiny_setup, monkeypatch):
    tiny = tiny_setup
    real_safe_open = checkpoint_io.safe_open

    class HeaderOnly:
        """safe_open that refuses to hand out tensor data."""

        def __init__(self, *args, **kwargs):
            self._inner = real_safe_open(*args, **kwargs)

        def __getattr__(self, name):
            if name == "get_tensor":
                raise AssertionError("tensor data was read")
            return getattr(self._inner, name)

    monkeypatch.setattr(checkpoint_io, "safe_open", HeaderOnly)
    dit = load_anima_model(tiny.dit, device="meta")
    vae = load_vae(tiny.vae, device="meta")
    qwen3 = load_qwen3_text_encoder(tiny.qwen3_dir, device="meta", dtype=torch.float32)
    for model in (dit, vae, qwen3):
        assert all(p.is_meta for p in model.parameters())
    with pytest.raises(AnimaError, match="tensor data was read"):  # the spy does catch real reads
        load_vae(tiny.vae, device="cpu")


def test_ctrl_c_ends_with_one_line_and_exit_code_130(tiny_setup, tmp_path, monkeypatch, capsys):
    def interrupted(self, args):
        raise KeyboardInterrupt

    monkeypatch.setattr(AnimaNetworkTrainer, "train", interrupted)
    assert anima_train_network.main(argv_for(tiny_setup, tmp_path / "out")) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: interrupted") and "--resume" in err[0]

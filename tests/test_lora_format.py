"""LoRA key layouts: sd-scripts <-> ComfyUI conversion, module-path table, file I/O, converter CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen3Config, Qwen3Model

from library.errors import AnimaError
from library.io.files import safetensors_hashes
from library.models.dit import Anima, AnimaConfig
from networks.convert_lora import main as convert_main
from networks.lora_format import (
    convert_from_comfy,
    convert_to_comfy,
    detect_lora_format,
    load_lora_file,
    lora_name_for,
    module_path_from_table,
    save_lora_file,
    to_sd_scripts_format,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def tiny_models() -> tuple[Anima, Qwen3Model]:
    dit = Anima(
        AnimaConfig(
            model_channels=32,
            num_blocks=12,  # two-digit block indices
            num_heads=2,
            crossattn_emb_channels=16,
            adaln_lora_dim=8,
            adapter_source_dim=12,
            adapter_model_dim=16,
            adapter_num_layers=11,
            adapter_num_heads=2,
            adapter_vocab_size=64,
        )
    )
    qwen3 = Qwen3Model(
        Qwen3Config(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=11,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
        )
    )
    return dit, qwen3


def make_lora(names: dict[str, tuple[int, int]], rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    """sd-scripts state dict for {lora_name: (in, out)}."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (fan_in, fan_out) in names.items():
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, fan_in, generator=gen)
        sd[f"{name}.lora_up.weight"] = torch.randn(fan_out, rank, generator=gen)
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def delta_weights(sd: dict) -> dict[str, torch.Tensor]:
    """lora_name -> up @ down * alpha / r, for either key layout (missing alpha = scale 1)."""
    sd = to_sd_scripts_format(sd)
    out = {}
    for key in sd:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            down, up = sd[key], sd[f"{name}.lora_up.weight"]
            out[name] = up @ down * (sd[f"{name}.alpha"] / down.shape[0])
    return out


SAMPLE = make_lora(
    {
        "lora_unet_blocks_0_self_attn_q_proj": (32, 32),
        "lora_unet_blocks_1_adaln_modulation_self_attn_1": (32, 8),
        "lora_unet_t_embedder_1_linear_2": (32, 96),
        "lora_unet_llm_adapter_blocks_0_mlp_0": (16, 64),
        "lora_te_layers_3_mlp_down_proj": (32, 16),
    }
)


def test_module_path_table_restores_every_linear_layer_of_dit_adapter_and_qwen3():
    dit, qwen3 = tiny_models()
    for prefix, model in (("lora_unet", dit), ("lora_te", qwen3)):
        names = linear_names(model)
        assert names
        for name in names:
            assert module_path_from_table(lora_name_for(prefix, name)) == name


def test_unknown_module_name_cannot_be_restored():
    with pytest.raises(AnimaError, match="lora_unet_blocks_0_something_new"):
        module_path_from_table("lora_unet_blocks_0_something_new")


def test_comfy_keys_follow_comfyui_naming():
    comfy = convert_to_comfy(SAMPLE, fold_alpha=False)
    assert "diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight" in comfy
    assert "diffusion_model.blocks.1.adaln_modulation_self_attn.1.lora_B.weight" in comfy
    assert "diffusion_model.t_embedder.1.linear_2.alpha" in comfy
    assert "diffusion_model.llm_adapter.blocks.0.mlp.0.lora_A.weight" in comfy
    assert "text_encoders.qwen3_06b.transformer.model.layers.3.mlp.down_proj.lora_B.weight" in comfy
    assert len(comfy) == len(SAMPLE)
    assert detect_lora_format(comfy) == "comfy" and detect_lora_format(SAMPLE) == "sd-scripts"


def test_round_trip_with_alpha_kept_is_exact():
    back = convert_from_comfy(convert_to_comfy(SAMPLE, fold_alpha=False))
    assert back.keys() == SAMPLE.keys()
    for key in SAMPLE:
        assert torch.equal(back[key], SAMPLE[key])


def test_folded_alpha_keeps_the_effective_update_and_every_key_names_lora():
    comfy = convert_to_comfy(SAMPLE)  # default: folded, loadable by diffusers
    assert all("lora" in key for key in comfy)
    assert not any(key.endswith(".alpha") for key in comfy)
    expected = delta_weights(SAMPLE)
    back = convert_from_comfy(comfy)
    assert back.keys() == SAMPLE.keys()
    for name, delta in delta_weights(back).items():
        torch.testing.assert_close(delta, expected[name])
        assert float(back[f"{name}.alpha"]) == 4.0  # no alpha in the file = scale 1 = alpha equal to rank


def test_model_module_paths_take_priority_over_the_table():
    sd = make_lora({"lora_unet_custom_layer_x": (4, 4)})
    comfy = convert_to_comfy(sd, module_paths={"lora_unet_custom_layer_x": "custom.layer_x"})
    assert "diffusion_model.custom.layer_x.lora_A.weight" in comfy


def test_kohya_suffixes_under_comfy_prefix_and_te1_prefix_are_accepted():
    comfy = {
        "diffusion_model.blocks.0.mlp.layer1.lora_down.weight": torch.zeros(2, 8),
        "diffusion_model.blocks.0.mlp.layer1.lora_up.weight": torch.zeros(8, 2),
    }
    assert set(to_sd_scripts_format(comfy)) == {
        "lora_unet_blocks_0_mlp_layer1.lora_down.weight",
        "lora_unet_blocks_0_mlp_layer1.lora_up.weight",
        "lora_unet_blocks_0_mlp_layer1.alpha",
    }
    te1 = make_lora({"lora_te1_layers_0_self_attn_q_proj": (8, 8)})
    assert "lora_te_layers_0_self_attn_q_proj.alpha" in to_sd_scripts_format(te1)


@pytest.mark.parametrize(
    ("sd", "message"),
    [
        ({}, "no tensors"),
        ({"transformer.blocks.0.lora_A.weight": torch.zeros(1, 1)}, "unrecognised LoRA key"),
        ({**SAMPLE, **convert_to_comfy(SAMPLE)}, "mixes"),
        ({"lora_unet_blocks_0_mlp_layer1.hada_w1_a": torch.zeros(1)}, "LoHa"),
        ({"lora_unet_blocks_0_mlp_layer1.lora_down.weight": torch.zeros(2, 8)}, "lacks"),
        (
            {
                "lora_unet_blocks_0_mlp_layer1.lora_down.weight": torch.zeros(2, 8),
                "lora_unet_blocks_0_mlp_layer1.lora_up.weight": torch.zeros(8, 3),
            },
            "inconsistent shapes",
        ),
    ],
)
def test_bad_state_dicts_give_one_clear_error(sd, message):
    with pytest.raises(AnimaError, match=message):
        to_sd_scripts_format(sd)


def test_save_is_atomic_and_adds_hashes(tmp_path):
    path = tmp_path / "out.safetensors"
    save_lora_file(path, SAMPLE, {"ss_network_dim": "4", "modelspec.title": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
    tensors, meta = load_lora_file(path)
    assert tensors.keys() == SAMPLE.keys()
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == safetensors_hashes(tensors, {"ss_network_dim": "4"})


def test_load_rejects_missing_and_non_lora_files(tmp_path):
    with pytest.raises(AnimaError, match="not found"):
        load_lora_file(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(AnimaError, match="bad.safetensors"):
        load_lora_file(bad)
    pickled = tmp_path / "obj.pt"
    torch.save({"a": [1, 2]}, pickled)
    with pytest.raises(AnimaError, match="obj.pt"):
        load_lora_file(pickled)


def test_converter_cli_round_trip_keeps_metadata_and_effective_weights(tmp_path, capsys):
    src = tmp_path / "kohya.safetensors"
    save_file(SAMPLE, str(src), metadata={"ss_network_dim": "4", "sshs_model_hash": "stale"})
    comfy, back = tmp_path / "comfy.safetensors", tmp_path / "back.safetensors"

    assert convert_main(["--src", str(src), "--dst", str(comfy), "--to", "comfy"]) == 0
    assert "5 LoRA modules" in capsys.readouterr().out
    assert convert_main(["--src", str(comfy), "--dst", str(back), "--to", "sd-scripts"]) == 0

    with safe_open(str(comfy), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_lora_format"] == "comfy"
    assert meta["ss_lora_alpha_folded"] == "True"
    assert meta["sshs_model_hash"] == safetensors_hashes(load_file(str(comfy)), meta)[0]
    back_sd = load_file(str(back))
    assert back_sd.keys() == SAMPLE.keys()
    expected = delta_weights(SAMPLE)
    for name, delta in delta_weights(back_sd).items():
        torch.testing.assert_close(delta, expected[name])

    exact = tmp_path / "exact.safetensors"
    assert convert_main(["--src", str(src), "--dst", str(comfy), "--to", "comfy", "--keep_alpha"]) == 0
    assert convert_main(["--src", str(comfy), "--dst", str(exact), "--to", "sd-scripts"]) == 0
    assert all(torch.equal(v, SAMPLE[k]) for k, v in load_file(str(exact)).items())


def test_converter_cli_errors_are_one_line(tmp_path, capsys):
    assert (
        convert_main(["--src", str(tmp_path / "missing.safetensors"), "--dst", "x.safetensors", "--to", "comfy"]) == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --src: file not found") and "\n" not in err


def test_converter_runs_as_a_module(tmp_path, golden_dir):
    dst = tmp_path / "tiny_comfy.safetensors"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "networks.convert_lora",
            "--src",
            str(golden_dir / "lora_tiny.safetensors"),
            "--dst",
            str(dst),
            "--to",
            "comfy",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    keys = set(load_file(str(dst)))
    assert len(keys) == 40
    assert "diffusion_model.blocks.1.cross_attn.output_proj.lora_B.weight" in keys

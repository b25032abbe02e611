"""LoRA tools: merge into the DiT, SVD rank resize, the sd-scripts-named converter and alpha restoration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.errors import AnimaError
from library.models.dit_loading import load_anima_model
from networks import anima_merge_lora, convert_anima_lora_to_comfy, resize_lora
from networks.lora_anima import create_network, create_network_from_weights
from networks.lora_format import convert_to_comfy, save_lora_file, to_sd_scripts_with_alpha

REPO_ROOT = Path(__file__).resolve().parent.parent


def write_lora(dit, path: Path, rank: int, alpha: float, seed: int, **network_args: str) -> Path:
    """A LoRA on the tiny DiT with random (non-zero) up and down weights, saved in the sd-scripts layout."""
    network = create_network(1.0, rank, alpha, None, None, dit, **network_args)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.unet_loras:
            lora.lora_down.weight.copy_(torch.randn(lora.lora_down.weight.shape, generator=generator) * 0.2)
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator) * 0.2)
    network.save_weights(str(path), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)})
    network.remove_hooks()
    return path


@pytest.fixture(scope="module")
def tiny_dit_and_loras(tiny_setup, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    dit = load_anima_model(tiny_setup.dit).requires_grad_(False)
    first = write_lora(dit, folder / "first.safetensors", rank=4, alpha=2.0, seed=1)
    second = write_lora(dit, folder / "second.safetensors", rank=8, alpha=8.0, seed=2, train_llm_adapter="true")
    return tiny_setup, dit, first, second


def dit_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(1, 16, 1, 8, 8, generator=generator),
        "t": torch.tensor([0.6]),
        "qwen3_embeds": torch.randn(1, 5, 48, generator=generator),
        "qwen3_mask": torch.ones(1, 5, dtype=torch.long),
        "t5_ids": torch.randint(2, 60, (1, 6), generator=generator),
        "t5_mask": torch.ones(1, 6, dtype=torch.long),
    }


def velocity(dit, inputs) -> torch.Tensor:
    with torch.no_grad():
        context = dit.encode_text(inputs["qwen3_embeds"], inputs["qwen3_mask"], inputs["t5_ids"], inputs["t5_mask"])
        return dit(inputs["x"], inputs["t"], context)


# --- merge --------------------------------------------------------------------------------------------------


def test_merged_dit_equals_the_loras_applied_at_their_multipliers(tiny_dit_and_loras, tmp_path):
    setup, dit, first, second = tiny_dit_and_loras
    merged_path = tmp_path / "merged.safetensors"
    assert anima_merge_lora.main(["--dit", str(setup.dit), "--models", str(first), str(second),
                                  "--ratios", "1.0", "0.5", "--save_to", str(merged_path), "--precision", "float",
                                  "--working_device", "cpu"]) == 0

    inputs = dit_inputs()
    networks = []
    for path, ratio in ((first, 1.0), (second, 0.5)):
        network, _ = create_network_from_weights(ratio, str(path), None, None, dit, for_inference=True)
        network.apply_to(None, dit)
        networks.append(network)
    try:
        expected = velocity(dit, inputs)
    finally:
        for network in networks:
            network.remove_hooks()
    assert (expected - velocity(dit, inputs)).abs().max() > 1e-3  # the LoRAs change the output

    merged = load_anima_model(merged_path)
    torch.testing.assert_close(velocity(merged, inputs), expected, rtol=1e-4, atol=1e-4)


def test_merged_file_has_the_released_key_layout_and_dtype(tiny_dit_and_loras, tmp_path):
    setup, _, first, _ = tiny_dit_and_loras
    out = tmp_path / "merged_bf16.safetensors"
    assert anima_merge_lora.main(["--dit", str(setup.dit), "--models", str(first), "--save_to", str(out),
                                  "--save_precision", "bf16"]) == 0
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    with safe_open(str(setup.dit), "pt") as f:
        assert keys == set(f.keys())  # net.* keys, the LLM adapter included
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(out)).values())


def test_merge_refuses_a_lora_whose_module_matches_no_layer_before_reading_the_dit(tiny_dit_and_loras, tmp_path,
                                                                                   capsys):
    setup, _, first, _ = tiny_dit_and_loras
    sd = load_file(str(first))
    renamed = {k.replace("blocks_0_mlp_layer1", "blocks_7_mlp_layer1"): v for k, v in sd.items()}
    bad = tmp_path / "renamed.safetensors"
    save_lora_file(bad, renamed)
    assert anima_merge_lora.main(["--dit", str(setup.dit), "--models", str(bad),
                                  "--save_to", str(tmp_path / "x.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --models") and "lora_unet_blocks_7_mlp_layer1" in err and "\n" not in err
    assert not (tmp_path / "x.safetensors").exists()


def test_merge_refuses_text_encoder_modules_unless_dit_only(tiny_dit_and_loras, tmp_path):
    setup, _, first, _ = tiny_dit_and_loras
    sd = dict(load_file(str(first)))
    sd["lora_te_layers_0_mlp_up_proj.lora_down.weight"] = torch.zeros(4, 48)
    sd["lora_te_layers_0_mlp_up_proj.lora_up.weight"] = torch.zeros(96, 4)
    with_te = tmp_path / "with_te.safetensors"
    save_lora_file(with_te, sd)
    args = anima_merge_lora.build_parser().parse_args(
        ["--dit", str(setup.dit), "--models", str(with_te), "--save_to", str(tmp_path / "m.safetensors")])
    with pytest.raises(AnimaError, match="--dit_only"):
        anima_merge_lora.merge_file(args)
    args.dit_only = True
    anima_merge_lora.merge_file(args)
    assert (tmp_path / "m.safetensors").exists()


# --- resize -------------------------------------------------------------------------------------------------


def delta_weights(path: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    sd, _ = to_sd_scripts_with_alpha(tensors, metadata)
    out = {}
    for key, down in sd.items():
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            out[name] = sd[f"{name}.lora_up.weight"].float() @ down.float() * (sd[f"{name}.alpha"].float()
                                                                                / down.shape[0])
    return out


def test_resize_to_the_full_rank_is_lossless(tiny_dit_and_loras, tmp_path, capsys):
    _, _, _, second = tiny_dit_and_loras
    out = tmp_path / "same.safetensors"
    assert resize_lora.main(["--model", str(second), "--save_to", str(out), "--new_rank", "8", "--verbose"]) == 0
    printed = capsys.readouterr().out
    assert "Frobenius norm kept: mean 100.00%" in printed
    original, resized = delta_weights(second), delta_weights(out)
    assert original.keys() == resized.keys()
    for name, delta in original.items():
        torch.testing.assert_close(resized[name], delta, rtol=1e-5, atol=1e-6)


def test_resize_to_a_lower_rank_reports_the_kept_norm_and_writes_that_rank(tiny_dit_and_loras, tmp_path, capsys):
    _, _, _, second = tiny_dit_and_loras
    out = tmp_path / "r2.safetensors"
    assert resize_lora.main(["--model", str(second), "--save_to", str(out), "--new_rank", "2",
                             "--save_precision", "fp16"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    mean_kept = float(summary.split("mean ")[1].split("%")[0])
    assert 0 < mean_kept < 100
    sd = load_file(str(out))
    downs = [v for k, v in sd.items() if k.endswith("lora_down.weight")]
    assert downs and all(v.shape[0] == 2 and v.dtype == torch.float16 for v in downs)
    assert all(float(v) == 2.0 for k, v in sd.items() if k.endswith(".alpha"))  # alpha/rank kept at 8/8
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_training_comment"].startswith("dimension is resized from 8 to 2")


def test_resize_keeps_the_best_rank_r_approximation(tiny_dit_and_loras, tmp_path):
    _, _, _, second = tiny_dit_and_loras
    out = tmp_path / "r3.safetensors"
    args = resize_lora.build_parser().parse_args(["--model", str(second), "--save_to", str(out), "--new_rank", "3"])
    report = resize_lora.resize_file(args)
    resized = delta_weights(out)
    for row in report:
        full = delta_weights(second)[row.lora_name]
        s = torch.linalg.svdvals(full)
        best_error = s[3:].square().sum().sqrt()  # Eckart–Young: the optimum for rank 3
        torch.testing.assert_close((full - resized[row.lora_name]).norm(), best_error, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.tensor(row.fro_kept), s[:3].norm() / s.norm(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("method", "param"), [("sv_fro", "0.9"), ("sv_cumulative", "0.9"), ("sv_ratio", "4")])
def test_dynamic_resize_picks_the_smallest_rank_reaching_the_target(tiny_dit_and_loras, tmp_path, method, param):
    _, _, _, second = tiny_dit_and_loras
    out = tmp_path / f"{method}.safetensors"
    args = resize_lora.build_parser().parse_args(["--model", str(second), "--save_to", str(out), "--new_rank", "8",
                                                  "--dynamic_method", method, "--dynamic_param", param])
    report = resize_lora.resize_file(args)
    original = delta_weights(second)
    target = float(param)
    for row in report:
        s = torch.linalg.svdvals(original[row.lora_name])[:8]
        if method == "sv_ratio":
            expected = int((s > s[0] / target).sum())
        else:
            values = s if method == "sv_cumulative" else s.square()
            goal = target if method == "sv_cumulative" else target**2
            shares = values.cumsum(0) / values.sum()
            expected = int((shares < goal - 1e-6).sum()) + 1
        assert row.new_rank == max(1, expected)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "Dynamic"


def test_resize_comment_names_the_largest_rank_before_and_after(tiny_dit_and_loras, tmp_path):
    _, dit, _, _ = tiny_dit_and_loras
    mixed = write_lora(dit, tmp_path / "mixed.safetensors", rank=8, alpha=4.0, seed=3,
                       network_reg_dims="blocks\\.1\\..*=2")  # ranks 8 (block 0) and 2 (block 1)
    for extra, comment in ((["--new_rank", "4"], "dimension is resized from 8 to 4; "),
                           (["--new_rank", "8", "--dynamic_method", "sv_fro", "--dynamic_param", "0.5"],
                            "Dynamic resize with sv_fro: 0.5 from 8; ")):
        out = tmp_path / "out.safetensors"
        assert resize_lora.main(["--model", str(mixed), "--save_to", str(out), *extra]) == 0
        with safe_open(str(out), "pt") as f:
            assert f.metadata()["ss_training_comment"] == comment


def test_resize_metadata_is_the_new_rank_and_the_alpha_of_the_modules_at_that_rank(tiny_dit_and_loras, tmp_path):
    _, dit, first, _ = tiny_dit_and_loras
    sd = load_file(str(first))  # rank 4, alpha 2; one module all zero: it stays at rank 1
    sd["lora_unet_blocks_0_mlp_layer1.lora_up.weight"] = torch.zeros_like(sd["lora_unet_blocks_0_mlp_layer1.lora_up.weight"])
    with_zero = tmp_path / "with_zero.safetensors"
    save_lora_file(with_zero, sd, {"ss_network_dim": "4", "ss_network_alpha": "2.0"})
    mixed = write_lora(dit, tmp_path / "mixed.safetensors", rank=8, alpha=4.0, seed=3,
                       network_reg_dims="blocks\\.1\\..*=2")  # scales 0.5 (rank 8) and 2 (rank 2)
    for model, dim, alpha in ((with_zero, "2", "1.0"), (mixed, "2", "Dynamic")):
        out = tmp_path / "out.safetensors"
        assert resize_lora.main(["--model", str(model), "--save_to", str(out), "--new_rank", "2"]) == 0
        with safe_open(str(out), "pt") as f:
            meta = f.metadata()
        assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (dim, alpha)
    assert load_file(str(out))["lora_unet_blocks_1_mlp_layer1.alpha"] == 4.0  # rank 2 kept, alpha/rank 2 kept


def test_resize_of_a_comfy_file_keeps_its_layout(tiny_dit_and_loras, tmp_path):
    _, _, _, second = tiny_dit_and_loras
    comfy, out = tmp_path / "comfy.safetensors", tmp_path / "comfy_r8.safetensors"
    assert convert_anima_lora_to_comfy.main([str(second), str(comfy)]) == 0
    assert resize_lora.main(["--model", str(comfy), "--save_to", str(out), "--new_rank", "8"]) == 0
    keys = load_file(str(out)).keys()
    assert all(k.startswith("diffusion_model.") and ".lora_" in k for k in keys)  # still folded ComfyUI keys
    original, resized = delta_weights(second), delta_weights(out)
    for name, delta in original.items():
        torch.testing.assert_close(resized[name], delta, rtol=1e-5, atol=1e-6)


def test_resize_argument_errors_are_one_line(tiny_dit_and_loras, tmp_path, capsys):
    _, _, first, _ = tiny_dit_and_loras
    assert resize_lora.main(["--model", str(first), "--save_to", str(tmp_path / "o.safetensors"),
                             "--dynamic_method", "sv_fro"]) == 1
    assert capsys.readouterr().err.strip() == "error: --dynamic_method sv_fro needs --dynamic_param"
    assert resize_lora.main(["--model", str(first), "--save_to", str(first)]) == 1  # a bad file, not flag
    assert "is also an input file" in capsys.readouterr().err


def test_resize_warns_that_new_conv_rank_has_no_effect_and_resizes_as_without_it(tiny_dit_and_loras, tmp_path,
                                                                                 capsys):
    _, _, first, _ = tiny_dit_and_loras
    plain, conv = tmp_path / "plain.safetensors", tmp_path / "conv.safetensors"
    assert resize_lora.main(["--model", str(first), "--save_to", str(plain), "--new_rank", "2"]) == 0
    capsys.readouterr()
    assert resize_lora.main(["--model", str(first), "--save_to", str(conv), "--new_rank", "2",
                             "--new_conv_rank", "2"]) == 0
    assert "warning: --new_conv_rank 2 has no effect" in capsys.readouterr().err
    with safe_open(str(plain), "pt") as a, safe_open(str(conv), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


# --- converter and alpha restoration -------------------------------------------------------------------------


def test_sd_scripts_named_converter_round_trip_restores_alpha_and_metadata(tiny_dit_and_loras, tmp_path):
    _, _, first, _ = tiny_dit_and_loras
    comfy, back = tmp_path / "comfy.safetensors", tmp_path / "back.safetensors"
    script = REPO_ROOT / "networks" / "convert_anima_lora_to_comfy.py"
    for argv in ([str(first), str(comfy)], [str(comfy), str(back), "--reverse"]):
        result = subprocess.run([sys.executable, str(script), *argv], cwd=tmp_path, capture_output=True, text=True,
                                check=False)  # run by file path from another folder, as sd-scripts documents it
        assert result.returncode == 0, result.stderr
    comfy_sd = load_file(str(comfy))
    assert all(k.startswith("diffusion_model.") and ".lora_" in k for k in comfy_sd)  # alpha folded
    original, restored = load_file(str(first)), load_file(str(back))
    assert restored.keys() == original.keys()
    for key, tensor in original.items():  # alpha 2 of rank 4: folded to 0.5 x lora_B, then unfolded again
        torch.testing.assert_close(restored[key], tensor, rtol=1e-6, atol=1e-7)
    with safe_open(str(back), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_lora_format"] == "sd-scripts"
    assert all(float(v) == float(meta["ss_network_alpha"]) for k, v in restored.items() if k.endswith(".alpha"))


def test_converter_keep_alpha_round_trip_is_exact(tiny_dit_and_loras, tmp_path):
    _, _, first, _ = tiny_dit_and_loras
    comfy, back = tmp_path / "comfy_alpha.safetensors", tmp_path / "back.safetensors"
    assert convert_anima_lora_to_comfy.main([str(first), str(comfy), "--keep_alpha"]) == 0
    assert any(k.endswith(".alpha") for k in load_file(str(comfy)))
    assert convert_anima_lora_to_comfy.main([str(comfy), str(back), "--reverse"]) == 0
    original = load_file(str(first))
    assert all(torch.equal(v, original[k]) for k, v in load_file(str(back)).items())


def test_a_folded_file_without_alpha_metadata_gets_alpha_equal_to_rank_and_matching_metadata():
    generator = torch.Generator().manual_seed(0)
    sd = {"lora_unet_blocks_0_mlp_layer1.lora_down.weight": torch.randn(4, 8, generator=generator),
          "lora_unet_blocks_0_mlp_layer1.lora_up.weight": torch.randn(16, 4, generator=generator),
          "lora_unet_blocks_0_mlp_layer1.alpha": torch.tensor(1.0)}
    folded = convert_to_comfy(sd)
    restored, meta = to_sd_scripts_with_alpha(folded, {})
    assert float(restored["lora_unet_blocks_0_mlp_layer1.alpha"]) == 4.0
    assert meta["ss_network_alpha"] == "4.0" and meta["ss_network_dim"] == "4"
    update = restored["lora_unet_blocks_0_mlp_layer1.lora_up.weight"] @ restored[
        "lora_unet_blocks_0_mlp_layer1.lora_down.weight"]
    expected = sd["lora_unet_blocks_0_mlp_layer1.lora_up.weight"] @ sd[
        "lora_unet_blocks_0_mlp_layer1.lora_down.weight"] / 4
    torch.testing.assert_close(update, expected)


def test_a_lokr_file_merges_into_the_dit_like_its_network_applies_and_is_not_resized(tiny_dit_and_loras, tmp_path,
                                                                                     capsys):
    from networks import lokr

    setup, dit, _, _ = tiny_dit_and_loras
    network = lokr.create_network(1.0, 4, 2.0, None, None, dit)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    path = tmp_path / "lokr.safetensors"
    network.save_weights(str(path))
    inputs = dit_inputs(1)
    network.apply_to(None, dit)
    try:
        expected = velocity(dit, inputs)
    finally:
        network.remove_hooks()
    merged_path = tmp_path / "merged_lokr.safetensors"
    assert anima_merge_lora.main(["--dit", str(setup.dit), "--models", str(path), "--save_to", str(merged_path)]) == 0
    torch.testing.assert_close(velocity(load_anima_model(merged_path), inputs), expected, rtol=1e-4, atol=1e-4)
    assert resize_lora.main(["--model", str(path), "--save_to", str(tmp_path / "r.safetensors")]) == 1
    assert "holds LoKr modules; the rank resize works on LoRA modules only" in capsys.readouterr().err


def test_a_misspelt_tool_flag_ends_with_one_error_line_and_a_suggestion(tmp_path, capsys):
    for main, argv in ((resize_lora.main, ["--model", "a", "--save_to", "b", "--new_rnak", "4"]),
                       (anima_merge_lora.main, ["--dit", "a", "--models", "b", "--save_to", "c", "--ratoi", "1"]),
                       (convert_anima_lora_to_comfy.main, ["a", "b", "--reversed"])):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "did you mean" in err and "\n" not in err


def test_converting_a_file_with_alpha_keys_copies_its_metadata_unchanged(tmp_path):
    generator = torch.Generator().manual_seed(0)
    sd = {"lora_unet_blocks_0_mlp_layer1.lora_down.weight": torch.randn(4, 8, generator=generator),
          "lora_unet_blocks_0_mlp_layer1.lora_up.weight": torch.randn(16, 4, generator=generator),
          "lora_unet_blocks_0_mlp_layer1.alpha": torch.tensor(2.0)}
    given = {"ss_network_dim": "8", "ss_training_comment": "kept"}  # no ss_network_alpha, dim not the tensors'
    src, comfy, back = (tmp_path / f"{n}.safetensors" for n in ("src", "comfy", "back"))
    save_lora_file(src, sd, given)
    assert convert_anima_lora_to_comfy.main([str(src), str(comfy), "--keep_alpha"]) == 0
    assert convert_anima_lora_to_comfy.main([str(comfy), str(back), "--reverse"]) == 0
    for path in (comfy, back):
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert {k: v for k, v in meta.items() if k.startswith("ss_network_") or k == "ss_training_comment"} == given


def test_sd_scripts_named_converter_names_its_positional_arguments_and_warns_on_a_same_layout_input(
        tiny_dit_and_loras, tmp_path, capsys):
    _, _, first, _ = tiny_dit_and_loras
    assert convert_anima_lora_to_comfy.main([str(tmp_path / "missing.safetensors"), str(tmp_path / "o.safetensors")]) == 1
    assert capsys.readouterr().err.startswith("error: src_path: file not found")
    assert convert_anima_lora_to_comfy.main([str(first), str(tmp_path / "o.txt")]) == 1
    assert capsys.readouterr().err.startswith("error: dst_path ") and not (tmp_path / "o.txt").exists()
    assert convert_anima_lora_to_comfy.main([str(first), str(first)]) == 1
    assert "is also an input file" in capsys.readouterr().err
    same = tmp_path / "same.safetensors"
    assert convert_anima_lora_to_comfy.main([str(first), str(same), "--reverse"]) == 0  # already sd-scripts
    assert "already in the sd-scripts layout" in capsys.readouterr().err
    assert load_file(str(same)).keys() == load_file(str(first)).keys()


@pytest.mark.parametrize("device", ["bogus", "meta"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_resize_and_merge_refuse_a_device_they_cannot_use_in_one_line(tiny_dit_and_loras, tmp_path, capsys, device):
    setup, _, first, _ = tiny_dit_and_loras
    out = tmp_path / "o.safetensors"
    assert resize_lora.main(["--model", str(first), "--save_to", str(out), "--device", device]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --device {device}: ") and "\n" not in err
    assert anima_merge_lora.main(["--dit", str(setup.dit), "--models", str(first), "--save_to", str(out),
                                  "--working_device", device]) == 1
    assert capsys.readouterr().err.startswith(f"error: --working_device {device}: ") and not out.exists()

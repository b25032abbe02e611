"""--network_module lycoris.kohya: LyCORIS (optional lycoris-lora) builds its modules on Anima's layers with the
native names, its network_args are checked, its files load in ComfyUI and reload here, and the trainer runs it."""

from __future__ import annotations

import importlib
import logging

import comfy_rules
import pytest
import torch
from safetensors.torch import load_file
from test_lokr_loha import metadata
from test_lora_anima import dit_output, tiny_dit, tiny_qwen3
from torch import nn
from train_helpers import train_tiny

from library.errors import AnimaError
from networks.lora_format import lora_name_for

pytest.importorskip("lycoris", reason="lycoris-lora is not installed (pip install lycoris-lora)")


@pytest.fixture
def lyco():
    return importlib.import_module("networks.lycoris_kohya")


def randomize(network, seed: int = 4, std: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "dora_scale" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def test_lycoris_builds_on_anima_s_linear_layers_with_the_native_names(lyco):
    model, te = tiny_dit(), tiny_qwen3()
    network = lyco.create_network(1.0, 4, 1.0, None, [te], model, algo="lokr", train_llm_adapter="true")
    names = network.module_names()
    linears = [lora_name_for("lora_unet", n) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    linears += [lora_name_for("lora_te", n) for n, m in te.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        assert linears.count(name) == 1, name
    # The preset's Anima class names reach every part: DiT blocks, embedders, final layer, adapter, Qwen3.
    for part in ("lora_unet_blocks_1_mlp_layer2", "lora_unet_x_embedder_proj_1", "lora_unet_t_embedder_1_linear_1",
                 "lora_unet_final_layer_linear", "lora_unet_llm_adapter_blocks_1_cross_attn_o_proj",
                 "lora_te_layers_1_mlp_down_proj"):
        assert part in names, part
    without_adapter = lyco.create_network(1.0, 4, 1.0, None, [te], model, algo="lokr")
    assert not any("llm_adapter" in n for n in without_adapter.module_names())


def test_lycoris_network_args_are_checked_before_building(lyco, caplog):
    model = tiny_dit()
    with pytest.raises(AnimaError, match="exclude_patterns for lycoris.kohya.*preset"):
        lyco.create_network(1.0, 4, 1.0, None, None, model, exclude_patterns='[".*mlp.*"]')
    with pytest.raises(AnimaError, match="algo=lokx: LyCORIS algorithms are"):
        lyco.create_network(1.0, 4, 1.0, None, None, model, algo="lokx")
    with pytest.raises(AnimaError, match="preset=nope"):
        lyco.create_network(1.0, 4, 1.0, None, None, model, preset="nope")
    with pytest.raises(AnimaError, match="factor='x'"):
        lyco.create_network(1.0, 4, 1.0, None, None, model, algo="lokr", factor="x")
    with caplog.at_level(logging.WARNING):
        lyco.create_network(1.0, 4, 1.0, None, None, model, algo="lokr", conv_dim="8")
    assert "conv_dim has no effect" in caplog.text
    network = lyco.create_network(1.0, 4, 1.0, None, None, model, algo="loha")
    network.apply_to(None, model, False, True)
    with pytest.raises(AnimaError, match="--mlp_lr: per-component"):
        network.prepare_optimizer_params(None, None, 1e-3, {"mlp": 1e-4, "self_attn": None})
    with pytest.raises(AnimaError, match="algo=ia3 tensors have no ComfyUI-layout names"):
        lyco.create_network(1.0, 4, 1.0, None, None, model, algo="ia3").check_save_format("comfy")


@pytest.mark.parametrize("lora_format", ["sd-scripts", "comfy"])
@pytest.mark.parametrize("args", [{"algo": "lokr", "factor": "4"}, {"algo": "loha"}, {"algo": "locon"},
                                  {"algo": "lokr", "dora_wd": "true"}])
def test_lycoris_files_load_in_comfyui_with_every_key(lyco, tmp_path, args, lora_format):
    model, te = tiny_dit(), tiny_qwen3()
    network = lyco.create_network(1.0, 2, 1.0, None, [te], model, train_llm_adapter="true", **args)
    network.apply_to([te], model, True, True)
    randomize(network)
    network.eval()
    path = tmp_path / "lyco.safetensors"
    network.save_weights(str(path), None, {"ss_network_module": "lycoris.kohya"}, lora_format=lora_format)
    sd = load_file(str(path))
    patches, not_loaded = comfy_rules.load_patches(sd, comfy_rules.key_map(model, te))
    assert not_loaded == set()
    assert len(patches) == len(network.loras)
    if "dora_wd" in args:
        return  # DoRA renormalises the weight: no additive update to compare
    weights = {f"diffusion_model.{n}": p for n, p in model.named_parameters()}
    weights |= {f"qwen3_06b.transformer.model.{n}": p for n, p in te.named_parameters()}
    for lora in network.loras:
        prefix = "diffusion_model." if lora.lora_name.startswith("lora_unet_") else "qwen3_06b.transformer.model."
        path_name = next(n for n, m in (model if prefix == "diffusion_model." else te).named_modules()
                         if m is lora.org_module[0])
        target = f"{prefix}{path_name}.weight"
        adapter, tensors, alpha = patches[target]
        theirs = comfy_rules.weight_delta(adapter, tensors, alpha, weights[target].shape)
        x = torch.randn(3, weights[target].shape[1])
        with torch.no_grad():
            ours = lora(x) - lora.org_forward(x)  # what LyCORIS' wrapped layer adds
        torch.testing.assert_close(ours, x @ theirs.T, rtol=1e-4, atol=1e-6, msg=target)


def test_lycoris_weights_reload_into_a_new_network_and_from_the_file(lyco, tmp_path):
    model = tiny_dit()
    args = {"algo": "lokr", "factor": "4", "train_llm_adapter": "true"}
    network = lyco.create_network(0.9, 2, 1.0, None, None, model, **args)
    network.apply_to(None, model, False, True)
    randomize(network)
    expected = dit_output(model)
    path = tmp_path / "lyco.safetensors"
    network.save_weights(str(path), torch.float32, None)
    network.remove_hooks()
    assert not torch.allclose(dit_output(model), expected)

    fresh = lyco.create_network(0.9, 2, 1.0, None, None, model, **args)
    fresh.apply_to(None, model, False, True)
    assert fresh.load_weights(str(path)) == []
    torch.testing.assert_close(dit_output(model), expected, rtol=1e-5, atol=1e-6)
    fresh.remove_hooks()

    from_file, _ = lyco.create_network_from_weights(0.9, str(path), None, None, model)
    from_file.apply_to(None, model, False, True)
    assert from_file.algo == "lokr"
    torch.testing.assert_close(dit_output(model), expected, rtol=1e-5, atol=1e-6)
    from_file.remove_hooks()

    other = lyco.create_network(1.0, 2, 1.0, None, None, model, algo="lokr", factor="4")  # no adapter modules
    other.apply_to(None, model, False, True)
    with pytest.raises(AnimaError, match="fit no module of this network.*train_llm_adapter"):
        other.load_weights(str(path))
    other.remove_hooks()
    sd = load_file(str(path))
    sd["lora_unet_blocks_9_mlp_layer1.lokr_w1"] = torch.zeros(4, 4)
    with pytest.raises(AnimaError, match="blocks_9_mlp_layer1.*another model"):
        lyco.create_network_from_weights(1.0, None, None, None, model, weights_sd=sd)


@pytest.mark.parametrize("trained_side", ["dit", "text_encoder"])
def test_a_two_sided_lycoris_file_loads_into_a_run_training_one_side(lyco, tmp_path, caplog, trained_side):
    """As with the native networks: the modules of the side left untrained are skipped with one warning, and the
    trained side gets the file's weights (no refusal of a file from a Qwen3 + DiT run)."""
    model, te = tiny_dit(), tiny_qwen3()
    both = lyco.create_network(1.0, 2, 1.0, None, [te], model, algo="lokr", factor="4")
    both.apply_to([te], model, True, True)
    randomize(both)
    path = tmp_path / "both.safetensors"
    both.save_weights(str(path), torch.float32, None)
    expected = {k: v.clone() for k, v in both.state_dict().items()}
    both.remove_hooks()

    one = lyco.create_network(1.0, 2, 1.0, None, [te], model, algo="lokr", factor="4")
    one.apply_to([te], model, trained_side == "text_encoder", trained_side == "dit")
    with caplog.at_level(logging.WARNING):
        assert one.load_weights(str(path)) == []
    kept, skipped = ("lora_unet_", "lora_te_") if trained_side == "dit" else ("lora_te_", "lora_unet_")
    assert any(f"{skipped.rstrip('_')}" in r.getMessage() and "not trained in this run" in r.getMessage()
               for r in caplog.records)
    loaded = one.state_dict()
    assert loaded and all(k.startswith(kept) for k in loaded)
    for key, value in loaded.items():
        assert torch.equal(value, expected[key]), key
    one.remove_hooks()

    caplog.clear()
    with caplog.at_level(logging.WARNING):  # --dim_from_weights: the file builds both sides, one is dropped
        from_file, _ = lyco.create_network_from_weights(1.0, str(path), None, [te], model)
        from_file.apply_to([te], model, trained_side == "text_encoder", trained_side == "dit")
    assert any("of the weights are dropped" in r.getMessage() for r in caplog.records)
    assert from_file.state_dict().keys() == loaded.keys()
    from_file.remove_hooks()

    other = lyco.create_network(1.0, 2, 1.0, None, [te], model, algo="lokr", factor="4", train_llm_adapter="true")
    wrong = tmp_path / "wrong.safetensors"
    other.apply_to([te], model, True, True)
    randomize(other)
    other.save_weights(str(wrong), torch.float32, None)
    other.remove_hooks()
    plain = lyco.create_network(1.0, 2, 1.0, None, [te], model, algo="lokr", factor="4")
    plain.apply_to([te], model, False, True)
    with pytest.raises(AnimaError, match="fit no module of this network"):  # the trained side still must fit
        plain.load_weights(str(wrong))
    plain.remove_hooks()


@pytest.fixture(scope="module")
def lycoris_run(tiny_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("lycoris")
    trainer = train_tiny(tiny_setup, out, "lycoris.kohya", "--max_train_steps", "2", "--network_args", "algo=lokr",
                         "factor=4", "train_llm_adapter=true")
    return trainer, out / "tiny.safetensors"


def test_trainer_trains_lycoris_and_its_file_loads_in_comfyui(lycoris_run):
    trainer, path = lycoris_run
    sd = load_file(str(path))
    assert any(k.endswith(".lokr_w1") for k in sd) and any("llm_adapter" in k for k in sd)
    meta = metadata(path)
    assert meta["ss_network_module"] == "lycoris.kohya" and '"algo": "lokr"' in meta["ss_network_args"]
    assert "sshs_model_hash" in meta
    patches, not_loaded = comfy_rules.load_patches(sd, comfy_rules.key_map(trainer.dit))
    assert not_loaded == set()
    weights = {f"diffusion_model.{n}": p for n, p in trainer.dit.named_parameters()}
    updates = [comfy_rules.weight_delta(*patch, weights[target].shape) for target, patch in patches.items()]
    assert any(float(u.abs().max()) > 0 for u in updates)  # it trained (LoKr starts as a zero update)


def test_trainer_continues_a_lycoris_run_with_dim_from_weights(tiny_setup, lycoris_run, tmp_path):
    _, start = lycoris_run
    train_tiny(tiny_setup, tmp_path, "lycoris.kohya", "--max_train_steps", "1", "--learning_rate", "1e-12",
               "--network_weights", str(start), "--dim_from_weights", "--network_dim", "2")
    before, after = load_file(str(start)), load_file(str(tmp_path / "tiny.safetensors"))
    assert metadata(tmp_path / "tiny.safetensors")["ss_network_dim"] == "4"
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6, msg=key)


def test_trainer_continues_a_two_sided_lycoris_file_with_cached_text_encoder_outputs(lyco, tiny_setup, tmp_path):
    """The trainer's whole path (input check on weightless models, then the run): a Qwen3 + DiT LyCORIS file
    continues a run that trains the DiT only, and the saved file holds the DiT modules, continued."""
    from library.models.dit_loading import load_anima_model
    from library.models.qwen3 import load_qwen3_text_encoder

    dit = load_anima_model(tiny_setup.dit).requires_grad_(False)
    qwen3 = load_qwen3_text_encoder(tiny_setup.qwen3_dir, dtype=torch.float32)
    both = lyco.create_network(1.0, 4, 4.0, None, [qwen3], dit, algo="lokr", factor="4")
    both.apply_to([qwen3], dit, True, True)
    randomize(both, std=0.01)
    start = tmp_path / "both.safetensors"
    both.save_weights(str(start), torch.float32, None)
    both.remove_hooks()
    assert any(k.startswith("lora_te_") for k in load_file(str(start)))

    train_tiny(tiny_setup, tmp_path / "out", "lycoris.kohya", "--max_train_steps", "1", "--learning_rate", "1e-12",
               "--network_args", "algo=lokr", "factor=4", "--network_weights", str(start))
    before, after = load_file(str(start)), load_file(str(tmp_path / "out" / "tiny.safetensors"))
    assert after and all(k.startswith("lora_unet_") for k in after)
    assert after.keys() == {k for k in before if k.startswith("lora_unet_")}
    for key in after:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6, msg=key)


def test_base_weights_merge_equals_the_attached_lycoris_network(lyco, tmp_path):
    model = tiny_dit()
    network = lyco.create_network(1.0, 2, 1.0, None, None, model, algo="loha")
    network.apply_to(None, model, False, True)
    randomize(network)
    network.set_multiplier(0.5)
    network.eval()
    expected = dit_output(model)
    path = tmp_path / "loha.safetensors"
    network.save_weights(str(path))
    network.remove_hooks()
    merger, _ = lyco.create_network_from_weights(0.5, str(path), None, None, model, for_inference=True)
    merger.merge_to(None, model, None, torch.float32, "cpu")
    torch.testing.assert_close(dit_output(model), expected, rtol=1e-5, atol=1e-5)


def test_lycoris_state_dict_round_trip_restores_the_output(lyco):
    # The --save_state / --resume path: the network's own state dict, loaded strictly into a fresh network.
    model = tiny_dit()
    network = lyco.create_network(1.0, 2, 1.0, None, None, model, algo="lokr", factor="4")
    network.apply_to(None, model, False, True)
    randomize(network)
    expected = dit_output(model)
    state = {k: v.clone() for k, v in network.state_dict().items()}
    network.remove_hooks()
    fresh = lyco.create_network(1.0, 2, 1.0, None, None, model, algo="lokr", factor="4")
    fresh.apply_to(None, model, False, True)
    fresh.load_state_dict(state, strict=True)
    torch.testing.assert_close(dit_output(model), expected, rtol=1e-5, atol=1e-6)

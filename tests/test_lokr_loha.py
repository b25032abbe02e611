"""Native LoKr / LoHa networks (networks.lokr, networks.loha): the update formulas, the layer choice they share
with LoRA, sd-scripts' tensor names, ComfyUI's key rules, saving / reloading, and per-module network_args."""

from __future__ import annotations

import logging
import sys

import comfy_rules
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_lora_anima import ADAPTER_MODULES, DEFAULT_DIT_MODULES, dit_output, tiny_dit, tiny_qwen3
from torch import nn
from train_helpers import train_tiny

from library.errors import AnimaError
from networks import NETWORK_MODULES, check_network_module, import_network_module, lora_anima
from networks import loha as loha_module
from networks import lokr as lokr_module
from networks.convert_lora import main as convert_main
from networks.loha import LoHaModule
from networks.lokr import LoKrModule, factorization

NATIVE = {"lokr": lokr_module, "loha": loha_module, "lora": lora_anima}


def randomize(network, seed: int = 3, std: float = 0.2) -> None:
    """Non-zero values in every adapter tensor, so the update is not the zero it starts as."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * std)


def kron_formula(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """kron(w1, w2) written out: entry [a*out_k + c, b*in_n + d] = w1[a, b] * w2[c, d]."""
    (out_l, in_m), (out_k, in_n) = w1.shape, w2.shape
    return torch.einsum("ab,cd->acbd", w1, w2).reshape(out_l * out_k, in_m * in_n)


# ------------------------------------------------------------------------------------------------------------
# The update formulas
# ------------------------------------------------------------------------------------------------------------


def test_factorization_splits_like_lycoris():
    assert factorization(128) == (8, 16)
    assert factorization(1024) == (32, 32)
    assert factorization(2048) == (32, 64)
    assert factorization(6144) == (64, 96)
    assert factorization(128, 4) == (4, 32)
    assert factorization(128, 3) == (2, 64)  # 3 does not divide: the most balanced split with a side <= 3
    assert factorization(16, 8) == (2, 8)
    assert factorization(7) == (1, 7)


@pytest.mark.parametrize(
    "kwargs, names",
    [
        ({"rank": 2}, ["lokr_w1", "lokr_w2_a", "lokr_w2_b"]),
        ({"rank": 2, "factor": 4}, ["lokr_w1", "lokr_w2_a", "lokr_w2_b"]),
        ({"rank": 2, "decompose_both": True}, ["lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"]),
        ({"rank": 64}, ["lokr_w1", "lokr_w2"]),  # rank >= half of w2's larger side: full matrix
        ({"rank": 2, "full_matrix": True}, ["lokr_w1", "lokr_w2"]),
    ],
)
def test_lokr_output_equals_the_kronecker_product_formula(kwargs, names):
    module = LoKrModule("lora_unet_x", "x", 48, 96, alpha=1.0, multiplier=0.7, **kwargs)
    assert [n for n, _ in module.named_parameters()] == names
    randomize(module)
    p = dict(module.named_parameters())
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
    full = "lokr_w1" in p and "lokr_w2" in p
    scale = 1.0 if full else 1.0 / kwargs["rank"]  # both factors full: scale 1 whatever alpha is
    expected_delta = kron_formula(w1.detach(), w2.detach()) * scale
    torch.testing.assert_close(module.delta_weight(), expected_delta, rtol=1e-5, atol=1e-6)

    x = torch.randn(3, 5, 48)
    torch.testing.assert_close(module.delta(x), x @ expected_delta.T * 0.7, rtol=1e-4, atol=1e-5)


def test_full_rank_lokr_matches_the_dense_update_it_encodes():
    # At full rank both factors are full matrices, so the module can carry any dense kron(A, B) update.
    a, b = torch.randn(8, 6), torch.randn(12, 8)
    module = LoKrModule("lora_unet_x", "x", 48, 96, rank=64, alpha=3.0)
    with torch.no_grad():
        module.lokr_w1.copy_(a)
        module.lokr_w2.copy_(b)
    dense = nn.Linear(48, 96, bias=False)
    with torch.no_grad():
        dense.weight.copy_(kron_formula(a, b))
    x = torch.randn(4, 48)
    assert module.scale == 1.0 and float(module.alpha) == 64.0  # alpha is written as the rank
    torch.testing.assert_close(module.delta(x), dense(x), rtol=1e-4, atol=1e-5)


def test_loha_output_equals_the_hadamard_product_formula():
    module = LoHaModule("lora_unet_x", "x", 24, 40, rank=3, alpha=2.0, multiplier=0.5)
    randomize(module)
    expected = (module.hada_w1_a @ module.hada_w1_b) * (module.hada_w2_a @ module.hada_w2_b) * (2.0 / 3)
    x = torch.randn(2, 7, 24)
    torch.testing.assert_close(module.delta(x), x @ expected.detach().T * 0.5, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_new_network_leaves_the_model_output_unchanged_and_trains(kind):
    model = tiny_dit()
    expected = dit_output(model)
    network = NATIVE[kind].create_network(1.0, 4, 1.0, None, None, model)
    network.apply_to(None, model)
    torch.testing.assert_close(dit_output(model), expected, rtol=0, atol=0)
    groups, _ = network.prepare_optimizer_params(None, None, 1e-3)
    assert sum(len(g["params"]) for g in groups) == len(list(network.parameters()))
    x = torch.randn(2, 16, 1, 4, 6)
    model(x, torch.tensor([0.3, 0.6]), torch.randn(2, 5, 16)).square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())


# ------------------------------------------------------------------------------------------------------------
# Shared layer choice and network_args
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_layer_choice_is_lora_anima_s(kind):
    model, te = tiny_dit(), tiny_qwen3()
    args = {"train_llm_adapter": "true", "exclude_patterns": '[".*mlp.*"]', "network_reg_dims": ".*q_proj=0"}
    native = NATIVE[kind].create_network(1.0, 4, 1.0, None, [te], model, **args)
    lora = lora_anima.create_network(1.0, 4, 1.0, None, [te], model, **args)
    assert native.module_paths() == lora.module_paths()
    assert {n for n in native.module_paths().values() if n in DEFAULT_DIT_MODULES + ADAPTER_MODULES}
    assert not any(".mlp." in n or "q_proj" in n for n in native.module_paths().values())


def test_network_args_are_checked_per_module(caplog):
    model = tiny_dit()
    with pytest.raises(AnimaError, match="factor.*for networks.lora_anima"):
        lora_anima.create_network(1.0, 4, 1.0, None, None, model, factor="4")
    with pytest.raises(AnimaError, match="algo.*for networks.lokr"):
        lokr_module.create_network(1.0, 4, 1.0, None, None, model, algo="lokr")
    with pytest.raises(AnimaError, match="factor.*for networks.loha"):
        loha_module.create_network(1.0, 4, 1.0, None, None, model, factor="4")
    with pytest.raises(AnimaError, match="factor='0'"):
        lokr_module.create_network(1.0, 4, 1.0, None, None, model, factor="0")
    with caplog.at_level(logging.WARNING):
        lokr_module.create_network(1.0, 4, 1.0, None, None, model, conv_dim="4", neuron_dropout=0.1)
    assert "conv_dim=4 has no effect" in caplog.text and "--network_dropout has no effect" in caplog.text
    network = lokr_module.create_network(1.0, 4, 1.0, None, None, model, factor="4", decompose_both="true")
    first = network.unet_loras[0]  # blocks.0.self_attn.q_proj: 32 -> 32 = (4 x 8) x (4 x 8)
    assert (first.layout.out_l, first.layout.in_m, first.layout.w1_rank) == (4, 4, None)  # rank 4 >= 4/2: full w1


def test_missing_lycoris_library_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "lycoris", None)  # `import lycoris` then fails as for an absent package
    monkeypatch.delitem(sys.modules, "lycoris.kohya", raising=False)
    monkeypatch.delitem(sys.modules, "networks.lycoris_kohya", raising=False)
    with pytest.raises(AnimaError, match=r"lycoris.kohya needs the LyCORIS library: pip install lycoris-lora"):
        import_network_module("lycoris.kohya")


def test_a_lycoris_install_that_fails_to_import_is_one_error_naming_both_versions(monkeypatch, tmp_path):
    # LyCORIS 4.1.3 raises ValueError at import beside torch 2.6 (a custom-op schema that torch cannot read).
    fake = tmp_path / "lycoris"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ValueError('infer_schema(func): Parameter shape has unsupported type')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "lycoris" or m.startswith("lycoris.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "networks.lycoris_kohya", raising=False)
    with pytest.raises(AnimaError) as error:
        import_network_module("lycoris.kohya")
    message = str(error.value)
    assert "the installed LyCORIS (lycoris-lora " in message and f"beside torch {torch.__version__}" in message
    assert "ValueError: infer_schema(func)" in message and "networks.lokr" in message


def test_network_module_registry_names_every_supported_module():
    assert set(NETWORK_MODULES) == {"networks.lora_anima", "networks.lokr", "networks.loha", "lycoris.kohya"}
    with pytest.raises(AnimaError, match="networks.lora .*networks.lora_anima"):
        check_network_module("networks.lora")
    assert import_network_module("networks.lokr") is lokr_module


def test_loraplus_trains_the_factors_sd_scripts_picks():
    model = tiny_dit()
    for module, plus_name in ((lokr_module, "lokr_w1"), (loha_module, "hada_w2_a")):
        network = module.create_network(1.0, 2, 1.0, None, None, model, loraplus_lr_ratio="4")
        groups, descriptions = network.prepare_optimizer_params(None, 1e-3, 1e-3)
        assert descriptions == ["unet", "unet plus"] and [g["lr"] for g in groups] == [1e-3, 4e-3]
        plus = {id(p) for p in groups[1]["params"]}
        names = {name.rsplit(".", 1)[-1] for name, p in network.named_parameters() if id(p) in plus}
        assert names == {plus_name}


def test_max_norm_regularization_scales_the_update_to_the_limit():
    model = tiny_dit()
    for module in (lokr_module, loha_module):
        network = module.create_network(1.0, 2, 2.0, None, None, model)
        randomize(network, std=1.0)
        limit = 0.5
        scaled, _, max_norm = (t.item() for t in network.apply_max_norm_regularization(limit, "cpu"))
        assert scaled == len(network.unet_loras)
        norms = [lora.delta_weight().norm().item() for lora in network.unet_loras]
        assert max(norms) == pytest.approx(limit, rel=1e-4) and max_norm == pytest.approx(limit, rel=1e-4)


# ------------------------------------------------------------------------------------------------------------
# Files: names, ComfyUI, reloading, converting
# ------------------------------------------------------------------------------------------------------------

VARIANTS = [
    ("lora", {}),  # the same checks for LoRA, whose ComfyUI layout folds alpha into lora_B
    ("lokr", {}),
    ("lokr", {"factor": "4", "decompose_both": "true"}),
    ("lokr", {"full_matrix": "true"}),
    ("loha", {}),
]


@pytest.mark.parametrize("lora_format", ["sd-scripts", "comfy"])
@pytest.mark.parametrize("kind, args", VARIANTS)
def test_saved_keys_load_in_comfyui_with_the_same_update(tmp_path, kind, args, lora_format):
    model, te = tiny_dit(), tiny_qwen3()
    network = NATIVE[kind].create_network(1.0, 2, 1.0, None, [te], model, train_llm_adapter="true", **args)
    randomize(network)
    path = tmp_path / "net.safetensors"
    network.save_weights(str(path), None, {"ss_network_module": f"networks.{kind}"}, lora_format=lora_format)
    sd = load_file(str(path))
    if lora_format == "sd-scripts":  # sd-scripts' names: lora_unet_<path>.lokr_w1 / .hada_w1_a ... and alpha
        assert {k.split(".")[0] for k in sd} == set(network.module_paths())
    patches, not_loaded = comfy_rules.load_patches(sd, comfy_rules.key_map(model, te))
    assert not_loaded == set()
    assert len(patches) == len(network.all_loras)
    weights = {f"diffusion_model.{n}": p for n, p in model.named_parameters()}
    weights |= {f"qwen3_06b.transformer.model.{n}": p for n, p in te.named_parameters()}
    ours = {}
    for lora in network.all_loras:
        prefix = "diffusion_model." if lora.lora_name.startswith("lora_unet_") else "qwen3_06b.transformer.model."
        ours[f"{prefix}{lora.original_name}.weight"] = lora.delta_weight().detach()
    assert set(patches) == set(ours)
    for target, (adapter, tensors, alpha) in patches.items():
        assert adapter == kind
        delta = comfy_rules.weight_delta(adapter, tensors, alpha, weights[target].shape)
        torch.testing.assert_close(delta, ours[target], rtol=1e-5, atol=1e-6, msg=target)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_lora_format"] == lora_format and "sshs_model_hash" in meta
    folded = kind == "lora" and lora_format == "comfy"
    assert meta.get("ss_lora_alpha_folded", "False") == str(folded)  # only LoRA alphas fold


@pytest.mark.parametrize("kind, args", VARIANTS)
def test_network_weights_and_dim_from_weights_reproduce_the_output(tmp_path, kind, args):
    model = tiny_dit()
    network = NATIVE[kind].create_network(0.8, 2, 1.0, None, None, model, train_llm_adapter="true", **args)
    randomize(network)
    network.apply_to(None, model)
    expected = dit_output(model)
    for lora_format in ("sd-scripts", "comfy"):
        path = tmp_path / f"{lora_format}.safetensors"
        network.save_weights(str(path), None, None, lora_format=lora_format)
        network.remove_hooks()
        fresh = NATIVE[kind].create_network(0.8, 2, 1.0, None, None, model, train_llm_adapter="true", **args)
        fresh.apply_to(None, model)
        assert fresh.load_weights(str(path)) == []
        torch.testing.assert_close(dit_output(model), expected, rtol=1e-5, atol=1e-6)
        fresh.remove_hooks()
        from_file, _ = NATIVE[kind].create_network_from_weights(0.8, str(path), None, None, model)
        from_file.apply_to(None, model)
        torch.testing.assert_close(dit_output(model), expected, rtol=1e-5, atol=1e-6)
        from_file.remove_hooks()
        network.apply_to(None, model)


def test_a_file_of_another_kind_names_the_module_that_loads_it(tmp_path):
    model = tiny_dit()
    path = tmp_path / "lokr.safetensors"
    lokr_module.create_network(1.0, 2, 1.0, None, None, model).save_weights(str(path))
    with pytest.raises(AnimaError, match="LoKr module.*--network_module networks.lokr"):
        lora_anima.create_network(1.0, 2, 1.0, None, None, model).load_weights(str(path))
    with pytest.raises(AnimaError, match="LoKr modules.*--network_module networks.lokr"):
        loha_module.create_network_from_weights(1.0, str(path), None, None, model)
    other = lokr_module.create_network(1.0, 2, 1.0, None, None, model, factor="2")
    with pytest.raises(AnimaError, match="factor for LoKr.*--dim_from_weights"):
        other.load_weights(str(path))


def test_converter_round_trips_lokr_and_loha_exactly(tmp_path):
    model = tiny_dit()
    for module in (lokr_module, loha_module):
        network = module.create_network(1.0, 2, 1.5, None, None, model)
        randomize(network)
        src, comfy, back = (tmp_path / f"{n}.safetensors" for n in ("src", "comfy", "back"))
        network.save_weights(str(src), None, {"ss_network_alpha": "1.5"})
        assert convert_main(["--src", str(src), "--dst", str(comfy), "--to", "comfy"]) == 0
        assert all(k.startswith("diffusion_model.") for k in load_file(str(comfy)))
        assert convert_main(["--src", str(comfy), "--dst", str(back), "--to", "sd-scripts"]) == 0
        original, restored = load_file(str(src)), load_file(str(back))
        assert original.keys() == restored.keys()
        for key in original:
            assert torch.equal(original[key], restored[key]), key
        with safe_open(str(comfy), "pt") as f:
            assert f.metadata()["ss_lora_alpha_folded"] == "False"


# ------------------------------------------------------------------------------------------------------------
# The trainer: train, save, reload
# ------------------------------------------------------------------------------------------------------------


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def lokr_run(tiny_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("lokr")
    trainer = train_tiny(tiny_setup, out, "networks.lokr", "--max_train_steps", "2", "--network_args", "factor=4",
                         "train_llm_adapter=true")
    return trainer, out / "tiny.safetensors"


def test_trained_lokr_file_has_sd_scripts_names_metadata_and_loads_in_comfyui(lokr_run):
    trainer, path = lokr_run
    sd = load_file(str(path))
    assert any(k.endswith(".lokr_w1") for k in sd) and any(k.endswith(".lokr_w2_b") for k in sd)
    assert any(k.startswith("lora_unet_llm_adapter_blocks_0_") for k in sd)
    assert any(float(v.abs().sum()) > 0 for k, v in sd.items() if k.endswith(".lokr_w2_b"))  # it trained
    meta = metadata(path)
    assert meta["ss_network_module"] == "networks.lokr" and '"factor": "4"' in meta["ss_network_args"]
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    patches, not_loaded = comfy_rules.load_patches(sd, comfy_rules.key_map(trainer.dit))
    assert not_loaded == set() and len(patches) == len(trainer.network.all_loras)


def test_network_weights_continue_a_lokr_run(tiny_setup, lokr_run, tmp_path):
    _, start = lokr_run
    train_tiny(tiny_setup, tmp_path, "networks.lokr", "--max_train_steps", "1", "--learning_rate", "1e-12",
               "--network_weights", str(start), "--network_args", "factor=4", "train_llm_adapter=true")
    before, after = load_file(str(start)), load_file(str(tmp_path / "tiny.safetensors"))
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6, msg=key)


def test_dim_from_weights_continues_a_comfy_layout_loha_run(tiny_setup, tmp_path):
    first = tmp_path / "first"
    train_tiny(tiny_setup, first, "networks.loha", "--max_train_steps", "2", "--lora_format", "comfy")
    start = load_file(str(first / "tiny.safetensors"))
    assert any(k.startswith("diffusion_model.") and k.endswith(".hada_w1_a") for k in start)
    # --dim_from_weights: the rank comes from the file (4), not from --network_dim 2.
    train_tiny(tiny_setup, tmp_path / "second", "networks.loha", "--max_train_steps", "1", "--learning_rate", "1e-12",
               "--network_weights", str(first / "tiny.safetensors"), "--dim_from_weights", "--network_dim", "2")
    after = load_file(str(tmp_path / "second" / "tiny.safetensors"))
    assert {v.shape[1] for k, v in after.items() if k.endswith(".hada_w1_a")} == {4}
    assert metadata(tmp_path / "second" / "tiny.safetensors")["ss_network_dim"] == "4"
    restored = {}
    for key, tensor in start.items():
        module, suffix = key.removeprefix("diffusion_model.").rsplit(".", 1)
        restored[f"lora_unet_{module.replace('.', '_')}.{suffix}"] = tensor
    assert restored.keys() == after.keys()
    for key in after:
        torch.testing.assert_close(after[key], restored[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_base_weights_merge_equals_the_attached_network(kind, tmp_path):
    model = tiny_dit()
    network = NATIVE[kind].create_network(0.5, 2, 1.0, None, None, model)
    randomize(network)
    network.apply_to(None, model)
    expected = dit_output(model)
    network.remove_hooks()
    merger, _ = NATIVE[kind].create_network_from_weights(0.5, None, None, None, model,
                                                         weights_sd=network.state_dict(), for_inference=True)
    merger.merge_to(None, model, None, torch.float32, "cpu")
    torch.testing.assert_close(dit_output(model), expected, rtol=1e-5, atol=1e-5)


def test_diffusers_anima_loader_does_not_take_lokr_or_loha_keys(tmp_path):
    # docs/lora-formats.md says diffusers cannot load these files: its Anima loader converts the ComfyUI
    # layout's keys and then requires every key to contain "lora".
    try:
        from diffusers.loaders.lora_pipeline import AnimaLoraLoaderMixin
    except ImportError:
        from importlib.metadata import version

        pytest.skip(f"diffusers {version('diffusers')} has no Anima LoRA loader")

    model = tiny_dit()
    for module in (lokr_module, loha_module):
        path = tmp_path / "comfy.safetensors"
        module.create_network(1.0, 2, 1.0, None, None, model).save_weights(str(path), lora_format="comfy")
        converted = AnimaLoraLoaderMixin.lora_state_dict(load_file(str(path)))
        assert converted and all(k.startswith("transformer.") for k in converted)
        assert not all("lora" in k for k in converted)


@pytest.fixture(scope="module")
def lokr_file(tiny_setup, tmp_path_factory):
    """A LoKr file for the tiny DiT (built on a weightless DiT: only the network holds data)."""
    from library.models.dit_loading import load_anima_model

    path = tmp_path_factory.mktemp("lokr_file") / "lokr.safetensors"
    lokr_module.create_network(1.0, 4, 4, None, [], load_anima_model(tiny_setup.dit, device="meta")).save_weights(
        str(path))
    return path


@pytest.mark.parametrize(
    ("module", "extra", "expected"),
    [
        ("networks.lokr", ["--network_args", "factor=0"], "--network_args factor='0'"),
        ("networks.loha", ["--network_weights", "LOKR_FILE"], "use --network_module networks.lokr"),
        ("networks.lora", [], "--network_module networks.lora (sd-scripts' SD LoRA"),
        ("lycoris.kohya", ["--network_args", "exclude_patterns=['.*']"], "exclude_patterns for lycoris.kohya"),
        ("lycoris.kohya", ["--network_args", "algo=ia3", "--lora_format", "comfy"], "--lora_format comfy"),
    ],
)
def test_bad_network_choice_is_one_error_line_before_any_long_work(module, extra, expected, tiny_setup, lokr_file,
                                                                   tmp_path, monkeypatch, capsys):
    from test_bad_input_fails_early import _must_not_run, argv_for

    import anima_train_network
    from anima_train_network import AnimaNetworkTrainer

    if module == "lycoris.kohya":
        pytest.importorskip("lycoris", reason="lycoris-lora is not installed")
    extra = [str(lokr_file) if e == "LOKR_FILE" else e for e in extra]
    out = tmp_path / "out"
    argv = argv_for(tiny_setup, out, *extra)
    argv[argv.index("--network_module") + 1] = module
    for phase in ("build_datasets", "load_frozen_models", "write_caches_only"):
        monkeypatch.setattr(AnimaNetworkTrainer, phase, _must_not_run)
    assert anima_train_network.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], "\n".join(err)
    assert not out.exists()


def test_network_args_dropout_reaches_the_network(tiny_setup, tmp_path):
    from train_helpers import tiny_train_argv, trainer_through_network

    trainer = trainer_through_network(tiny_train_argv(tiny_setup, tmp_path, "--network_dropout", "0.1",
                                                      "--network_args", "dropout=0.2"))
    # network_args win (LyCORIS reads that key; sd-scripts' own modules would ignore it silently).
    assert {lora.dropout for lora in trainer.network.unet_loras} == {0.2}


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_state_dict_round_trip_restores_weights_alpha_and_scale(kind):
    # The --save_state / --resume path: the network's own state dict, loaded strictly into a fresh network.
    model = tiny_dit()
    network = NATIVE[kind].create_network(1.0, 2, 1.0, None, None, model)
    randomize(network)
    state = {k: v.clone() for k, v in network.state_dict().items()}
    state = {k: (torch.tensor(0.5) if k.endswith(".alpha") else v) for k, v in state.items()}
    fresh = NATIVE[kind].create_network(1.0, 2, 1.0, None, None, model)
    fresh.load_state_dict(state, strict=True)
    for lora in fresh.unet_loras:
        assert lora.scale == 0.25  # alpha 0.5 / rank 2, re-derived on load
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key

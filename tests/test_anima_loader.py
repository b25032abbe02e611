"""Anima checkpoint loading: the released key layout, config inference for every model width, error cases."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import AnimaError
from library.models.dit import Anima, AnimaConfig
from library.models.dit_loading import infer_anima_config, load_anima_model


def spec_key_table(
    width: int,
    num_blocks: int,
    head_dim: int,
    crossattn: int = 1024,
    adaln_lora: int = 256,
    adapter_width: int = 1024,
    adapter_layers: int = 6,
    adapter_head_dim: int = 64,
    adapter_source: int = 1024,
    vocab: int = 32128,
) -> dict[str, tuple[int, ...]]:
    """The checkpoint key list (after stripping ``net.``) as documented for the released model family."""
    d = width
    table = {
        "x_embedder.proj.1.weight": (d, 68),
        "t_embedder.1.linear_1.weight": (d, d),
        "t_embedder.1.linear_2.weight": (3 * d, d),
        "t_embedding_norm.weight": (d,),
        "final_layer.linear.weight": (64, d),
        "final_layer.adaln_modulation.1.weight": (adaln_lora, d),
        "final_layer.adaln_modulation.2.weight": (2 * d, adaln_lora),
    }
    for i in range(num_blocks):
        b = f"blocks.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "output_proj"):
            table[f"{b}self_attn.{name}.weight"] = (d, d)
        for name in ("q_proj", "output_proj"):
            table[f"{b}cross_attn.{name}.weight"] = (d, d)
        for name in ("k_proj", "v_proj"):
            table[f"{b}cross_attn.{name}.weight"] = (d, crossattn)
        for attn in ("self_attn", "cross_attn"):
            table[f"{b}{attn}.q_norm.weight"] = (head_dim,)
            table[f"{b}{attn}.k_norm.weight"] = (head_dim,)
        table[f"{b}mlp.layer1.weight"] = (4 * d, d)
        table[f"{b}mlp.layer2.weight"] = (d, 4 * d)
        for sub in ("self_attn", "cross_attn", "mlp"):
            table[f"{b}adaln_modulation_{sub}.1.weight"] = (adaln_lora, d)
            table[f"{b}adaln_modulation_{sub}.2.weight"] = (3 * d, adaln_lora)
    a = adapter_width
    table["llm_adapter.embed.weight"] = (vocab, a)
    for j in range(adapter_layers):
        b = f"llm_adapter.blocks.{j}."
        for norm in ("norm_self_attn", "norm_cross_attn", "norm_mlp"):
            table[f"{b}{norm}.weight"] = (a,)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            table[f"{b}self_attn.{name}.weight"] = (a, a)
        for name in ("q_proj", "o_proj"):
            table[f"{b}cross_attn.{name}.weight"] = (a, a)
        for name in ("k_proj", "v_proj"):
            table[f"{b}cross_attn.{name}.weight"] = (a, adapter_source)
        for attn in ("self_attn", "cross_attn"):
            table[f"{b}{attn}.q_norm.weight"] = (adapter_head_dim,)
            table[f"{b}{attn}.k_norm.weight"] = (adapter_head_dim,)
        table[f"{b}mlp.0.weight"] = (4 * a, a)
        table[f"{b}mlp.0.bias"] = (4 * a,)
        table[f"{b}mlp.2.weight"] = (a, 4 * a)
        table[f"{b}mlp.2.bias"] = (a,)
    table["llm_adapter.out_proj.weight"] = (a, a)
    table["llm_adapter.out_proj.bias"] = (a,)
    table["llm_adapter.norm.weight"] = (a,)
    return table


def meta_state_dict(table: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta") for key, shape in table.items()}


def test_full_2b_model_has_the_released_keys_shapes_and_parameter_count():
    with torch.device("meta"):
        model = Anima(AnimaConfig())
    shapes = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    assert shapes == spec_key_table(2048, 28, 128)
    assert len(shapes) == 685
    assert sum(p.numel() for p in model.parameters()) == 2_091_068_928
    assert sum(p.numel() for p in model.llm_adapter.parameters()) == 134_663_680
    assert sum(p.numel() for p in model.blocks[0].parameters()) == 69_206_528
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 28


@pytest.mark.parametrize(
    ("width", "blocks", "heads"),
    [(2048, 28, 16), (5120, 36, 40), (1280, 20, 20)],
    ids=["2B", "36-block", "20-block"],
)
def test_config_is_inferred_from_weights(width, blocks, heads):
    table = spec_key_table(width, blocks, width // heads)
    config = infer_anima_config(meta_state_dict(table))
    assert (config.model_channels, config.num_blocks, config.num_heads) == (width, blocks, heads)
    assert (config.in_channels, config.out_channels) == (16, 16)
    assert (config.crossattn_emb_channels, config.adaln_lora_dim, config.mlp_channels) == (1024, 256, 4 * width)
    assert (
        config.rope_h_extrapolation_ratio,
        config.rope_w_extrapolation_ratio,
        config.rope_t_extrapolation_ratio,
    ) == (4.0, 4.0, 1.0)
    assert (config.adapter_source_dim, config.adapter_model_dim, config.adapter_num_layers) == (1024, 1024, 6)
    assert (config.adapter_num_heads, config.adapter_mlp_channels, config.adapter_vocab_size) == (16, 4096, 32128)
    with torch.device("meta"):
        model = Anima(config)
    assert {key: tuple(t.shape) for key, t in model.state_dict().items()} == table


def test_adapter_sizes_are_inferred_not_assumed():
    table = spec_key_table(
        256, 3, 64, crossattn=96, adaln_lora=16, adapter_width=96, adapter_layers=2, adapter_head_dim=32,
        adapter_source=40, vocab=500,
    )  # fmt: skip
    config = infer_anima_config(meta_state_dict(table))
    assert (config.adapter_source_dim, config.adapter_model_dim, config.adapter_num_layers) == (40, 96, 2)
    assert (config.adapter_num_heads, config.adapter_vocab_size, config.crossattn_emb_channels) == (3, 500, 96)
    assert (config.num_blocks, config.num_heads, config.adaln_lora_dim) == (3, 4, 16)


@pytest.fixture(scope="module")
def tiny_weights(golden_dir) -> dict[str, torch.Tensor]:
    """The tiny golden checkpoint with ``net.`` stripped."""
    raw = load_file(str(golden_dir / "dit_tiny.safetensors"))
    return {key.removeprefix("net."): t for key, t in raw.items()}


def _assert_same_weights(model: Anima, weights: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == weights.keys()
    for key, tensor in weights.items():
        assert torch.equal(state[key], tensor), key


@pytest.mark.parametrize("prefix", ["net.", "", "diffusion_model.", "model.diffusion_model."])
@pytest.mark.parametrize("with_rope_buffers", [False, True])
def test_checkpoint_loads_with_any_prefix_and_optional_rope_buffers(tmp_path, tiny_weights, prefix, with_rope_buffers):
    weights = {prefix + key: t for key, t in tiny_weights.items()}
    if with_rope_buffers:
        weights[prefix + "pos_embedder.seq"] = torch.arange(256, dtype=torch.float32)
        weights[prefix + "pos_embedder.dim_spatial_range"] = torch.arange(10, dtype=torch.float32)
        weights[prefix + "pos_embedder.dim_temporal_range"] = torch.arange(12, dtype=torch.float32)
    path = tmp_path / "dit.safetensors"
    save_file(weights, str(path), metadata={"format": "pt"})
    model = load_anima_model(path)
    _assert_same_weights(model, tiny_weights)
    assert model.config.num_blocks == 2 and model.config.num_heads == 2


def test_pt_file_loads_and_dtype_and_device_are_applied(tmp_path, tiny_weights):
    path = tmp_path / "dit.pt"
    torch.save({"net." + key: t for key, t in tiny_weights.items()}, path)
    model = load_anima_model(path, dtype=torch.bfloat16, attn_mode="sdpa", split_attn=True)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" and not p.is_meta for p in model.parameters())
    assert model.attn_mode == "torch" and model.split_attn
    assert torch.equal(
        model.state_dict()["blocks.0.mlp.layer1.weight"], tiny_weights["blocks.0.mlp.layer1.weight"].bfloat16()
    )


def test_missing_file_names_the_flag(tmp_path):
    with pytest.raises(AnimaError, match="--pretrained_model_name_or_path.*not found"):
        load_anima_model(tmp_path / "nope.safetensors")


def test_unknown_attention_mode_fails_before_loading(tmp_path):
    with pytest.raises(AnimaError, match="--attn_mode.*unknown"):
        load_anima_model(tmp_path / "nope.safetensors", attn_mode="fastest")


def test_vae_file_is_rejected_as_not_a_dit(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file(
        {"encoder.conv_in.weight": torch.zeros(16, 3, 3, 3, 3), "decoder.conv_out.bias": torch.zeros(3)}, str(path)
    )
    with pytest.raises(AnimaError, match=r"vae\.safetensors is not an Anima DiT checkpoint"):
        load_anima_model(path)


def test_corrupt_file_gives_one_clear_error(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"this is not a safetensors file")
    with pytest.raises(AnimaError, match="cannot read"):
        load_anima_model(path)


def _split_adapter(tiny_weights):
    dit = {"net." + k: t for k, t in tiny_weights.items() if not k.startswith("llm_adapter.")}
    adapter = {k: t for k, t in tiny_weights.items() if k.startswith("llm_adapter.")}
    return dit, adapter


def test_dit_without_adapter_asks_for_llm_adapter_path(tmp_path, tiny_weights):
    dit, _ = _split_adapter(tiny_weights)
    path = tmp_path / "dit_only.safetensors"
    save_file(dit, str(path))
    with pytest.raises(AnimaError, match="no llm_adapter.* weights: pass --llm_adapter_path"):
        load_anima_model(path)


@pytest.mark.parametrize("adapter_prefix", ["llm_adapter.", "net.llm_adapter.", ""])
def test_llm_adapter_path_completes_the_model(tmp_path, tiny_weights, adapter_prefix):
    dit, adapter = _split_adapter(tiny_weights)
    dit_path, adapter_path = tmp_path / "dit_only.safetensors", tmp_path / "adapter.safetensors"
    save_file(dit, str(dit_path))
    save_file({adapter_prefix + k.removeprefix("llm_adapter."): t for k, t in adapter.items()}, str(adapter_path))
    model = load_anima_model(dit_path, llm_adapter_path=adapter_path)
    _assert_same_weights(model, tiny_weights)


def test_llm_adapter_path_replaces_the_bundled_adapter(tmp_path, tiny_weights):
    _, adapter = _split_adapter(tiny_weights)
    full_path, adapter_path = tmp_path / "dit.safetensors", tmp_path / "adapter.safetensors"
    save_file({"net." + k: t for k, t in tiny_weights.items()}, str(full_path))
    replaced = {k: t + 1.0 for k, t in adapter.items()}
    save_file(replaced, str(adapter_path))
    model = load_anima_model(full_path, llm_adapter_path=adapter_path)
    assert torch.equal(model.state_dict()["llm_adapter.norm.weight"], replaced["llm_adapter.norm.weight"])
    assert torch.equal(model.state_dict()["blocks.0.mlp.layer1.weight"], tiny_weights["blocks.0.mlp.layer1.weight"])


def test_missing_adapter_file_names_its_flag(tmp_path, golden_dir):
    with pytest.raises(AnimaError, match="--llm_adapter_path.*not found"):
        load_anima_model(golden_dir / "dit_tiny.safetensors", llm_adapter_path=tmp_path / "absent.safetensors")


def test_missing_and_unexpected_keys_are_named(tmp_path, tiny_weights):
    weights = dict(tiny_weights)
    del weights["blocks.1.mlp.layer2.weight"]
    weights["blocks.0.extra_thing.weight"] = torch.zeros(3)
    path = tmp_path / "odd.safetensors"
    save_file(weights, str(path))
    with pytest.raises(AnimaError, match=r"missing blocks\.1\.mlp\.layer2\.weight.*unexpected blocks\.0\.extra_thing"):
        load_anima_model(path)


def test_inconsistent_shapes_are_reported(tmp_path, tiny_weights):
    weights = dict(tiny_weights)
    weights["blocks.1.self_attn.q_proj.weight"] = torch.zeros(128, 64)
    path = tmp_path / "bad_shape.safetensors"
    save_file(weights, str(path))
    with pytest.raises(AnimaError, match=r"blocks\.1\.self_attn\.q_proj\.weight \(128, 64\)"):
        load_anima_model(path)


def test_missing_inference_key_is_named(tmp_path, tiny_weights):
    weights = {k: t for k, t in tiny_weights.items() if k != "blocks.0.self_attn.q_norm.weight"}
    path = tmp_path / "incomplete.safetensors"
    save_file(weights, str(path))
    with pytest.raises(AnimaError, match=r"incomplete\.safetensors is missing blocks\.0\.self_attn\.q_norm\.weight"):
        load_anima_model(path)


def _save_in_parts(tmp_path, weights: dict[str, torch.Tensor], count: int) -> list:
    keys = sorted(weights)
    paths = []
    for index in range(count):
        path = tmp_path / f"anima-{index + 1:05d}-of-{count:05d}.safetensors"
        save_file({"net." + k: weights[k] for k in keys[index::count]}, str(path))
        paths.append(path)
    return paths


@pytest.mark.parametrize("given", [0, 2])
def test_a_checkpoint_split_in_parts_loads_whole_from_any_part(tmp_path, tiny_weights, given):
    paths = _save_in_parts(tmp_path, tiny_weights, 3)
    _assert_same_weights(load_anima_model(paths[given]), tiny_weights)
    assert load_anima_model(paths[given], device="meta").config.num_blocks == 2  # the header-only input check too


def test_a_missing_part_of_a_split_checkpoint_is_named(tmp_path, tiny_weights):
    paths = _save_in_parts(tmp_path, tiny_weights, 3)
    paths[1].unlink()
    with pytest.raises(AnimaError, match=r"split in 3, but .*anima-00002-of-00003\.safetensors is missing"):
        load_anima_model(paths[0])


def test_parts_holding_the_same_tensor_twice_are_refused(tmp_path, tiny_weights):
    paths = _save_in_parts(tmp_path, tiny_weights, 2)
    first = load_file(str(paths[0]))
    save_file({**load_file(str(paths[1])), "net.x_embedder.proj.1.weight": first["net.x_embedder.proj.1.weight"]},
              str(paths[1]))
    with pytest.raises(AnimaError, match="holds some tensors twice"):
        load_anima_model(paths[0])


def test_plain_float8_weights_are_upcast_to_the_load_dtype(tmp_path, tiny_weights):
    weights = {k: (t.to(torch.float8_e4m3fn) if t.ndim == 2 and k.startswith("blocks.") else t)
               for k, t in tiny_weights.items()}
    path = tmp_path / "fp8.safetensors"
    save_file({"net." + k: t for k, t in weights.items()}, str(path))
    state = load_anima_model(path, dtype=torch.bfloat16).state_dict()
    key = "blocks.0.mlp.layer1.weight"
    assert state[key].dtype == torch.bfloat16
    assert torch.equal(state[key], weights[key].to(torch.bfloat16))  # the float8 value itself, no scale applied


@pytest.mark.parametrize("marker", ["blocks.0.mlp.layer1.scale_weight", "scaled_fp8"])
def test_scaled_float8_checkpoints_are_refused_in_one_line(tmp_path, tiny_weights, marker):
    weights = {"net." + k: t for k, t in tiny_weights.items()}
    weights["net.blocks.0.mlp.layer1.weight"] = tiny_weights["blocks.0.mlp.layer1.weight"].to(torch.float8_e4m3fn)
    weights[marker] = torch.ones(())
    path = tmp_path / "scaled.safetensors"
    save_file(weights, str(path))
    expected = r"^--pretrained_model_name_or_path: .*scaled-float8 checkpoint .*bf16"
    with pytest.raises(AnimaError, match=expected) as error:
        load_anima_model(path)
    assert "\n" not in str(error.value)


def test_rope_angles_stay_float32_when_the_weights_load_in_bf16(golden_dir):
    """The position tables are not cast with the weights: bf16 weights rotate by the float32 angles."""
    model = load_anima_model(golden_dir / "dit_tiny.safetensors", dtype=torch.bfloat16)
    angles = model.rope_angles(1, 64, 64)
    assert angles.dtype == torch.float32
    # Height half of the table (head_dim 64: dim_h = 20 after dim_t = 24): angle = h * theta_h^(-2k/20),
    # theta_h = 10000 * 4^(20/18); the last row is h = 63, w = 63.
    theta_h = 10000.0 * 4.0 ** (20 / 18)
    expected = 63 * theta_h ** (-torch.arange(0, 20, 2, dtype=torch.float64) / 20)
    torch.testing.assert_close(angles[-1, 12:22].double(), expected, rtol=1e-6, atol=1e-5)

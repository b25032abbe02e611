"""Qwen-Image VAE: parity with the reference tensors, both key layouts, chunking, and clear errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from library.errors import AnimaError
from library.models.vae import (
    LATENTS_MEAN,
    LATENTS_STD,
    CausalConv3d,
    ChannelRMSNorm,
    QwenImageVAE,
    VAEConfig,
    load_vae,
)
from library.models.vae_keys import diffusers_to_original_keys, original_to_diffusers_keys


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def vae_file(golden_dir: Path) -> Path:
    return golden_dir / "vae_tiny.safetensors"


@pytest.fixture(scope="module")
def golden(golden_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(golden_dir / "vae_tiny_golden.safetensors")


@pytest.fixture(scope="module")
def vae(vae_file: Path) -> QwenImageVAE:
    return load_vae(vae_file)


@pytest.fixture(scope="module")
def reference_outputs(vae: QwenImageVAE, golden: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, decoded) of the unchunked model, for comparing variants of it."""
    with torch.no_grad():
        return vae.encode_pixels_to_latents(golden["in.pixels"]), vae.decode_latents_to_pixels(golden["out.latents"])


def assert_matches_golden(model: QwenImageVAE, golden: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        mean, logvar = model.encode_posterior(golden["in.pixels"].unsqueeze(2))
        latents = model.encode_pixels_to_latents(golden["in.pixels"])
        decoded = model.decode_latents_to_pixels(golden["out.latents"])
    assert mean.shape == golden["out.posterior_mean"].shape
    assert max_rel_err(mean, golden["out.posterior_mean"]) <= 1e-4
    assert max_rel_err(logvar, golden["out.posterior_logvar"]) <= 1e-4
    assert latents.shape == (2, 16, 8, 12)
    assert max_rel_err(latents, golden["out.latents"]) <= 1e-4
    assert decoded.shape == (2, 3, 64, 96)
    assert (decoded - golden["out.decoded"]).abs().max().item() <= 1e-5


# --- parity ------------------------------------------------------------------------------------------------


def test_tiny_vae_matches_golden_posterior_latents_and_decode(vae, golden):
    assert vae.config == VAEConfig(base_dim=16)
    assert_matches_golden(vae, golden)


def test_latent_constants_equal_reference(golden):
    assert torch.equal(torch.tensor(LATENTS_MEAN), golden["const.latents_mean"])
    assert torch.equal(torch.tensor(LATENTS_STD), golden["const.latents_std"])


def test_5d_single_frame_input_gives_same_numbers_and_keeps_rank(vae, golden, reference_outputs):
    latents, decoded = reference_outputs
    with torch.no_grad():
        latents_5d = vae.encode_pixels_to_latents(golden["in.pixels"].unsqueeze(2))
        decoded_5d = vae.decode_latents_to_pixels(golden["out.latents"].unsqueeze(2))
    assert latents_5d.shape == (2, 16, 1, 8, 12) and decoded_5d.shape == (2, 3, 1, 64, 96)
    assert torch.equal(latents_5d[:, :, 0], latents)
    assert torch.equal(decoded_5d[:, :, 0], decoded)


def test_grad_enabled_path_gives_same_numbers(vae, golden, reference_outputs):
    # Without no_grad the blocks avoid in-place updates; the numbers must not change.
    latents = vae.encode_pixels_to_latents(golden["in.pixels"])
    decoded = vae.decode_latents_to_pixels(golden["out.latents"])
    # Out-of-place instead of in-place kernels: equal within fp32 rounding.
    torch.testing.assert_close(latents.detach(), reference_outputs[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(decoded.detach(), reference_outputs[1], rtol=1e-6, atol=1e-6)


def test_matches_diffusers_autoencoder_on_tiny_weights(vae, vae_file):
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.AutoencoderKLQwenImage(base_dim=16).eval()
    reference.load_state_dict(load_file(vae_file), strict=True)
    pixels = torch.rand(1, 3, 1, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected_mean = reference.encode(pixels).latent_dist.mean
        mean, _ = vae.encode_posterior(pixels)
        z = torch.randn(1, 16, 1, 4, 6, generator=torch.Generator().manual_seed(1))
        expected_pixels = reference.decode(z).sample.clamp(-1, 1)
        stats_mean = torch.tensor(LATENTS_MEAN).view(1, 16, 1, 1, 1)
        stats_std = torch.tensor(LATENTS_STD).view(1, 16, 1, 1, 1)
        decoded = vae.decode_latents_to_pixels((z - stats_mean) / stats_std)
    assert max_rel_err(mean, expected_mean) <= 1e-4
    assert (decoded - expected_pixels).abs().max().item() <= 1e-4


# --- key layouts and file formats --------------------------------------------------------------------------


def test_original_names_round_trip_through_the_mapping(vae_file):
    state_dict = load_file(vae_file)
    original = diffusers_to_original_keys(state_dict)
    assert len(original) == len(state_dict) == 194
    assert "decoder.upsamples.4.shortcut.weight" in original
    assert "decoder.upsamples.11.resample.1.weight" in original
    assert "encoder.downsamples.8.time_conv.weight" in original
    assert "decoder.middle.1.to_qkv.weight" in original
    assert "decoder.head.2.weight" in original and "conv2.bias" in original
    back = original_to_diffusers_keys(original)
    assert set(back) == set(state_dict)
    assert all(back[k] is state_dict[k] for k in state_dict)


def test_original_names_agree_with_diffusers_converter(vae_file):
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    state_dict = load_file(vae_file)
    converted = single_file_utils.convert_wan_vae_to_diffusers(diffusers_to_original_keys(state_dict))
    assert set(converted) == set(state_dict)
    assert all(torch.equal(converted[k], state_dict[k]) for k in state_dict)


@pytest.mark.parametrize("prefix", ["", "first_stage_model.", "vae."])
def test_original_named_safetensors_load_to_same_numbers(vae_file, golden, tmp_path, prefix):
    original = diffusers_to_original_keys(load_file(vae_file))
    path = tmp_path / "qwen_image_vae.safetensors"
    save_file({prefix + k: v for k, v in original.items()}, path)
    assert_matches_golden(load_vae(path), golden)


def test_pth_with_nested_state_dict_loads_to_same_numbers(vae_file, golden, tmp_path):
    path = tmp_path / "vae.pth"
    torch.save({"state_dict": diffusers_to_original_keys(load_file(vae_file))}, path)
    assert_matches_golden(load_vae(path), golden)


def test_diffusers_folder_loads(vae_file, golden, tmp_path):
    (tmp_path / "vae").mkdir()
    save_file(load_file(vae_file), tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    assert_matches_golden(load_vae(tmp_path), golden)


def test_loaded_model_is_frozen_in_requested_dtype(vae_file):
    model = load_vae(vae_file, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.device == torch.device("cpu")
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert list(model.state_dict()) == list(load_vae(vae_file).state_dict())


def test_bf16_encode_decode_stays_close_to_fp32(vae_file, golden, reference_outputs):
    model = load_vae(vae_file, dtype=torch.bfloat16, chunk_size=16)
    with torch.no_grad():
        latents = model.encode_pixels_to_latents(golden["in.pixels"])
        decoded = model.decode_latents_to_pixels(golden["out.latents"])
    assert latents.dtype == torch.bfloat16 and decoded.dtype == torch.bfloat16
    # Random tiny weights amplify rounding: diffusers' own bf16 run is off by 1.1% (encode) and 5.5% (decode).
    assert max_rel_err(latents.float(), reference_outputs[0]) < 0.03
    assert max_rel_err(decoded.float(), reference_outputs[1]) < 0.1



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latent_normalisation_uses_sd_scripts_arithmetic_in_the_vae_dtype(vae_file, golden, dtype):
    """sd-scripts normalises as (mu - mean) * (1/std) and un-normalises as z / (1/std) + mean, in the VAE's
    dtype, with std rounded to that dtype before the reciprocal (its `1.0 / tensor(std).to(dtype)`): a bf16 VAE
    must cache the same latents bit for bit."""
    model = load_vae(vae_file, dtype=dtype)
    mean = torch.tensor(LATENTS_MEAN).view(1, 16, 1, 1).to(dtype)
    inv_std = 1.0 / torch.tensor(LATENTS_STD).view(1, 16, 1, 1).to(dtype)
    if dtype == torch.bfloat16:  # the order of rounding matters here, so the test can tell the two apart
        assert not torch.equal(inv_std, (1.0 / torch.tensor(LATENTS_STD).view(1, 16, 1, 1)).to(dtype))
    seen: list[torch.Tensor] = []
    model.post_quant_conv.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    with torch.no_grad():
        mu, _ = model.encode_posterior(golden["in.pixels"])
        latents = model.encode_pixels_to_latents(golden["in.pixels"])
        model.decode_latents_to_pixels(golden["out.latents"])
    assert torch.equal(latents, (mu - mean) * inv_std)
    assert torch.equal(seen[0], golden["out.latents"].to(dtype) / inv_std + mean)


@pytest.mark.parametrize("grad", [False, True])
def test_channel_rms_norm_is_sd_scripts_normalize_then_scale_then_gamma(grad):
    """The same ops in the same order as sd-scripts (F.normalize over channels, times sqrt(C), times gamma),
    with and without autograd (the grad-free path multiplies in place)."""
    norm = ChannelRMSNorm(8)
    with torch.no_grad():
        norm.gamma.copy_(1 + 0.1 * torch.randn(8, 1, 1, 1, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(2, 8, 5, 7, generator=torch.Generator().manual_seed(1)) * 3
    with torch.set_grad_enabled(grad):
        y = norm(x)
    expected = F.normalize(x, dim=1) * 8**0.5 * norm.gamma.detach().reshape(8, 1, 1)
    assert torch.equal(y.detach(), expected)


def test_causal_conv_gives_the_same_bits_for_a_channels_last_input():
    """The mid-block attention hands on a channels-last tensor; a conv on it would pick another kernel and
    round differently from sd-scripts, whose padded conv input is always contiguous."""
    conv = CausalConv3d(16, 16, 3, padding=1)
    x = torch.randn(1, 16, 12, 10, generator=torch.Generator().manual_seed(2))
    channels_last = x.to(memory_format=torch.channels_last)
    assert not channels_last.is_contiguous()
    with torch.no_grad():
        assert torch.equal(conv(channels_last), conv(x))
        conv.chunk_size = 4  # the row-band path too
        assert torch.equal(conv(channels_last), conv(x))


# --- chunking and the cache flag ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 16])
def test_chunked_convs_match_unchunked(vae_file, golden, reference_outputs, chunk_size):
    model = load_vae(vae_file, chunk_size=chunk_size)
    assert model.chunk_size == chunk_size + chunk_size % 2
    pixels, golden_latents = golden["in.pixels"].clone(), golden["out.latents"].clone()
    with torch.no_grad():
        latents = model.encode_pixels_to_latents(pixels)
        decoded = model.decode_latents_to_pixels(golden_latents)
    # In-place residual sums must never touch the caller's tensors.
    assert torch.equal(pixels, golden["in.pixels"]) and torch.equal(golden_latents, golden["out.latents"])
    assert max_rel_err(latents, reference_outputs[0]) <= 1e-5
    assert (decoded - reference_outputs[1]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("height, width", [(8, 8), (8, 24), (24, 40), (40, 8)])
def test_chunking_handles_odd_latent_sizes_and_images_smaller_than_a_chunk(vae_file, height, width):
    # 8x24 etc. give odd latent sizes (1x3, 3x5); chunk 2 cuts every layer, 64 is larger than the image.
    vae = load_vae(vae_file)
    pixels = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(height * width)) * 2 - 1
    with torch.no_grad():
        vae.set_chunk_size(None)
        latents = vae.encode_pixels_to_latents(pixels)
        decoded = vae.decode_latents_to_pixels(latents)
        for chunk_size in (2, 64):
            vae.set_chunk_size(chunk_size)
            assert vae.encode_pixels_to_latents(pixels).shape == (1, 16, height // 8, width // 8)
            assert max_rel_err(vae.encode_pixels_to_latents(pixels), latents) <= 1e-5
            assert (vae.decode_latents_to_pixels(latents) - decoded).abs().max().item() <= 1e-5


def test_odd_chunk_size_is_rounded_up_with_a_note(vae_file, caplog):
    with caplog.at_level(logging.INFO, logger="library.models.vae"):
        model = load_vae(vae_file, chunk_size=7)
    assert model.chunk_size == 8
    assert "--vae_chunk_size 7" in caplog.text


def test_disable_cache_changes_nothing_for_images(vae_file, golden, reference_outputs):
    model = load_vae(vae_file, disable_cache=True)
    assert model.disable_cache
    with torch.no_grad():
        assert torch.equal(model.encode_pixels_to_latents(golden["in.pixels"]), reference_outputs[0])
        assert torch.equal(model.decode_latents_to_pixels(golden["out.latents"]), reference_outputs[1])


# --- the real configuration ----------------------------------------------------------------------------------


def test_full_size_config_has_reference_keys_shapes_and_param_count():
    with torch.device("meta"):
        model = QwenImageVAE(VAEConfig())
    state_dict = model.state_dict()
    assert len(state_dict) == 194
    assert sum(p.numel() for p in model.parameters()) == 126_892_531
    assert sum(p.numel() for p in model.encoder.parameters()) == 53_595_872
    assert sum(p.numel() for p in model.decoder.parameters()) == 73_295_331
    expected_shapes = {
        "encoder.conv_in.weight": (96, 3, 3, 3, 3),
        "encoder.down_blocks.0.norm1.gamma": (96, 1, 1, 1),
        "encoder.down_blocks.3.conv_shortcut.weight": (192, 96, 1, 1, 1),
        "encoder.down_blocks.2.resample.1.weight": (96, 96, 3, 3),
        "encoder.down_blocks.5.resample.1.weight": (192, 192, 3, 3),
        "encoder.down_blocks.8.time_conv.weight": (384, 384, 3, 1, 1),
        "encoder.mid_block.attentions.0.norm.gamma": (384, 1, 1),
        "encoder.mid_block.attentions.0.to_qkv.weight": (1152, 384, 1, 1),
        "encoder.mid_block.attentions.0.to_qkv.bias": (1152,),
        "encoder.mid_block.attentions.0.proj.weight": (384, 384, 1, 1),
        "encoder.conv_out.weight": (32, 384, 3, 3, 3),
        "quant_conv.weight": (32, 32, 1, 1, 1),
        "post_quant_conv.weight": (16, 16, 1, 1, 1),
        "decoder.conv_in.weight": (384, 16, 3, 3, 3),
        "decoder.up_blocks.0.upsamplers.0.resample.1.weight": (192, 384, 3, 3),
        "decoder.up_blocks.0.upsamplers.0.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.up_blocks.1.resnets.0.conv_shortcut.weight": (384, 192, 1, 1, 1),
        "decoder.up_blocks.1.upsamplers.0.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.up_blocks.2.upsamplers.0.resample.1.weight": (96, 192, 3, 3),
        "decoder.up_blocks.3.resnets.2.conv2.weight": (96, 96, 3, 3, 3),
        "decoder.conv_out.weight": (3, 96, 3, 3, 3),
    }
    assert {k: tuple(state_dict[k].shape) for k in expected_shapes} == expected_shapes
    assert "encoder.down_blocks.2.time_conv.weight" not in state_dict
    assert "decoder.up_blocks.2.upsamplers.0.time_conv.weight" not in state_dict
    assert not any(k.startswith("decoder.up_blocks.3.upsamplers") for k in state_dict)
    assert sum(".conv_shortcut." in k for k in state_dict) == 6  # weight+bias at enc 3, 6 and dec up_blocks.1.0
    original = diffusers_to_original_keys(state_dict)
    assert len(original) == 194 and set(original_to_diffusers_keys(original)) == set(state_dict)


# --- errors ------------------------------------------------------------------------------------------------


def test_missing_file_names_the_flag(tmp_path):
    with pytest.raises(AnimaError, match="--vae: file not found"):
        load_vae(tmp_path / "nope.safetensors")


def test_dit_checkpoint_passed_as_vae_is_recognised(golden_dir):
    with pytest.raises(AnimaError, match="Anima DiT") as info:
        load_vae(golden_dir / "dit_tiny.safetensors")
    assert "\n" not in str(info.value)


def test_missing_key_is_named(vae_file, tmp_path):
    state_dict = load_file(vae_file)
    del state_dict["decoder.up_blocks.0.upsamplers.0.time_conv.weight"]
    path = tmp_path / "broken.safetensors"
    save_file(state_dict, path)
    with pytest.raises(AnimaError, match=r"1 missing keys \(e.g. decoder.up_blocks.0.upsamplers.0.time_conv.weight\)"):
        load_vae(path)


@pytest.mark.parametrize("marker", ["decoder.conv_out.scale_weight", "scaled_fp8"])
def test_scaled_float8_file_is_refused_in_one_line(vae_file, tmp_path, marker):
    state_dict = load_file(vae_file)
    state_dict[marker] = torch.ones(())
    path = tmp_path / "vae_scaled.safetensors"
    save_file(state_dict, path)
    with pytest.raises(AnimaError, match=r"^--vae: .*scaled-float8 checkpoint") as info:
        load_vae(path)
    assert "\n" not in str(info.value)


def test_unexpected_key_and_shape_mismatch_are_named(vae_file, tmp_path):
    state_dict = load_file(vae_file)
    state_dict["decoder.extra.weight"] = torch.zeros(1)
    state_dict["encoder.mid_block.attentions.0.proj.bias"] = torch.zeros(3)
    path = tmp_path / "broken.safetensors"
    save_file(state_dict, path)
    with pytest.raises(AnimaError, match="decoder.extra.weight") as info:
        load_vae(path)
    assert "encoder.mid_block.attentions.0.proj.bias: file (3,), expected (64,)" in str(info.value)


def test_unreadable_file_is_reported(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(AnimaError, match="cannot read"):
        load_vae(path)


@pytest.mark.parametrize("chunk_size", [0, -4])
def test_non_positive_chunk_size_is_rejected(vae_file, chunk_size):
    with pytest.raises(AnimaError, match="--vae_chunk_size"):
        load_vae(vae_file, chunk_size=chunk_size)


def test_size_not_multiple_of_8_is_rejected_with_bucket_hint(vae):
    with pytest.raises(AnimaError, match="multiple of 16"):
        vae.encode_pixels_to_latents(torch.zeros(1, 3, 60, 96))


def test_pixels_outside_minus_one_to_one_are_rejected(vae):
    with pytest.raises(AnimaError, match=r"must be in \[-1, 1\] but reach 255"):
        vae.encode_pixels_to_latents(torch.full((1, 3, 16, 16), 255.0))


def test_video_input_is_rejected(vae):
    with pytest.raises(AnimaError, match="only single images"):
        vae.encode_pixels_to_latents(torch.zeros(1, 3, 5, 64, 64))


def test_wrong_channel_count_is_rejected(vae):
    with pytest.raises(AnimaError, match=r"latents must be \[B, 16, H, W\]"):
        vae.decode_latents_to_pixels(torch.zeros(1, 4, 8, 8))

"""Qwen3 text encoder and Qwen3/T5 tokenizers: parity with the reference tensors, loading paths, errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.errors import AnimaError
from library.models.qwen3 import (
    AnimaTextEncoding,
    AnimaTokenizer,
    encode_qwen3,
    load_qwen3_text_encoder,
    load_qwen3_tokenizer,
    load_t5_tokenizer,
    text_encoder_identity,
)

GOLDEN_MAX_LENGTH = 16


@pytest.fixture(autouse=True)
def no_hub_downloads(tmp_path_factory, monkeypatch):
    """Every test here runs with the hub offline and an empty cache, so nothing can be downloaded."""
    from huggingface_hub import constants

    empty_home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(empty_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(empty_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(empty_home / "hub"))
    return empty_home / "hub"


@pytest.fixture(scope="module")
def qwen3_tiny_dir(golden_dir: Path) -> Path:
    return golden_dir / "qwen3_tiny"


@pytest.fixture(scope="module")
def golden_text(golden_dir: Path) -> tuple[list[str], dict[str, torch.Tensor]]:
    path = golden_dir / "text_tiny_golden.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        captions = json.loads(handle.metadata()["captions"])
    return captions, load_file(str(path))


@pytest.fixture(scope="module")
def qwen3_tokenizer(qwen3_tiny_dir: Path):
    return load_qwen3_tokenizer(qwen3_path=qwen3_tiny_dir)


@pytest.fixture(scope="module")
def t5_tokenizer(tokenizers_dir: Path):
    return load_t5_tokenizer(tokenizers_dir / "t5_old")


@pytest.fixture(scope="module")
def tiny_encoder(qwen3_tiny_dir: Path):
    return load_qwen3_text_encoder(qwen3_tiny_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def golden_tokenizer(qwen3_tokenizer, t5_tokenizer) -> AnimaTokenizer:
    return AnimaTokenizer(qwen3_tokenizer, t5_tokenizer, GOLDEN_MAX_LENGTH, GOLDEN_MAX_LENGTH)


def _max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.abs().max()).item()


def _single_file_copy(qwen3_tiny_dir: Path, target: Path, drop: str | None = None) -> Path:
    """The tiny model's weights as one file with ``model.``-prefixed keys plus a tied ``lm_head.weight``."""
    state = load_file(str(qwen3_tiny_dir / "model.safetensors"))
    assert all(key.startswith("model.") for key in state)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    if drop is not None:
        del state[drop]
    save_file(state, str(target))
    return target


# --- parity with the reference ----------------------------------------------------------------------------


def test_golden_captions_tokenize_to_reference_ids_and_masks(golden_tokenizer, golden_text):
    captions, golden = golden_text
    tokens = golden_tokenizer(captions)
    assert torch.equal(tokens.qwen3_ids, golden["out.qwen3_input_ids"])
    assert torch.equal(tokens.qwen3_mask, golden["out.qwen3_attn_mask"])
    assert torch.equal(tokens.t5_ids, golden["out.t5_input_ids"])
    assert torch.equal(tokens.t5_mask, golden["out.t5_attn_mask"])
    assert all(t.dtype == torch.int64 for t in (tokens.qwen3_ids, tokens.qwen3_mask, tokens.t5_ids, tokens.t5_mask))


def test_golden_prompt_embeds_match_reference(golden_tokenizer, tiny_encoder, golden_text):
    captions, golden = golden_text
    encoding = AnimaTextEncoding(golden_tokenizer, tiny_encoder, "cpu", torch.float32)
    out = encoding.encode(captions)
    assert out["qwen3_embeds"].dtype == torch.float32 and out["qwen3_embeds"].device.type == "cpu"
    assert out["qwen3_embeds"].shape == golden["out.prompt_embeds"].shape
    assert _max_rel_err(out["qwen3_embeds"], golden["out.prompt_embeds"]) <= 1e-4
    padded = golden["out.qwen3_attn_mask"] == 0
    assert torch.count_nonzero(out["qwen3_embeds"][padded]) == 0
    assert torch.equal(out["t5_ids"], golden["out.t5_input_ids"])


def test_real_qwen3_tokenizer_matches_golden_ids(tokenizers_dir, t5_tokenizer, golden_text):
    captions, golden = golden_text
    real = load_qwen3_tokenizer(tokenizer_path=tokenizers_dir / "qwen3_06b")
    assert real.pad_token_id == 151643
    tokens = AnimaTokenizer(real, t5_tokenizer, GOLDEN_MAX_LENGTH, GOLDEN_MAX_LENGTH)(captions)
    assert torch.equal(tokens.qwen3_ids, golden["out.qwen3_input_ids"])
    assert torch.equal(tokens.qwen3_mask, golden["out.qwen3_attn_mask"])


# --- tokenisation rules -----------------------------------------------------------------------------------


def test_empty_caption_has_no_qwen3_tokens_and_only_t5_eos(golden_tokenizer, tiny_encoder):
    tokens = golden_tokenizer(["", "a cat"])
    assert torch.count_nonzero(tokens.qwen3_mask[0]) == 0
    assert tokens.t5_ids[0].tolist() == [1] + [0] * (GOLDEN_MAX_LENGTH - 1)
    assert tokens.t5_mask[0].tolist() == [1] + [0] * (GOLDEN_MAX_LENGTH - 1)
    assert tokens.t5_ids[1, :5].tolist() == [3, 9, 1712, 1, 0]

    embeds = encode_qwen3(tiny_encoder, tokens.qwen3_ids, tokens.qwen3_mask)
    assert torch.isfinite(embeds).all()
    assert torch.count_nonzero(embeds[0]) == 0
    assert torch.count_nonzero(embeds[1, :2]) > 0


def test_empty_caption_encodes_to_zeros_alone(golden_tokenizer, tiny_encoder):
    # A batch made only of empty captions: every attention row would be fully masked.
    encoding = AnimaTextEncoding(golden_tokenizer, tiny_encoder, "cpu", torch.float32)
    out = encoding.encode(["", ""])
    assert torch.equal(out["qwen3_embeds"], torch.zeros(2, GOLDEN_MAX_LENGTH, tiny_encoder.config.hidden_size))


def test_truncation_keeps_t5_eos_and_cuts_qwen3_to_max_length(qwen3_tokenizer, t5_tokenizer):
    tokenizer = AnimaTokenizer(qwen3_tokenizer, t5_tokenizer, qwen3_max_length=5, t5_max_length=6)
    long_caption = "1girl, solo, looking at viewer, smile, outdoors, blue sky, cherry blossoms"
    tokens = tokenizer([long_caption])
    assert tokens.t5_ids.shape == (1, 6) and tokens.qwen3_ids.shape == (1, 5)
    assert tokens.t5_ids[0, -1].item() == 1
    assert tokens.t5_mask[0].tolist() == [1] * 6
    assert tokens.t5_ids[0, :5].tolist() == t5_tokenizer(long_caption)["input_ids"][:5]
    assert tokens.qwen3_mask[0].tolist() == [1] * 5
    assert tokens.qwen3_ids[0].tolist() == qwen3_tokenizer(long_caption, add_special_tokens=False)["input_ids"][:5]


def test_qwen3_side_adds_no_special_tokens_and_pads_right(qwen3_tokenizer, t5_tokenizer):
    tokens = AnimaTokenizer(qwen3_tokenizer, t5_tokenizer, 8, 8)(["a cat"])
    raw = qwen3_tokenizer.encode("a cat", add_special_tokens=False)
    pad = qwen3_tokenizer.pad_token_id
    assert tokens.qwen3_ids[0].tolist() == raw + [pad] * (8 - len(raw))
    assert tokens.qwen3_mask[0].tolist() == [1] * len(raw) + [0] * (8 - len(raw))


def test_caption_weights_are_tokenised_as_plain_text(qwen3_tokenizer, t5_tokenizer):
    # "(tag:1.2)" is not a prompt weight here: both sides see the literal characters, brackets and number included.
    caption = "1girl, (red hair:1.2), ((smile))"
    tokens = AnimaTokenizer(qwen3_tokenizer, t5_tokenizer, 32, 32)([caption])
    raw_qwen3 = qwen3_tokenizer.encode(caption, add_special_tokens=False)
    raw_t5 = t5_tokenizer.encode(caption)  # ends with </s>
    assert tokens.qwen3_ids[0, : len(raw_qwen3)].tolist() == raw_qwen3
    assert tokens.t5_ids[0, : len(raw_t5)].tolist() == raw_t5
    assert qwen3_tokenizer.decode(raw_qwen3) == caption
    assert int(tokens.qwen3_mask.sum()) == len(raw_qwen3) and int(tokens.t5_mask.sum()) == len(raw_t5)


def test_bad_max_length_is_rejected_naming_the_flag(qwen3_tokenizer, t5_tokenizer):
    with pytest.raises(AnimaError, match="--qwen3_max_token_length"):
        AnimaTokenizer(qwen3_tokenizer, t5_tokenizer, qwen3_max_length=0)
    with pytest.raises(AnimaError, match="--t5_max_token_length"):
        AnimaTokenizer(qwen3_tokenizer, t5_tokenizer, t5_max_length=-3)


# --- encoding -------------------------------------------------------------------------------------------------


def test_padding_does_not_change_real_rows(qwen3_tokenizer, t5_tokenizer, tiny_encoder, golden_text):
    captions, _ = golden_text
    short = AnimaTextEncoding(AnimaTokenizer(qwen3_tokenizer, t5_tokenizer, 16, 16), tiny_encoder, "cpu", torch.float32)
    long = AnimaTextEncoding(AnimaTokenizer(qwen3_tokenizer, t5_tokenizer, 40, 40), tiny_encoder, "cpu", torch.float32)
    out_short, out_long = short.encode(captions), long.encode(captions)
    assert torch.equal(out_long["qwen3_mask"][:, :16], out_short["qwen3_mask"])
    assert torch.count_nonzero(out_long["qwen3_mask"][:, 16:]) == 0
    torch.testing.assert_close(out_long["qwen3_embeds"][:, :16], out_short["qwen3_embeds"], rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(out_long["qwen3_embeds"][:, 16:]) == 0
    # One caption alone equals the same caption in a batch.
    alone = short.encode(captions[:1])["qwen3_embeds"]
    torch.testing.assert_close(alone[0], out_short["qwen3_embeds"][0], rtol=1e-5, atol=1e-5)


def test_encoder_is_frozen_but_lora_style_grads_flow(golden_tokenizer, qwen3_tiny_dir):
    encoder = load_qwen3_text_encoder(qwen3_tiny_dir, dtype=torch.float32)
    assert not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    encoding = AnimaTextEncoding(golden_tokenizer, encoder, "cpu", torch.float32)
    assert not encoding.encode(["a cat"])["qwen3_embeds"].requires_grad

    trainable = encoder.layers[0].self_attn.q_proj.weight
    trainable.requires_grad_(True)
    out = encoding.encode(["a cat"])["qwen3_embeds"]
    assert out.requires_grad
    out.sum().backward()
    assert trainable.grad is not None and torch.count_nonzero(trainable.grad) > 0


def test_hook_based_lora_gets_gradients_while_encoder_weights_stay_frozen(golden_tokenizer, qwen3_tiny_dir):
    # A LoRA attaches through forward hooks and owns its parameters; the encoder's weights stay frozen.
    encoder = load_qwen3_text_encoder(qwen3_tiny_dir, dtype=torch.float32)
    q_proj = encoder.layers[0].self_attn.q_proj
    delta = torch.nn.Parameter(torch.full((q_proj.out_features,), 0.01))
    q_proj.register_forward_hook(lambda module, inputs, output: output + delta)
    encoding = AnimaTextEncoding(golden_tokenizer, encoder, "cpu", torch.float32)

    encoding.encode(["a cat"])["qwen3_embeds"].sum().backward()
    assert delta.grad is not None and torch.count_nonzero(delta.grad) > 0
    with torch.no_grad():
        assert not encoding.encode(["a cat"])["qwen3_embeds"].requires_grad


# --- loading paths -----------------------------------------------------------------------------------------


def test_single_safetensors_file_with_model_prefix_loads_like_the_directory(
    qwen3_tiny_dir, tmp_path, tiny_encoder, golden_tokenizer, golden_text
):
    single = _single_file_copy(qwen3_tiny_dir, tmp_path / "qwen3_tiny.safetensors")
    encoder = load_qwen3_text_encoder(single, dtype=torch.float32, config_path=qwen3_tiny_dir / "config.json")
    reference = tiny_encoder.state_dict()
    loaded = encoder.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[key], reference[key]) for key in reference)
    captions, golden = golden_text
    out = AnimaTextEncoding(golden_tokenizer, encoder, "cpu", torch.float32).encode(captions)
    assert _max_rel_err(out["qwen3_embeds"], golden["out.prompt_embeds"]) <= 1e-4


def test_torch_format_single_file_loads(qwen3_tiny_dir, tmp_path, tiny_encoder):
    state = load_file(str(qwen3_tiny_dir / "model.safetensors"))
    torch.save(state, tmp_path / "qwen3_tiny.pt")
    encoder = load_qwen3_text_encoder(
        tmp_path / "qwen3_tiny.pt", dtype=torch.float32, config_path=qwen3_tiny_dir / "config.json"
    )
    reference = tiny_encoder.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in encoder.state_dict().items())


def test_sharded_directory_loads(qwen3_tiny_dir, tmp_path, tiny_encoder):
    state = load_file(str(qwen3_tiny_dir / "model.safetensors"))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({key: state[key] for key in shard_keys}, str(tmp_path / name))
    weight_map = {key: name for name, shard_keys in shards.items() for key in shard_keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(qwen3_tiny_dir / "config.json", tmp_path / "config.json")
    encoder = load_qwen3_text_encoder(tmp_path, dtype=torch.float32)
    reference = tiny_encoder.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in encoder.state_dict().items())


def test_bfloat16_load_keeps_rope_in_float32(qwen3_tiny_dir, golden_tokenizer, golden_text):
    encoder = load_qwen3_text_encoder(qwen3_tiny_dir)  # default dtype bf16
    assert all(p.dtype == torch.bfloat16 for p in encoder.parameters())
    assert encoder.rotary_emb.inv_freq.dtype == torch.float32 and not encoder.rotary_emb.inv_freq.is_meta
    # theta^(-2k/d) in float32, not rounded to bf16 (a bf16 table turns token p by up to ~0.0012*p rad).
    values = json.loads((qwen3_tiny_dir / "config.json").read_text())
    exponents = torch.arange(0, values["head_dim"], 2, dtype=torch.float32) / values["head_dim"]
    expected = 1.0 / float(values["rope_theta"]) ** exponents
    torch.testing.assert_close(encoder.rotary_emb.inv_freq, expected, rtol=1e-6, atol=0)
    captions, golden = golden_text
    out = AnimaTextEncoding(golden_tokenizer, encoder, "cpu", torch.bfloat16).encode(captions)
    assert out["qwen3_embeds"].dtype == torch.float32
    assert _max_rel_err(out["qwen3_embeds"], golden["out.prompt_embeds"]) < 0.05


def test_encoding_refuses_an_encoder_of_another_dtype(golden_tokenizer, tiny_encoder):
    with pytest.raises(ValueError, match="float32"):
        AnimaTextEncoding(golden_tokenizer, tiny_encoder, "cpu", torch.bfloat16).encode(["a"])


def test_encoding_accepts_an_indexed_cpu_device(golden_tokenizer, tiny_encoder):
    # accelerate reports the CPU as "cpu:0" in multi-process runs; it is the same device as "cpu".
    out = AnimaTextEncoding(golden_tokenizer, tiny_encoder, "cpu:0", torch.float32).encode(["a"])
    assert out["qwen3_embeds"].shape[0] == 1


# --- identity ---------------------------------------------------------------------------------------------------


def test_identity_follows_weights_tokenizers_and_lengths(qwen3_tiny_dir, tmp_path, qwen3_tokenizer, t5_tokenizer):
    single = _single_file_copy(qwen3_tiny_dir, tmp_path / "te.safetensors")
    config = qwen3_tiny_dir / "config.json"

    def identity(path: Path, qwen3_length: int = 16, t5_length: int = 16, tokenizer=qwen3_tokenizer) -> str:
        encoder = load_qwen3_text_encoder(path, dtype=torch.float32, config_path=config)
        return AnimaTextEncoding(
            AnimaTokenizer(tokenizer, t5_tokenizer, qwen3_length, t5_length), encoder, "cpu", torch.float32
        ).identity

    base = identity(single)
    assert identity(single) == base
    assert identity(single, qwen3_length=32) != base
    assert identity(single, t5_length=32) != base

    other_tokenizer = load_qwen3_tokenizer(qwen3_path=qwen3_tiny_dir)
    other_tokenizer.add_tokens(["<extra_caption_token>"])
    assert identity(single, tokenizer=other_tokenizer) != base

    stat = single.stat()
    os.utime(single, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert identity(single) != base


def test_identity_of_an_in_memory_encoder_follows_its_weights(tiny_encoder):
    from transformers import Qwen3Model

    model = Qwen3Model(tiny_encoder.config)
    model.load_state_dict(tiny_encoder.state_dict())
    before = text_encoder_identity(model)
    assert before == text_encoder_identity(model)
    with torch.no_grad():
        model.embed_tokens.weight[0, 0] += 1.0
    assert text_encoder_identity(model) != before


# --- errors ------------------------------------------------------------------------------------------------------


def test_missing_encoder_path_is_one_clear_error(tmp_path):
    with pytest.raises(AnimaError, match="--qwen3: file not found"):
        load_qwen3_text_encoder(tmp_path / "nope.safetensors")


def test_dit_checkpoint_passed_as_qwen3_is_rejected(golden_dir):
    with pytest.raises(AnimaError, match="--qwen3: .*not a Qwen3 text encoder checkpoint"):
        load_qwen3_text_encoder(golden_dir / "dit_tiny.safetensors")


def test_wrong_size_checkpoint_names_the_mismatch(qwen3_tiny_dir, tmp_path):
    single = _single_file_copy(qwen3_tiny_dir, tmp_path / "tiny.safetensors")
    # No config_path: the bundled Qwen3-0.6B config does not fit the tiny weights.
    with pytest.raises(AnimaError, match="--qwen3: .*wrong size"):
        load_qwen3_text_encoder(single, dtype=torch.float32)


def test_incomplete_checkpoint_lists_missing_keys(qwen3_tiny_dir, tmp_path):
    single = _single_file_copy(qwen3_tiny_dir, tmp_path / "partial.safetensors", drop="model.norm.weight")
    with pytest.raises(AnimaError, match=r"--qwen3: .*1 missing keys.*norm\.weight"):
        load_qwen3_text_encoder(single, dtype=torch.float32, config_path=qwen3_tiny_dir / "config.json")


def test_scaled_float8_single_file_is_refused_not_loaded_without_its_scales(qwen3_tiny_dir, tmp_path):
    state = load_file(str(qwen3_tiny_dir / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    scale = state[key].abs().max() / 448
    state[key] = (state[key] / scale).to(torch.float8_e4m3fn)
    state[key.removesuffix("weight") + "scale_weight"] = scale.reshape(())
    path = tmp_path / "qwen3_scaled_fp8.safetensors"
    save_file(state, str(path))
    with pytest.raises(AnimaError, match=r"^--qwen3: .*scaled-float8 checkpoint .*up_proj\.scale_weight") as info:
        load_qwen3_text_encoder(path, dtype=torch.float32, config_path=qwen3_tiny_dir / "config.json")
    assert "\n" not in str(info.value)


def test_plain_float8_single_file_loads_upcast(qwen3_tiny_dir, tmp_path):
    state = load_file(str(qwen3_tiny_dir / "model.safetensors"))
    key = "model.layers.1.self_attn.q_proj.weight"
    state[key] = state[key].to(torch.float8_e4m3fn)
    path = tmp_path / "qwen3_fp8.safetensors"
    save_file(state, str(path))
    model = load_qwen3_text_encoder(path, dtype=torch.bfloat16, config_path=qwen3_tiny_dir / "config.json")
    assert torch.equal(model.state_dict()[key.removeprefix("model.")], state[key].to(torch.bfloat16))


def test_non_qwen3_config_is_rejected(tokenizers_dir, qwen3_tiny_dir, tmp_path):
    single = _single_file_copy(qwen3_tiny_dir, tmp_path / "tiny.safetensors")
    with pytest.raises(AnimaError, match="model_type 't5'"):
        load_qwen3_text_encoder(single, config_path=tokenizers_dir / "t5_old" / "config.json")


def test_no_qwen3_tokenizer_anywhere_lists_needed_files(tmp_path):
    model_dir = tmp_path / "weights_only"
    model_dir.mkdir()
    with pytest.raises(AnimaError) as raised:
        load_qwen3_tokenizer(qwen3_path=model_dir)
    message = str(raised.value)
    assert "vocab.json + merges.txt" in message and "tokenizer.json" in message
    assert "--qwen3_tokenizer_path" in message and "Qwen/Qwen3-0.6B" in message
    assert "\n" not in message


def test_no_t5_tokenizer_anywhere_lists_needed_files():
    with pytest.raises(AnimaError) as raised:
        load_t5_tokenizer()
    message = str(raised.value)
    assert "spiece.model" in message and "tokenizer.json" in message and "--t5_tokenizer_path" in message
    assert "\n" not in message


def test_explicit_tokenizer_dir_without_files_does_not_fall_back(tmp_path, qwen3_tiny_dir):
    with pytest.raises(AnimaError, match="--qwen3_tokenizer_path .*vocab.json"):
        load_qwen3_tokenizer(qwen3_path=qwen3_tiny_dir, tokenizer_path=tmp_path)
    with pytest.raises(AnimaError, match="--t5_tokenizer_path .*not a directory"):
        load_t5_tokenizer(tmp_path / "missing")


def test_qwen3_tokenizer_found_in_the_hub_cache_offline(no_hub_downloads, tokenizers_dir, golden_text, t5_tokenizer):
    # Lay out a standard HF cache entry as a previous download would have left it.
    revision = "0" * 40
    repo_cache = no_hub_downloads / "models--Qwen--Qwen3-0.6B"
    snapshot = repo_cache / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (snapshot / name).symlink_to(tokenizers_dir / "qwen3_06b" / name)
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text(revision)

    tokenizer = load_qwen3_tokenizer(qwen3_path=None)
    captions, golden = golden_text
    tokens = AnimaTokenizer(tokenizer, t5_tokenizer, GOLDEN_MAX_LENGTH, GOLDEN_MAX_LENGTH)(captions)
    assert torch.equal(tokens.qwen3_ids, golden["out.qwen3_input_ids"])


def test_tokenizer_json_only_folders_load(tmp_path, qwen3_tokenizer, tokenizers_dir, golden_text):
    qwen3_dir = tmp_path / "qwen3"
    qwen3_tokenizer.save_pretrained(str(qwen3_dir))
    for leftover in ("vocab.json", "merges.txt"):
        (qwen3_dir / leftover).unlink(missing_ok=True)
    t5_dir = tmp_path / "t5"
    t5_dir.mkdir()
    shutil.copy(tokenizers_dir / "t5_old" / "tokenizer.json", t5_dir / "tokenizer.json")

    captions, golden = golden_text
    tokenizer = AnimaTokenizer(
        load_qwen3_tokenizer(tokenizer_path=qwen3_dir), load_t5_tokenizer(t5_dir), GOLDEN_MAX_LENGTH, GOLDEN_MAX_LENGTH
    )
    tokens = tokenizer(captions)
    assert torch.equal(tokens.qwen3_ids, golden["out.qwen3_input_ids"])
    assert torch.equal(tokens.t5_ids, golden["out.t5_input_ids"])

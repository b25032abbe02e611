"""The tiny-setup factory: its files load through the project's loaders and behave like real ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from library.models.tiny import MANIFEST_NAME, write_tiny_anima_setup, write_tiny_dit


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_anima_setup(tmp_path_factory.mktemp("tiny"), num_images=6, seed=0)


def test_setup_writes_every_file_and_reuses_a_finished_setup(tiny):
    for path in (tiny.dit, tiny.vae, tiny.dataset_toml, tiny.sample_prompts, tiny.qwen3_dir / "config.json",
                 tiny.qwen3_dir / "vocab.json", tiny.qwen3_dir / "merges.txt", tiny.t5_tokenizer_dir / "tokenizer.json"):
        assert path.is_file(), path
    stamps = {p: p.stat().st_mtime_ns for p in tiny.root.rglob("*") if p.is_file()}
    again = write_tiny_anima_setup(tiny.root, num_images=6, seed=0)
    assert again == tiny
    assert {p: p.stat().st_mtime_ns for p in tiny.root.rglob("*") if p.is_file()} == stamps
    assert not list(tiny.root.rglob(".*.tmp*"))


def test_a_different_recipe_rebuilds_the_setup(tmp_path, monkeypatch):
    import library.models.tiny as tiny_models

    calls = []
    for name in ("write_tiny_dit", "write_tiny_vae", "write_tiny_qwen3", "write_tiny_t5_tokenizer"):
        monkeypatch.setattr(tiny_models, name, lambda *a, _n=name, **k: calls.append(_n))
    write_tiny_anima_setup(tmp_path, num_images=2, seed=0)
    write_tiny_anima_setup(tmp_path, num_images=2, seed=0)
    assert len(calls) == 4
    (tmp_path / "images" / "shape_000_0064x0064_anima.npz").write_bytes(b"stale cache")
    write_tiny_anima_setup(tmp_path, num_images=1, seed=0)
    assert len(calls) == 8
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["recipe"]["num_images"] == 1
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["shape_000.png", "shape_000.txt"]


def test_dit_file_has_released_layout_and_is_deterministic(tiny, tmp_path):
    with safe_open(str(tiny.dit), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = list(f.keys())
        assert all(k.startswith("net.") for k in keys)
        assert "net.llm_adapter.out_proj.weight" in keys and "net.blocks.1.mlp.layer2.weight" in keys
        # AdaLN outputs are zero in a fresh model; here they must not be (else every block is an identity).
        assert f.get_tensor("net.blocks.0.adaln_modulation_self_attn.2.weight").abs().mean() > 0.01
    write_tiny_dit(tmp_path / "again.safetensors", seed=0)
    assert (tmp_path / "again.safetensors").read_bytes() == tiny.dit.read_bytes()


def test_dit_and_vae_load_and_run(tiny):
    from library.models.dit_loading import load_anima_model
    from library.models.vae import load_vae

    dit = load_anima_model(str(tiny.dit), "cpu", torch.float32)
    gen = torch.Generator().manual_seed(0)
    context = dit.encode_text(torch.randn(1, 5, 48, generator=gen), torch.ones(1, 5, dtype=torch.long),
                              torch.tensor([[7, 8, 1, 0]]), torch.tensor([[1, 1, 1, 0]]))
    x = torch.randn(1, 16, 1, 4, 6, generator=gen)
    with torch.no_grad():
        v = dit(x, torch.tensor([0.5]), context, padding_mask=torch.zeros(1, 1, 4, 6))
    assert v.shape == x.shape and torch.isfinite(v).all() and v.std() > 0.1

    vae = load_vae(tiny.vae, "cpu", torch.float32)
    with torch.no_grad():
        pixels = vae.decode_latents_to_pixels(torch.randn(1, 16, 4, 6, generator=gen))
        latents = vae.encode_pixels_to_latents(pixels)
    assert pixels.shape == (1, 3, 32, 48) and latents.shape == (1, 16, 4, 6)
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.std() > 0


def test_tokenizers_and_text_encoder_load_and_encode(tiny):
    from library.models.qwen3 import AnimaTextEncoding, load_qwen3_text_encoder
    from library.models.tokenizers import AnimaTokenizer, load_qwen3_tokenizer, load_t5_tokenizer

    qwen3_tok = load_qwen3_tokenizer(tiny.qwen3_dir)
    t5_tok = load_t5_tokenizer(tiny.t5_tokenizer_dir)
    assert qwen3_tok.pad_token == "<|endoftext|>"
    assert t5_tok("")["input_ids"] == [1] and t5_tok.pad_token_id == 0
    assert t5_tok("a red circle")["input_ids"][-1] == 1

    encoder = load_qwen3_text_encoder(tiny.qwen3_dir, "cpu", torch.float32)
    encoding = AnimaTextEncoding(AnimaTokenizer(qwen3_tok, t5_tok, 16, 16), encoder, "cpu", torch.float32)
    out = encoding.encode(["a red circle on a blue background", ""])
    assert out["qwen3_embeds"].shape == (2, 16, 48)
    assert out["qwen3_mask"][0].sum() > 0 and out["qwen3_mask"][1].sum() == 0
    assert out["qwen3_embeds"][1].abs().sum() == 0 and out["qwen3_embeds"][0].std() > 0
    assert out["t5_ids"][1].tolist() == [1] + [0] * 15


def test_images_captions_dataset_toml_and_prompts(tiny):
    from library.training.sampling import load_sample_prompts

    images = sorted(p for p in tiny.image_dir.iterdir() if p.suffix in (".png", ".jpg"))
    assert len(images) == 6 and {p.suffix for p in images} == {".png", ".jpg"}
    sizes = {Image.open(p).size for p in images}
    assert sizes == {(64, 64), (96, 64), (64, 96)}
    for p in images:
        caption = p.with_suffix(".txt").read_text().strip()
        assert caption.startswith("a ") and "background" in caption
        assert np.asarray(Image.open(p)).std() > 5  # a shape on a background, not a flat colour

    from library.data.config import load_dataset_config, validate_user_config

    config = load_dataset_config(tiny.dataset_toml)
    validate_user_config(config, str(tiny.dataset_toml))
    assert config["general"]["caption_extension"] == ".txt"
    [dataset] = config["datasets"]
    assert dataset["bucket_reso_steps"] % 16 == 0
    assert dataset["subsets"][0]["image_dir"] == str(tiny.image_dir)

    prompts = load_sample_prompts(tiny.sample_prompts)
    assert len(prompts) == 2 and all(p.seed is not None for p in prompts)

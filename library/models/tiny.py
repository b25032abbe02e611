"""Tiny random Anima-format models and data for tests, benchmarks and the CPU quick start.

``write_tiny_anima_setup(root)`` writes, in a few seconds and without any download:

* ``dit.safetensors``: a tiny DiT + LLM adapter in the released file layout (``net.`` prefix, ``format=pt``),
  every weight randomised so that no layer is an identity;
* ``vae.safetensors``: a tiny Qwen-Image VAE (base_dim 8) with diffusers key names;
* ``qwen3/``: a tiny ``Qwen3ForCausalLM`` folder with a small byte-level BPE tokenizer trained on the captions;
* ``t5_tokenizer/``: a small Unigram T5-style tokenizer (``<pad>`` = 0, ``</s>`` = 1 appended);
* ``images/``: captioned synthetic images (coloured shapes, PNG and JPEG, three aspect ratios);
* ``dataset.toml`` and ``sample_prompts.txt``.

The files are the same for the same ``num_images`` and ``seed``; a finished setup is reused, not rewritten.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from library.io.files import atomic_write

if TYPE_CHECKING:
    from library.models.dit import AnimaConfig

# Bump when the written files change, so cached setups are rebuilt.
SETUP_VERSION = 1
MANIFEST_NAME = "tiny_setup.json"

QWEN3_HIDDEN = 48
QWEN3_PAD_TOKEN = "<|endoftext|>"
T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in the real T5 vocabulary
VAE_BASE_DIM = 8

_COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 190), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
_SHAPES = ("circle", "square", "triangle")
_SIZES = ((64, 64), (96, 64), (64, 96))  # (width, height): square, landscape, portrait


@dataclass(frozen=True)
class TinySetup:
    """Paths of everything ``write_tiny_anima_setup`` wrote."""

    root: Path
    dit: Path
    vae: Path
    qwen3_dir: Path
    t5_tokenizer_dir: Path
    dataset_toml: Path
    image_dir: Path
    sample_prompts: Path


def tiny_dit_config() -> AnimaConfig:
    """The DiT + adapter sizes of the tiny checkpoint (same shapes as the golden reference model)."""
    from library.models.dit import AnimaConfig

    return AnimaConfig(
        model_channels=128,
        num_blocks=2,
        num_heads=2,
        crossattn_emb_channels=64,
        adaln_lora_dim=32,
        adapter_source_dim=QWEN3_HIDDEN,
        adapter_model_dim=64,
        adapter_num_layers=2,
        adapter_num_heads=4,
    )


# ---------------------------------------------------------------------------------------------------------------
# Writing helpers


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _randomize_like_reference(state: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    # The model's own init zeroes the AdaLN outputs (every block would be an identity), so overwrite all:
    # matrices N(0, 1/fan_in), the token embedding N(0, 1), norm weights 1 + 0.1 N, other vectors 0.1 N.
    out = {}
    for key, tensor in state.items():
        if tensor.ndim >= 2:
            std = 1.0 if key.endswith("embed.weight") else (1.0 / tensor[0].numel()) ** 0.5
            value = torch.randn(tensor.shape, generator=generator) * std
        elif "norm" in key and key.endswith("weight"):
            value = 1.0 + 0.1 * torch.randn(tensor.shape, generator=generator)
        else:
            value = 0.1 * torch.randn(tensor.shape, generator=generator)
        out[key] = value.to(torch.float32).contiguous()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Components


def write_tiny_dit(path: Path, seed: int = 0) -> None:
    """A random tiny DiT + LLM adapter, keys prefixed ``net.`` like the released checkpoint."""
    from library.models.dit import Anima

    with torch.device("meta"):
        model = Anima(tiny_dit_config())
    shapes = {k: torch.empty(v.shape) for k, v in model.state_dict().items()}
    state = _randomize_like_reference(shapes, torch.Generator().manual_seed(seed))
    net_state = {f"net.{k}": v for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(net_state, str(tmp), metadata={"format": "pt"}))


def write_tiny_vae(path: Path, seed: int = 0) -> None:
    """A tiny Qwen-Image VAE (base_dim 8, PyTorch default init) with diffusers key names."""
    from library.models.vae import QwenImageVAE, VAEConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = QwenImageVAE(VAEConfig(base_dim=VAE_BASE_DIM))
    state = {k: v.detach().contiguous() for k, v in vae.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def _vocabulary_corpus(captions: list[str]) -> list[str]:
    words = list(_COLOURS) + list(_SHAPES) + ["a", "an", "on", "the", "background", "with", "and", "of", "in",
                                                "lowres", "blurry", "bad", "quality", "best", "masterpiece",
                                                "girl", "boy", "cat", "dog", "anime", "style", "1girl", "solo"]
    return captions + [" ".join(words)] * 3


def write_tiny_qwen3(directory: Path, captions: list[str], seed: int = 0) -> None:
    """A tiny Qwen3ForCausalLM folder plus a byte-level BPE tokenizer (vocab.json, merges.txt, config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen3Config, Qwen3ForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # The full byte alphabet makes every text encodable; the pad token is id 0.
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[QWEN3_PAD_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_vocabulary_corpus(captions), trainer=trainer)
    vocab = bpe.get_vocab()
    pad_id = vocab[QWEN3_PAD_TOKEN]
    bpe.model.save(str(directory))  # vocab.json + merges.txt
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": QWEN3_PAD_TOKEN,
        "pad_token": QWEN3_PAD_TOKEN,
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "split_special_tokens": False,
        "added_tokens_decoder": {str(pad_id): {"content": QWEN3_PAD_TOKEN, "lstrip": False, "normalized": False,
                                               "rstrip": False, "single_word": False, "special": True}},
    }
    _write_text(directory / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2))

    config = Qwen3Config(
        vocab_size=len(vocab), hidden_size=QWEN3_HIDDEN, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=pad_id, eos_token_id=pad_id, pad_token_id=pad_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.save_pretrained(str(directory), safe_serialization=True)


def write_tiny_t5_tokenizer(directory: Path, captions: list[str]) -> None:
    """A small Unigram tokenizer that behaves like T5's: Metaspace words, ``</s>`` appended, pad id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    unigram.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=list(T5_SPECIAL_TOKENS), unk_token="<unk>",
                                      show_progress=False)
    unigram.train_from_iterator(_vocabulary_corpus(captions), trainer=trainer)
    eos_id = unigram.token_to_id("</s>")
    unigram.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)])
    ids = [unigram.token_to_id(t) for t in T5_SPECIAL_TOKENS]
    if ids != [0, 1, 2]:
        raise RuntimeError(f"tiny T5 tokenizer special ids are {ids}, expected [0, 1, 2]")
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "tokenizer.json", lambda tmp: unigram.save(str(tmp)))
    tokenizer_config = {
        "tokenizer_class": "T5Tokenizer",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "extra_ids": 0,
        "additional_special_tokens": [],
        "model_max_length": 512,
    }
    _write_text(directory / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2))


def _draw_image(width: int, height: int, rng: random.Random) -> tuple[Image.Image, str]:
    background, colour = rng.sample(sorted(_COLOURS), 2)
    shape = rng.choice(_SHAPES)
    image = Image.new("RGB", (width, height), _COLOURS[background])
    draw = ImageDraw.Draw(image)
    size = rng.randint(min(width, height) // 3, min(width, height) * 3 // 4)
    left, top = rng.randint(0, width - size), rng.randint(0, height - size)
    box = (left, top, left + size, top + size)
    if shape == "circle":
        draw.ellipse(box, fill=_COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=_COLOURS[colour])
    else:
        draw.polygon([(left + size // 2, top), (left, top + size), (left + size, top + size)], fill=_COLOURS[colour])
    return image, f"a {colour} {shape} on a {background} background"


def write_tiny_images(image_dir: Path, num_images: int, seed: int = 0) -> list[str]:
    """Captioned shape images, alternating PNG/JPEG and three aspect ratios; returns the captions."""
    rng = random.Random(seed)
    image_dir.mkdir(parents=True, exist_ok=True)
    # Remove an older set (and the latent/text caches written beside it) so no stale image stays in the dataset.
    for old in image_dir.glob("shape_*"):
        if old.is_file():
            old.unlink()
    captions = []
    for i in range(num_images):
        width, height = _SIZES[i % len(_SIZES)]
        image, caption = _draw_image(width, height, rng)
        suffix, fmt = (".png", "PNG") if i % 2 == 0 else (".jpg", "JPEG")
        atomic_write(image_dir / f"shape_{i:03d}{suffix}", lambda tmp, im=image, f=fmt: im.save(tmp, format=f))
        _write_text(image_dir / f"shape_{i:03d}.txt", caption + "\n")
        captions.append(caption)
    return captions


def _toml_value(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def tiny_dataset_toml_text(image_dir: Path, batch_size: int = 2) -> str:
    """The tiny dataset config as TOML text, written without the ``toml`` package (not on every machine the tests
    run on, e.g. the GPU device image): the same text ``toml.dumps`` gives for this config."""
    general = {"caption_extension": ".txt", "shuffle_caption": False, "keep_tokens": 0}
    dataset = {"resolution": 64, "batch_size": batch_size, "enable_bucket": True, "min_bucket_reso": 32,
               "max_bucket_reso": 128, "bucket_reso_steps": 16}
    subset = {"image_dir": str(image_dir.resolve()), "num_repeats": 1}

    def table(header: str, values: dict) -> list[str]:
        return [header, *(f"{key} = {_toml_value(value)}" for key, value in values.items())]

    lines = [*table("[[datasets]]", dataset), *table("[[datasets.subsets]]", subset), "", "",
             *table("[general]", general)]
    return "\n".join(lines) + "\n"


def write_tiny_dataset_toml(path: Path, image_dir: Path) -> None:
    """A one-subset DreamBooth-style dataset config with bucketing over the tiny image sizes."""
    _write_text(path, tiny_dataset_toml_text(image_dir))


def write_tiny_sample_prompts(path: Path) -> None:
    _write_text(path, "\n".join([
        "# tiny sample prompts: 64-96 px, a few steps",
        "a red circle on a blue background --w 64 --h 64 --d 1 --s 4 --l 3.0",
        "a green square on a white background --n blurry --w 96 --h 64 --d 2 --s 4 --l 3.0 --fs 2.0",
    ]) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def _setup_paths(root: Path) -> TinySetup:
    return TinySetup(
        root=root,
        dit=root / "dit.safetensors",
        vae=root / "vae.safetensors",
        qwen3_dir=root / "qwen3",
        t5_tokenizer_dir=root / "t5_tokenizer",
        dataset_toml=root / "dataset.toml",
        image_dir=root / "images",
        sample_prompts=root / "sample_prompts.txt",
    )


def write_tiny_anima_setup(root: str | os.PathLike[str], *, num_images: int = 8, seed: int = 0) -> TinySetup:
    """Write (or reuse) the tiny models, tokenizers, images, dataset TOML and sample prompts under ``root``."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    root = Path(root).resolve()
    paths = _setup_paths(root)
    manifest_path = root / MANIFEST_NAME
    wanted = {"version": SETUP_VERSION, "num_images": num_images, "seed": seed}
    if manifest_path.is_file():
        try:
            if json.loads(manifest_path.read_text(encoding="utf-8")).get("recipe") == wanted:
                return paths
        except json.JSONDecodeError:
            pass  # half-written or foreign file: rebuild
        manifest_path.unlink()

    captions = write_tiny_images(paths.image_dir, num_images, seed)
    write_tiny_dit(paths.dit, seed)
    write_tiny_vae(paths.vae, seed)
    write_tiny_qwen3(paths.qwen3_dir, captions, seed)
    write_tiny_t5_tokenizer(paths.t5_tokenizer_dir, captions)
    write_tiny_dataset_toml(paths.dataset_toml, paths.image_dir)
    write_tiny_sample_prompts(paths.sample_prompts)
    # Written last: its presence means every file above is complete.
    manifest = {"recipe": wanted, "paths": {k: str(v) for k, v in asdict(paths).items()}}
    _write_text(manifest_path, json.dumps(manifest, indent=2))
    return paths

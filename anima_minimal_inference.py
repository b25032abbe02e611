"""Generate images with Anima, optionally with LoRAs: sd-scripts' ``anima_minimal_inference.py`` command line.

    python anima_minimal_inference.py --dit anima.safetensors --vae qwen_image_vae.safetensors \\
        --text_encoder qwen3_06b --prompt "1girl, solo, red hair" --image_size 1024 1024 --infer_steps 30 \\
        --lora_weight my_lora.safetensors --lora_multiplier 0.8 --save_path outputs

The pieces are the trainer's: the same loaders, the Euler flow sampler and prompt-file parser of sample images
(``library.training.sampling``) and the network modules (``networks.lora_anima`` / ``lokr`` / ``loha`` by the
file's adapter kind, or LyCORIS' with ``--lycoris``), whose updates are merged into the DiT and Qwen3 weights
before sampling. Unlike sd-scripts, a LoRA is applied completely or not at all: a
module that matches no layer of the models is an error naming it (sd-scripts drops such keys silently).
Every input is checked, the LoRAs against the models' headers, before any weight is read.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import logging
import os
import random
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from library.errors import AnimaError, OneLineErrorParser, flags_renamed
from library.io.checkpoints import open_checkpoint, sample_keys
from library.io.files import atomic_write, check_writable_dir
from library.models.attention import ATTN_MODE_CHOICES, check_attn_mode
from library.models.dit_loading import MODEL_FLAG
from library.models.qwen3 import QWEN3_FLAG
from library.training.sampling import (
    CachedPromptEncodings,
    PromptEncoder,
    SamplePrompt,
    decode_latents,
    encode_prompt_contexts,
    is_prompt_line,
    load_sample_prompts,
    non_finite_values,
    prompt_from_fields,
    prompt_from_line,
    sample_latents,
    save_png_atomic,
)
from networks import LYCORIS_MODULE, import_network_module
from networks.lora_format import (
    COMFY_TE_PREFIX,
    KIND_NAMES,
    TE_PREFIX,
    TE_PREFIX_ALIASES,
    adapter_kinds,
    load_lora_file,
    to_sd_scripts_format,
)
from networks.network_base import MODULE_FOR_KIND

logger = logging.getLogger("anima_minimal_inference")

OUTPUT_TYPES = ("images", "latent", "latent_images")
MAX_SEED = 2**32 - 1
LATENT_KEY = "latent"  # the tensor name of a saved latent file, as sd-scripts writes it
# The trainer's loaders name the trainer's flags in their errors; this script's flags are named differently.
RENAMED_FLAGS = {MODEL_FLAG: "--dit", QWEN3_FLAG: "--text_encoder"}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="anima_minimal_inference.py",
                                     description="Generate images with Anima and LoRAs.")
    models = parser.add_argument_group("models")
    models.add_argument("--dit", default=None, help="Anima DiT .safetensors (with its LLM adapter)")
    models.add_argument("--vae", required=True, help="Qwen-Image VAE .safetensors")
    models.add_argument("--text_encoder", default=None,
                        help="Qwen3-0.6B text encoder: a Hugging Face folder or one .safetensors file")
    models.add_argument("--qwen3_tokenizer_path", default=None,
                        help="Qwen3 tokenizer folder (default: the --text_encoder folder, else the hub)")
    models.add_argument("--t5_tokenizer_path", default=None, help="T5 tokenizer folder (default: the hub)")
    models.add_argument("--vae_chunk_size", type=int, default=None,
                        help="spatial chunk size of the VAE decode (even; less memory)")
    models.add_argument("--vae_disable_cache", action="store_true",
                        help="accepted for sd-scripts command lines; has no effect on images (warned)")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora_weight", nargs="*", default=None, help="LoRA files (either key layout)")
    lora.add_argument("--lora_multiplier", type=float, nargs="*", default=None,
                      help="one multiplier per LoRA file, or one for all (default 1.0)")
    lora.add_argument("--include_patterns", nargs="*", default=None,
                      help="one regex per LoRA file: only tensors whose key (sd-scripts names, lora_unet_...) matches")
    lora.add_argument("--exclude_patterns", nargs="*", default=None,
                      help="one regex per LoRA file: leave out tensors whose key matches")
    lora.add_argument("--lycoris", action="store_true",
                      help="load every --lora_weight file through the LyCORIS library (pip install lycoris-lora), "
                      "as sd-scripts does; LoRA, LoKr and LoHa files also load without it (natively)")

    generation = parser.add_argument_group("generation")
    generation.add_argument("--prompt", default=None, help="prompt")
    generation.add_argument("--negative_prompt", default="", help="negative prompt (used when guidance_scale is not 1)")
    generation.add_argument("--from_file", default=None,
                            help="prompt file (.txt lines with --w --h --d --s --l/--g --fs --n, .toml or .json, "
                            "as --sample_prompts); the command line gives the defaults")
    generation.add_argument("--interactive", action="store_true",
                            help="read prompts from the console, one per line in the --from_file .txt form, and "
                            "render each as it is entered (models stay loaded); Ctrl+D ends")
    generation.add_argument("--image_size", type=int, nargs=2, default=[1024, 1024], metavar=("HEIGHT", "WIDTH"),
                            help="image height and width (rounded down to multiples of 16)")
    generation.add_argument("--infer_steps", type=int, default=50, help="sampling steps")
    generation.add_argument("--guidance_scale", type=float, default=3.5, help="classifier-free guidance scale; 1 turns CFG off, any other value (below 1 too, as in sd-scripts) runs it")
    generation.add_argument("--flow_shift", type=float, default=5.0, help="flow-matching schedule shift")
    generation.add_argument("--seed", type=int, default=None, help="seed (default: random, written in the name)")
    generation.add_argument("--save_path", required=True, help="output folder")
    generation.add_argument("--output_type", choices=OUTPUT_TYPES, default="images",
                            help="images (PNG), latent (.safetensors) or both")
    generation.add_argument("--no_metadata", action="store_true",
                            help="write no prompt/seed metadata into the PNG and latent files")
    generation.add_argument("--latent_path", nargs="*", default=None,
                            help="decode these latent files (.safetensors or .pt) to PNGs; no sampling")

    device = parser.add_argument_group("device and memory")
    device.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")
    device.add_argument("--attn_mode", choices=ATTN_MODE_CHOICES, default="torch", help="DiT attention (sdpa = torch)")
    device.add_argument("--fp8", action="store_true",
                        help="DiT block projections stored as float8_e4m3fn with one scale per tensor (the trainer's --fp8_base storage)")
    device.add_argument("--fp8_scaled", action="store_true",
                        help="DiT block projections stored as float8_e4m3fn with one scale per output channel")
    device.add_argument("--text_encoder_cpu", action="store_true", help="run Qwen3 on the CPU")
    device.add_argument("--blocks_to_swap", type=int, default=None,
                        help="DiT blocks kept in CPU memory and streamed to the device (less device memory)")
    return parser


# --- checks (all before any weight is read) ------------------------------------------------------------------


def _per_file(values: list | None, count: int, flag: str, default: Any, one_for_all: bool = False) -> list:
    """One value per --lora_weight file: missing ones take ``default``; with ``one_for_all`` a single value
    applies to every file."""
    if not values:
        return [default] * count
    if one_for_all and len(values) == 1:
        return values * count
    if len(values) > count:
        raise AnimaError(f"{flag} has {len(values)} values for {count} --lora_weight file(s); give one per file")
    return list(values) + [default] * (count - len(values))


def check_args(args: argparse.Namespace) -> None:
    if args.attn_mode == "sdpa":
        args.attn_mode = "torch"
    args.attn_mode = check_attn_mode(args.attn_mode, training=False)
    decode_only = bool(args.latent_path)
    required = ["vae"] if decode_only else ["dit", "vae", "text_encoder"]
    missing = [f"--{name}" for name in required if not getattr(args, name)]
    if missing:
        raise AnimaError(f"missing required option(s): {', '.join(missing)}")
    for name in ("dit", "vae", "text_encoder", "qwen3_tokenizer_path", "t5_tokenizer_path", "from_file"):
        path = getattr(args, name)
        if path and not os.path.exists(path):
            raise AnimaError(f"--{name} {path}: not found; check the path")
    for flag, paths in (("--lora_weight", args.lora_weight or []), ("--latent_path", args.latent_path or [])):
        for path in paths:
            if not os.path.isfile(path):
                raise AnimaError(f"{flag} {path}: not found; check the path")
    if args.interactive:
        given = [flag for flag, value in (("--prompt", args.prompt is not None), ("--from_file", args.from_file),
                                          ("--latent_path", decode_only)) if value]
        if given:
            raise AnimaError(f"--interactive reads the prompts from the console; leave out {', '.join(given)}")
    elif not decode_only and args.prompt is None and not args.from_file:
        raise AnimaError("give --prompt, --from_file, --interactive or --latent_path")
    if args.prompt is not None and args.from_file:
        raise AnimaError("--prompt and --from_file exclude each other; keep one")
    count = len(args.lora_weight or [])
    args.lora_multiplier = _per_file(args.lora_multiplier, count, "--lora_multiplier", 1.0, one_for_all=True)
    args.include_patterns = _per_file(args.include_patterns, count, "--include_patterns", None)
    args.exclude_patterns = _per_file(args.exclude_patterns, count, "--exclude_patterns", None)
    for flag in ("--include_patterns", "--exclude_patterns"):
        for pattern in getattr(args, flag[2:]):
            try:
                re.compile(pattern or "")
            except re.error as error:
                raise AnimaError(f"{flag} {pattern!r}: not a valid regular expression ({error})") from None
    if args.fp8 and args.fp8_scaled:
        raise AnimaError("--fp8 and --fp8_scaled exclude each other; keep one")
    if args.blocks_to_swap is not None and args.blocks_to_swap < 1:
        raise AnimaError(f"--blocks_to_swap must be at least 1, got {args.blocks_to_swap}")
    if args.infer_steps < 1:
        raise AnimaError(f"--infer_steps must be at least 1, got {args.infer_steps}")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise AnimaError(f"--seed must be between 0 and {MAX_SEED}, got {args.seed}")
    check_writable_dir(args.save_path, "--save_path")


def prompt_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """What a prompt line leaves out comes from the command line."""
    height, width = args.image_size
    return {"width": width, "height": height, "sample_steps": args.infer_steps, "scale": args.guidance_scale,
            "flow_shift": args.flow_shift, "negative_prompt": args.negative_prompt, "seed": args.seed}


def with_seed(prompt: SamplePrompt) -> SamplePrompt:
    # A random seed is drawn here, not inside the sampler, so that it can be written into the file name.
    return prompt if prompt.seed is not None else dataclasses.replace(prompt, seed=random.randint(0, MAX_SEED))


def prompts_from_args(args: argparse.Namespace) -> list[SamplePrompt]:
    """The prompts to render: --prompt, or --from_file with the command line as defaults; every seed fixed."""
    defaults = prompt_defaults(args)
    if args.from_file:
        prompts = load_sample_prompts(args.from_file, defaults=defaults, guidance_is_scale=True, flag="--from_file")
    else:
        prompts = [prompt_from_fields({**defaults, "prompt": args.prompt}, 0, "--prompt")]
    return [with_seed(p) for p in prompts]


# --- LoRAs ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoraFile:
    """One --lora_weight file: the network module that loads it, its tensors filtered by the patterns and
    split by model."""

    path: str
    multiplier: float
    network_module: str  # a --network_module name (networks.NETWORK_MODULES)
    dit_part: dict[str, torch.Tensor]
    text_encoder_part: dict[str, torch.Tensor]


TEXT_ENCODER_KEY_PREFIXES = (TE_PREFIX, *TE_PREFIX_ALIASES, COMFY_TE_PREFIX)


def read_loras(args: argparse.Namespace) -> list[LoraFile]:
    """Every --lora_weight file, its tensors filtered by --include_patterns / --exclude_patterns (searched in
    each tensor key), with the network module that loads it: LyCORIS' with --lycoris, otherwise the native
    module of the file's adapter kind (LoRA, LoKr or LoHa)."""
    files = []
    for path, multiplier, include, exclude in zip(args.lora_weight or [], args.lora_multiplier,
                                                  args.include_patterns, args.exclude_patterns, strict=True):
        sd = load_lora_file(path, flag="--lora_weight")[0]
        if args.lycoris:
            module = LYCORIS_MODULE
        else:
            try:
                sd = to_sd_scripts_format(sd, add_missing_alpha=True)
                kinds = adapter_kinds(sd)
            except AnimaError as error:
                raise AnimaError(f"--lora_weight {path}: {error}; other LyCORIS algorithms load with --lycoris") \
                    from None
            if len(kinds) > 1:
                raise AnimaError(f"--lora_weight {path} mixes {' and '.join(KIND_NAMES[k] for k in sorted(kinds))} "
                                 "modules; load it with --lycoris")
            module = MODULE_FOR_KIND[kinds.pop()]
        kept = {k: v for k, v in sd.items() if (include is None or re.search(include, k))
                and not (exclude is not None and re.search(exclude, k))}
        if not kept:
            raise AnimaError(f"--lora_weight {path}: --include_patterns / --exclude_patterns leave none of its "
                             f"{len(sd)} tensors")
        if len(kept) < len(sd):
            logger.info("%s: %d of %d tensors kept by the include/exclude patterns", path, len(kept), len(sd))
        files.append(LoraFile(
            path, multiplier, module,
            dit_part={k: v for k, v in kept.items() if not k.startswith(TEXT_ENCODER_KEY_PREFIXES)},
            text_encoder_part={k: v for k, v in kept.items() if k.startswith(TEXT_ENCODER_KEY_PREFIXES)},
        ))
    return files


def lora_networks(loras: Sequence[LoraFile], text_encoder: Any, dit: Any, text_encoder_side: bool) -> list[Any]:
    """A network per file for one side (DiT, or Qwen3 with ``text_encoder_side``), hooks not installed. ``dit``
    is needed for the Qwen3 side too (LyCORIS builds on both models; a meta-device DiT will do). A module that
    matches no layer is an error naming it; with meta-device models this checks every file before any weight
    is read."""
    networks = []
    for lora in loras:
        sd = lora.text_encoder_part if text_encoder_side else lora.dit_part
        if not sd:
            continue
        module = import_network_module(lora.network_module)
        try:
            network, _ = module.create_network_from_weights(lora.multiplier, lora.path, None,
                                                            text_encoder if text_encoder_side else None, dit,
                                                            weights_sd=sd, for_inference=True)
        except AnimaError as error:
            raise AnimaError(f"--lora_weight {lora.path}: {error}; it cannot be applied completely") from None
        networks.append(network)
    return networks


def merge_loras(loras: Sequence[LoraFile], text_encoder: Any, dit: Any, text_encoder_side: bool) -> None:
    """Add multiplier x update of every module of one side into that model's weights."""
    for network in lora_networks(loras, text_encoder, dit, text_encoder_side):
        network.merge_to([text_encoder] if text_encoder_side else None, dit)


# --- models --------------------------------------------------------------------------------------------------


def compute_dtype(device: torch.device) -> torch.dtype:
    # bf16 on CUDA as sd-scripts runs it; float32 elsewhere (CPU bf16 matmuls are slow and inexact).
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def check_models(args: argparse.Namespace, loras: Sequence[LoraFile]) -> torch.nn.Module | None:
    """Load every model on the meta device (headers only) and place every LoRA module on them; returns the
    weightless DiT (None when only decoding latents)."""
    from library.models.dit_loading import load_anima_model
    from library.models.qwen3 import load_qwen3_text_encoder
    from library.models.vae import load_vae

    meta = torch.device("meta")
    with flags_renamed(RENAMED_FLAGS):
        load_vae(args.vae, device=meta, chunk_size=args.vae_chunk_size)
        if args.latent_path:
            return None
        dit = load_anima_model(args.dit, device=meta, attn_mode=args.attn_mode)
        text_encoder = load_qwen3_text_encoder(args.text_encoder, device=meta, dtype=torch.float32)
    max_swap = len(dit.blocks) - 2  # two blocks stay resident
    if args.blocks_to_swap is not None and args.blocks_to_swap > max_swap:
        raise AnimaError(f"--blocks_to_swap {args.blocks_to_swap}: this DiT has {len(dit.blocks)} blocks, so at most "
                         f"{max_swap} can be swapped")
    lora_networks(loras, None, dit, text_encoder_side=False)
    lora_networks(loras, text_encoder, dit, text_encoder_side=True)
    return dit


def load_tokenizer(args: argparse.Namespace) -> Any:
    """The Qwen3 + T5 tokenizers (found or fetched before any weight is read)."""
    from library.models.tokenizers import AnimaTokenizer, load_qwen3_tokenizer, load_t5_tokenizer

    with flags_renamed(RENAMED_FLAGS):
        return AnimaTokenizer(
            load_qwen3_tokenizer(qwen3_path=args.text_encoder, tokenizer_path=args.qwen3_tokenizer_path),
            load_t5_tokenizer(args.t5_tokenizer_path))


def load_text_encoding(args: argparse.Namespace, tokenizer: Any, loras: Sequence[LoraFile],
                       dit_shapes: torch.nn.Module, device: torch.device) -> PromptEncoder:
    """Qwen3 with the LoRAs merged, on the device (or the CPU with --text_encoder_cpu), as a prompt encoder."""
    from library.models.qwen3 import AnimaTextEncoding, load_qwen3_text_encoder

    te_device = torch.device("cpu") if args.text_encoder_cpu else device
    dtype = compute_dtype(te_device)
    with flags_renamed(RENAMED_FLAGS):
        text_encoder = load_qwen3_text_encoder(args.text_encoder, device=te_device, dtype=dtype)
    merge_loras(loras, text_encoder, dit_shapes, text_encoder_side=True)
    return AnimaTextEncoding(tokenizer, text_encoder, te_device, dtype)


def encode_prompts(args: argparse.Namespace, prompts: Sequence[SamplePrompt], tokenizer: Any,
                   loras: Sequence[LoraFile], dit_shapes: torch.nn.Module, device: torch.device
                   ) -> CachedPromptEncodings:
    """Encode every prompt text with Qwen3 (LoRAs merged), then free the text encoder."""
    encoder = load_text_encoding(args, tokenizer, loras, dit_shapes, device)
    encodings = CachedPromptEncodings.from_encoder(encoder, prompts)
    del encoder
    _free_device_memory(device)
    return encodings


def load_dit(args: argparse.Namespace, loras: Sequence[LoraFile], device: torch.device) -> torch.nn.Module:
    """The DiT with the LoRAs merged, fp8 storage if asked, on the device (or block-swapped)."""
    from library.models.dit_loading import load_anima_model

    # Merged, quantised and block-swapped from CPU memory; otherwise loaded straight onto the device.
    staging = torch.device("cpu") if (args.blocks_to_swap or args.fp8 or args.fp8_scaled) else device
    with flags_renamed(RENAMED_FLAGS):
        dit = load_anima_model(args.dit, device=staging, dtype=compute_dtype(device), attn_mode=args.attn_mode,
                               split_attn=args.attn_mode == "xformers")
    dit.requires_grad_(False)
    merge_loras(loras, None, dit, text_encoder_side=False)
    if args.fp8 or args.fp8_scaled:
        store_fp8(dit, per_channel=args.fp8_scaled)
    if args.blocks_to_swap:
        dit.enable_block_swap(args.blocks_to_swap, device)
        dit.move_to_device_except_swap_blocks(device)
        dit.switch_block_swap_for_inference()
    else:
        dit.to(device)
    return dit


def store_fp8(dit: torch.nn.Module, per_channel: bool) -> None:
    """--fp8 / --fp8_scaled: the DiT's block projections stored as float8_e4m3fn (the trainer's --fp8_base
    storage), with one scale per tensor (--fp8) or per output channel (--fp8_scaled)."""
    from library.models.fp8 import quantize_linear_weights

    converted = quantize_linear_weights(dit, per_channel=per_channel)
    logger.info("fp8: %d DiT projections stored as float8_e4m3fn (%s scales)", len(converted),
                "per-channel" if per_channel else "per-tensor")


def _free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- outputs -------------------------------------------------------------------------------------------------


def _time_flag() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]


def _unique_path(folder: Path, stem: str, suffix: str) -> Path:
    path = folder / f"{stem}{suffix}"
    counter = 1
    while path.exists():
        path = folder / f"{stem}_{counter}{suffix}"
        counter += 1
    return path


def prompt_metadata(prompt: SamplePrompt) -> dict[str, str]:
    """What the PNG and latent files record (sd-scripts' latent metadata keys, plus the schedule)."""
    return {"prompt": prompt.prompt, "negative_prompt": prompt.negative_prompt, "seeds": str(prompt.seed),
            "height": str(prompt.height), "width": str(prompt.width), "infer_steps": str(prompt.sample_steps),
            "guidance_scale": str(prompt.scale), "flow_shift": str(prompt.flow_shift)}


def save_latent(latents: torch.Tensor, prompt: SamplePrompt, stem: str, args: argparse.Namespace) -> Path:
    """latents [1, 16, 1, h, w] -> ``<save_path>/<time>_<seed>_latent.safetensors`` (tensor ``latent``)."""
    path = _unique_path(Path(args.save_path), f"{stem}_latent", ".safetensors")
    tensors = {LATENT_KEY: latents.detach().float().cpu().contiguous()}
    metadata = None if args.no_metadata else prompt_metadata(prompt)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def load_latent(path: str) -> tuple[torch.Tensor, dict[str, str]]:
    """A latent file written by this script or sd-scripts' -> (latents [1, 16, 1, h, w], metadata)."""
    with open_checkpoint(path, "--latent_path", "a latent file (.safetensors with a 'latent' tensor, or .pt)") as f:
        keys = f.keys()
        key = LATENT_KEY if LATENT_KEY in keys else (keys[0] if len(keys) == 1 else None)
        if key is None:
            raise AnimaError(f"--latent_path {path}: no '{LATENT_KEY}' tensor (found {sample_keys(keys)})")
        latents, metadata = f.tensor(key, dtype=torch.float32), f.metadata()
    if latents.dim() == 4:  # [16, 1, h, w] or [1, 16, h, w]
        latents = latents.unsqueeze(0) if latents.shape[0] != 1 else latents.unsqueeze(2)
    if latents.dim() != 5 or latents.shape[1] != 16:
        raise AnimaError(f"--latent_path {path}: latent of shape {tuple(latents.shape)}; expected [1, 16, 1, h, w]")
    return latents, metadata


def save_image(pixels: torch.Tensor, stem: str, metadata: dict[str, str] | None, args: argparse.Namespace) -> Path:
    path = _unique_path(Path(args.save_path), stem, ".png")
    save_png_atomic(pixels, path, text=None if args.no_metadata else metadata)
    return path


@dataclasses.dataclass(frozen=True)
class Rendered:
    """One sampled prompt (or loaded latent file) waiting to be decoded."""

    latents: torch.Tensor  # [1, 16, 1, h, w], fp32 on the CPU
    stem: str  # output file name without suffix
    metadata: dict[str, str]


def sampling_context(args: argparse.Namespace, device: torch.device) -> contextlib.ExitStack:
    """no_grad, and with --fp8/--fp8_scaled on CUDA the bf16 autocast that float8 weights compute in (elsewhere
    they are dequantised to float32)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    stack.enter_context(torch.autocast(device.type, dtype=compute_dtype(device),
                                       enabled=bool(args.fp8 or args.fp8_scaled) and device.type == "cuda"))
    return stack


def render_prompt(args: argparse.Namespace, dit: torch.nn.Module, encoder: PromptEncoder, prompt: SamplePrompt,
                  device: torch.device, written: list[Path]) -> Rendered:
    """Sample one prompt; with --output_type latent/latent_images its latent file is written (and listed)."""
    context, negative = encode_prompt_contexts(dit, encoder, prompt, device, compute_dtype(device),
                                               guidance_below_one=True)
    latents = sample_latents(dit, prompt, context, negative).cpu()
    problem = non_finite_values(latents, "DiT", compute_dtype(device))
    if problem is not None:
        raise AnimaError(f"prompt {prompt.index} ({prompt.prompt[:60]!r}): {problem}; check the --lora_weight "
                         "files and their --lora_multiplier, and the --dit file")
    stem = f"{_time_flag()}_{prompt.seed}"
    if args.output_type != "images":
        written.append(save_latent(latents, prompt, stem, args))
    return Rendered(latents, stem, prompt_metadata(prompt))


def load_image_vae(args: argparse.Namespace, device: torch.device) -> torch.nn.Module | None:
    """The VAE that decodes the PNGs, or None with --output_type latent."""
    if args.output_type == "latent":
        return None
    from library.models.vae import load_vae

    return load_vae(args.vae, device=device, dtype=compute_dtype(device), chunk_size=args.vae_chunk_size,
                    disable_cache=args.vae_disable_cache)


def write_image(vae: torch.nn.Module, rendered: Rendered, device: torch.device, args: argparse.Namespace) -> Path:
    with torch.no_grad():
        pixels = decode_latents(vae, rendered.latents[:, :, 0], device)  # [1, 3, H, W]
    problem = non_finite_values(pixels, "VAE", compute_dtype(device))
    if problem is not None:
        raise AnimaError(f"{problem} while decoding {rendered.stem}; check the --vae file (and --latent_path's "
                         "latents, when given)")
    return save_image(pixels[0], rendered.stem, rendered.metadata, args)


def console_lines() -> Iterator[str]:
    """Prompt lines typed at the console (with line editing where ``readline`` exists), or piped in."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    try:
        import readline  # noqa: F401  (input() then edits lines and keeps a history)
    except ImportError:
        pass
    while True:
        try:
            yield input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return


def run_interactive(args: argparse.Namespace, tokenizer: Any, loras: Sequence[LoraFile],
                    dit_shapes: torch.nn.Module, device: torch.device, lines: Iterable[str]) -> list[Path]:
    """--interactive: every model stays loaded and each prompt line is rendered and written as it comes. A bad
    line is one ``error:`` line on stderr and the next line is read; Ctrl+C stops the image being rendered."""
    encoder = load_text_encoding(args, tokenizer, loras, dit_shapes, device)
    dit = load_dit(args, loras, device)
    vae = load_image_vae(args, device)
    defaults = prompt_defaults(args)
    written: list[Path] = []
    logger.info("interactive: enter one prompt per line (options --w --h --d --s --l/--g --fs --n); Ctrl+D ends")
    for number, line in enumerate(lines, start=1):
        if not is_prompt_line(line):
            continue
        try:
            prompt = with_seed(prompt_from_line(line, number - 1, f"prompt {number}", defaults,
                                                guidance_is_scale=True))
        except AnimaError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            continue
        files: list[Path] = []
        try:
            with sampling_context(args, device):
                rendered = render_prompt(args, dit, encoder, prompt, device, files)
            if vae is not None:
                files.append(write_image(vae, rendered, device, args))
        except KeyboardInterrupt:  # stops this image only (its files are written whole or not at all)
            print("interrupted; enter the next prompt (Ctrl+D ends)", file=sys.stderr, flush=True)
        except AnimaError as error:  # e.g. NaN latents: this prompt's image is not written, the session goes on
            print(f"error: {error}", file=sys.stderr, flush=True)
        for path in files:
            logger.info("wrote %s", path)
        written += files
    return written


# --- main ----------------------------------------------------------------------------------------------------


def generate(args: argparse.Namespace) -> list[Path]:
    """Everything after parsing; returns the files written."""
    check_args(args)
    if args.vae_disable_cache:
        logger.warning("--vae_disable_cache has no effect on images (the image VAE keeps no cache); ignored")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prompts = [] if args.latent_path or args.interactive else prompts_from_args(args)
    loras = read_loras(args)
    dit_shapes = check_models(args, loras)
    tokenizer = None if args.latent_path else load_tokenizer(args)
    Path(args.save_path).mkdir(parents=True, exist_ok=True)
    if args.interactive:
        return run_interactive(args, tokenizer, loras, dit_shapes, device, console_lines())

    written: list[Path] = []
    results: list[Rendered] = []
    if args.latent_path:
        for path in args.latent_path:
            latents, metadata = load_latent(path)
            results.append(Rendered(latents, f"{_time_flag()}_{metadata.get('seeds', 0)}_{Path(path).stem}", metadata))
    else:
        # One model on the device at a time: the text encoder for every prompt, then the DiT, then the VAE.
        encodings = encode_prompts(args, prompts, tokenizer, loras, dit_shapes, device)
        dit = load_dit(args, loras, device)
        with sampling_context(args, device):
            results = [render_prompt(args, dit, encodings, prompt, device, written) for prompt in prompts]
        del dit
        _free_device_memory(device)
    vae = load_image_vae(args, device)
    if vae is not None:
        written += [write_image(vae, rendered, device, args) for rendered in results]
    for path in written:
        logger.info("wrote %s", path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: bad input ends with one ``error:`` line and exit code 2."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.setLevel(logging.INFO)
    try:
        generate(build_parser().parse_args(argv))
    except AnimaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

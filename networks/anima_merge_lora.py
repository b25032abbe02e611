"""Merge one or more LoRAs (or LoKr / LoHa files) into the Anima DiT and save a full DiT checkpoint.

    python -m networks.anima_merge_lora --dit anima.safetensors --models style.safetensors char.safetensors \\
        --ratios 1.0 0.7 --save_to anima_merged.safetensors --save_precision bf16

Every weight W of an adapted layer becomes W + ratio · ΔW (for LoRA ΔW = up @ down · alpha / rank; LoKr and
LoHa files are merged with their own update, through networks.lokr / networks.loha), computed in
``--precision`` (fp32 by default). The result is written atomically in the released key layout (``net.`` prefix,
``format=pt`` metadata, the LLM adapter included), so the trainer (``--pretrained_model_name_or_path``),
``anima_minimal_inference.py --dit`` and ComfyUI load it like the original. Each LoRA must fit the DiT exactly:
a module that matches no layer is an error naming it. The DiT holds no text encoder, so a LoRA with Qwen3
(``lora_te_``) modules is refused unless ``--dit_only`` leaves those out.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
from safetensors.torch import save_file

from library.errors import AnimaError, OneLineErrorParser, flags_renamed
from library.io.checkpoints import open_checkpoint, sample_keys
from library.io.files import atomic_write
from library.models.dit import Anima
from library.models.dit_loading import DIT_WHAT, MODEL_FLAG, load_anima_model
from networks import import_network_module
from networks.lora_format import (
    KIND_NAMES,
    TE_PREFIX,
    UNET_PREFIX,
    adapter_kinds,
    load_lora_file,
    split_sd_key,
    to_sd_scripts_format,
)
from networks.lora_tools import SAVE_PRECISIONS, check_device, check_inputs_exist, check_output_path, run_cli
from networks.network_base import MODULE_FOR_KIND, AdapterNetwork

RELEASED_KEY_PREFIX = "net."
RELEASED_METADATA = {"format": "pt"}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m networks.anima_merge_lora",
                                     description="Merge LoRAs into the Anima DiT.")
    parser.add_argument("--dit", required=True, help="base Anima DiT .safetensors (with its LLM adapter)")
    parser.add_argument("--models", nargs="+", required=True, help="LoRA files to merge (either key layout)")
    parser.add_argument("--ratios", type=float, nargs="*", default=None,
                        help="one multiplier per LoRA (default 1.0 each)")
    parser.add_argument("--save_to", required=True, help="output DiT .safetensors")
    parser.add_argument("--save_precision", choices=list(SAVE_PRECISIONS), default=None,
                        help="dtype of the saved weights (default: the base file's dtype)")
    parser.add_argument("--precision", choices=list(SAVE_PRECISIONS), default="float",
                        help="dtype the merge is computed in")
    parser.add_argument("--working_device", default="cpu", help="device the merge runs on, e.g. cuda")
    parser.add_argument("--dit_only", action="store_true",
                        help="leave out the LoRAs' Qwen3 (lora_te_) modules instead of refusing such LoRAs")
    return parser


def _base_dtype(path: str) -> torch.dtype:
    with flags_renamed({MODEL_FLAG: "--dit"}), open_checkpoint(path, MODEL_FLAG, DIT_WHAT) as checkpoint:
        dtypes = [t.dtype for t in checkpoint.meta_state_dict().values() if t.dtype.is_floating_point]
    return max(set(dtypes), key=dtypes.count) if dtypes else torch.float32


def _dit_modules(path: str, dit_only: bool) -> dict[str, torch.Tensor]:
    """A LoRA file's sd-scripts state dict, DiT modules only (Qwen3 modules refused or, with dit_only, dropped)."""
    sd = to_sd_scripts_format(load_lora_file(path, flag="--models")[0], add_missing_alpha=True)
    te_modules = sorted({split_sd_key(key)[0] for key in sd if not key.startswith(UNET_PREFIX + "_")})
    if te_modules and not dit_only:
        raise AnimaError(
            f"--models {path}: {len(te_modules)} Qwen3 text-encoder module(s) ({sample_keys(te_modules, 2)}) cannot "
            "be merged into the DiT; add --dit_only to merge the DiT part and leave them out"
        )
    sd = {k: v for k, v in sd.items() if not k.startswith(TE_PREFIX + "_")}
    if not sd:
        raise AnimaError(f"--models {path}: holds no DiT (lora_unet_) modules, nothing to merge")
    return sd


def _network_for(dit: Anima, path: str, ratio: float, dit_only: bool) -> AdapterNetwork:
    """The LoRA (or LoKr / LoHa) of ``path`` on ``dit``, hooks not installed; a module that matches no layer
    is an error."""
    sd = _dit_modules(path, dit_only)
    kinds = adapter_kinds(sd)
    if len(kinds) > 1:
        raise AnimaError(f"--models {path} mixes {' and '.join(KIND_NAMES[k] for k in sorted(kinds))} modules; "
                         "merge files of one adapter kind")
    module = import_network_module(MODULE_FOR_KIND[kinds.pop()])
    try:
        network, _ = module.create_network_from_weights(ratio, path, None, None, dit, weights_sd=sd,
                                                        for_inference=True)
    except AnimaError as error:
        raise AnimaError(f"--models {path}: {error}") from None
    return network


def merge_loras(dit: Anima, paths: Sequence[str], ratios: Sequence[float], dit_only: bool = False) -> int:
    """Add ratio · ΔW of every LoRA into the DiT's weights (in place). Returns the number of modules merged."""
    merged = 0
    for path, ratio in zip(paths, ratios, strict=True):
        network = _network_for(dit, path, ratio, dit_only)
        network.to(next(dit.parameters()).device)
        network.merge_to(None, dit)
        merged += len(network.unet_loras)
        print(f"merged {path} x {ratio:g}: {len(network.unet_loras)} modules")
    return merged


def save_released_layout(dit: Anima, path: str, dtype: torch.dtype) -> None:
    """The DiT's weights with the released ``net.`` key prefix and ``format=pt`` metadata, written atomically."""
    state = {
        RELEASED_KEY_PREFIX + key: (value.to(dtype) if value.is_floating_point() else value).detach().cpu().contiguous()
        for key, value in dit.state_dict().items()
    }
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=dict(RELEASED_METADATA)))


def merge_file(args: argparse.Namespace) -> None:
    check_inputs_exist([args.dit], "--dit")
    check_inputs_exist(args.models, "--models")
    check_output_path(args.save_to, [args.dit, *args.models], suffixes=(".safetensors",))
    check_device(args.working_device, "--working_device")
    ratios = args.ratios if args.ratios else [1.0] * len(args.models)
    if len(ratios) != len(args.models):
        raise AnimaError(f"--ratios has {len(ratios)} value(s) for {len(args.models)} --models file(s); give one each")
    save_dtype = SAVE_PRECISIONS[args.save_precision] if args.save_precision else _base_dtype(args.dit)
    with flags_renamed({MODEL_FLAG: "--dit"}):
        # Every LoRA is matched against the DiT's layers from the file header before any weight is read.
        shapes_only = load_anima_model(args.dit, device="meta")
        for path in args.models:
            _network_for(shapes_only, path, 1.0, args.dit_only)
        dit = load_anima_model(args.dit, device=args.working_device, dtype=SAVE_PRECISIONS[args.precision])
    dit.requires_grad_(False)
    merge_loras(dit, args.models, ratios, dit_only=args.dit_only)
    save_released_layout(dit, args.save_to, save_dtype)
    print(f"saved {args.save_to} ({str(save_dtype).removeprefix('torch.')})")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv, merge_file)


if __name__ == "__main__":
    sys.exit(main())

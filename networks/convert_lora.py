"""Convert an Anima LoRA between the sd-scripts and ComfyUI key layouts.

    python -m networks.convert_lora --src in.safetensors --dst out.safetensors --to comfy
    python -m networks.convert_lora --src in.safetensors --dst out.safetensors --to sd-scripts

Metadata is copied (``ss_lora_format`` updated, sshs_* hashes recomputed). By default the ComfyUI output
folds alpha/r into lora_B so that diffusers (which rejects alpha keys) loads it too; ``--keep_alpha`` writes
the alpha keys instead (ComfyUI only, converts back exactly). Converting a folded file back restores the
alpha of its ``ss_network_alpha`` metadata (lora_B unfolded to match), so tensors and metadata agree. LoKr and
LoHa files (native or LyCORIS) convert with their tensor names and alphas unchanged, exactly both ways. Other
LyCORIS algorithms are refused: their tensors have no ComfyUI-layout names, and ComfyUI reads their
sd-scripts-layout files as they are.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from library.errors import AnimaError, OneLineErrorParser
from networks.lora_format import (
    ALPHA_FOLDED_METADATA_KEY,
    COMFY_FORMAT,
    KIND_NAMES,
    LORA_FORMATS,
    LORA_KIND,
    adapter_kinds,
    convert_to_comfy,
    detect_lora_format,
    format_metadata,
    load_lora_file,
    save_lora_file,
    to_sd_scripts_with_alpha,
)
from networks.lora_tools import check_output_path


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m networks.convert_lora", description="Convert an Anima LoRA between sd-scripts and ComfyUI keys."
    )
    parser.add_argument("--src", required=True, help="input LoRA (.safetensors, either layout)")
    parser.add_argument("--dst", required=True, help="output file (.safetensors keeps metadata)")
    parser.add_argument("--to", required=True, choices=LORA_FORMATS, help="target layout")
    parser.add_argument(
        "--keep_alpha",
        action="store_true",
        help="comfy output: keep alpha keys instead of folding alpha/rank into lora_B (diffusers cannot load it)",
    )
    return parser


def convert_file(src: str, dst: str, to: str, keep_alpha: bool = False, src_flag: str = "--src",
                 dst_flag: str = "--dst", direction_hint: str = "--to") -> int:
    """Convert src into dst; returns the number of LoRA modules written. The flags name the arguments in
    messages (the sd-scripts-named script takes positional paths and ``--reverse``)."""
    check_output_path(dst, [src], flag=dst_flag)
    tensors, metadata = load_lora_file(src, flag=src_flag)
    source_format = detect_lora_format(tensors)
    if source_format == to:
        print(f"warning: {src} is already in the {to} layout: written as it is (check {direction_hint})",
              file=sys.stderr)
    sd, metadata = to_sd_scripts_with_alpha(tensors, metadata)
    kinds = adapter_kinds(sd)
    fold_alpha = not keep_alpha and kinds == {LORA_KIND}  # LoKr/LoHa alphas always stay
    if to == COMFY_FORMAT:
        out = convert_to_comfy(sd, fold_alpha=fold_alpha)
    else:
        out = sd
    metadata = {k: v for k, v in metadata.items() if not k.startswith("sshs_") and k != ALPHA_FOLDED_METADATA_KEY}
    metadata.update(format_metadata(to, fold_alpha))
    save_lora_file(dst, out, metadata)
    modules = len({key.split(".")[0] for key in sd})
    names = "/".join(KIND_NAMES[k] for k in sorted(kinds))
    print(f"{src} ({source_format}) -> {dst} ({to}): {modules} {names} modules")
    return modules


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: a bad command line exits 2, a bad file 1, each with one `error:` line."""
    try:
        args = build_parser().parse_args(argv)
    except AnimaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        convert_file(args.src, args.dst, args.to, keep_alpha=args.keep_alpha)
    except AnimaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""sd-scripts' converter command line: an Anima LoRA from the sd-scripts layout to ComfyUI's, or back.

    python networks/convert_anima_lora_to_comfy.py my_lora.safetensors my_lora_comfy.safetensors
    python networks/convert_anima_lora_to_comfy.py my_lora_comfy.safetensors back.safetensors --reverse

Same positional arguments and ``--reverse`` as sd-scripts' script of this name (also runnable as
``python -m networks.convert_anima_lora_to_comfy``); the conversion itself is ``networks.convert_lora``'s:
alpha folded into lora_B unless ``--keep_alpha`` (sd-scripts always keeps the alpha keys), metadata copied with
fresh hashes, and a folded file converted back gets the alpha of its ``ss_network_alpha`` again.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run by file path, as sd-scripts documents it: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import OneLineErrorParser  # noqa: E402
from networks.convert_lora import convert_file  # noqa: E402
from networks.lora_format import COMFY_FORMAT, SD_SCRIPTS_FORMAT  # noqa: E402
from networks.lora_tools import run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="convert_anima_lora_to_comfy.py", description="Convert an Anima LoRA to the ComfyUI layout (or back)."
    )
    parser.add_argument("src_path", help="source LoRA: sd-scripts layout (ComfyUI layout with --reverse)")
    parser.add_argument("dst_path", help="destination: ComfyUI layout (sd-scripts layout with --reverse)")
    parser.add_argument("--reverse", action="store_true", help="convert from the ComfyUI layout to sd-scripts'")
    parser.add_argument(
        "--keep_alpha",
        action="store_true",
        help="ComfyUI output: keep the alpha keys (as sd-scripts does) instead of folding alpha/rank into lora_B",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: a bad command line exits 2, a bad file 1, each with one `error:` line."""
    return run_cli(build_parser(), argv, lambda args: convert_file(
        args.src_path, args.dst_path, SD_SCRIPTS_FORMAT if args.reverse else COMFY_FORMAT, keep_alpha=args.keep_alpha,
        src_flag="src_path", dst_flag="dst_path", direction_hint="--reverse"))


if __name__ == "__main__":
    sys.exit(main())

"""What the LoRA command-line tools share: save precisions, output-path checks, the one-line error exit."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from library.errors import AnimaError
from library.io.files import check_writable_dir

# --save_precision values, as sd-scripts' tools name them.
SAVE_PRECISIONS: dict[str, torch.dtype] = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_output_path(path: str, inputs: Sequence[str], flag: str = "--save_to",
                      suffixes: Sequence[str] = (".safetensors", ".pt", ".ckpt", ".pth")) -> None:
    """The output must have a known suffix, lie in a writable folder and be none of the input files."""
    if Path(path).suffix not in suffixes:
        raise AnimaError(f"{flag} {path}: must end in {', '.join(suffixes)}")
    check_writable_dir(Path(path).absolute().parent, flag)
    target = Path(path).resolve()
    for source in inputs:
        if Path(source).resolve() == target:
            raise AnimaError(f"{flag} {path} is also an input file; choose another output path")


def check_inputs_exist(paths: Sequence[str], flag: str) -> None:
    for path in paths:
        if not os.path.isfile(path):
            raise AnimaError(f"{flag} {path}: not found; check the path")


def check_device(value: str, flag: str) -> torch.device:
    """A device name torch knows and this machine has (cuda only when CUDA is available)."""
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise AnimaError(f"{flag} {value}: not a device name; use cpu, cuda or cuda:<index>") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AnimaError(f"{flag} {value}: CUDA is not available on this machine; use {flag} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AnimaError(f"{flag} {value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise AnimaError(f"{flag} {value}: MPS is not available on this machine; use {flag} cpu")
    elif device.type not in ("cpu", "mps"):
        raise AnimaError(f"{flag} {value}: the LoRA tools run on cpu, cuda or mps, not '{device.type}'")
    return device


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
            work: Callable[[argparse.Namespace], object]) -> int:
    """Parse and run a tool: a bad command line exits 2, a bad file 1, each with one ``error:`` line."""
    try:
        args = parser.parse_args(argv)
    except AnimaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        work(args)
    except AnimaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

"""Does the VAE's one-slice 2-D causal conv round like the padded 3-D conv sd-scripts runs, at the real shapes?

sd-scripts runs each 3x3x3 causal conv of the Qwen-Image VAE on the image plus two zero frames in front; this
project's VAE runs only the kernel slice that meets the image, as a 2-D conv (a third of the work). Both are the
same sum, but a backend may order it differently. This prints, per conv shape of a 1024x1024 image's encode and
decode, batch and dtype, the share of output elements whose bits differ and the largest difference. On CPU, at
batch 1 in float32 they differ (PyTorch's plain 3-D path vs oneDNN's 2-D one); the question is what cuDNN does.

    python bench/bench_vae_conv_bits.py --device cuda --summary summary.md
    python bench/bench_vae_conv_bits.py --device cpu --scale 0.0625          # quick CPU run
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

# (in channels, out channels, height = width at 1024^2 input): the 3x3 causal convs of the real VAE (base 96).
CONV_SHAPES = (
    (3, 96, 1024),  # encoder conv_in
    (96, 96, 1024),
    (192, 192, 512),
    (384, 384, 256),
    (384, 384, 128),  # mid block
    (384, 32, 128),  # encoder head
    (384, 384, 256),  # decoder (up blocks run at the same widths)
    (192, 192, 512),
    (96, 96, 1024),
    (96, 3, 1024),  # decoder conv_out
)


def conv_difference(in_ch: int, out_ch: int, size: int, batch: int, dtype: torch.dtype,
                    device: torch.device) -> tuple[float, float]:
    """(share of output elements that differ, max abs difference) between the two formulations."""
    generator = torch.Generator(device=device).manual_seed(in_ch * 7 + size)
    x = torch.randn(batch, in_ch, 1, size, size, generator=generator, device=device).to(dtype)  # [B, C, T=1, H, W]
    weight = (torch.randn(out_ch, in_ch, 3, 3, 3, generator=generator, device=device) / (27 * in_ch) ** 0.5).to(dtype)
    bias = torch.randn(out_ch, generator=generator, device=device).to(dtype)
    with torch.no_grad():
        padded_3d = F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0)), weight, bias)[:, :, 0]  # sd-scripts' formulation
        slice_2d = F.conv2d(x[:, :, 0].contiguous(), weight[:, :, -1], bias, padding=1)  # this project's
    differ = (padded_3d != slice_2d).float().mean().item()
    largest = (padded_3d.float() - slice_2d.float()).abs().max().item()
    return differ, largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="image side as a share of 1024 (CPU: 0.0625)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--summary", type=Path, help="append the table (markdown) to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False  # float32 as sd-scripts runs it by default
    lines = [f"### VAE causal conv: one-slice 2-D vs padded 3-D (device={device.type}, scale={args.scale})", "",
             "| in | out | side | batch | dtype | elements differing | max abs diff |", "|---|---|---|---|---|---|---|"]
    seen = set()
    for in_ch, out_ch, side in CONV_SHAPES:
        size = max(8, int(side * args.scale))
        for batch in args.batches:
            for dtype in (torch.bfloat16, torch.float32):
                key = (in_ch, out_ch, size, batch, dtype)
                if key in seen:
                    continue
                seen.add(key)
                differ, largest = conv_difference(in_ch, out_ch, size, batch, dtype, device)
                lines.append(f"| {in_ch} | {out_ch} | {size} | {batch} | {str(dtype).removeprefix('torch.')} | "
                             f"{differ:.1%} | {largest:.2e} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.summary:
        with args.summary.open("a", encoding="utf-8") as out:
            out.write(table + "\n")


if __name__ == "__main__":
    main()

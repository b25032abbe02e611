"""PyTorch SDPA back-ends at the Anima shapes: forward and forward+backward time per back-end.

Shapes (batch 1, bf16 on CUDA, layout [B, H, L, Dh]): DiT self-attention at 1024² (4096 tokens) and 512²
(1024 tokens), 16 heads of 128; DiT cross-attention (4096 queries, 512 context keys); the LLM adapter's masked
self-attention (512 tokens, 16 heads of 64, key mask). Each back-end is forced with
`torch.nn.attention.sdpa_kernel`; one that cannot run a shape says why in its cell.

    python bench/bench_sdpa.py                         # CUDA
    python bench/bench_sdpa.py --device cpu --scale 0.0625 --steps 1     # dry run: tiny shapes

--summary FILE appends the table to FILE.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
# name -> (query tokens, key tokens, heads, head dim, key mask)
SHAPES = {"self 1024²": (4096, 4096, 16, 128, False), "self 512²": (1024, 1024, 16, 128, False),
          "cross 1024²": (4096, 512, 16, 128, False), "adapter masked": (512, 512, 16, 64, True)}


def timed(fn, steps: int, device: torch.device) -> float:
    fn()  # warm-up (kernel selection, allocation)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps * 1e3


def measure(shape: tuple, backend: SDPBackend, args, device, dtype) -> str:
    lq, lk, heads, head_dim, masked = shape
    lq, lk = max(int(lq * args.scale), 8), max(int(lk * args.scale), 8)
    q = torch.randn(1, heads, lq, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, heads, lk, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(1, heads, lk, head_dim, device=device, dtype=dtype, requires_grad=True)
    mask = None
    if masked:
        mask = torch.ones(1, 1, 1, lk, dtype=torch.bool, device=device)
        mask[..., lk // 2:] = False
    try:
        with sdpa_kernel(backend):
            forward = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), args.steps, device)
            both = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward(),
                         args.steps, device)
    except RuntimeError as exc:
        return "n/a: " + str(exc).splitlines()[0][:60]
    flop = 4 * lq * lk * heads * head_dim  # two matmuls forward; backward about 2.5x that
    return f"{forward:.2f} / {both:.2f} ms ({flop / forward / 1e9:.1f} TFLOP/s fwd)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scale", type=float, default=1.0, help="token counts times this (dry runs)")
    parser.add_argument("--summary", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    names = list(BACKENDS) if device.type == "cuda" else ["math", "flash"]
    lines = [f"device={device} dtype={dtype} scale={args.scale}; cells: forward / forward+backward", "",
             "| shape | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    print("\n".join(lines), flush=True)
    for label, shape in SHAPES.items():
        row = f"| {label} | " + " | ".join(measure(shape, BACKENDS[n], args, device, dtype) for n in names) + " |"
        lines.append(row)
        print(row, flush=True)
    if args.summary:
        with open(args.summary, "a", encoding="utf-8") as summary:
            summary.write("\n".join(["", "### SDPA back-ends at the real shapes", "", *lines, ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time of the rank resize (networks.resize_lora) per module shape: thin-QR core SVD vs an SVD of the full ΔW.

Examples:
    python bench/bench_lora_resize.py                      # rank 32 -> 8, the 2B DiT's LoRA module shapes
    python bench/bench_lora_resize.py --rank 64 --repeats 3

The full-matrix SVD (what sd-scripts' resize computes per module) is timed once per shape; the resize of a
whole default LoRA (28 blocks x 10 projections) is extrapolated from the per-shape times. Both give the
same singular values; the largest relative difference is printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from networks.resize_lora import low_rank_svd  # noqa: E402

# (out, in) of the DiT's default LoRA modules and how many of them one block holds (width 2048, MLP 8192,
# cross-attention keys/values from the 1024-wide context).
BLOCK_SHAPES = {(2048, 2048): 6, (2048, 1024): 2, (8192, 2048): 1, (2048, 8192): 1}
NUM_BLOCKS = 28


def seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7, help="best of N for the core method (the machine may be busy)")
    args = parser.parse_args()
    torch.manual_seed(0)
    total_core = total_full = 0.0
    print(f"{'shape (out x in)':>18}  {'core SVD':>10}  {'full SVD':>10}  {'max rel. diff of S':>18}")
    for (out_features, in_features), per_block in BLOCK_SHAPES.items():
        up = torch.randn(out_features, args.rank) * 0.01
        down = torch.randn(args.rank, in_features) * 0.01
        core = seconds(lambda up=up, down=down: low_rank_svd(up, down), args.repeats)
        start = time.perf_counter()
        s_full = torch.linalg.svdvals(up @ down)[: args.rank]
        full = time.perf_counter() - start
        s_core = low_rank_svd(up, down)[1]
        diff = float(((s_core - s_full).abs() / s_full).max())
        print(f"{out_features:>8} x {in_features:<7}  {core * 1e3:>8.1f}ms  {full * 1e3:>8.0f}ms  {diff:>18.1e}")
        total_core += core * per_block * NUM_BLOCKS
        total_full += full * per_block * NUM_BLOCKS
    print(f"whole default LoRA ({NUM_BLOCKS} blocks): core {total_core:.1f} s, full-matrix SVD {total_full:.0f} s")


if __name__ == "__main__":
    main()

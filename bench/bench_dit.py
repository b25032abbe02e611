"""Step time and peak memory of the Anima DiT (forward and forward+backward), random full-width weights.

Examples:
    python bench/bench_dit.py                                   # CUDA: 28 blocks, bf16, 1024 and 512
    python bench/bench_dit.py --gradient_checkpointing --attn_mode flash
    python bench/bench_dit.py --device cpu --blocks 2 --resolution 512 --steps 2   # CPU: reduced depth

The base weights are frozen and the latents require grad, which is what LoRA training back-propagates through;
pass --train_weights to also compute full weight gradients. With --blocks N < 28 the per-block time is the
number to extrapolate from (embedders, final layer and the adapter are negligible next to the blocks).
Saved activations: what autograd keeps for backward in one forward (weights excluded), device independent.
Peak memory: CUDA max allocated; on CPU the process' peak resident set size (includes Python and torch).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.models.attention import check_attn_mode  # noqa: E402
from library.models.dit import Anima, AnimaConfig  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--blocks", type=int, default=28, help="number of DiT blocks (full width is kept)")
    parser.add_argument("--resolution", type=int, nargs="+", default=[1024, 512], help="square image sizes in pixels")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--context_length", type=int, default=512)
    parser.add_argument("--attn_mode", default="torch")
    parser.add_argument("--split_attn", action="store_true")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--train_weights", action="store_true", help="also compute gradients of all DiT weights")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    return parser.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def saved_activation_mib(model: Anima, run_forward) -> float:
    """Bytes autograd keeps for backward during one forward, weights excluded (device independent)."""
    weight_ptrs = {p.data_ptr() for p in model.parameters()}
    seen: set[tuple] = set()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.data_ptr() not in weight_ptrs and key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = run_forward()
    del output
    return total / 2**20


def timed(fn, device: torch.device, warmup: int, steps: int) -> float:
    """Mean seconds per call after warm-up."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    attn_mode = check_attn_mode(args.attn_mode, training=True)
    torch.manual_seed(0)

    config = AnimaConfig(num_blocks=args.blocks)
    with torch.device(device):
        model = Anima(config, attn_mode=attn_mode, split_attn=args.split_attn).to(dtype)
    model.train()
    model.requires_grad_(args.train_weights)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    params = sum(p.numel() for p in model.parameters() if not p.is_meta)
    print(
        f"device={device} dtype={dtype} blocks={args.blocks} width={config.model_channels} params={params / 1e6:.1f}M "
        f"attn_mode={attn_mode} split_attn={args.split_attn} gradient_checkpointing={args.gradient_checkpointing} "
        f"train_weights={args.train_weights} batch={args.batch_size} threads={torch.get_num_threads()}"
    )

    for resolution in args.resolution:
        measure_resolution(model, config, args, device, dtype, resolution)


def measure_resolution(
    model: Anima,
    config: AnimaConfig,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    resolution: int,
) -> None:
    latent = resolution // 8
    b = args.batch_size
    x = torch.randn(b, config.in_channels, 1, latent, latent, device=device, dtype=dtype, requires_grad=True)
    sigmas = torch.rand(b, device=device)
    context = torch.randn(b, args.context_length, config.crossattn_emb_channels, device=device, dtype=dtype)

    def forward_only() -> None:
        with torch.no_grad():
            model(x, sigmas, context)

    def forward_backward() -> None:
        model(x, sigmas, context).float().square().mean().backward()
        x.grad = None
        model.zero_grad(set_to_none=True)

    saved = saved_activation_mib(model, lambda: model(x, sigmas, context))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fwd = timed(forward_only, device, args.warmup, args.steps)
    step = timed(forward_backward, device, args.warmup, args.steps)
    tokens = (latent // config.patch_spatial) ** 2
    print(
        f"{resolution}x{resolution} (latent {latent}x{latent}, {tokens} tokens): "
        f"forward {fwd * 1e3:.1f} ms, forward+backward {step * 1e3:.1f} ms, "
        f"per block fwd+bwd {step / args.blocks * 1e3:.1f} ms, saved activations {saved:.0f} MiB "
        f"({saved / args.blocks:.0f} MiB/block), peak memory {peak_memory_mib(device):.0f} MiB"
    )


if __name__ == "__main__":
    main()

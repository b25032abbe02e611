"""Speed and peak memory of the Qwen-Image VAE image path vs diffusers' AutoencoderKLQwenImage (3-D path).

Real widths (base 96), random weights (timing does not depend on the values), batch 1. Every measurement
runs in a fresh subprocess so peaks do not mix. Peak memory is the increase over the loaded model:
CPU: peak RSS (VmHWM, reset through /proc/self/clear_refs; ru_maxrss where that is unavailable);
GPU: torch.cuda.max_memory_allocated. Both implementations load the same weights, and the table's last
column is the max abs difference of their outputs (a sanity check, not a parity test).

    python bench/bench_vae.py --sizes 512 1024 --chunk-sizes 0 64            # CPU, fp32
    python bench/bench_vae.py --device cuda --dtype bfloat16 --sizes 512 1024 2048 --chunk-sizes 0 64 256

``--chunk-sizes 0`` means no chunking; diffusers is run unchunked only (its image path has no such option).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from library.models.vae import LATENTS_MEAN, LATENTS_STD, QwenImageVAE, load_vae  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _inputs(op: str, size: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if op == "encode":
        x = torch.rand(1, 3, size, size, generator=generator) * 2 - 1
    else:
        x = torch.randn(1, 16, size // 8, size // 8, generator=generator)
    return x.to(device=device, dtype=dtype)


def _build_diffusers(weights: Path, device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKLQwenImage
    from safetensors.torch import load_file

    with torch.device("meta"):
        model = AutoencoderKLQwenImage()
    state_dict = {k: v.to(device=device, dtype=dtype) for k, v in load_file(weights).items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.eval().requires_grad_(False)
    mean = torch.tensor(LATENTS_MEAN, device=device).view(1, 16, 1, 1, 1)
    std = torch.tensor(LATENTS_STD, device=device).view(1, 16, 1, 1, 1)

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        mu = model.encode(pixels.unsqueeze(2)).latent_dist.mode()
        return ((mu.float() - mean) / std).to(dtype)[:, :, 0]

    def decode(latents: torch.Tensor) -> torch.Tensor:
        z = (latents.unsqueeze(2).float() * std + mean).to(dtype)
        return model.decode(z).sample.clamp(-1, 1)[:, :, 0]

    return encode, decode


def worker(args: argparse.Namespace) -> None:
    """One measurement; prints a JSON line."""
    device, dtype = args.device, DTYPES[args.dtype]
    torch.set_num_threads(args.threads) if args.threads else None
    if args.impl == "ours":
        vae = load_vae(args.weights, device=device, dtype=dtype, chunk_size=args.chunk_size or None)
        encode, decode = vae.encode_pixels_to_latents, vae.decode_latents_to_pixels
    else:
        encode, decode = _build_diffusers(args.weights, device, dtype)
    run = encode if args.op == "encode" else decode
    with torch.no_grad():
        run(_inputs(args.op, 64, device, dtype))  # warm-up: kernel selection, allocator
        x = _inputs(args.op, args.size, device, dtype)
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _current_rss()
            _reset_peak_rss()
        start = time.perf_counter()
        out = run(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = _peak_rss() - base
        seconds = time.perf_counter() - start
    if args.save_output:
        torch.save(out.float().cpu(), args.save_output)
    print(json.dumps({"seconds": seconds, "peak_mib": peak / 2**20}))


def _measure(args: argparse.Namespace, weights: Path, impl: str, op: str, size: int, chunk: int, out: Path) -> dict:
    command = [sys.executable, __file__, "--worker", "--weights", str(weights), "--impl", impl, "--op", op,
               "--size", str(size), "--chunk-size", str(chunk), "--device", args.device, "--dtype", args.dtype,
               "--threads", str(args.threads), "--save-output", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512])
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[0, 64])
    parser.add_argument("--ops", nargs="+", default=["encode", "decode"], choices=["encode", "decode"])
    parser.add_argument("--impls", nargs="+", default=["ours", "diffusers"], choices=["ours", "diffusers"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    # worker-only arguments
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--op", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--save-output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "vae_random.safetensors"
        torch.manual_seed(0)
        save_file(QwenImageVAE().state_dict(), weights)
        print(f"device={args.device} dtype={args.dtype} threads={args.threads or torch.get_num_threads()} batch=1")
        print("| size | op | impl | chunk | seconds | peak MiB | max abs diff vs diffusers |")
        print("|---|---|---|---|---|---|---|")
        for size in args.sizes:
            for op in args.ops:
                reference = Path(tmp) / f"diffusers_{op}_{size}.pt"
                cases = [("diffusers", 0)] if "diffusers" in args.impls else []
                cases += [("ours", chunk) for chunk in args.chunk_sizes] if "ours" in args.impls else []
                for impl, chunk in cases:
                    out = reference if impl == "diffusers" else Path(tmp) / "ours.pt"
                    result = _measure(args, weights, impl, op, size, chunk, out)
                    if "error" in result:
                        print(f"| {size} | {op} | {impl} | {chunk or '-'} | error: {result['error']} | | |")
                        continue
                    diff = "-"
                    if impl == "ours" and reference.exists():
                        diff = f"{(torch.load(out) - torch.load(reference)).abs().max().item():.2e}"
                    print(f"| {size} | {op} | {impl} | {chunk or '-'} | {result['seconds']:.2f} | "
                          f"{result['peak_mib']:.0f} | {diff} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

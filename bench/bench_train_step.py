"""Step time, peak memory and MFU of one LoRA training step of the Anima DiT under each memory configuration.

One step = forward + backward + AdamW step on the LoRA parameters (frozen base weights, random init, batch 1,
512 context tokens, bf16 autocast when the weights are bf16). Every configuration runs in a fresh subprocess
(with its own time limit, --config_timeout) so peaks do not mix. Configurations (join with "+", e.g. swap8+ckpt):
  plain        no memory feature
  ckpt         gradient checkpointing (non-reentrant)
  cpu_offload  checkpointing with block inputs in CPU memory, blocking copies (implies ckpt)
  unsloth      checkpointing with block inputs in CPU memory, asynchronous copies (implies ckpt)
  swapN        block swap of N blocks
  fp8          --fp8_base: block projections stored in float8 (`library.models.fp8`; skipped, with a line saying
               so, in a checkout without it)
  compile      --compile: every block compiled (`Anima.compile_blocks`, --compile_backend; skipped likewise)
  fp16         --mixed_precision fp16: weights and autocast in float16 (hidden states in float32), whatever --dtype

    python bench/bench_train_step.py                                     # CUDA, 28 blocks, bf16, 1024 and 512
    python bench/bench_train_step.py --configs plain ckpt swap26+ckpt --resolution 1024 --profile
    python bench/bench_train_step.py --device cpu --blocks 4 --resolution 128 --steps 1 \\
        --configs plain ckpt cpu_offload unsloth swap2                   # CPU: full width, fewer blocks

Peak memory: CUDA max allocated and max reserved during the timed steps (weights included); on CPU the process'
peak RSS. MFU = model FLOPs per step / step time / the device's dense bf16 peak (--peak_tflops; 989 TFLOP/s for
H100/H200 SXM), with 42.7 TFLOP per step at 1024² and 8.25 at 512² for the 28-block DiT (batch 1, 512 context
tokens, LoRA rank 16); other sizes show no MFU. --profile adds, per configuration, the device time of one step
split into GEMM / attention / memcpy / other kernels (torch.profiler; on CPU the aten ops of those kinds).
--summary FILE appends the markdown tables to FILE.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from library.models.attention import check_attn_mode  # noqa: E402
from library.models.dit import Anima, AnimaConfig  # noqa: E402
from networks.lora_anima import create_network  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_CONFIGS = ["plain", "ckpt", "cpu_offload", "unsloth", "swap8", "swap8+ckpt", "swap26", "swap26+ckpt",
                   "fp8", "compile"]
# Model FLOPs of one training step of the 28-block DiT at batch 1 with 512 context tokens (forward + backward).
STEP_TFLOP = {1024: 42.7, 512: 8.25}
# Dense bf16 tensor-core peak (TFLOP/s) by device name, for MFU.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}
KERNEL_KINDS = ("GEMM", "attention", "memcpy", "other")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--blocks", type=int, default=28, help="number of DiT blocks (full width is kept)")
    parser.add_argument("--model_channels", type=int, default=2048, help="DiT width (smaller only for dry runs)")
    parser.add_argument("--num_heads", type=int, default=16)
    parser.add_argument("--resolution", type=int, nargs="+", default=[1024, 512], help="square image sizes")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--network_dim", type=int, default=16)
    parser.add_argument("--network_alpha", type=float, default=16.0,
                        help="LoRA alpha (default 16: scale 1 at rank 16, as bench_gpu_parity.py builds it, so that "
                             "both compile the same block graph and the second finds it in inductor's cache)")
    parser.add_argument("--attn_mode", default="torch")
    parser.add_argument("--context_length", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--config_timeout", type=float, default=120.0, help="seconds per configuration")
    parser.add_argument("--compile_timeout", type=float, default=None,
                        help="seconds for a configuration with compile, whose first step compiles the block "
                             "(default: --config_timeout)")
    parser.add_argument("--compile_backend", default=None, help="default: inductor on CUDA, eager on CPU")
    parser.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (default: by name)")
    parser.add_argument("--profile", action="store_true", help="kernel-time breakdown of one step per config")
    parser.add_argument("--summary", type=Path, default=None, help="append the markdown tables to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one configuration at one resolution
    return parser.parse_args()


def parse_config(name: str) -> dict:
    options = {"checkpointing": False, "cpu_offload": False, "unsloth": False, "swap": 0, "fp8": False,
               "compile": False, "dtype": None}
    for part in name.split("+"):
        if part == "plain":
            continue
        if part == "ckpt":
            options["checkpointing"] = True
        elif part in ("cpu_offload", "unsloth"):
            options["checkpointing"] = True
            options[part] = True
        elif part in ("fp8", "compile"):
            options[part] = True
        elif part == "fp16":
            options["dtype"] = "fp16"
        elif part.startswith("swap") and part[4:].isdigit():
            options["swap"] = int(part[4:])
        else:
            raise SystemExit(f"unknown configuration part {part!r} in {name!r}")
    return options


def classify_kernel(name: str, on_cuda: bool) -> str:
    """GEMM / attention / memcpy / other for a CUDA kernel name (or, on CPU, an aten op name)."""
    lowered = name.lower()
    if any(k in lowered for k in ("flash", "fmha", "attention", "sdpa", "efficient_attention")):
        return "attention"
    if any(k in lowered for k in ("memcpy", "memset", "copy_", "_to_copy")) and (on_cuda or "aten::" in lowered):
        return "memcpy"
    gemm = ("gemm", "cutlass", "xmma", "wgmma", "cublas", "nvjet", "sm90_", "sm80_") if on_cuda else (
        "aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")
    if any(k in lowered for k in gemm):
        return "GEMM"
    return "other"


def kernel_breakdown(step, device: torch.device) -> dict[str, float]:
    """Milliseconds of device time per kernel kind for one call of `step` (self time, so nothing counts twice)."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CUDA] if on_cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    totals = dict.fromkeys(KERNEL_KINDS, 0.0)
    for event in prof.key_averages():
        if on_cuda:
            micros = getattr(event, "self_device_time_total", None)
            if micros is None:
                micros = getattr(event, "self_cuda_time_total", 0.0)
        else:
            if not event.key.startswith("aten::"):
                continue
            micros = event.self_cpu_time_total
        if micros:
            totals[classify_kernel(event.key, on_cuda)] += micros / 1e3
    return totals


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_worker(args: argparse.Namespace) -> None:
    config_name, resolution = args.worker.rsplit("@", 1)
    resolution = int(resolution)
    options = parse_config(config_name)
    device = torch.device(args.device)
    dtype = DTYPES[options["dtype"] or args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(0)

    config = AnimaConfig(num_blocks=args.blocks, model_channels=args.model_channels, num_heads=args.num_heads)
    # Built on the device (fast random init); block swap then moves the block weights to pinned CPU memory.
    with torch.device(device):
        model = Anima(config, attn_mode=check_attn_mode(args.attn_mode, training=True)).to(dtype)
    model.requires_grad_(False)
    if options["fp8"]:
        try:
            from library.models.fp8 import quantize_linear_weights
        except ImportError:
            print(json.dumps({"skipped": "fp8: --fp8_base (library.models.fp8) is not in this checkout"}))
            return
        quantize_linear_weights(model)
    if options["compile"] and not hasattr(model, "compile_blocks"):
        print(json.dumps({"skipped": "compile: --compile (Anima.compile_blocks) is not in this checkout"}))
        return
    network = create_network(1.0, args.network_dim, args.network_alpha, None, [], model)
    network.apply_to([], model, False, True)
    network.to(device)
    if options["checkpointing"]:
        model.enable_gradient_checkpointing(cpu_offload=options["cpu_offload"], unsloth_offload=options["unsloth"])
    if options["swap"]:
        model.enable_block_swap(options["swap"], device)
        model.move_to_device_except_swap_blocks(device)
        model.prepare_block_swap_before_forward()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if options["compile"]:
        model.compile_blocks(backend=args.compile_backend or ("inductor" if device.type == "cuda" else "eager"))
    model.train()
    network.train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)

    latent = resolution // 8
    x = torch.randn(1, config.in_channels, 1, latent, latent, device=device)
    target = torch.randn_like(x)
    sigmas = torch.rand(1, device=device)
    context = torch.randn(1, args.context_length, config.crossattn_emb_channels, device=device, dtype=dtype)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            prediction = model(x, sigmas, context)
        torch.nn.functional.mse_loss(prediction.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    result = {"seconds": seconds}
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
        result["device_name"] = torch.cuda.get_device_name(device)
    else:
        result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    if args.profile:
        result["kernels_ms"] = kernel_breakdown(step, device)
    print(json.dumps(result))


def device_peak_tflops(name: str | None) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if name and key in name:
            return value
    return None


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    for name in args.configs:
        parse_config(name)  # fail before the first measurement
    lines = [f"device={args.device} dtype={args.dtype or 'default'} blocks={args.blocks} width={args.model_channels} "
             f"network_dim={args.network_dim} network_alpha={args.network_alpha:g} attn_mode={args.attn_mode} "
             f"steps={args.steps} batch=1", "",
             "| config | resolution | step ms | peak alloc MiB | peak reserved MiB | MFU | command |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    # Rows reach the summary as they come: a time limit that cuts the run keeps what was measured.
    summary = open(args.summary, "a", encoding="utf-8") if args.summary else None
    if summary:
        summary.write("\n".join(["", "### LoRA training step per configuration", "", *lines, ""]))
        summary.flush()
    kernel_rows = []
    for resolution in args.resolution:
        for name in args.configs:
            command = [sys.executable, __file__, "--device", args.device, "--blocks", str(args.blocks),
                       "--model_channels", str(args.model_channels), "--num_heads", str(args.num_heads),
                       "--network_dim", str(args.network_dim), "--network_alpha", str(args.network_alpha),
                       "--attn_mode", args.attn_mode,
                       "--context_length", str(args.context_length), "--warmup", str(args.warmup),
                       "--steps", str(args.steps), "--worker", f"{name}@{resolution}"]  # fmt: skip
            if args.dtype:
                command += ["--dtype", args.dtype]
            if args.compile_backend:
                command += ["--compile_backend", args.compile_backend]
            if args.profile:
                command.append("--profile")
            # The row's own command line: the same flags, this configuration and resolution only.
            user_flags = command[2:command.index("--worker")] + command[command.index("--worker") + 2:]
            shown = shlex.join(["python", "bench/bench_train_step.py", *user_flags, "--configs", name,
                                "--resolution", str(resolution)])
            timeout = args.config_timeout
            if parse_config(name)["compile"] and args.compile_timeout is not None:
                timeout = args.compile_timeout
            try:
                result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout)
            except subprocess.TimeoutExpired:
                row = f"| {name} | {resolution} | timed out after {timeout:.0f} s | | | | `{shown}` |"
            else:
                last = (result.stdout.strip().splitlines() or ["{}"])[-1]
                if result.returncode != 0 or not last.startswith("{"):
                    error = (result.stderr.strip().splitlines() or ["failed"])[-1]
                    row = f"| {name} | {resolution} | failed: {error} | | | | `{shown}` |"
                else:
                    numbers = json.loads(last)
                    if "skipped" in numbers:
                        row = f"| {name} | {resolution} | skipped: {numbers['skipped']} | | | | `{shown}` |"
                    else:
                        row = format_row(args, name, resolution, numbers, shown)
                        if "kernels_ms" in numbers:
                            kernel_rows.append(format_kernels(name, resolution, numbers["kernels_ms"]))
            print(row, flush=True)
            if summary:
                summary.write(row + "\n")
                summary.flush()
    if kernel_rows:
        table = ["", "Device time of one step by kernel kind (ms, share):", "",
                 "| config | resolution | " + " | ".join(KERNEL_KINDS) + " | total |",
                 "|---|---|" + "---|" * (len(KERNEL_KINDS) + 1), *kernel_rows]
        print("\n".join(table), flush=True)
        if summary:
            summary.write("\n".join(table) + "\n")
    if summary:
        summary.close()


def format_row(args: argparse.Namespace, name: str, resolution: int, numbers: dict, shown: str) -> str:
    full_size = args.blocks == 28 and args.model_channels == 2048 and args.context_length == 512
    tflop = STEP_TFLOP.get(resolution) if full_size else None
    peak = args.peak_tflops or device_peak_tflops(numbers.get("device_name"))
    mfu = f"{100 * tflop / numbers['seconds'] / peak:.1f} %" if tflop and peak else "-"
    reserved = f"{numbers['reserved_mib']:.0f}" if "reserved_mib" in numbers else "-"
    return (f"| {name} | {resolution} | {numbers['seconds'] * 1e3:.0f} | {numbers['peak_mib']:.0f} | {reserved} | "
            f"{mfu} | `{shown}` |")


def format_kernels(name: str, resolution: int, kernels: dict[str, float]) -> str:
    total = sum(kernels.values()) or 1.0
    cells = " | ".join(f"{kernels[k]:.1f} ({100 * kernels[k] / total:.0f} %)" for k in KERNEL_KINDS)
    return f"| {name} | {resolution} | {cells} | {total:.1f} |"


if __name__ == "__main__":
    main()

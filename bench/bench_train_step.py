"""Step time and peak memory of one LoRA training step of the Anima DiT under each memory configuration.

One step = forward + backward + AdamW step on the LoRA parameters (frozen base weights, random init, batch 1,
512 context tokens, bf16 autocast when the weights are bf16). Every configuration runs in a fresh subprocess
so peaks do not mix. Configurations (join with "+", e.g. swap14+ckpt):
  plain        no memory feature
  ckpt         gradient checkpointing (non-reentrant)
  cpu_offload  checkpointing with block inputs in CPU memory, blocking copies (implies ckpt)
  unsloth      checkpointing with block inputs in CPU memory, asynchronous copies (implies ckpt)
  swapN        block swap of N blocks

    python bench/bench_train_step.py                                     # CUDA, 28 blocks, bf16, 1024 and 512
    python bench/bench_train_step.py --configs plain ckpt swap26+ckpt --resolution 1024
    python bench/bench_train_step.py --device cpu --blocks 4 --resolution 128 --steps 1 \\
        --configs plain ckpt cpu_offload unsloth swap2                   # CPU: full width, fewer blocks

Peak memory: CUDA max allocated during the timed steps (weights included); on CPU the process' peak RSS.
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
DEFAULT_CONFIGS = ["plain", "ckpt", "cpu_offload", "unsloth", "swap14", "swap14+ckpt", "swap26+ckpt"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--blocks", type=int, default=28, help="number of DiT blocks (full width is kept)")
    parser.add_argument("--resolution", type=int, nargs="+", default=[1024, 512], help="square image sizes")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--network_dim", type=int, default=16)
    parser.add_argument("--attn_mode", default="torch")
    parser.add_argument("--context_length", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one configuration at one resolution
    return parser.parse_args()


def parse_config(name: str) -> dict:
    options = {"checkpointing": False, "cpu_offload": False, "unsloth": False, "swap": 0}
    for part in name.split("+"):
        if part == "plain":
            continue
        if part == "ckpt":
            options["checkpointing"] = True
        elif part in ("cpu_offload", "unsloth"):
            options["checkpointing"] = True
            options[part] = True
        elif part.startswith("swap") and part[4:].isdigit():
            options["swap"] = int(part[4:])
        else:
            raise SystemExit(f"unknown configuration part {part!r} in {name!r}")
    return options


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_worker(args: argparse.Namespace) -> None:
    config_name, resolution = args.worker.rsplit("@", 1)
    resolution = int(resolution)
    options = parse_config(config_name)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(0)

    config = AnimaConfig(num_blocks=args.blocks)
    # Built on the device (fast random init); block swap then moves the block weights to pinned CPU memory.
    with torch.device(device):
        model = Anima(config, attn_mode=check_attn_mode(args.attn_mode, training=True)).to(dtype)
    model.requires_grad_(False)
    network = create_network(1.0, args.network_dim, 1.0, None, [], model)
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
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(json.dumps({"seconds": seconds, "peak_mib": peak}))


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    for name in args.configs:
        parse_config(name)  # fail before the first measurement
    print(f"device={args.device} dtype={args.dtype or 'default'} blocks={args.blocks} "
          f"network_dim={args.network_dim} attn_mode={args.attn_mode} steps={args.steps} batch=1")
    print("| config | resolution | step ms | peak MiB | command |")
    print("|---|---|---|---|---|")
    for resolution in args.resolution:
        for name in args.configs:
            command = [sys.executable, __file__, "--device", args.device, "--blocks", str(args.blocks),
                       "--network_dim", str(args.network_dim), "--attn_mode", args.attn_mode,
                       "--context_length", str(args.context_length), "--warmup", str(args.warmup),
                       "--steps", str(args.steps), "--worker", f"{name}@{resolution}"]  # fmt: skip
            if args.dtype:
                command += ["--dtype", args.dtype]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            # The row's own command line: the same flags, this configuration and resolution only.
            user_flags = command[2:command.index("--worker")] + command[command.index("--worker") + 2:]
            shown = shlex.join(["python", "bench/bench_train_step.py", *user_flags, "--configs", name,
                                "--resolution", str(resolution)])
            if result.returncode != 0:
                error = (result.stderr.strip().splitlines() or ["failed"])[-1]
                print(f"| {name} | {resolution} | failed: {error} | | `{shown}` |", flush=True)
                continue
            numbers = json.loads(result.stdout.strip().splitlines()[-1])
            print(f"| {name} | {resolution} | {numbers['seconds'] * 1e3:.0f} | {numbers['peak_mib']:.0f} | "
                  f"`{shown}` |", flush=True)


if __name__ == "__main__":
    main()

"""Memory and speed features against the plain model: same prediction and LoRA gradients, within tolerance.

A full-width DiT (random weights, --blocks of them, LoRA rank 16 with random up weights) runs one training
forward + backward per configuration and is compared with the plain model (relative L2 error of the
prediction and of all LoRA gradients), at each --tokens image-token count: the real 1024² count (4096) and a
tiny one (16), where the copies dwarf the compute and a missing stream wait would show. `swap-forward` is three
no-grad forwards in a row with block swap (the sampling / validation schedule). fp8 and compile are compared
the same way and skipped, with a line saying so, in a checkout without them. fp16 trains in float16 (weights and
autocast; the hidden states in float32) against the bf16 (on CPU float32) plain model.

    python bench/bench_gpu_parity.py                              # CUDA, bf16, 4 full-width blocks
    python bench/bench_gpu_parity.py --device cpu --blocks 3 --model_channels 128 --num_heads 2 --tokens 16

Tolerances (relative L2): 2e-2 for features that recompute or move the same numbers (checkpointing, offload,
swap, compile), 0.05 for fp16 (another 16-bit format than the reference's), 0.15 for fp8 weights. --summary FILE appends the table to FILE.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.models.dit import Anima, AnimaConfig  # noqa: E402
from networks.lora_anima import create_network  # noqa: E402

CONFIGS = ["ckpt", "cpu_offload", "unsloth", "swap", "swap+ckpt", "swap-forward", "fp8", "fp16", "compile"]
TOLERANCE = {"fp8": 0.15, "fp16": 0.05}
DEFAULT_TOLERANCE = 2e-2


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    config = AnimaConfig(num_blocks=args.blocks, model_channels=args.model_channels, num_heads=args.num_heads)
    with torch.device(device):
        model = Anima(config).to(dtype)
    model.requires_grad_(False)
    network = create_network(1.0, 16, 16.0, None, [], model)
    network.apply_to([], model, False, True)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in network.unet_loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator) * 0.02)
    network.to(device)
    model.train()
    return model, network


def inputs(tokens: int, device: torch.device, dtype: torch.dtype, context_channels: int):
    side = max(int(math.isqrt(tokens)), 1) * 2  # latent side: 2x2 patches per token
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 1, side, side, generator=generator).to(device)
    sigmas = torch.rand(1, generator=generator).to(device)
    context = torch.randn(1, 512, context_channels, generator=generator).to(device=device, dtype=dtype)
    return x, sigmas, context


def train_pass(model, network, batch, device, dtype):
    network.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model(*batch)
    out.float().square().mean().backward()
    grads = torch.cat([p.grad.float().flatten() for p in network.parameters() if p.grad is not None])
    return out.detach().float(), grads


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-12))


def run_config(name: str, args, device, dtype, batch, reference) -> tuple[str, float | None, float | None, str]:
    if name == "fp16":  # --mixed_precision fp16: float16 weights and autocast, float32 hidden states
        dtype = torch.float16
    model, network = build(args, device, dtype)
    swap = args.blocks - 2
    if name == "fp8":
        try:
            from library.models.fp8 import quantize_linear_weights
        except ImportError:
            return "skipped: --fp8_base (library.models.fp8) is not in this checkout", None, None, ""
        quantize_linear_weights(model)
    if name == "compile":
        if not hasattr(model, "compile_blocks"):
            return "skipped: --compile (Anima.compile_blocks) is not in this checkout", None, None, ""
        model.compile_blocks(backend=args.compile_backend or ("inductor" if device.type == "cuda" else "eager"))
    if name in ("ckpt", "swap+ckpt"):
        model.enable_gradient_checkpointing()
    if name in ("cpu_offload", "unsloth"):
        model.enable_gradient_checkpointing(cpu_offload=name == "cpu_offload", unsloth_offload=name == "unsloth")
    if name.startswith("swap"):
        model.enable_block_swap(swap, device)
        model.move_to_device_except_swap_blocks(device)
        model.prepare_block_swap_before_forward()
    if name == "swap-forward":
        model.switch_block_swap_for_inference()
        copied_before = model.block_swapper.blocks_copied
        errors = []
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            for _ in range(3):
                errors.append(relative_error(model(*batch).float(), reference[2]))
        copied = model.block_swapper.blocks_copied - copied_before
        return "", max(errors), None, f"{swap} of {args.blocks} swapped; {copied} block copies in 3 forwards"
    out, grads = train_pass(model, network, batch, device, dtype)
    out2, grads2 = train_pass(model, network, batch, device, dtype)  # a second step: the layout came back
    note = f"{swap} swapped" if name.startswith("swap") else ""
    return "", max(relative_error(out, reference[0]), relative_error(out2, reference[0])), max(
        relative_error(grads, reference[1]), relative_error(grads2, reference[1])), note


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--model_channels", type=int, default=2048)
    parser.add_argument("--num_heads", type=int, default=16)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=CONFIGS)
    parser.add_argument("--compile_backend", default=None)
    parser.add_argument("--summary", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lines = [f"device={device} dtype={dtype} blocks={args.blocks} width={args.model_channels}", "",
             "| config | tokens | pred rel err | LoRA grad rel err | result | note |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    # Rows reach the summary as they come: a time limit that cuts the run keeps what was measured.
    summary = open(args.summary, "a", encoding="utf-8") if args.summary else None
    if summary:
        summary.write("\n".join(["", "### Features against the plain model", "", *lines, ""]))
        summary.flush()
    failures = 0
    references = {}
    # compile runs last of all: its first pass compiles, and a time limit that cuts it leaves every other row.
    order = [(tokens, name) for tokens in args.tokens for name in args.configs if name != "compile"]
    order += [(tokens, "compile") for tokens in args.tokens if "compile" in args.configs]
    for tokens, name in order:
        if tokens not in references:
            model, network = build(args, device, dtype)
            batch = inputs(tokens, device, dtype, model.config.crossattn_emb_channels)
            out, grads = train_pass(model, network, batch, device, dtype)
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                forward_only = model(*batch).float()
            references[tokens] = batch, (out, grads, forward_only)
            del model, network
        batch, reference = references[tokens]
        try:
            skipped, pred_err, grad_err, note = run_config(name, args, device, dtype, batch, reference)
        except Exception as exc:  # a broken feature is a row of the table, not the end of the check
            skipped, pred_err, grad_err, note = f"error: {type(exc).__name__}: {exc}"[:200], None, None, ""
        if skipped:
            result = "SKIP" if skipped.startswith("skipped") else "FAIL"
            row = f"| {name} | {tokens} | | | {result} | {skipped} |"
        else:
            worst = max(e for e in (pred_err, grad_err) if e is not None)
            result = "PASS" if worst <= TOLERANCE.get(name, DEFAULT_TOLERANCE) else "FAIL"
            grad = f"{grad_err:.2e}" if grad_err is not None else "-"
            row = f"| {name} | {tokens} | {pred_err:.2e} | {grad} | {result} | {note} |"
        failures += result == "FAIL"
        print(row, flush=True)
        if summary:
            summary.write(row + "\n")
            summary.flush()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if summary:
        summary.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

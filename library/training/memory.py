"""The device-memory estimate printed by `--dry_run`, from parameter counts and the options (no weights needed).

The training step itself is estimated by the block-swap planner's model (`library.models.block_swap`:
`dit_training_memory` and `TrainingMemory.peak_bytes`, the same numbers `--blocks_to_swap auto` plans with):
the frozen DiT weights minus the swapped blocks, the LoRA weights with gradients and optimizer state, the
activations kept for backward for the chosen checkpointing mode, and a reserve for workspaces. Added here: the
text encoder while it stays loaded (it is freed after caching when its outputs are cached and it is not
trained). With `--blocks_to_swap auto` the estimate is for no swapped block (the plan needs the free memory of
the real device, known only when the run starts).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch

from library.models import block_swap
from library.training.args import MIXED_PRECISION_DTYPES

GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    training_peak: int  # the planner's peak of a training step (weights, LoRA + optimizer, activations, reserve)
    text_encoder: int
    blocks_to_swap: int
    checkpointing: str

    @property
    def total(self) -> int:
        return self.training_peak + self.text_encoder

    def describe(self) -> str:
        def size(n: int) -> str:
            return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / 2**20:.1f} MiB"

        return (f"about {size(self.total)} on the device (training step {size(self.training_peak)} with "
                f"{self.blocks_to_swap} blocks swapped and checkpointing {self.checkpointing}, text encoder "
                f"{size(self.text_encoder)}; the block-swap planner's estimate, see library/training/memory.py)")


def checkpointing_mode(args: argparse.Namespace) -> str:
    """The planner's name of the checkpointing flags."""
    if args.cpu_offload_checkpointing:
        return "cpu_offload"
    if args.unsloth_offload_checkpointing:
        return "unsloth"
    return "ckpt" if args.gradient_checkpointing else "none"


def largest_batch_tokens(train_group: Any) -> tuple[int, int]:
    """(batch size, image tokens) of the largest batch: 16 pixels per token side (VAE 8x, 2x2 patches)."""
    return max(((d.config.batch_size, (w // 16) * (h // 16)) for d in train_group.datasets
                for (w, h) in d.bucket_sizes), key=lambda bt: bt[0] * bt[1], default=(1, 0))


def estimate_training_memory(args: argparse.Namespace, dit: torch.nn.Module, trainable_parameters: int,
                             train_group: Any, text_encoder_parameters: int = 0) -> MemoryEstimate:
    """dit: the weightless (meta) DiT from the header check (cast to the training dtype here, which costs
    nothing on the meta device); train_group: the scanned data.DatasetGroup."""
    compute_dtype = MIXED_PRECISION_DTYPES[args.mixed_precision]
    element_size = compute_dtype.itemsize
    dit.to(compute_dtype)
    batch, tokens = largest_batch_tokens(train_group)
    lora_bytes = element_size if (args.full_fp16 or args.full_bf16) else 4
    memory = block_swap.dit_training_memory(
        dit, batch_size=batch, tokens=tokens, context_tokens=args.t5_max_token_length,
        adapter_context_tokens=args.qwen3_max_token_length, fp8=bool(args.fp8_base),
        trainable_bytes=trainable_parameters * lora_bytes, compute_dtype=compute_dtype)
    swapped = args.blocks_to_swap if isinstance(args.blocks_to_swap, int) else 0
    checkpointing = checkpointing_mode(args)
    text_encoder_resident = not args.cache_text_encoder_outputs or not args.network_train_unet_only
    return MemoryEstimate(training_peak=memory.peak_bytes(swapped, checkpointing),
                          text_encoder=text_encoder_parameters * element_size if text_encoder_resident else 0,
                          blocks_to_swap=swapped, checkpointing=checkpointing)

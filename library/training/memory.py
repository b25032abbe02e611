"""A rough device-memory estimate for `--dry_run`, from parameter counts and the options (no weights needed).

Parts: the frozen DiT weights on the device (minus the blocks --blocks_to_swap keeps in CPU memory), the text
encoder while it stays loaded (it is freed after caching when its outputs are cached and it is not trained), the
LoRA parameters with their gradients and optimizer state, and the activations kept for backward. Activations
are the crude part: per DiT block and token about ACTIVATION_WIDTHS x model_channels values are kept without
gradient checkpointing; with it, one block input per block plus one block's working set. The real figure also
depends on the attention kernel and the allocator, so the estimate is meant to tell 8 GiB from 24 GiB, no more.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

import torch

GIB = 1024**3
ACTIVATION_WIDTHS = 34  # values per token and block: q/k/v/out, norms, modulation, 4x MLP in and out, residuals
# Bytes of optimizer state per trained parameter (fp32 moments unless the optimizer quantises them).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "pagedadamw8bit": 2, "lion": 4, "lion8bit": 1, "sgdnesterov": 4,
                         "adafactor": 1, "prodigy": 16, "dadaptadam": 12}
DEFAULT_OPTIMIZER_STATE_BYTES = 8


@dataclass(frozen=True)
class MemoryEstimate:
    dit_weights: int
    text_encoder: int
    network_and_optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.dit_weights + self.text_encoder + self.network_and_optimizer + self.activations

    def describe(self) -> str:
        def gib(n: int) -> str:
            return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / 2**20:.1f} MiB"

        return (f"about {gib(self.total)} on the device (DiT weights {gib(self.dit_weights)}, text encoder "
                f"{gib(self.text_encoder)}, LoRA + gradients + optimizer {gib(self.network_and_optimizer)}, "
                f"activations {gib(self.activations)}; rough, see library/training/memory.py)")


def _dtype_bytes(mixed_precision: str) -> int:
    return 4 if mixed_precision == "no" else 2


def estimate_training_memory(args: argparse.Namespace, dit: torch.nn.Module, trainable_parameters: int,
                             train_group: Any, text_encoder_parameters: int = 0) -> MemoryEstimate:
    """dit: the weightless (meta) DiT from the header check; train_group: the scanned data.DatasetGroup."""
    weight_bytes = _dtype_bytes(args.mixed_precision)
    dit_params = sum(p.numel() for p in dit.parameters())
    config = dit.config
    if args.blocks_to_swap:
        block_params = sum(p.numel() for p in dit.blocks[0].parameters()) if len(dit.blocks) else 0
        dit_params -= block_params * args.blocks_to_swap
    text_encoder_resident = not args.cache_text_encoder_outputs or not args.network_train_unet_only
    text_encoder = text_encoder_parameters * weight_bytes if text_encoder_resident else 0

    lora_bytes = weight_bytes if (args.full_fp16 or args.full_bf16) else 4
    optimizer_key = (args.optimizer_type or ("AdamW8bit" if args.use_8bit_adam else
                                             "Lion" if args.use_lion_optimizer else "AdamW")).lower()
    state_bytes = OPTIMIZER_STATE_BYTES.get(optimizer_key, DEFAULT_OPTIMIZER_STATE_BYTES)
    gradient_bytes = 0 if args.fused_backward_pass else lora_bytes
    network = trainable_parameters * (lora_bytes + gradient_bytes + state_bytes)

    # The largest batch: tokens per sample = latent pixels / patch area (latents are 1/8 of the image).
    largest = 0
    for dataset in train_group.datasets:
        for width, height in dataset.bucket_sizes or [(0, 0)]:
            tokens = math.ceil(width / 8 / config.patch_spatial) * math.ceil(height / 8 / config.patch_spatial)
            largest = max(largest, tokens * dataset.config.batch_size)
    per_block_input = largest * config.model_channels * weight_bytes
    if args.gradient_checkpointing:
        activations = per_block_input * (config.num_blocks + ACTIVATION_WIDTHS)
    else:
        activations = per_block_input * ACTIVATION_WIDTHS * config.num_blocks
    return MemoryEstimate(dit_weights=dit_params * weight_bytes, text_encoder=text_encoder,
                          network_and_optimizer=network, activations=activations)

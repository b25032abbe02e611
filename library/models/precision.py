"""float16 facts shared across layers: the dtype the DiT keeps its hidden states in (read by the model and by the
memory planner, ``block_swap``, which the model imports), and the advice every float16 NaN/inf message gives."""

from __future__ import annotations

import torch


def residual_stream_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the blocks' hidden states (the residual stream) when they compute in `compute_dtype`.

    float32 for float16: the hidden states can outgrow float16's range (65504) and would turn to inf / NaN, so the
    stream stays float32 while attention and MLP still compute in float16 (ComfyUI runs Anima in float16 the same
    way). bfloat16 has float32's range and keeps its own.
    """
    return torch.float32 if compute_dtype == torch.float16 else compute_dtype


# What every message about a float16 NaN/inf (text-encoder cache, samples, the non-finite guard's stop) advises.
FLOAT16_OVERFLOW_ADVICE = "float16 may overflow: --mixed_precision bf16 or no avoids that"

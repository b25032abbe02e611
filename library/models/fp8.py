"""``--fp8_base``: the frozen DiT block Linear weights stored as float8_e4m3fn with one scale per output channel.

Only the big block projections are stored in float8: ``blocks.N.{self_attn,cross_attn,mlp}.*`` (q/k/v/output
projections and the two MLP layers, 91 % of a block's weights). Everything else keeps its dtype: the embedders,
``t_embedding_norm``, the final layer, the LLM adapter (diffusion-pipe keeps the same modules in high precision),
every 1-D parameter (the q/k norms) and the adaLN modulation layers, which set the scale and gate of every
sub-layer. LoRA weights are the network's and keep their own dtype.

Storage: ``weight`` [out, in] float8_e4m3fn and ``weight_scale`` [out, 1] float32 with
``weight ≈ weight_fp8 * weight_scale``; the scale maps each row's largest magnitude to float8's largest finite
value (448). Both are frozen parameters of the layer, so block swap streams them as they are (half the bytes of
bf16). The layer computes in bf16 (or whatever dtype autocast or its input asks for): the weight is dequantised
inside the forward and again inside the backward (for the input gradient), so no dequantised copy is kept
between them. The module keeps its identity (its class is switched to ``Fp8Linear``), so hooks already attached
to it -- the LoRA's -- keep working.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from library.models.dit import compute_dtype

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# Module names (inside the DiT) whose Linear weights are stored in float8; see the module docstring.
FP8_MODULE_PATTERN = re.compile(r"blocks\.\d+\.(self_attn|cross_attn|mlp)\.[A-Za-z0-9_]+")


def quantize_weight(weight: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] weight -> (float8_e4m3fn weight [out, in], float32 scale [out, 1] or [1, 1] when per tensor)."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().reshape(1, 1)
    scale = absmax.clamp(min=torch.finfo(torch.float32).tiny) / FP8_MAX
    quantized = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized, scale


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float8 weight [out, in] and scale [out, 1] -> the weight in dtype."""
    return weight.to(dtype).mul_(scale.to(dtype))


class _Fp8LinearFunction(torch.autograd.Function):
    """y = x @ dequant(W)^T; the backward dequantises again instead of saving the 16-bit weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)
        ctx.dtype = dtype
        return F.linear(x.to(dtype), dequantize_weight(weight, scale, dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.to(ctx.dtype) @ dequantize_weight(weight, scale, ctx.dtype)
        return grad_x, None, None, None


class Fp8Linear(nn.Linear):
    """An nn.Linear (no bias) whose frozen weight is float8 with a per-output-channel ``weight_scale``."""

    weight_scale: nn.Parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            dtype = torch.bfloat16
        return _Fp8LinearFunction.apply(x, self.weight, self.weight_scale, dtype)


def convert_to_fp8(linear: nn.Linear, per_channel: bool = True) -> Fp8Linear:
    """Quantise one bias-free Linear in place (same object, class switched; hooks stay attached)."""
    if linear.bias is not None:
        raise ValueError("fp8 storage is implemented for bias-free Linear layers (every DiT block projection)")
    quantized, scale = quantize_weight(linear.weight, per_channel=per_channel)
    linear.weight = nn.Parameter(quantized, requires_grad=False)
    linear.weight_scale = nn.Parameter(scale.to(linear.weight.device), requires_grad=False)
    linear.__class__ = Fp8Linear
    return linear


def quantize_linear_weights(model: nn.Module, per_channel: bool = True, prefix: str = "") -> list[str]:
    """Store every Linear of ``model`` whose name matches FP8_MODULE_PATTERN in float8; returns their names.

    ``prefix`` is prepended to the names for matching (e.g. ``"blocks.0."`` for a lone block).
    """
    converted = []
    for name, module in model.named_modules():
        full = prefix + name
        if type(module) is nn.Linear and FP8_MODULE_PATTERN.fullmatch(full):
            if module.weight.requires_grad:
                raise ValueError(f"{full}: fp8 storage is for frozen weights, but this one requires grad")
            convert_to_fp8(module, per_channel=per_channel)
            converted.append(full)
    return converted


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (float8 weights count one byte per element)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))

"""The Anima diffusion model: a MiniTrainDIT (Cosmos-Predict2 style DiT) plus the LLM adapter.

Parameter names match the released checkpoint after stripping its ``net.`` prefix, so LoRA module names
(``blocks.0.self_attn.q_proj``, ``llm_adapter.blocks.0.cross_attn.q_proj``...) follow from the module tree.

Numerics: the timestep sinusoid, RMSNorm statistics and RoPE rotations are computed in float32 and cast back to
the activation dtype (the dtype of the weights); everything else runs in the activation dtype.

Token layout inside the DiT: ``[B, L, D]`` with the (t, h, w) patch grid flattened row-major.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from library.models.attention import attention, normalize_attn_mode
from library.models.block_swap import BlockSwapper
from library.models.offload_checkpointing import (
    CPU_OFFLOAD,
    UNSLOTH_OFFLOAD,
    checkpoint_offload_mode,
    checkpoint_with_cpu_offload,
)
from library.models.precision import residual_stream_dtype

logger = logging.getLogger(__name__)

NORM_EPS = 1e-6


@dataclass
class AnimaConfig:
    """Sizes of the DiT and its LLM adapter. Defaults are the released 2B model."""

    in_channels: int = 16  # latent channels (the zero padding-mask channel is added on top)
    out_channels: int = 16
    model_channels: int = 2048
    num_blocks: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    crossattn_emb_channels: int = 1024  # width of the text context = adapter width
    adaln_lora_dim: int = 256
    patch_spatial: int = 2
    patch_temporal: int = 1
    rope_h_extrapolation_ratio: float = 4.0
    rope_w_extrapolation_ratio: float = 4.0
    rope_t_extrapolation_ratio: float = 1.0
    adapter_source_dim: int = 1024  # Qwen3 hidden size
    adapter_model_dim: int = 1024
    adapter_num_layers: int = 6
    adapter_num_heads: int = 16
    adapter_mlp_ratio: float = 4.0
    adapter_vocab_size: int = 32128  # T5 vocabulary incl. padding rows

    def __post_init__(self) -> None:
        if self.model_channels % self.num_heads:
            raise ValueError(f"model_channels {self.model_channels} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 8:
            raise ValueError(f"DiT head dim {self.head_dim} must be even and >= 8 for 3D RoPE")
        if self.adapter_model_dim % self.adapter_num_heads or (self.adapter_model_dim // self.adapter_num_heads) % 2:
            raise ValueError(
                f"adapter_model_dim {self.adapter_model_dim} must split into {self.adapter_num_heads} even-width heads"
            )
        if self.adapter_model_dim != self.crossattn_emb_channels:
            raise ValueError(
                f"adapter width {self.adapter_model_dim} must equal crossattn_emb_channels {self.crossattn_emb_channels}"
            )

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads

    @property
    def mlp_channels(self) -> int:
        return round(self.model_channels * self.mlp_ratio)

    @property
    def adapter_mlp_channels(self) -> int:
        return round(self.adapter_model_dim * self.adapter_mlp_ratio)

    @property
    def patch_features(self) -> int:
        """Input width of the patch embedding: (latent channels + padding-mask channel) * patch volume."""
        return (self.in_channels + 1) * self.patch_spatial**2 * self.patch_temporal


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight; statistics in float32, result cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            # One fused kernel on CUDA (float32 statistics inside), no float32 copy of x.
            with autocast_off(x):
                return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight.to(x.dtype)


def _autocast_device_type(x: torch.Tensor) -> str:
    # Meta tensors stand for CUDA ones: bench/bench_step_traffic.py counts the CUDA autocast step on them.
    return "cuda" if x.device.type == "meta" else x.device.type


def autocast_off(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context without autocast for x's device type (a no-op when autocast is off there).

    Used around norms whose kernels already keep float32 statistics for 16-bit inputs: autocast would otherwise
    cast their whole input to float32 first (layer_norm is on its float32 list) and return float32 activations.
    """
    device_type = _autocast_device_type(x)
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def compute_dtype(x: torch.Tensor, otherwise: torch.dtype | None = None) -> torch.dtype:
    """The dtype the next Linear computes in: autocast's when it is on for x's device, else ``otherwise`` (the
    Linear's weight dtype, where x may differ from it) or x's own."""
    device_type = _autocast_device_type(x)
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype if otherwise is None else otherwise


def layer_norm_no_affine(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=NORM_EPS)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift, returned in the compute dtype (see ``compute_dtype``).

    x: [B, L, D]; shift/scale: [B, 1, D]. float32 x computing in float32: the three ops of upstream's formula.
    Otherwise (16-bit x, or the float32 residual stream of float16 compute) (1 + scale) and shift of each sample
    are the norm kernel's own affine parameters, so h is computed in float32 inside that one kernel and rounded
    once to the compute dtype, as upstream's float32 h (CUDA autocast runs layer_norm in float32) is rounded where
    each Linear casts it; every Linear and LoRA reading h shares that one copy. One pass over x per sample; with
    several samples the rows are joined (one copy).
    """
    dtype = compute_dtype(x)
    if x.dtype == torch.float32 and dtype == torch.float32:
        return layer_norm_no_affine(x) * (1 + scale) + shift
    weight, bias = (1 + scale).to(x.dtype), shift.to(x.dtype)  # [B, 1, D]
    width = (x.shape[-1],)
    with autocast_off(x):
        if x.shape[0] == 1:  # x itself, not a slice: a slice's backward writes a zero-filled full-size gradient
            h = F.layer_norm(x, width, weight.reshape(-1), bias.reshape(-1), NORM_EPS)
        else:
            h = torch.cat([
                F.layer_norm(row, width, w.reshape(-1), b.reshape(-1), NORM_EPS)
                for row, w, b in zip(x.split(1), weight, bias)
            ])
    return h.to(dtype)  # a no-op when h is already in it


def gated_residual(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """x + gate * update; one fused kernel, except for float32 throughout (upstream's two ops).

    The float32 stream of float16 compute takes the float16 gate and update as they are: addcmul computes in
    float32 (no float16 product to overflow) without casting them first (autocast, off here, would)."""
    if x.dtype == torch.float32:
        if update.dtype == torch.float32:
            return x + gate * update
        with autocast_off(x):
            return torch.addcmul(x, gate, update)
    return torch.addcmul(x, gate.to(x.dtype), update.to(x.dtype))


def rope_tables(angles: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE angles [L, Dh] (float32) -> (cos, signed sin) [L, Dh] in dtype, the tables ``apply_rope`` takes.

    The signed sin is -sin on the first half of the lanes and sin on the second, so the rotation needs no
    negation pass: x * cos + roll(x, Dh/2) * signed_sin.
    """
    half = angles.shape[-1] // 2
    sin = angles.sin()
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return angles.cos().to(dtype), signed_sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Half-split ("rotate half") rotary embedding: lane j pairs with lane j + Dh/2.

    x: [B, L, H, Dh]; cos/signed_sin: [L, Dh] from ``rope_tables``. float32 x: rotation in float32 (the same bits
    as with cat(-x2, x1) * sin, negation being exact). 16-bit x: three kernels in x's dtype, no float32 copy.
    """
    rolled = x.roll(x.shape[-1] // 2, dims=-1)  # [x2, x1]
    cos, signed_sin = cos[:, None, :], signed_sin[:, None, :]
    if x.dtype == torch.float32:
        return x * cos.float() + rolled * signed_sin.float()
    return torch.addcmul(x * cos.to(x.dtype), rolled, signed_sin.to(x.dtype))


def _inverse_frequencies(dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """theta^(-2k/dim) for k in [0, dim/2), float32: [dim // 2]."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=device)[: dim // 2] / dim
    return 1.0 / (theta**exponents)


def video_rope_angles(
    frames: int, height: int, width: int, head_dim: int, ratios: tuple[float, float, float], device=None
) -> torch.Tensor:
    """3D RoPE angles for a (t, h, w) patch grid: [T*H*W, head_dim] float32, tokens in (t, h, w) row-major order.

    Lanes per token: [t-axis | h-axis | w-axis] angles, duplicated for the half-split rotation. The h/w axes get
    (head_dim // 6) * 2 lanes each, t the rest. Each axis uses NTK-scaled theta = 10000 * ratio^(dim / (dim - 2)).
    ratios = (h, w, t) extrapolation ratios.
    """
    dim_h = head_dim // 6 * 2
    dim_w = dim_h
    dim_t = head_dim - dim_h - dim_w

    def axis_angles(length: int, dim: int, ratio: float) -> torch.Tensor:
        theta = 10000.0 * ratio ** (dim / (dim - 2))
        positions = torch.arange(length, dtype=torch.float32, device=device)
        return torch.outer(positions, _inverse_frequencies(dim, theta, device))  # [length, dim/2]

    a_t = axis_angles(frames, dim_t, ratios[2])
    a_h = axis_angles(height, dim_h, ratios[0])
    a_w = axis_angles(width, dim_w, ratios[1])
    grid = torch.cat(
        [
            a_t[:, None, None, :].expand(frames, height, width, -1),
            a_h[None, :, None, :].expand(frames, height, width, -1),
            a_w[None, None, :, :].expand(frames, height, width, -1),
        ],
        dim=-1,
    ).reshape(frames * height * width, head_dim // 2)
    return torch.cat([grid, grid], dim=-1)


def sequence_rope_angles(length: int, head_dim: int, device=None, theta: float = 10000.0) -> torch.Tensor:
    """1D RoPE angles for positions 0..length-1: [length, head_dim] float32 (duplicated halves)."""
    positions = torch.arange(length, dtype=torch.float32, device=device)
    half = torch.outer(positions, _inverse_frequencies(head_dim, theta, device))
    return torch.cat([half, half], dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# LLM adapter: T5-token queries attend to Qwen3 hidden states and produce the DiT's text context.


class QKNormAttention(nn.Module):
    """Attention with per-head RMS QK-norm, as the DiT and the LLM adapter both use it: q/k/v projections,
    q/k norms, RoPE where given, the attention call; the output projection is applied by the subclass.

    The layers keep upstream's names (the checkpoint keys) and order (the order LoRA modules are made in):
    q_proj, k_proj, v_proj, the output projection (``output_name``), q_norm, k_norm."""

    def __init__(self, query_dim: int, kv_dim: int, num_heads: int, output_name: str):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = query_dim // num_heads
        self.q_proj = nn.Linear(query_dim, query_dim, bias=False)
        self.k_proj = nn.Linear(kv_dim, query_dim, bias=False)
        self.v_proj = nn.Linear(kv_dim, query_dim, bias=False)
        self.add_module(output_name, nn.Linear(query_dim, query_dim, bias=False))
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)

    def attend(
        self,
        x: torch.Tensor,
        kv: torch.Tensor,
        q_rope: tuple[torch.Tensor, torch.Tensor] | None,
        k_rope: tuple[torch.Tensor, torch.Tensor] | None,
        attn_mode: str,
        mask: torch.Tensor | None = None,
        split_batch: bool = False,
    ) -> torch.Tensor:
        """Queries from x [B, Lq, D], keys and values from kv [B, Lk, Dkv] -> [B, Lq, D] before the output
        projection. mask: key mask [B, Lk] (see library.models.attention)."""
        b, lq, _ = x.shape
        lk = kv.shape[1]
        q = self.q_norm(self.q_proj(x).view(b, lq, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(kv).view(b, lk, self.num_heads, self.head_dim))
        v = self.v_proj(kv).view(b, lk, self.num_heads, self.head_dim)
        if q_rope is not None:
            q = apply_rope(q, *q_rope)
        if k_rope is not None:
            k = apply_rope(k, *k_rope)
        return attention(q, k, v, attn_mode, mask=mask, split_batch=split_batch).reshape(b, lq, -1)


class AdapterAttention(QKNormAttention):
    o_proj: nn.Linear

    def __init__(self, query_dim: int, kv_dim: int, num_heads: int):
        super().__init__(query_dim, kv_dim, num_heads, output_name="o_proj")

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor,
        q_rope: tuple[torch.Tensor, torch.Tensor],
        k_rope: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        # The adapter is small and masked: always SDPA.
        return self.o_proj(self.attend(x, kv, q_rope, k_rope, "torch", mask=key_mask))


class LLMAdapterTransformerBlock(nn.Module):
    # Class name as upstream's: LyCORIS' presets and sd-scripts select the adapter blocks by it.
    def __init__(self, source_dim: int, model_dim: int, num_heads: int, mlp_channels: int):
        super().__init__()
        self.norm_self_attn = RMSNorm(model_dim)
        self.self_attn = AdapterAttention(model_dim, model_dim, num_heads)
        self.norm_cross_attn = RMSNorm(model_dim)
        self.cross_attn = AdapterAttention(model_dim, source_dim, num_heads)
        self.norm_mlp = RMSNorm(model_dim)
        self.mlp = nn.Sequential(nn.Linear(model_dim, mlp_channels), nn.GELU(), nn.Linear(mlp_channels, model_dim))

    def forward(
        self,
        x: torch.Tensor,
        source: torch.Tensor,
        target_rope: tuple[torch.Tensor, torch.Tensor],
        source_rope: tuple[torch.Tensor, torch.Tensor],
        target_mask: torch.Tensor | None,
        source_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        h = self.norm_self_attn(x)
        x = x + self.self_attn(h, h, target_rope, target_rope, target_mask)
        # Keys/values read the raw source states (no norm on the source side).
        x = x + self.cross_attn(self.norm_cross_attn(x), source, target_rope, source_rope, source_mask)
        return x + self.mlp(self.norm_mlp(x))


class LLMAdapter(nn.Module):
    """Maps Qwen3 hidden states + T5 token ids to a [B, St, model_dim] context."""

    def __init__(self, source_dim: int, model_dim: int, num_layers: int, num_heads: int, mlp_channels: int, vocab: int):
        super().__init__()
        self.head_dim = model_dim // num_heads
        self.embed = nn.Embedding(vocab, model_dim)
        self.blocks = nn.ModuleList(
            [LLMAdapterTransformerBlock(source_dim, model_dim, num_heads, mlp_channels) for _ in range(num_layers)]
        )
        self.out_proj = nn.Linear(model_dim, model_dim)
        self.norm = RMSNorm(model_dim)

    def forward(
        self,
        source_hidden_states: torch.Tensor,
        target_input_ids: torch.Tensor,
        target_attention_mask: torch.Tensor | None = None,
        source_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """source_hidden_states: [B, Sq, Ds]; target_input_ids: [B, St]; masks: [B, S] (1 = real token).

        Returns [B, St, model_dim]; rows at padded target positions are computed, not zeroed (see
        ``Anima.encode_text``).
        """
        x = self.embed(target_input_ids)
        source = source_hidden_states.to(x.dtype)
        device = x.device
        target_angles = sequence_rope_angles(x.shape[1], self.head_dim, device)
        source_angles = sequence_rope_angles(source.shape[1], self.head_dim, device)
        target_rope = rope_tables(target_angles, torch.float32)
        source_rope = rope_tables(source_angles, torch.float32)
        target_mask = None if target_attention_mask is None else target_attention_mask.bool()
        source_mask = None if source_attention_mask is None else source_attention_mask.bool()
        for block in self.blocks:
            x = block(x, source, target_rope, source_rope, target_mask, source_mask)
        return self.norm(self.out_proj(x))


# ---------------------------------------------------------------------------------------------------------------
# DiT


class PatchToTokens(nn.Module):
    """[B, C, T, H, W] -> [B, T/pt, H/p, W/p, C*pt*p*p], features ordered (c, t-offset, row-offset, col-offset)."""

    def __init__(self, patch_spatial: int, patch_temporal: int):
        super().__init__()
        self.p = patch_spatial
        self.pt = patch_temporal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        p, pt = self.p, self.pt
        x = x.reshape(b, c, t // pt, pt, h // p, p, w // p, p)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # b, t', h', w', c, r, m, n
        return x.reshape(b, t // pt, h // p, w // p, c * pt * p * p)


class PatchEmbed(nn.Module):
    def __init__(self, patch_spatial: int, patch_temporal: int, in_features: int, model_channels: int):
        super().__init__()
        # Slot 0 is the parameter-free rearrange, so the Linear is stored as ``proj.1``.
        self.proj = nn.Sequential(
            PatchToTokens(patch_spatial, patch_temporal), nn.Linear(in_features, model_channels, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # [B, T', H', W', D]


class SinusoidalTimesteps(nn.Module):
    """t [B] -> [B, 1, D] float32 features [cos | sin], frequencies exp(-ln(10000) k / (D/2))."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float().reshape(-1, 1, 1) * freqs  # [B, 1, half]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """Sinusoid -> (the sinusoid itself, adaLN-LoRA term [B, 1, 3D]) as used with adaLN-LoRA."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim, bias=False)
        self.activation = nn.SiLU()
        self.linear_2 = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, sinusoid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The sinusoid goes on in float32 (to t_embedding_norm and the adaLN SiLUs, as upstream keeps it); only the
        # adaLN-LoRA branch computes in the Linear's dtype.
        hidden = self.activation(self.linear_1(sinusoid.to(compute_dtype(sinusoid, self.linear_1.weight.dtype))))
        return sinusoid, self.linear_2(hidden)


class AdaLNModulation(nn.Sequential):
    """SiLU -> low-rank down -> up (keys ``.1.weight`` and ``.2.weight``): emb [B, 1, D] -> [B, 1, chunks * D].

    The SiLU runs in emb's dtype (float32 for the normed timestep embedding, as upstream) and its result is cast
    once to the dtype the down projection computes in.
    """

    def __init__(self, model_channels: int, adaln_lora_dim: int, chunks: int):
        super().__init__(
            nn.SiLU(),
            nn.Linear(model_channels, adaln_lora_dim, bias=False),
            nn.Linear(adaln_lora_dim, chunks * model_channels, bias=False),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        activation, down, up = self[0], self[1], self[2]
        hidden = activation(emb)
        return up(down(hidden.to(compute_dtype(hidden, down.weight.dtype))))


class DiTAttention(QKNormAttention):
    """Self- or cross-attention with per-head RMS QK-norm; RoPE only when given (self-attention)."""

    output_proj: nn.Linear

    def __init__(self, query_dim: int, context_dim: int, num_heads: int):
        super().__init__(query_dim, context_dim, num_heads, output_name="output_proj")

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        attn_mode: str,
        split_attn: bool,
    ) -> torch.Tensor:
        # No mask: zero (padded) context rows take part in the softmax on purpose.
        return self.output_proj(self.attend(x, context, rope, rope, attn_mode, split_batch=split_attn))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden, bias=False)
        self.activation = nn.GELU()
        self.layer2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.activation(self.layer1(x)))


class Block(nn.Module):
    """Pre-norm DiT block: gated self-attention, cross-attention and MLP, each modulated by adaLN-LoRA."""

    def __init__(self, config: AnimaConfig):
        super().__init__()
        d = config.model_channels
        self.self_attn = DiTAttention(d, d, config.num_heads)
        self.cross_attn = DiTAttention(d, config.crossattn_emb_channels, config.num_heads)
        self.mlp = FeedForward(d, config.mlp_channels)
        self.adaln_modulation_self_attn = AdaLNModulation(d, config.adaln_lora_dim, 3)
        self.adaln_modulation_cross_attn = AdaLNModulation(d, config.adaln_lora_dim, 3)
        self.adaln_modulation_mlp = AdaLNModulation(d, config.adaln_lora_dim, 3)
        self.gradient_checkpointing = False
        self.checkpoint_offload: str | None = None  # None, CPU_OFFLOAD or UNSLOTH_OFFLOAD
        self.compiled_body = None  # torch.compile'd _body (Anima.compile_blocks), run inside the checkpointing

    def _body(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        adaln_lora: torch.Tensor,
        attn_mode: str,
        split_attn: bool,
    ) -> torch.Tensor:
        # x: [B, L, D]; emb: [B, 1, D]; adaln_lora: [B, 1, 3D] (shared by every sub-layer)
        # rope_cos/rope_sin: [L, Dh] from rope_tables. h is made once per sub-layer in the compute dtype and
        # shared by q/k/v and their LoRA downs.
        shift, scale, gate = (self.adaln_modulation_self_attn(emb) + adaln_lora).chunk(3, dim=-1)
        h = modulate(x, shift, scale)
        x = gated_residual(x, gate, self.self_attn(h, h, (rope_cos, rope_sin), attn_mode, split_attn))

        shift, scale, gate = (self.adaln_modulation_cross_attn(emb) + adaln_lora).chunk(3, dim=-1)
        h = modulate(x, shift, scale)
        x = gated_residual(x, gate, self.cross_attn(h, context, None, attn_mode, split_attn))

        shift, scale, gate = (self.adaln_modulation_mlp(emb) + adaln_lora).chunk(3, dim=-1)
        h = modulate(x, shift, scale)
        return gated_residual(x, gate, self.mlp(h))

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        adaln_lora: torch.Tensor,
        attn_mode: str = "torch",
        split_attn: bool = False,
    ) -> torch.Tensor:
        args = (x, emb, context, rope_cos, rope_sin, adaln_lora, attn_mode, split_attn)
        body = self._body if self.compiled_body is None else self.compiled_body
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            if self.checkpoint_offload is None:
                return checkpoint(body, *args, use_reentrant=False)
            body = functools.partial(body, attn_mode=attn_mode, split_attn=split_attn)
            return checkpoint_with_cpu_offload(
                body, *args[:6], asynchronous=self.checkpoint_offload == UNSLOTH_OFFLOAD
            )
        return body(*args)


class FinalLayer(nn.Module):
    def __init__(self, config: AnimaConfig):
        super().__init__()
        d = config.model_channels
        out_features = config.patch_spatial**2 * config.patch_temporal * config.out_channels
        self.linear = nn.Linear(d, out_features, bias=False)
        self.adaln_modulation = AdaLNModulation(d, config.adaln_lora_dim, 2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, adaln_lora: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        shift, scale = (self.adaln_modulation(emb) + adaln_lora[..., : 2 * d]).chunk(2, dim=-1)
        return self.linear(modulate(x, shift, scale))


# Graphs torch.compile keeps per DiT block for the modes a block runs in: the training forward, the no-grad first
# pass of CPU-offload checkpointing and the eval forward of sampling and validation; one to spare.
GRAPHS_PER_BLOCK = 4
# From this release on, torch.compile no longer guards on the identity of each forward hook (the LoRA's), so the
# blocks share their graphs; before it, every block compiles its own (seen on 2.6 to 2.10; 2.11 shares).
ONE_GRAPH_FOR_ALL_BLOCKS_SINCE = "2.11"


def blocks_share_compiled_graphs(torch_version: str | None = None) -> bool:
    """Whether this PyTorch release (default: the running one) lets every DiT block use the same compiled graphs."""
    return torch.torch_version.TorchVersion(torch_version or torch.__version__) >= ONE_GRAPH_FOR_ALL_BLOCKS_SINCE


def graphs_needed_per_function(num_blocks: int, torch_version: str | None = None) -> int:
    """How many graphs torch._dynamo must keep for the blocks' shared body code under this PyTorch release."""
    if blocks_share_compiled_graphs(torch_version):
        return 2 * GRAPHS_PER_BLOCK  # shared by every block; the first block's input needs no grad, the others' do
    return GRAPHS_PER_BLOCK * num_blocks


class Anima(nn.Module):
    """MiniTrainDIT velocity predictor with the LLM adapter as ``llm_adapter``.

    attn_mode / split_attn are plain attributes and may be changed after construction.
    """

    def __init__(self, config: AnimaConfig, attn_mode: str = "torch", split_attn: bool = False):
        super().__init__()
        self.config = config
        self.attn_mode = attn_mode
        self.split_attn = split_attn
        d = config.model_channels
        self.x_embedder = PatchEmbed(config.patch_spatial, config.patch_temporal, config.patch_features, d)
        self.t_embedder = nn.Sequential(SinusoidalTimesteps(d), TimestepEmbedding(d))
        # Registration order = named_modules() order, which sets the order (and so, for one seed, the initial
        # weights) of the LoRA modules; it is sd-scripts' order: embedders, adapter, blocks, final layer, norm.
        self.llm_adapter = LLMAdapter(
            config.adapter_source_dim,
            config.adapter_model_dim,
            config.adapter_num_layers,
            config.adapter_num_heads,
            config.adapter_mlp_channels,
            config.adapter_vocab_size,
        )
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.num_blocks)])
        self.final_layer = FinalLayer(config)
        self.t_embedding_norm = RMSNorm(d)
        # (T', H', W', device, dtype) -> rope_tables [L, head_dim]; derived data, never in the state dict.
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.block_swapper: BlockSwapper | None = None

    @property
    def attn_mode(self) -> str:
        return self._attn_mode

    @attn_mode.setter
    def attn_mode(self, mode: str) -> None:
        self._attn_mode = normalize_attn_mode(mode)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj[1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.x_embedder.proj[1].weight.device

    def enable_gradient_checkpointing(self, cpu_offload: bool = False, unsloth_offload: bool = False) -> None:
        """Recompute each DiT block in backward; acts only in training mode with grad enabled.

        Plain: non-reentrant torch checkpointing (block inputs stay on the device). ``cpu_offload``: block inputs
        kept in CPU memory, blocking copies. ``unsloth_offload``: the same with asynchronous copies (side stream,
        pinned memory). See ``library.models.offload_checkpointing``. Offloading excludes block swap.
        """
        offload = checkpoint_offload_mode(cpu_offload, unsloth_offload, block_swap=self.block_swapper is not None)
        for block in self.blocks:
            block.gradient_checkpointing = True
            block.checkpoint_offload = offload

    def disable_gradient_checkpointing(self) -> None:
        for block in self.blocks:
            block.gradient_checkpointing = False
            block.checkpoint_offload = None

    def compile_blocks(
        self, backend: str = "inductor", mode: str | None = None, dynamic: bool | None = None, fullgraph: bool = False,
        cache_size_limit: int | None = None,
    ) -> None:
        """``torch.compile`` every DiT block's computation (``--compile``), one compiled function per block.

        What is compiled is the block body: gradient checkpointing, CPU-offload checkpointing and block swap stay
        eager around it (their copies, streams and autograd hooks are host-side bookkeeping). The LoRA hooks of
        the block's Linear layers and float8 weights (``--fp8_base``) are traced into the graph. Parameters are
        graph inputs, so block swap re-pointing a block at another device slot needs no recompilation; modes
        that capture CUDA graphs (fixed addresses) are refused with block swap by the trainer.

        ``cache_size_limit`` (``--compile_cache_size_limit``) sets torch._dynamo's limit of graphs per compiled
        function. Without it, the limit is raised where this PyTorch needs more than its default (see
        ``graphs_needed_per_function``), so that no block silently falls back to eager.
        """
        import torch._dynamo

        if cache_size_limit is not None:
            torch._dynamo.config.cache_size_limit = cache_size_limit
        else:
            needed = graphs_needed_per_function(len(self.blocks))
            if torch._dynamo.config.cache_size_limit < needed:
                logger.info(
                    "PyTorch %s compiles a graph of its own for every DiT block (2.11 and newer share one across "
                    "blocks): torch._dynamo cache_size_limit raised from %d to %d so that no block falls back to "
                    "eager; --compile_cache_size_limit sets it", torch.__version__,
                    torch._dynamo.config.cache_size_limit, needed)
                torch._dynamo.config.cache_size_limit = needed
        for block in self.blocks:
            block.compiled_body = torch.compile(
                block._body, backend=backend, mode=mode, dynamic=dynamic, fullgraph=fullgraph
            )

        # ---- block swap (library.models.block_swap) -----------------------------------------------------------------------

    def enable_block_swap(self, num_blocks: int, device: torch.device) -> None:
        """Keep the weights of ``num_blocks`` DiT blocks in CPU memory and stream them in during forward/backward.

        The block weights move to (pinned) CPU memory now; then call ``move_to_device_except_swap_blocks(device)``
        and ``prepare_block_swap_before_forward()``. Block weights must stay frozen and must not be moved with
        ``.to()`` afterwards (checked at every forward).
        """
        offload = next((block.checkpoint_offload for block in self.blocks if block.checkpoint_offload), None)
        checkpoint_offload_mode(offload == CPU_OFFLOAD, offload == UNSLOTH_OFFLOAD, block_swap=True)
        self.block_swapper = BlockSwapper(self.blocks, num_blocks, device)

    def move_to_device_except_swap_blocks(self, device: torch.device) -> None:
        """Move everything but the swapped block weights (embedders, final layer, adapter, block buffers)."""
        for name, child in self.named_children():
            if name != "blocks":
                child.to(device)
        for block in self.blocks:
            for module in block.modules():
                for key, buffer in module.named_buffers(recurse=False):
                    module._buffers[key] = buffer.to(device)

    def prepare_block_swap_before_forward(self) -> None:
        """Put the blocks in the starting layout (first N - n on the device); a no-op without block swap."""
        if self.block_swapper is not None:
            self.block_swapper.prepare()

    def switch_block_swap_for_inference(self) -> None:
        """Forward-only swapping (sampling): every block leaves after it ran."""
        if self.block_swapper is not None:
            self.block_swapper.forward_only = True
            self.block_swapper.prepare()

    def switch_block_swap_for_training(self) -> None:
        if self.block_swapper is not None:
            self.block_swapper.forward_only = False
            self.block_swapper.prepare()

    def rope_angles(self, frames: int, height: int, width: int, device=None) -> torch.Tensor:
        """3D RoPE angle table for a patch grid (T', H', W'): [T'*H'*W', head_dim] float32."""
        c = self.config
        ratios = (c.rope_h_extrapolation_ratio, c.rope_w_extrapolation_ratio, c.rope_t_extrapolation_ratio)
        return video_rope_angles(frames, height, width, c.head_dim, ratios, device)

    def _rope_cos_sin(
        self, frames: int, height: int, width: int, device: torch.device, dtype: torch.dtype = torch.float32
    ):
        """rope_tables for the grid in the dtype the rotation runs in (float32, or the 16-bit q/k dtype)."""
        key = (frames, height, width, str(device), dtype)
        cached = self._rope_cache.get(key)
        if cached is None:
            angles = self.rope_angles(frames, height, width, device)
            cached = rope_tables(angles, dtype)
            self._rope_cache[key] = cached
        return cached

    def encode_text(
        self,
        qwen3_embeds: torch.Tensor,
        qwen3_mask: torch.Tensor,
        t5_ids: torch.Tensor,
        t5_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Run the LLM adapter: qwen3_embeds [B, Lq, Dq], masks [B, L] (1 = token), t5_ids [B, Lt] -> [B, Lt, D].

        Rows at T5 padding positions are set to exactly 0 (they still take part, as zeros, in the DiT's
        cross-attention). An all-zero Qwen3 mask (empty prompt) gives a finite context.
        """
        out = self.llm_adapter(qwen3_embeds, t5_ids, target_attention_mask=t5_mask, source_attention_mask=qwen3_mask)
        keep = t5_mask.to(device=out.device).bool()[..., None]
        return torch.where(keep, out, torch.zeros_like(out))

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        crossattn_emb: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [B, C, T, H, W] noisy latents; timesteps: [B] sigma in [0, 1]; crossattn_emb: [B, S, Dc].

        padding_mask: [B, 1, H, W] or None (zeros). Returns the velocity prediction [B, C_out, T, H, W] in the
        activation dtype.
        """
        c = self.config
        if x.ndim != 5:
            raise ValueError(f"expected latents [B, C, T, H, W], got shape {tuple(x.shape)}")
        b, _, t, h, w = x.shape
        p, pt = c.patch_spatial, c.patch_temporal
        if h % p or w % p or t % pt:
            raise ValueError(f"latent size (T={t}, H={h}, W={w}) must be a multiple of the patch ({pt}, {p}, {p})")
        if timesteps.numel() != b:
            raise ValueError(f"expected one timestep per sample ([{b}]), got shape {tuple(timesteps.shape)}")
        dtype = self.dtype

        if padding_mask is None:
            padding_mask = torch.zeros(b, 1, h, w, device=x.device, dtype=dtype)
        elif padding_mask.shape[-2:] != (h, w):
            padding_mask = F.interpolate(padding_mask.float(), size=(h, w), mode="nearest")
        mask = padding_mask.to(device=x.device, dtype=dtype)[:, :, None].expand(b, 1, t, h, w)
        x = torch.cat([x.to(dtype), mask], dim=1)  # [B, C+1, T, H, W]

        x = self.x_embedder(x)  # [B, T', H', W', D]
        grid = x.shape[1:4]
        x = x.flatten(1, 3)  # [B, L, D]
        device_type = _autocast_device_type(x)
        if torch.is_autocast_enabled(device_type):
            x = x.to(residual_stream_dtype(torch.get_autocast_dtype(device_type)))

        sinusoid, adaln_lora = self.t_embedder(timesteps.reshape(b))  # [B, 1, D], [B, 1, 3D]
        emb = self.t_embedding_norm(sinusoid)
        rope_cos, rope_sin = self._rope_cos_sin(*grid, x.device, compute_dtype(x))
        context = crossattn_emb.to(dtype)

        swapper = self.block_swapper
        if swapper is not None:
            swapper.begin_forward()
        for index, block in enumerate(self.blocks):
            if swapper is not None:
                swapper.before_block(index)
            x = block(x, emb, context, rope_cos, rope_sin, adaln_lora, self.attn_mode, self.split_attn)
            if swapper is not None:
                x = swapper.after_block(index, x)

        x = self.final_layer(x, emb, adaln_lora)  # [B, L, p*p*pt*C_out]
        return self._unpatchify(x, grid)

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        # Output features are ordered (row-offset, col-offset, t-offset, channel): not the inverse of the input.
        c = self.config
        p, pt, co = c.patch_spatial, c.patch_temporal, c.out_channels
        tg, hg, wg = grid
        x = x.reshape(x.shape[0], tg, hg, wg, p, p, pt, co)
        x = x.permute(0, 7, 1, 6, 2, 4, 3, 5)  # b, c, t', pt, h', p1, w', p2
        return x.reshape(x.shape[0], co, tg * pt, hg * p, wg * p)

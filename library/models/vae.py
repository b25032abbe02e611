"""The Qwen-Image VAE (a fine-tuned Wan 2.1 causal video VAE), run as a 2-D image model.

Anima only ever encodes and decodes single images (T = 1). For one frame the causal 3-D network reduces
exactly to a 2-D one:

* a causal 3x3x3 conv pads time with two zero frames in front, so only the last temporal kernel slice
  ``weight[:, :, -1]`` ever meets data; a 1x1x1 conv is a 1x1 conv with ``weight[:, :, 0]``;
* the resamplers' ``time_conv`` only runs from the second temporal chunk on, i.e. never for one frame;
* the causal feature cache only carries frames between temporal chunks, so there is nothing to cache.

Parameters keep their 5-D checkpoint shapes and diffusers ``AutoencoderKLQwenImage`` names (state dicts
round-trip and load strictly, ``time_conv`` included); the 2-D kernels are sliced at run time.

Why not wrap diffusers' ``AutoencoderKLQwenImage``: it runs every conv as a 3-D conv on an input padded
with two zero time frames (3x the conv work and a padded copy of every activation) and clones each conv
input into its causal cache, which only pays off for video. This module does the image path with plain
2-D convs, no padded copies (except the chunks below) and no cache, so it is faster and uses less memory
for identical numbers (see ``bench/bench_vae.py``).

``chunk_size`` (``--vae_chunk_size``) computes the 3x3 convs in bands of input rows. Per band it also
applies the preceding norm + SiLU (both act per pixel) and, with autograd off, adds the conv output into
the residual sum in place. So the conv workspace, the normalized input, the upsamplers' 2x-upsampled
input and a separate block output only ever exist one band at a time; peak memory roughly halves (see
the bench). A band of n input rows gives n/2 output rows in the stride-2 downsamplers, so odd n are
rounded up to even. Results equal the unchunked ones up to float rounding.

``disable_cache`` (``--vae_disable_cache``) is accepted for compatibility; there is no cache on this path,
so it changes nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import AnimaError
from library.io.checkpoints import (
    VIDEO_VAE_KIND,
    check_not_scaled_float8,
    find_prefix,
    guess_checkpoint_kind,
    open_checkpoint,
    sample_keys,
)
from library.models.vae_keys import (
    DIFFUSERS_ANCHOR_KEY,
    ORIGINAL_ANCHOR_KEY,
    original_to_diffusers_keys,
)

logger = logging.getLogger(__name__)

SCALE_FACTOR = 8  # pixels per latent, in height and width
# Names how latents are computed; part of the latent caches' VAE identity, so that caches written by an
# earlier formula (float32 (mu - mean) / std; a float32 1/std; another RMS-norm order) are encoded again.
LATENT_NORMALISATION = "normalize-rms+inverse-of-rounded-std"
LATENT_CHANNELS = 16

# Per-channel statistics of the Qwen-Image latent space: latents = (posterior_mean - MEAN) / STD.
LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass(frozen=True)
class VAEConfig:
    """Widths of the network; the defaults are the real Qwen-Image VAE."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3


# ---------------------------------------------------------------------------------------------------------
# Row-chunked 2-D convolution


def _grad_free() -> bool:
    """In-place activation updates are only safe when autograd is not recording."""
    return not torch.is_grad_enabled()


def _conv2d_in_row_bands(
    read_padded_rows: Callable[[int, int], torch.Tensor],
    padded_height: int,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    out_rows_per_band: int,
    accumulate_into: torch.Tensor | None = None,
) -> torch.Tensor:
    """A 2-D conv (no padding of its own) computed band by band of output rows.

    ``read_padded_rows(p0, p1)`` returns rows [p0, p1) of the (virtually) padded input, already padded in
    width; it is asked only for the rows a band needs (its rows plus the kernel halo). With
    ``accumulate_into`` the bands are added to that tensor in place (a residual sum without a new tensor).
    """
    kernel_h = weight.shape[2]
    out_height = (padded_height - kernel_h) // stride + 1
    out = accumulate_into
    for o0 in range(0, out_height, out_rows_per_band):
        o1 = min(o0 + out_rows_per_band, out_height)
        band = F.conv2d(read_padded_rows(o0 * stride, (o1 - 1) * stride + kernel_h), weight, bias, stride=stride)
        if accumulate_into is not None:
            out[:, :, o0:o1] += band
            continue
        if out is None:
            out = band.new_empty(band.shape[0], band.shape[1], out_height, band.shape[3])
        out[:, :, o0:o1] = band
    assert out is not None
    return out


def _padded_row_reader(
    x: torch.Tensor,
    left: int,
    right: int,
    top: int,
    bottom: int,
    pre: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Callable[[int, int], torch.Tensor]:
    """Rows of ``pre(x)`` zero-padded by (left, right, top, bottom), materialising only the rows asked for.
    ``pre`` must act on each pixel on its own (norm + SiLU), so applying it to a band of rows is exact."""
    height = x.shape[2]

    def read(p0: int, p1: int) -> torch.Tensor:
        r0, r1 = p0 - top, p1 - top  # rows of x
        rows = x[:, :, max(r0, 0) : min(r1, height)]
        if pre is not None:
            rows = pre(rows)
        return F.pad(rows, (left, right, max(0, -r0), max(0, r1 - height))).contiguous()  # see CausalConv3d

    return read


def _upsampled_padded_row_reader(x: torch.Tensor, pad: int) -> Callable[[int, int], torch.Tensor]:
    """Rows of nearest-x2-upsampled ``x`` zero-padded by ``pad`` on every side, upsampling only those rows."""
    up_height = 2 * x.shape[2]

    def read(p0: int, p1: int) -> torch.Tensor:
        u0, u1 = p0 - pad, p1 - pad  # rows of the upsampled image
        v0, v1 = max(u0, 0), min(u1, up_height)
        source = x[:, :, v0 // 2 : (v1 - 1) // 2 + 1]
        rows = F.interpolate(source, scale_factor=2.0, mode="nearest-exact")
        rows = rows[:, :, v0 - 2 * (v0 // 2) : v1 - 2 * (v0 // 2)]
        return F.pad(rows, (pad, pad, max(0, -u0), max(0, u1 - up_height)))

    return read


# ---------------------------------------------------------------------------------------------------------
# Building blocks (module and parameter names follow diffusers' AutoencoderKLQwenImage)


class CausalConv3d(nn.Conv3d):
    """A causal 3-D conv kept in its checkpoint shape, run on single frames as a 2-D conv.

    Input and output are 4-D ``[N, C, H, W]`` (one frame). For one frame the zero time-padding in front
    means only the last temporal kernel slice contributes, which is what ``forward`` uses.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        padding: int = 0,
        stride: tuple[int, int, int] = (1, 1, 1),
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        self.spatial_padding = padding
        self.chunk_size: int | None = None  # input rows per band; None = whole image

    def forward(
        self,
        x: torch.Tensor,
        pre: Callable[[torch.Tensor], torch.Tensor] | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """conv(pre(x)) + residual. ``pre`` is a per-pixel op (norm + SiLU). When chunked, ``pre`` runs band by
        band and, with autograd off, the result is accumulated into ``residual`` in place, so neither
        pre(x) nor a separate output ever exists at full size."""
        weight = self.weight[:, :, -1]  # [O, I, kH, kW]
        pad = self.spatial_padding
        if self.chunk_size is None or weight.shape[2] == 1 or x.shape[2] <= self.chunk_size:
            # Contiguous, as sd-scripts' F.pad output is: a channels-last input (after the mid-block
            # attention) picks another conv kernel, which sums in another order.
            out = F.conv2d((x if pre is None else pre(x)).contiguous(), weight, self.bias, padding=pad)
        else:
            reader = _padded_row_reader(x, pad, pad, pad, pad, pre)
            if residual is not None and _grad_free():
                return _conv2d_in_row_bands(
                    reader, x.shape[2] + 2 * pad, weight, self.bias, 1, self.chunk_size, residual
                )
            out = _conv2d_in_row_bands(reader, x.shape[2] + 2 * pad, weight, self.bias, 1, self.chunk_size)
        if residual is None:
            return out
        return out.add_(residual) if _grad_free() else out + residual


class ChannelRMSNorm(nn.Module):
    """y = F.normalize(x, dim=channels) * sqrt(C) * gamma: no epsilon beyond normalize's 1e-12 floor, no bias.

    ``gamma`` is (C, 1, 1, 1) in residual blocks and heads, (C, 1, 1) in attention, as in the checkpoint.
    The ops and their order are sd-scripts' (normalize, times the Python-float scale, times gamma), so float32
    results round the same; without autograd the two products run in place on normalize's fresh output.
    """

    def __init__(self, dim: int, image_shaped_gamma: bool = False) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if image_shaped_gamma else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, C, H, W]
        channels = x.shape[1]
        scale = channels**0.5
        y = F.normalize(x, dim=1)
        gamma = self.gamma.reshape(channels, 1, 1)
        return y.mul_(scale).mul_(gamma) if _grad_free() else y * scale * gamma


def _norm_silu(norm: ChannelRMSNorm) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: F.silu(norm(x), inplace=_grad_free())  # the norm's output is fresh, so in-place is safe


class ResidualBlock(nn.Module):
    """x + conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))), with a 1x1 conv on the skip path when widths differ.

    With chunking and autograd off, an identity skip sums into ``x`` in place: block inputs are always
    intermediates of this model, never the caller's tensor.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm1 = ChannelRMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = ChannelRMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        h = self.conv1(x, pre=_norm_silu(self.norm1))
        return self.conv2(h, pre=_norm_silu(self.norm2), residual=shortcut)  # dropout is 0 in this model


class MidAttention(nn.Module):
    """Single-head self-attention over all H*W positions (head dim = C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = ChannelRMSNorm(dim, image_shaped_gamma=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        qkv = self.to_qkv(self.norm(x)).view(batch, 3, channels, height * width)
        # Contiguous q/k/v matter: strided ones make CPU SDPA fall back to materialising the full
        # (H*W)^2 attention matrix (2.3 GiB more at 1024^2 input).
        qkv = qkv.transpose(2, 3).contiguous()  # [N, 3, H*W, C]
        q, k, v = (t.unsqueeze(1) for t in qkv.unbind(1))  # each [N, 1, H*W, C]
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        h = self.proj(h)
        return h.add_(x) if _grad_free() else h + x


class MidBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([MidAttention(dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class Resample(nn.Module):
    """x2 spatial down- or upsampling.

    down: zero-pad right/bottom by 1, 3x3 conv stride 2 (C -> C).
    up:   nearest x2, 3x3 conv pad 1 (C -> C/2).
    ``resample`` mirrors the checkpoint layout: slot 0 is the parameter-free pad/upsample (done inline
    here), slot 1 the conv. ``time_conv`` (3-D variants) only acts between video chunks, so it is loaded
    but never run on images.
    """

    def __init__(self, dim: int, upsample: bool, temporal: bool) -> None:
        super().__init__()
        self.upsample = upsample
        out_dim = dim // 2 if upsample else dim
        conv = nn.Conv2d(dim, out_dim, 3, padding=1) if upsample else nn.Conv2d(dim, dim, 3, stride=2)
        self.resample = nn.ModuleList([nn.Identity(), conv])
        if temporal:
            time_out = dim * 2 if upsample else dim
            time_stride = (1, 1, 1) if upsample else (2, 1, 1)
            self.time_conv = CausalConv3d(dim, time_out, (3, 1, 1), stride=time_stride)
        self.chunk_size: int | None = None  # input rows per band; None = whole image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.resample[1]
        height = x.shape[2]
        if self.upsample:
            if self.chunk_size is None or height <= self.chunk_size:
                return conv(F.interpolate(x, scale_factor=2.0, mode="nearest-exact"))
            # Bands of chunk_size source rows -> 2*chunk_size output rows.
            reader = _upsampled_padded_row_reader(x, 1)
            return _conv2d_in_row_bands(reader, 2 * height + 2, conv.weight, conv.bias, 1, 2 * self.chunk_size)
        if self.chunk_size is None or height <= self.chunk_size:
            return conv(F.pad(x, (0, 1, 0, 1)))
        reader = _padded_row_reader(x, 0, 1, 0, 1)
        return _conv2d_in_row_bands(reader, height + 1, conv.weight, conv.bias, 2, self.chunk_size // 2)


class UpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_resnets: int, upsample_temporal: bool | None) -> None:
        super().__init__()
        dims = [in_dim] + [out_dim] * num_resnets
        self.resnets = nn.ModuleList([ResidualBlock(a, b) for a, b in zip(dims[:-1], dims[1:])])
        # upsample_temporal None: the last stage, which has no upsampler.
        self.upsamplers = nn.ModuleList(
            [] if upsample_temporal is None else [Resample(out_dim, upsample=True, temporal=upsample_temporal)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resnets:
            x = block(x)
        for upsampler in self.upsamplers:
            x = upsampler(x)
        return x


class VAEEncoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        self.conv_in = CausalConv3d(config.in_channels, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        last_stage = len(config.dim_mult) - 1
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if stage != last_stage:
                blocks.append(Resample(out_dim, upsample=False, temporal=config.temporal_downsample[stage]))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = ChannelRMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * config.z_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 3, H, W] -> [N, 2*z, H/8, W/8]
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(x, pre=_norm_silu(self.norm_out))


class VAEDecoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        mults = config.dim_mult
        dims = [config.base_dim * m for m in (mults[-1], *reversed(mults))]
        temporal_upsample = tuple(reversed(config.temporal_downsample))
        self.conv_in = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        blocks = []
        last_stage = len(mults) - 1
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if stage > 0:
                in_dim //= 2  # the previous upsampler halved the channels
            temporal = temporal_upsample[stage] if stage != last_stage else None
            blocks.append(UpBlock(in_dim, out_dim, config.num_res_blocks + 1, temporal))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = ChannelRMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], config.in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, z, h, w] -> [N, 3, 8h, 8w]
        x = self.conv_in(x)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(x, pre=_norm_silu(self.norm_out))


# ---------------------------------------------------------------------------------------------------------
# The model


def _check_pixel_range(pixels: torch.Tensor) -> None:
    """Images scaled to [0, 255] (or other ranges) would encode to plausible-looking wrong latents."""
    largest = pixels.detach().abs().amax().item()
    if largest > 1.0 + 1e-3:
        raise AnimaError(
            f"Qwen-Image VAE: pixels must be in [-1, 1] but reach {largest:.4g}; "
            "scale 8-bit images as (x / 255 - 0.5) / 0.5"
        )


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise AnimaError(
            f"--vae_chunk_size must be a positive integer (got {chunk_size!r}); omit it to disable chunking"
        )


class QwenImageVAE(nn.Module):
    """Qwen-Image VAE for single images. ``state_dict()`` keys equal diffusers ``AutoencoderKLQwenImage``'s."""

    def __init__(
        self, config: VAEConfig = VAEConfig(), chunk_size: int | None = None, disable_cache: bool = False
    ) -> None:
        super().__init__()
        self.config = config
        self.encoder = VAEEncoder(config)
        self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = VAEDecoder(config)
        # Kept for CLI compatibility (--vae_disable_cache): the image path has no causal cache, so this
        # changes nothing numerically or in memory.
        self.disable_cache = disable_cache
        self.chunk_size: int | None = None
        self.set_chunk_size(chunk_size)

    # -- properties ---------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def set_chunk_size(self, chunk_size: int | None) -> None:
        """Compute 3x3 convs in bands of ``chunk_size`` input rows (None: whole image). Odd sizes are
        rounded up to even, because stride-2 downsamplers turn a band of n rows into n/2 rows."""
        _check_chunk_size(chunk_size)
        if chunk_size is not None and chunk_size % 2:
            logger.info(
                "--vae_chunk_size %d is odd; using %d (the stride-2 downsamplers need an even band height)",
                chunk_size,
                chunk_size + 1,
            )
            chunk_size += 1
        self.chunk_size = chunk_size
        for module in self.modules():
            if isinstance(module, (CausalConv3d, Resample)):
                module.chunk_size = chunk_size

    # -- core ---------------------------------------------------------------------------------------------

    def _to_frame(self, x: torch.Tensor, what: str, channels: int, multiple: int) -> tuple[torch.Tensor, bool]:
        """Accept [B, C, H, W] or [B, C, 1, H, W]; return the 4-D frame cast to the model and whether it was 5-D."""
        was_5d = x.dim() == 5
        if was_5d:
            if x.shape[2] != 1:
                raise AnimaError(
                    f"Qwen-Image VAE: {what} has {x.shape[2]} frames; only single images (T=1) are supported"
                )
            x = x[:, :, 0]
        if x.dim() != 4 or x.shape[1] != channels:
            raise AnimaError(
                f"Qwen-Image VAE: {what} must be [B, {channels}, H, W] or [B, {channels}, 1, H, W], got {tuple(x.shape)}"
            )
        if x.shape[2] % multiple or x.shape[3] % multiple:
            raise AnimaError(
                f"Qwen-Image VAE: {what} size {x.shape[2]}x{x.shape[3]} is not a multiple of {multiple}; "
                "resize/crop the image, or use a bucket step (bucket_reso_steps) that is a multiple of 16"
            )
        return x.to(device=self.device, dtype=self.dtype), was_5d

    def _posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.quant_conv(self.encoder(pixels))  # [B, 2*z, h, w]
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std) as [1, 16, 1, 1] in `like`'s dtype. As in sd-scripts, std is rounded to that dtype first
        and the reciprocal taken there, and the normalisation runs in the latents' own dtype: a bf16 VAE then
        caches the same latents bit for bit (float32 constants, or a float32 reciprocal rounded afterwards,
        give other bf16 latents in about a third of the elements)."""
        mean = torch.tensor(LATENTS_MEAN, dtype=torch.float32).view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.tensor(LATENTS_STD, dtype=torch.float32).view(1, -1, 1, 1).to(like.device, like.dtype)
        return mean, 1.0 / std

    # -- public API ---------------------------------------------------------------------------------------

    def encode_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [B, 3, H, W] (or [B, 3, 1, H, W]) in [-1, 1] -> (mean, logvar), each [B, 16, H/8, W/8]
        (same rank as the input); logvar is clamped to [-30, 20]."""
        x, was_5d = self._to_frame(pixels, "pixels", self.config.in_channels, SCALE_FACTOR)
        _check_pixel_range(x)
        mean, logvar = self._posterior(x)
        if was_5d:
            return mean.unsqueeze(2), logvar.unsqueeze(2)
        return mean, logvar

    def encode_pixels_to_latents(self, pixels: torch.Tensor, check_range: bool = True) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> normalized latents [B, 16, H/8, W/8] (posterior mean, no sampling):
        (mean - LATENTS_MEAN) * (1 / LATENTS_STD). 5-D [B, 3, 1, H, W] input gives 5-D output. `check_range=False`
        skips the range check (a device read) for pixels that are in range by construction."""
        x, was_5d = self._to_frame(pixels, "pixels", self.config.in_channels, SCALE_FACTOR)
        if check_range:
            _check_pixel_range(x)
        mu, _ = self._posterior(x)
        stat_mean, inv_std = self._latent_stats(mu)
        latents = (mu - stat_mean) * inv_std
        return latents.unsqueeze(2) if was_5d else latents

    def decode_latents_to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """normalized latents [B, 16, h, w] -> pixels [B, 3, 8h, 8w] clamped to [-1, 1].
        5-D [B, 16, 1, h, w] input gives 5-D output."""
        z, was_5d = self._to_frame(latents, "latents", self.config.z_dim, 1)
        stat_mean, inv_std = self._latent_stats(z)
        z = z / inv_std + stat_mean
        pixels = self.decoder(self.post_quant_conv(z)).clamp(-1.0, 1.0)
        return pixels.unsqueeze(2) if was_5d else pixels


# ---------------------------------------------------------------------------------------------------------
# Loading

VAE_FLAG = "--vae"
VAE_WHAT = "the Qwen-Image VAE (.safetensors or .pth, e.g. split_files/vae/qwen_image_vae.safetensors)"
_KNOWN_PREFIXES = ("first_stage_model.", "vae.", "model.", "module.", "autoencoder.")


def _resolve_vae_file(path: Path) -> Path:
    """A diffusers repo or its vae/ folder -> its weights file; a file path is returned as is."""
    if not path.is_dir():
        return path
    for candidate in (
        path / "diffusion_pytorch_model.safetensors",
        path / "vae" / "diffusion_pytorch_model.safetensors",
    ):
        if candidate.is_file():
            return candidate
    raise AnimaError(
        f"{VAE_FLAG}: {path} is a folder without diffusion_pytorch_model.safetensors; pass the VAE file itself"
    )


def _diffusers_key_map(file_keys: list[str], path: Path) -> dict[str, str]:
    """diffusers name -> file key: strips a wrapping prefix (e.g. ``vae.``, ``first_stage_model.``) and
    converts original/ComfyUI names."""
    for anchor, is_original in ((DIFFUSERS_ANCHOR_KEY, False), (ORIGINAL_ANCHOR_KEY, True)):
        prefix = find_prefix(file_keys, anchor, _KNOWN_PREFIXES)
        if prefix is None:
            continue
        inner = {key[len(prefix) :]: key for key in file_keys if key.startswith(prefix)}
        if len(inner) != len(file_keys):
            logger.info(
                "%s: using the %d '%s*' tensors of %s, ignoring %d others",
                VAE_FLAG,
                len(inner),
                prefix,
                path,
                len(file_keys) - len(inner),
            )
        return original_to_diffusers_keys(inner) if is_original else inner
    raise AnimaError(
        f"{VAE_FLAG}: {path} is not a Qwen-Image VAE: it looks like {guess_checkpoint_kind(file_keys)} "
        f"(first keys: {sample_keys(file_keys, 3)}); pass {VAE_WHAT}"
    )


def infer_vae_config(state_dict: Mapping[str, torch.Tensor]) -> VAEConfig:
    """Widths and depth from a diffusers-named state dict (real: base 96, mult 1,2,4,4, 2 res blocks)."""
    base_dim, in_channels = state_dict["encoder.conv_in.weight"].shape[:2]
    z_dim = state_dict["decoder.conv_in.weight"].shape[1] if "decoder.conv_in.weight" in state_dict else 16
    stage_widths: list[int] = []
    stage_blocks: list[int] = [0]
    temporal: list[bool] = []
    index = 0
    while True:
        prefix = f"encoder.down_blocks.{index}."
        if prefix + "conv1.weight" in state_dict:
            width = state_dict[prefix + "conv1.weight"].shape[0]
            if stage_blocks[-1] == 0:
                stage_widths.append(width)
            stage_blocks[-1] += 1
        elif prefix + "resample.1.weight" in state_dict:
            temporal.append(prefix + "time_conv.weight" in state_dict)
            stage_blocks.append(0)
        else:
            break
        index += 1
    if not stage_widths or stage_blocks[-1] == 0:
        return VAEConfig(base_dim=base_dim, z_dim=z_dim, in_channels=in_channels)  # strict load will explain
    return VAEConfig(
        base_dim=base_dim,
        z_dim=z_dim,
        dim_mult=tuple(max(1, w // base_dim) for w in stage_widths),
        num_res_blocks=stage_blocks[0],
        temporal_downsample=tuple(temporal),
        in_channels=in_channels,
    )


def _check_matches(model: QwenImageVAE, state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        k for k in set(expected) & set(state_dict) if tuple(expected[k].shape) != tuple(state_dict[k].shape)
    )
    if not (missing or unexpected or wrong_shape):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong_shape:
        k = wrong_shape[0]
        problems.append(
            f"{len(wrong_shape)} shape mismatches (e.g. {k}: file {tuple(state_dict[k].shape)}, "
            f"expected {tuple(expected[k].shape)})"
        )
    kind = guess_checkpoint_kind(state_dict)
    origin = "a damaged file or another VAE configuration" if kind == VIDEO_VAE_KIND else kind
    raise AnimaError(
        f"{VAE_FLAG}: {path} does not match the Qwen-Image VAE: {'; '.join(problems)}. It looks like "
        f"{origin}; pass {VAE_WHAT}"
    )


def load_vae(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    chunk_size: int | None = None,
    disable_cache: bool = False,
) -> QwenImageVAE:
    """Load a Qwen-Image VAE from diffusers- or original/ComfyUI-named ``.safetensors``, or ``.pth``/``.pt``.

    Returns the model in eval mode with gradients off, on ``device`` in ``dtype``. ``chunk_size``: see
    ``QwenImageVAE.set_chunk_size``. ``disable_cache`` is accepted for CLI compatibility and has no effect
    on images (there is no causal cache in the image path). ``device="meta"`` checks the file from its
    header and returns a weightless model.
    """
    _check_chunk_size(chunk_size)  # before the file is opened
    with open_checkpoint(_resolve_vae_file(Path(path)), VAE_FLAG, VAE_WHAT) as checkpoint:
        file = checkpoint.path
        # Names, shapes and the config are checked on meta tensors before any weight is read.
        check_not_scaled_float8(checkpoint.keys(), VAE_FLAG, file)
        key_map = _diffusers_key_map(checkpoint.keys(), file)
        file_shapes = checkpoint.meta_state_dict()
        shapes = {key: file_shapes[file_key] for key, file_key in key_map.items()}
        config = infer_vae_config(shapes)
        if (config.in_channels, config.z_dim) != (3, LATENT_CHANNELS):
            raise AnimaError(
                f"{VAE_FLAG}: {file} is a video VAE with {config.in_channels} input and {config.z_dim} latent "
                f"channels (e.g. Wan 2.2); Anima needs the Qwen-Image VAE (3 and {LATENT_CHANNELS})"
            )
        with torch.device("meta"):
            model = QwenImageVAE(config, chunk_size=chunk_size, disable_cache=disable_cache)
        _check_matches(model, shapes, file)
        state_dict = checkpoint.read(key_map, device=device, dtype=dtype)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval().requires_grad_(False)

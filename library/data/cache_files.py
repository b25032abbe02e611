"""The on-disk cache formats: file names, keys and dtypes, and reading one sample's cached entry.

Latents live in `<image stem>_<W>x<H>_anima.npz`, text-encoder outputs in `<image stem>_anima_te.npz` (see
latent_cache and text_cache for how they are written and checked).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from library.data.records import ImageInfo, Size
from library.errors import AnimaError
from library.io.files import remove_leftovers
from library.io.npz import NPZ_READ_ERRORS

CACHE_FORMAT = 1
LATENT_CHANNELS = 16
VAE_STRIDE = 8


# Our batch keys -> (npz key, stored dtype).
DISK_KEYS = {
    "qwen3_embeds": ("prompt_embeds", np.float32),
    "qwen3_mask": ("attn_mask", np.int64),
    "t5_ids": ("t5_input_ids", np.int32),
    "t5_mask": ("t5_attn_mask", np.int32),
}
LOADED_DTYPES = {"qwen3_embeds": torch.float32, "qwen3_mask": torch.int64, "t5_ids": torch.int64,
                  "t5_mask": torch.int64}


def text_npz_path(image_path: str | os.PathLike) -> str:
    return os.path.splitext(os.fspath(image_path))[0] + "_anima_te.npz"


def latents_npz_path(image_path: str | os.PathLike, image_size: Size) -> str:
    stem = os.path.splitext(os.fspath(image_path))[0]
    return f"{stem}_{image_size[0]:04d}x{image_size[1]:04d}_anima.npz"


def key_suffix(bucket: Size) -> str:
    """`_<h>x<w>` of the latent for a bucket (W, H)."""
    return f"_{bucket[1] // VAE_STRIDE}x{bucket[0] // VAE_STRIDE}"


def latent_problem(latent: np.ndarray, bucket: Size) -> str | None:
    """Why a cached latent cannot be used for this bucket (W, H), or None: float [16, h, w] ([16, 1, h, w] from
    older caches), h, w = bucket / 8, every value finite."""
    expected = (LATENT_CHANNELS, bucket[1] // VAE_STRIDE, bucket[0] // VAE_STRIDE)
    if not np.issubdtype(latent.dtype, np.floating):
        return f"latent dtype {latent.dtype} is not a float type"
    shape = tuple(latent.shape)
    if shape != expected and not (len(shape) == 4 and shape[1] == 1 and (shape[0], *shape[2:]) == expected):
        return f"latent shape {list(shape)} differs from {list(expected)}"
    if not np.isfinite(latent).all():
        return "latent has NaN/inf values"
    return None


def mask_problem(mask: np.ndarray, bucket: Size) -> str | None:
    """Why a cached loss mask cannot be used for this bucket (W, H): float or integer [H, W], finite."""
    if not (np.issubdtype(mask.dtype, np.floating) or np.issubdtype(mask.dtype, np.integer)):
        return f"mask dtype {mask.dtype} is not numeric"
    if tuple(mask.shape) != (bucket[1], bucket[0]):
        return f"mask shape {list(mask.shape)} differs from {[bucket[1], bucket[0]]}"
    if np.issubdtype(mask.dtype, np.floating) and not np.isfinite(mask).all():
        return "mask has NaN/inf values"
    return None


def text_problem(arrays: dict[str, np.ndarray]) -> str | None:
    """Why cached text-encoder outputs (npz keys of DISK_KEYS) cannot be used, or None: `prompt_embeds` float
    [Lq, D] and finite, `attn_mask` integer [Lq], `t5_input_ids` and `t5_attn_mask` integer [Lt]."""
    embeds, mask = arrays["prompt_embeds"], arrays["attn_mask"]
    ids, t5_mask = arrays["t5_input_ids"], arrays["t5_attn_mask"]
    if not np.issubdtype(embeds.dtype, np.floating) or embeds.ndim != 2:
        return f"prompt_embeds is {embeds.dtype} {list(embeds.shape)}, not float [tokens, features]"
    for name, array in (("attn_mask", mask), ("t5_input_ids", ids), ("t5_attn_mask", t5_mask)):
        if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_) or array.ndim != 1:
            return f"{name} is {array.dtype} {list(array.shape)}, not integer [tokens]"
    if mask.shape[0] != embeds.shape[0]:
        return f"attn_mask has {mask.shape[0]} tokens, prompt_embeds {embeds.shape[0]}"
    if ids.shape != t5_mask.shape:
        return f"t5_input_ids has {ids.shape[0]} tokens, t5_attn_mask {t5_mask.shape[0]}"
    if not np.isfinite(embeds).all():
        return "prompt_embeds has NaN/inf values"
    return None


def remove_cache_leftovers(infos: list[ImageInfo]) -> None:
    """Remove the temporary cache files killed runs left beside the images (see files.remove_leftovers)."""
    for folder in sorted({Path(info.path).parent for info in infos}):
        remove_leftovers(folder)


def check_rewritable(rewrites: list[tuple[str, str]], kind: str, skip_check: bool) -> None:
    """Disk cache files about to be (re)written, as (path, why), must sit in writable folders: one error line
    before any encoding otherwise (a read-only folder of another tool's caches works with --skip_cache_check)."""
    for path, why in rewrites:
        folder = os.path.dirname(path) or "."
        if not os.access(folder, os.W_OK | os.X_OK):
            hint = "" if skip_check else (", or pass --skip_cache_check to use files that have the needed keys as "
                                          "they are")
            raise AnimaError(f"cache folder {folder} is not writable, and the {kind} cache {os.path.basename(path)} "
                             f"must be written there ({why}); make the folder writable{hint}")


def loss_mask_key(subset: Any, info: ImageInfo) -> str | None:
    """The cache key prefix of a sample's loss mask: conditioning image, alpha channel, or None (no mask)."""
    if info.conditioning_path is not None:
        return "conditioning_mask"
    return "alpha_mask" if subset.alpha_mask else None


def check_cache_name_collisions(infos: list[ImageInfo], suffix_of: Any) -> None:
    """Two different images must not share a cache file (e.g. `a.png` and `a.jpg`)."""
    owners: dict[str, Path] = {}
    for info in infos:
        name = suffix_of(info)
        other = owners.setdefault(name, info.path)
        if other != info.path:
            raise AnimaError(f"{other} and {info.path} would share the cache file {name}; rename one of them")


def load_cached_latents(info: ImageInfo, flip: bool,
                        mask_key: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(latent [16, h, w] float32, loss mask [H, W] or None) for one sample, flipped if asked.

    `mask_key` ("alpha_mask", "conditioning_mask" or None) names the mask this sample uses (see loss_mask_key).
    """
    if info.latents is not None:
        latent = info.latents_flipped if flip and info.latents_flipped is not None else info.latents
        mask = info.cached_loss_mask if mask_key is not None else None
    else:
        assert info.latents_npz is not None and info.bucket is not None
        suffix = key_suffix(info.bucket)
        try:
            with np.load(info.latents_npz, allow_pickle=False) as data:
                name = ("latents_flipped" if flip else "latents") + suffix
                if name not in data.files:
                    raise KeyError(name)
                stored = data[name]
                problem = latent_problem(stored, info.bucket)
                mask = None
                if mask_key is not None:
                    if mask_key + suffix not in data.files:
                        raise KeyError(mask_key + suffix)
                    stored_mask = data[mask_key + suffix]
                    problem = problem or mask_problem(stored_mask, info.bucket)
                    mask = torch.from_numpy(stored_mask.astype(np.float32))
        except NPZ_READ_ERRORS as exc:
            raise AnimaError(f"latent cache {info.latents_npz} cannot be read ({type(exc).__name__}: {exc}); delete "
                             "it and run the caching again") from exc
        if problem is not None:
            raise AnimaError(f"latent cache {info.latents_npz} is damaged ({problem}); delete it and run the "
                             "caching again")
        latent = torch.from_numpy(stored.astype(np.float32))
        if latent.dim() == 4:  # older 5-D caches store [16, 1, h, w]
            latent = latent.squeeze(1)
    if mask is not None and flip:
        mask = mask.flip(-1)
    return latent, mask


def load_cached_text(info: ImageInfo) -> dict[str, torch.Tensor]:
    """One sample's text-encoder outputs, from memory or its npz file."""
    if info.text is not None:
        return info.text
    assert info.text_npz is not None
    try:
        with np.load(info.text_npz, allow_pickle=False) as data:
            arrays = {disk: np.asarray(data[disk]) for disk, _ in DISK_KEYS.values()}
    except NPZ_READ_ERRORS as exc:
        raise AnimaError(f"text cache {info.text_npz} cannot be read ({type(exc).__name__}: {exc}); delete it and "
                         "run the caching again") from exc
    problem = text_problem(arrays)
    if problem is not None:
        raise AnimaError(f"text cache {info.text_npz} is damaged ({problem}); delete it and run the caching again")
    return {key: torch.from_numpy(arrays[disk]).to(LOADED_DTYPES[key]) for key, (disk, _) in DISK_KEYS.items()}

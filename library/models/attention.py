"""Attention back-ends behind one call.

Layout used everywhere in this project: q ``[B, Lq, H, Dh]``, k/v ``[B, Lk, H, Dh]``, output ``[B, Lq, H, Dh]``
(token-major, the layout flash-attn, xformers and SageAttention take natively; SDPA gets a transposed view).

Masks are *key masks*: a bool tensor ``[B, Lk]``, True = the key may be attended. A query row whose keys are
all masked (an empty prompt) returns exactly 0 in every mode, never NaN.

Modes:

* ``torch`` (alias ``sdpa``): ``torch.nn.functional.scaled_dot_product_attention``; PyTorch picks the kernel.
* ``flash``: the ``flash_attn`` package. Its kernels take fp16/bf16 only, so fp32 inputs are run in bf16 and the
  result is cast back (use bf16 training with this mode).
* ``xformers``: ``xformers.ops.memory_efficient_attention``.
* ``sageattn``: the ``sageattention`` package (8-bit quantised attention, no backward): inference only.

For the package-based modes a key mask is applied by attending each sample to its own valid keys.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
import torch.nn.functional as F

from library.errors import AnimaError

ATTN_MODES = ("torch", "flash", "xformers", "sageattn")
_ALIASES = {"sdpa": "torch"}
ATTN_MODE_CHOICES = (*ATTN_MODES, *_ALIASES)  # what --attn_mode accepts (trainer and inference script)
# mode -> (python package, how to install it)
_PACKAGES = {
    "flash": ("flash_attn", "pip install flash-attn --no-build-isolation"),
    "xformers": ("xformers", "pip install xformers"),
    "sageattn": ("sageattention", "pip install sageattention"),
}


def normalize_attn_mode(mode: str) -> str:
    """Canonical mode name (``sdpa`` -> ``torch``); AnimaError for an unknown name."""
    name = _ALIASES.get(str(mode).lower(), str(mode).lower())
    if name not in ATTN_MODES:
        raise AnimaError(f"--attn_mode: unknown attention mode '{mode}'; choose one of: {', '.join(ATTN_MODE_CHOICES)}")
    return name


def _import_backend(mode: str) -> ModuleType | None:
    if mode not in _PACKAGES:
        return None
    package, install = _PACKAGES[mode]
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise AnimaError(
            f"--attn_mode {mode} needs the '{package}' package, which is not installed ({e}); "
            f"install it with `{install}` or use --attn_mode torch"
        ) from None


def check_attn_mode(mode: str, training: bool) -> str:
    """Validate an attention mode before any long work starts; returns the canonical name.

    Raises AnimaError naming the missing package and its pip command, or when ``sageattn`` is asked for training.
    """
    name = normalize_attn_mode(mode)
    if name == "sageattn" and training:
        raise AnimaError(
            "--attn_mode sageattn is inference only (it has no backward pass); use --attn_mode torch, flash or "
            "xformers for training"
        )
    _import_backend(name)
    return name


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    attn_mask = None
    if mask is not None:
        attn_mask = mask[:, None, None, :]  # [B, 1, 1, Lk]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
    return out.transpose(1, 2)


def _package_kernel(mode: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention through an external package, all tensors [B, L, H, Dh]."""
    module = _import_backend(mode)
    if mode == "flash":
        in_dtype = q.dtype
        if in_dtype not in (torch.float16, torch.bfloat16):
            q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
        return module.flash_attn_func(q, k, v).to(in_dtype)
    if mode == "xformers":
        ops = importlib.import_module("xformers.ops")
        return ops.memory_efficient_attention(q, k, v)
    # sageattn
    return module.sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


def _masked_package_attention(
    mode: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    # Each sample attends to its own valid keys; a sample without any valid key gets zeros.
    outputs = []
    for b in range(q.shape[0]):
        keep = mask[b].nonzero(as_tuple=True)[0]
        if keep.numel() == 0:
            outputs.append(torch.zeros_like(q[b : b + 1]))
            continue
        outputs.append(_package_kernel(mode, q[b : b + 1], k[b : b + 1, keep], v[b : b + 1, keep]))
    return torch.cat(outputs, dim=0)


def _attention_once(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, mask: torch.Tensor | None
) -> torch.Tensor:
    if mode == "torch":
        return _sdpa(q, k, v, mask)
    if mask is None:
        return _package_kernel(mode, q, k, v)
    return _masked_package_attention(mode, q, k, v, mask)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mode: str = "torch",
    mask: torch.Tensor | None = None,
    split_batch: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention (scale 1/sqrt(Dh), no dropout).

    q: [B, Lq, H, Dh], k/v: [B, Lk, H, Dh], mask: bool [B, Lk] key mask (True = attend) or None.
    split_batch runs one sample at a time (lower peak memory); it never shortens k/v.
    Returns [B, Lq, H, Dh] in q's dtype.
    """
    mode = normalize_attn_mode(attn_mode)
    if mode == "sageattn" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise AnimaError("--attn_mode sageattn is inference only (no backward pass); use torch, flash or xformers")

    rows_valid = None
    if mask is not None:
        mask = mask.to(device=q.device, dtype=torch.bool)
        if mask.shape != (q.shape[0], k.shape[1]):
            raise ValueError(
                f"attention mask must be a key mask [B, Lk] = {(q.shape[0], k.shape[1])}, got {tuple(mask.shape)}"
            )
        # Fully-masked samples attend everywhere (finite values and gradients) and are zeroed below. Done for
        # every mask, without asking the device whether any sample is empty: that question is a host sync.
        rows_valid = mask.any(dim=1)  # [B]
        mask = mask | ~rows_valid[:, None]

    if split_batch and q.shape[0] > 1:
        out = torch.cat(
            [
                _attention_once(
                    q[b : b + 1], k[b : b + 1], v[b : b + 1], mode, None if mask is None else mask[b : b + 1]
                )
                for b in range(q.shape[0])
            ],
            dim=0,
        )
    else:
        out = _attention_once(q, k, v, mode, mask)

    if rows_valid is not None:
        out = out * rows_valid.to(out.dtype)[:, None, None, None]
    return out

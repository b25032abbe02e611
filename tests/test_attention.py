"""Attention back-ends: agreement with a plain reference, key masks, fully masked rows, clear errors."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from library.errors import AnimaError
from library.models.attention import attention, check_attn_mode


def reference_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d)) v in float64 on [B, L, H, D] tensors; fully masked rows -> 0."""
    q, k, v = (t.double() for t in (q, k, v))
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v)


def _qkv(b=3, lq=7, lk=5, h=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, lq, h, d, generator=g),
        torch.randn(b, lk, h, d, generator=g),
        torch.randn(b, lk, h, d, generator=g),
    )


def _mask():
    # sample 0: all keys, sample 1: first 2 keys, sample 2: no key (empty prompt)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0] = True
    mask[1, :2] = True
    return mask


def _fake_kernel(expect_half: bool):
    def kernel(q, k, v, **kwargs):
        assert q.ndim == 4 and q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:]  # [B, L, H, D]
        if expect_half:
            assert q.dtype in (torch.float16, torch.bfloat16)
        return reference_attention(q, k, v).to(q.dtype)

    return kernel


@pytest.fixture
def fake_backends(monkeypatch):
    """Stand-ins for the optional packages, computing the reference in the packages' [B, L, H, D] layout."""
    flash = types.ModuleType("flash_attn")
    flash.flash_attn_func = _fake_kernel(expect_half=True)
    xformers, xformers_ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    xformers_ops.memory_efficient_attention = _fake_kernel(expect_half=False)
    xformers.ops = xformers_ops
    sage = types.ModuleType("sageattention")

    def sageattn(q, k, v, tensor_layout, is_causal):
        assert tensor_layout == "NHD" and not is_causal
        return reference_attention(q, k, v).to(q.dtype)

    sage.sageattn = sageattn
    for name, module in [
        ("flash_attn", flash),
        ("xformers", xformers),
        ("xformers.ops", xformers_ops),
        ("sageattention", sage),
    ]:
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize("mode", ["torch", "sdpa"])
def test_torch_mode_matches_reference(mode):
    q, k, v = _qkv()
    torch.testing.assert_close(attention(q, k, v, mode).double(), reference_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_key_mask_and_fully_masked_rows():
    q, k, v = _qkv()
    mask = _mask()
    out = attention(q, k, v, "torch", mask=mask)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)
    assert (out[2] == 0).all()
    # Masked keys have no influence.
    k2, v2 = k.clone(), v.clone()
    k2[1, 2:] += 100.0
    v2[1, 2:] -= 100.0
    torch.testing.assert_close(attention(q, k2, v2, "torch", mask=mask)[1], out[1])


def test_fully_masked_rows_have_finite_gradients():
    q, k, v = (t.requires_grad_() for t in _qkv())
    attention(q, k, v, "torch", mask=_mask()).sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[2] == 0).all()


def test_split_batch_matches_batched_and_keeps_all_keys():
    q, k, v = _qkv(lq=2, lk=9)  # fewer queries than keys: nothing may be trimmed
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 4:] = False
    torch.testing.assert_close(attention(q, k, v, split_batch=True), attention(q, k, v), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        attention(q, k, v, mask=mask, split_batch=True), attention(q, k, v, mask=mask), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("mode", ["flash", "xformers", "sageattn"])
def test_package_modes_match_reference_with_and_without_mask(fake_backends, mode):
    q, k, v = _qkv()
    tol = 2e-2 if mode == "flash" else 1e-5  # flash kernels run in bf16
    with torch.no_grad():
        out = attention(q, k, v, mode)
        masked = attention(q, k, v, mode, mask=_mask())
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), rtol=tol, atol=tol)
    torch.testing.assert_close(masked.double(), reference_attention(q, k, v, _mask()), rtol=tol, atol=tol)
    assert (masked[2] == 0).all()
    assert check_attn_mode(mode, training=False) == mode


@pytest.mark.parametrize(
    ("mode", "package", "pip_command"),
    [
        ("flash", "flash_attn", "pip install flash-attn"),
        ("xformers", "xformers", "pip install xformers"),
        ("sageattn", "sageattention", "pip install sageattention"),
    ],
)
def test_missing_package_raises_clear_error(monkeypatch, mode, package, pip_command):
    monkeypatch.setitem(sys.modules, package, None)  # makes the import fail even where it is installed
    with pytest.raises(AnimaError) as info:
        check_attn_mode(mode, training=False)
    message = str(info.value)
    assert f"--attn_mode {mode}" in message and f"'{package}'" in message and pip_command in message
    assert "\n" not in message
    q, k, v = _qkv()
    with torch.no_grad(), pytest.raises(AnimaError, match=package):
        attention(q, k, v, mode)


def test_sageattn_is_rejected_for_training(fake_backends):
    with pytest.raises(AnimaError, match="sageattn is inference only"):
        check_attn_mode("sageattn", training=True)
    q, k, v = _qkv()
    q.requires_grad_()
    with pytest.raises(AnimaError, match="inference only"):
        attention(q, k, v, "sageattn")


def test_training_modes_are_accepted_for_training(fake_backends):
    assert check_attn_mode("torch", training=True) == "torch"
    assert check_attn_mode("SDPA", training=True) == "torch"
    assert check_attn_mode("flash", training=True) == "flash"


def test_unknown_mode_and_bad_mask_shape_are_rejected():
    with pytest.raises(AnimaError, match="unknown attention mode 'flash3'"):
        check_attn_mode("flash3", training=False)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="key mask"):
        attention(q, k, v, mask=torch.ones(3, 7, dtype=torch.bool))

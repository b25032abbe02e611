"""The traffic count of bench/bench_step_traffic.py: its emulated CUDA autocast and the block step's figures.

The figures are counts on meta tensors (exact, machine independent), so they can be held to the targets of the
eager step: at most 5 GiB of memory-bound traffic per full-width block forward+backward at 4096 tokens, and
float8 block weights at most 0.55x the bf16 ones.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_step_traffic.py"


@pytest.fixture(scope="module")
def traffic():
    spec = importlib.util.spec_from_file_location("bench_step_traffic", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def count(traffic, fn):
    counts = traffic.Counts()
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    try:
        with traffic.EmulatedCudaAutocast(torch.bfloat16), traffic.TrafficCounter(counts):
            result = fn()
    finally:
        torch.set_autocast_enabled("cuda", False)
    return counts, result


def test_emulated_autocast_casts_like_cuda_and_honours_autocast_off(traffic):
    x = torch.empty(64, 32, device="meta", dtype=torch.bfloat16)
    w = torch.empty(16, 32, device="meta")  # float32 weight
    counts, (y, ln, ln_off) = count(traffic, lambda: (
        F.linear(x, w), F.layer_norm(x, (32,)), _without_autocast(lambda: F.layer_norm(x, (32,)))))
    assert y.dtype == torch.bfloat16  # linear: lower precision
    assert ln.dtype == torch.float32  # layer_norm: float32 list
    assert ln_off.dtype == torch.bfloat16
    assert counts.gemm_flop == 2 * 64 * 32 * 16 and counts.gemm_kernels == 1
    # casts: the weight to bf16, x to float32 for the autocast layer_norm; then the two norms
    assert counts.by_op["_to_copy"][0] == 2 and counts.by_op["native_layer_norm"][0] == 2


def _without_autocast(fn):
    with torch.autocast("cuda", enabled=False):
        return fn()


def test_broadcast_inputs_count_their_distinct_elements_once(traffic):
    x = torch.empty(8, 128, device="meta", dtype=torch.bfloat16)
    row = torch.empty(1, 128, device="meta", dtype=torch.bfloat16)
    counts, _ = count(traffic, lambda: x * row.expand(8, 128))
    assert counts.mem_kernels == 1 and counts.mem_bytes == (8 * 128 + 128 + 8 * 128) * 2


def test_full_width_block_step_moves_at_most_5_gib_and_fp8_weights_are_at_most_055x(traffic):
    bf16 = traffic.measure(tokens=4096, context_tokens=512, rank=16, fp8_base=False)
    assert bf16["lora_modules"] == 10
    assert bf16["mem_gib_fwd"] + bf16["mem_gib_bwd"] <= 5.0  # 9.79 GiB before the eager-step work
    # 2 * tokens * (4 * 2048² + 2 * 2048² + 2 * 2048 * 1024 + 2 * 2048 * 8192) + the LoRA and modulation GEMMs
    assert 0.49 < bf16["gemm_tflop_fwd"] < 0.50
    fp8 = traffic.measure(tokens=4096, context_tokens=512, rank=16, fp8_base=True)
    assert fp8["weight_mib"] <= 0.55 * bf16["weight_mib"]
    assert fp8["mem_gib_fwd"] + fp8["mem_gib_bwd"] <= 5.0  # with the dequantisation passes


def test_fp16_block_step_with_its_float32_residual_stream_moves_at_most_3_5_gib(traffic, capsys):
    """fp16 keeps the hidden states in float32; the norms take them as they are and the residual adds take the
    fp16 updates without a cast (4.22 GiB when both went through separate float32 ops)."""
    assert traffic.main(["--tokens", "4096", "--mixed_precision", "fp16", "--json"]) == 0
    fp16 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fp16["mixed_precision"] == "fp16"
    bf16 = traffic.measure(tokens=4096, context_tokens=512, rank=16, fp8_base=False)
    assert fp16["gemm_tflop_fwd"] == bf16["gemm_tflop_fwd"]
    assert bf16["mem_gib_total"] < fp16["mem_gib_total"] <= 3.5

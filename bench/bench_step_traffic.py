"""Memory traffic of one full-width DiT block's LoRA training step, counted on the meta device.

Examples:
    python bench/bench_step_traffic.py --tokens 4096 --json           # 1024² image, the numbers in benchmarks.md
    python bench/bench_step_traffic.py --tokens 4096 --fp8_base --json
    python bench/bench_step_traffic.py --tokens 4096 --mixed_precision fp16 --json
    python bench/bench_step_traffic.py --tokens 1024 --top 15          # 512², with the heaviest kernels listed

One 2B DiT block (width 2048, 16 heads, MLP 8192, 512 text tokens of width 1024) with the LoRA attached (rank 16,
the default ``networks.lora_anima`` targets) runs forward and backward on meta tensors (shapes and dtypes only,
no data), so the count is exact and takes a second on any machine. It is what the block does under CUDA bf16
autocast: frozen weights in bf16, LoRA weights in float32, hidden states in bf16 requiring grad.

CUDA autocast is emulated, since a CPU build cannot run it: a function mode applies autocast's cast rules to the
torch calls (GEMM-like calls and SDPA cast float32 inputs to bf16; the float32 list -- layer_norm, pow, rsqrt,
exp, softmax, sum... -- casts bf16 inputs to float32; casts of trainable float32 leaves are cached as autocast
does) whenever ``torch.is_autocast_enabled("cuda")`` is set, so code that turns autocast off is honoured. SDPA
runs as the flash-attention op (flash-style IO, no Lq x Lk matrix).

Every aten op of forward and backward is then classified:
* free: views, reshapes without copy, allocations (no kernel);
* GEMM: mm/addmm/bmm/baddbmm (FLOPs = 2·M·N·K; an addmm's added operand is read inside the GEMM);
* attention: the flash forward/backward ops (IO = their inputs and outputs);
* memory-bound: everything else; bytes = the distinct elements of every input and output, times their size
  (an expanded, stride-0 input counts once).
The last line is one JSON object: ``mem_gib_fwd``/``mem_gib_bwd`` (memory-bound bytes), ``mem_kernels_fwd``/
``mem_kernels_bwd``, ``gemm_tflop_fwd``/``gemm_tflop_bwd``, ``attn_gib_*``/``attn_tflop_*`` and ``weight_mib``
(the block's frozen weight storage; with --fp8_base the float8 weights and their scales).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.models.dit import AnimaConfig, Block  # noqa: E402
from library.models.fp8 import quantize_linear_weights, weight_bytes  # noqa: E402
from library.models.precision import residual_stream_dtype  # noqa: E402
from networks.lora_anima import create_network  # noqa: E402

GIB = 2**30
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}  # --mixed_precision

# CUDA autocast's op lists (aten/src/ATen/autocast_mode.h), by the name of the Python-level call.
AUTOCAST_LOWER_PRECISION = {
    "linear", "matmul", "__matmul__", "__rmatmul__", "mm", "mv", "bmm", "addmm", "addmv", "addr", "baddbmm",
    "addbmm", "einsum", "chain_matmul", "prelu", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "scaled_dot_product_attention",
}
AUTOCAST_FP32 = {
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "group_norm", "cosine_similarity",
    "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "nll_loss", "kl_div", "logsumexp", "cdist", "dist",
    "binary_cross_entropy_with_logits", "renorm", "interpolate",
}
# Run in float32 unless the call names a dtype.
AUTOCAST_FP32_UNLESS_DTYPE = {"prod", "softmax", "log_softmax", "cumprod", "cumsum", "sum", "vector_norm"}
AUTOCAST_PROMOTE = {"addcdiv", "addcmul", "atan2", "cross", "dot", "vdot", "index_put", "tensordot", "scatter_add"}


class EmulatedCudaAutocast(TorchFunctionMode):
    """CUDA autocast's casting rules for tensors of any device (here: meta), active while the CUDA autocast flag is
    set; ``with torch.autocast("cuda", enabled=False)`` inside the model therefore switches it off as on a GPU."""

    def __init__(self, low_precision: torch.dtype) -> None:
        super().__init__()
        self.low_precision = low_precision
        self._cache: dict[int, torch.Tensor] = {}

    def _cast(self, value, dtype: torch.dtype, from_dtypes: tuple[torch.dtype, ...]):
        if isinstance(value, torch.Tensor) and value.dtype in from_dtypes:
            cacheable = dtype == self.low_precision and value.is_leaf and value.requires_grad
            if cacheable and id(value) in self._cache:
                return self._cache[id(value)]
            cast = value.to(dtype)
            if cacheable:
                self._cache[id(value)] = cast
            return cast
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v, dtype, from_dtypes) for v in value)
        return value

    def _cast_all(self, args, kwargs, dtype, from_dtypes):
        args = self._cast(args, dtype, from_dtypes)
        return args, {k: self._cast(v, dtype, from_dtypes) for k, v in kwargs.items()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not torch.is_autocast_enabled("cuda"):
            pass
        elif name in AUTOCAST_LOWER_PRECISION:
            args, kwargs = self._cast_all(args, kwargs, self.low_precision, (torch.float32,))
            if name == "scaled_dot_product_attention":
                return flash_attention(*args, **kwargs)
        elif name in AUTOCAST_FP32 or (name in AUTOCAST_FP32_UNLESS_DTYPE and kwargs.get("dtype") is None):
            args, kwargs = self._cast_all(args, kwargs, torch.float32, (torch.float16, torch.bfloat16))
        elif name in AUTOCAST_PROMOTE:
            dtypes = [a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            if dtypes:
                widest = max(dtypes, key=lambda d: torch.finfo(d).bits)
                args = self._cast(args, widest, tuple(d for d in dtypes if d != widest))
        elif name == "scaled_dot_product_attention":
            return flash_attention(*args, **kwargs)
        if name == "rms_norm":
            return fused_rms_norm(*args, **kwargs)
        return func(*args, **kwargs)


class _FusedRmsNorm(torch.autograd.Function):
    """CUDA's ``_fused_rms_norm`` and its backward as one kernel each (on meta the op decomposes into many)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        out = torch.empty_like(x)
        rstd = torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
        record_kernel("_fused_rms_norm", [x, weight, out, rstd])
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        touched = [grad, x, weight, rstd, grad_x] + ([grad_weight] if grad_weight is not None else [])
        record_kernel("_fused_rms_norm_backward", touched)
        return grad_x, grad_weight, None


def fused_rms_norm(x, normalized_shape, weight=None, eps=None):
    """F.rms_norm as CUDA runs it for a 16-bit input with a same-dtype weight over the last dimension."""
    if weight is None or weight.dtype != x.dtype or len(normalized_shape) != 1:
        return F.rms_norm(x, normalized_shape, weight, eps)
    return _FusedRmsNorm.apply(x, weight, eps)


def flash_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as the flash kernel runs it (the math fallback on meta would build the Lq x Lk matrix)."""
    if attn_mask is not None:
        raise ValueError("the traffic bench models unmasked attention only (the DiT's)")
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]


GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "_scaled_mm"}
FREE_OPS = {"_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach",
            "lift_fresh", "alias", "_reshape_alias", "split_with_sizes", "unbind"}
WRITE_ONLY_INPLACE = {"fill_", "zero_", "uniform_", "normal_", "bernoulli_", "random_"}


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches in t: stride-0 (broadcast) dimensions count once."""
    numel = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            numel *= size
    return numel * t.element_size()


def _tensors(tree) -> list[torch.Tensor]:
    out = []
    for value in tree:
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, (list, tuple)):
            out.extend(_tensors(value))
    return out


@dataclass
class Counts:
    mem_bytes: int = 0
    mem_kernels: int = 0
    gemm_flop: int = 0
    gemm_kernels: int = 0
    attn_bytes: int = 0
    attn_flop: int = 0
    by_op: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0]))  # op -> [kernels, bytes]


_ACTIVE_COUNTERS: list[TrafficCounter] = []


def record_kernel(name: str, tensors: list[torch.Tensor]) -> None:
    """Count one memory-bound kernel touching ``tensors`` (for kernels the meta device cannot run as one op)."""
    if _ACTIVE_COUNTERS:
        _ACTIVE_COUNTERS[-1].add_memory_kernel(name, sum(distinct_bytes(t) for t in tensors))


class TrafficCounter(TorchDispatchMode):
    """Classifies and counts every aten op that runs (forward and autograd's backward alike)."""

    def __init__(self, counts: Counts) -> None:
        super().__init__()
        self.counts = counts

    def __enter__(self):
        _ACTIVE_COUNTERS.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE_COUNTERS.pop()
        return super().__exit__(*exc)

    def add_memory_kernel(self, name: str, moved: int) -> None:
        c = self.counts
        c.mem_bytes += moved
        c.mem_kernels += 1
        entry = c.by_op[name]
        entry[0] += 1
        entry[1] += moved

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        schema = func._schema
        aliasing = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
        if name in FREE_OPS or (aliasing and not schema.is_mutable):
            return result
        c = self.counts
        inputs = _tensors(list(args) + list(kwargs.values()))
        outputs = _tensors(result if isinstance(result, (list, tuple)) else [result])
        if name in GEMM_OPS:
            a, b = (args[1], args[2]) if name in ("addmm", "baddbmm", "addbmm") else (args[0], args[1])
            batch = a.shape[0] if a.dim() == 3 else 1
            c.gemm_flop += 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
            c.gemm_kernels += 1
            return result
        if "flash_attention" in name or "efficient_attention" in name:
            q, k = args[0], args[1] if "backward" not in name else args[2]
            if "backward" in name:
                q, k = args[1], args[2]
            flop = 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
            c.attn_flop += flop * 5 // 2 if "backward" in name else flop  # flash backward: 5 matmuls vs 2
            c.attn_bytes += sum(distinct_bytes(t) for t in inputs + outputs if t.dim() > 1)
            return result
        if name == "copy_":
            moved = distinct_bytes(args[0]) + distinct_bytes(args[1])
        elif name in WRITE_ONLY_INPLACE:
            moved = distinct_bytes(args[0])
        else:
            moved = sum(distinct_bytes(t) for t in inputs) + sum(distinct_bytes(t) for t in outputs)
        self.add_memory_kernel(name, moved)
        return result


class _BlockHost(torch.nn.Module):
    """Puts the block at ``blocks.0`` so the LoRA selects it as it would inside the DiT."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([block])


def build_block(config: AnimaConfig, rank: int, fp8_base: bool,
                dtype: torch.dtype = torch.bfloat16) -> tuple[Block, torch.nn.Module]:
    with torch.device("meta"):
        block = Block(config).to(dtype)
    block.requires_grad_(False)
    host = _BlockHost(block)
    network = create_network(1.0, rank, 1.0, None, None, host).to("meta")  # built on CPU: alpha is read once
    network.apply_to(None, host, apply_text_encoder=False, apply_unet=True)
    if fp8_base:  # after the LoRA is attached, as in the trainer
        quantize_linear_weights(host)
    network.train()
    block.train()
    return block, network


def rope_tables_for(tokens: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.empty(tokens, head_dim, device="meta")
    from library.models.dit import rope_tables

    return rope_tables(angles, dtype)


def measure(tokens: int, context_tokens: int, rank: int, fp8_base: bool, batch: int = 1,
            mixed_precision: str = "bf16") -> dict:
    dtype = PRECISIONS[mixed_precision]
    config = AnimaConfig()
    block, network = build_block(config, rank, fp8_base, dtype)
    d, dh = config.model_channels, config.head_dim
    meta = {"device": "meta"}
    # The hidden states arrive in the DiT's residual-stream dtype (float32 under fp16).
    x = torch.empty(batch, tokens, d, dtype=residual_stream_dtype(dtype), requires_grad=True, **meta)
    emb = torch.empty(batch, 1, d, dtype=dtype, **meta)
    adaln_lora = torch.empty(batch, 1, 3 * d, dtype=dtype, **meta)
    context = torch.empty(batch, context_tokens, config.crossattn_emb_channels, dtype=dtype, **meta)
    rope_cos, rope_sin = rope_tables_for(tokens, dh, dtype)

    forward, backward = Counts(), Counts()
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        with EmulatedCudaAutocast(dtype), TrafficCounter(forward):
            out = block(x, emb, context, rope_cos, rope_sin, adaln_lora)
    finally:
        torch.set_autocast_enabled("cuda", False)
    grad = torch.empty_like(out)
    with TrafficCounter(backward):
        out.backward(grad)
    lora_params = sum(p.numel() for p in network.parameters())
    return {
        "tokens": tokens,
        "context_tokens": context_tokens,
        "batch": batch,
        "rank": rank,
        "fp8_base": fp8_base,
        "mixed_precision": mixed_precision,
        "lora_modules": len(network.unet_loras),
        "lora_params": lora_params,
        "mem_gib_fwd": round(forward.mem_bytes / GIB, 4),
        "mem_gib_bwd": round(backward.mem_bytes / GIB, 4),
        "mem_gib_total": round((forward.mem_bytes + backward.mem_bytes) / GIB, 4),
        "mem_kernels_fwd": forward.mem_kernels,
        "mem_kernels_bwd": backward.mem_kernels,
        "gemm_kernels_fwd": forward.gemm_kernels,
        "gemm_kernels_bwd": backward.gemm_kernels,
        "gemm_tflop_fwd": round(forward.gemm_flop / 1e12, 4),
        "gemm_tflop_bwd": round(backward.gemm_flop / 1e12, 4),
        "attn_gib_fwd": round(forward.attn_bytes / GIB, 4),
        "attn_gib_bwd": round(backward.attn_bytes / GIB, 4),
        "attn_tflop_fwd": round(forward.attn_flop / 1e12, 4),
        "attn_tflop_bwd": round(backward.attn_flop / 1e12, 4),
        "weight_mib": round(weight_bytes(block) / 2**20, 3),
        "_by_op": {"forward": forward.by_op, "backward": backward.by_op},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="image tokens (4096 = 1024², 1024 = 512²)")
    parser.add_argument("--context_tokens", type=int, default=512, help="text tokens")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--fp8_base", action="store_true", help="frozen block Linear weights in float8 + scales")
    parser.add_argument("--mixed_precision", choices=sorted(PRECISIONS), default="bf16",
                        help="autocast and frozen-weight dtype (fp16: hidden states in the float32 residual stream)")
    parser.add_argument("--top", type=int, default=10, help="memory-bound ops listed per pass (0: none)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    result = measure(args.tokens, args.context_tokens, args.rank, args.fp8_base, args.batch_size,
                     args.mixed_precision)
    by_op = result.pop("_by_op")
    if not args.json:
        for phase, ops in by_op.items():
            print(f"{phase}: {result['mem_kernels_fwd' if phase == 'forward' else 'mem_kernels_bwd']} memory-bound "
                  f"kernels, {result['mem_gib_fwd' if phase == 'forward' else 'mem_gib_bwd']:.3f} GiB")
            rows = sorted(ops.items(), key=lambda kv: -kv[1][1])[: args.top]
            for name, (kernels, moved) in rows:
                print(f"  {name:<32} {kernels:>4} kernels {moved / GIB:8.3f} GiB")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

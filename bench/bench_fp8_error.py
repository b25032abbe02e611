"""Prediction error of ``--fp8_base`` (float8 block weights, per output channel or per tensor) against bf16.

Examples:
    python bench/bench_fp8_error.py                       # golden tiny DiT + one full-width block at 256 tokens
    python bench/bench_fp8_error.py --tokens 1024 --json

Two models, each run in bf16 (weights bf16, no autocast) and with the block projections stored in float8:
* the golden tiny DiT (../shared/golden/dit_tiny.safetensors) on its golden inputs, whole prediction;
* one full-width 2B block (random weights, seed 0, default init) on random hidden states of ``--tokens`` tokens.
* the same block with rows of very different magnitude (each Linear row scaled by exp(N(0, 1.5))), where a
  per-tensor scale pushes the small rows into float8's subnormal range.
The error is max|fp8 - bf16| / max|bf16| and the RMS of the difference over the RMS of the bf16 output; for
scale, the bf16 output's own error against float32 is listed too. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.models.dit import Anima, AnimaConfig, Block, rope_tables, video_rope_angles  # noqa: E402
from library.models.fp8 import quantize_linear_weights  # noqa: E402

GOLDEN = Path(__file__).resolve().parent.parent.parent / "shared" / "golden"


def errors(actual: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
    diff = actual.float() - expected.float()
    return {
        "max_rel": round((diff.abs().max() / expected.float().abs().max()).item(), 6),
        "rms_rel": round((diff.pow(2).mean().sqrt() / expected.float().pow(2).mean().sqrt()).item(), 6),
    }


class _Host(torch.nn.Module):
    def __init__(self, block: Block) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([block])


def golden_dit_errors(golden_dir: Path) -> dict:
    from safetensors.torch import load_file

    from library.models.dit_loading import load_anima_model

    golden = load_file(str(golden_dir / "dit_tiny_golden.safetensors"))

    def predict(model: Anima) -> torch.Tensor:
        with torch.no_grad():
            context = model.encode_text(golden["in.qwen3_embeds"], golden["in.qwen3_attn_mask"],
                                        golden["in.t5_input_ids"], golden["in.t5_attn_mask"])
            return model(golden["in.noisy_latents"], golden["in.timesteps"], context,
                         padding_mask=golden["in.padding_mask"])

    base = load_anima_model(str(golden_dir / "dit_tiny.safetensors")).requires_grad_(False)
    fp32 = predict(base)
    bf16_model = copy.deepcopy(base).to(torch.bfloat16)
    bf16 = predict(bf16_model)
    result = {"bf16_vs_fp32": errors(bf16, fp32)}
    for per_channel in (True, False):
        model = copy.deepcopy(bf16_model)
        quantize_linear_weights(model, per_channel=per_channel)
        result["fp8_per_channel" if per_channel else "fp8_per_tensor"] = errors(predict(model), bf16)
    return result


def full_block_errors(tokens: int, context_tokens: int, row_spread: float = 0.0) -> dict:
    """row_spread > 0: every Linear row is scaled by exp(N(0, row_spread)), rows of very different magnitude as
    trained checkpoints have them (default init gives all rows the same distribution)."""
    torch.manual_seed(0)
    config = AnimaConfig()
    block = Block(config).requires_grad_(False)
    if row_spread:
        for module in block.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(torch.exp(torch.randn(module.out_features, 1) * row_spread))
    d = config.model_channels
    x = torch.randn(1, tokens, d)
    emb = torch.randn(1, 1, d)
    adaln_lora = torch.randn(1, 1, 3 * d) * 0.1
    context = torch.randn(1, context_tokens, config.crossattn_emb_channels)
    side = int(tokens**0.5)
    ratios = (config.rope_h_extrapolation_ratio, config.rope_w_extrapolation_ratio, config.rope_t_extrapolation_ratio)
    angles = video_rope_angles(1, side, tokens // side, config.head_dim, ratios)

    def run(model: Block, dtype: torch.dtype) -> torch.Tensor:
        cos, sin = rope_tables(angles, dtype)
        with torch.no_grad():
            return model(x.to(dtype), emb.to(dtype), context.to(dtype), cos, sin, adaln_lora.to(dtype))

    fp32 = run(block, torch.float32)
    bf16_block = copy.deepcopy(block).to(torch.bfloat16)
    bf16 = run(bf16_block, torch.bfloat16)
    x_bf16 = x.to(torch.bfloat16).float()  # the bf16 runs' own input
    result = {"tokens": tokens, "row_spread": row_spread, "bf16_vs_fp32": errors(bf16, fp32),
              "bf16_vs_fp32_update": errors(bf16.float() - x_bf16, fp32 - x)}
    for per_channel in (True, False):
        host = _Host(copy.deepcopy(bf16_block))
        quantize_linear_weights(host, per_channel=per_channel)
        key = "fp8_per_channel" if per_channel else "fp8_per_tensor"
        # The block output is x + updates; measure the update too, where the weights act.
        out = run(host.blocks[0], torch.bfloat16)
        result[key] = errors(out, bf16)
        result[key + "_update"] = errors(out.float() - x_bf16, bf16.float() - x_bf16)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256, help="image tokens of the full-width block")
    parser.add_argument("--context_tokens", type=int, default=512)
    parser.add_argument("--golden_dir", type=Path, default=GOLDEN)
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    result = {"golden_tiny_dit": golden_dit_errors(args.golden_dir),
              "full_width_block": full_block_errors(args.tokens, args.context_tokens),
              "full_width_block_spread_rows": full_block_errors(args.tokens, args.context_tokens, row_spread=1.5)}
    if not args.json:
        for model, rows in result.items():
            print(model)
            for key, value in rows.items():
                print(f"  {key:<28} {value}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

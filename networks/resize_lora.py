"""Change the rank of an Anima LoRA by SVD of each module's update (sd-scripts' ``networks/resize_lora.py``).

    python -m networks.resize_lora --model my_lora.safetensors --save_to my_lora_r8.safetensors --new_rank 8
    python -m networks.resize_lora --model my_lora.safetensors --save_to small.safetensors --new_rank 16 \\
        --dynamic_method sv_fro --dynamic_param 0.9 --verbose

Each module's ΔW = up @ down (the alpha scale set aside) is factored exactly through two thin QR
decompositions and an SVD of the small r x r core, so no out x in matrix is ever built. The new module keeps
the leading singular directions: up = U·S, down = Vᵀ, and alpha = scale · new_rank, so alpha/rank — and with it
the update of every kept direction — is unchanged. The rank is ``--new_rank``, or with ``--dynamic_method`` the
smallest rank (at most ``--new_rank``) that reaches ``--dynamic_param``:

* ``sv_ratio``: keep singular values larger than S₀ / param (param ≥ 1);
* ``sv_cumulative``: sum of the kept singular values ≥ param · their total (0 < param ≤ 1);
* ``sv_fro``: Frobenius norm of the kept part ≥ param · the norm of ΔW (0 < param ≤ 1).

A rank above a module's current rank keeps it as it is. The kept share of each module's Frobenius norm is
printed per module with ``--verbose`` and always as mean and minimum. The output keeps the input's key layout
and metadata (ss_network_dim / ss_network_alpha updated, "Dynamic" for dynamic resizing, as sd-scripts does).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from library.errors import AnimaError, OneLineErrorParser
from networks.lora_format import (
    ALPHA_FOLDED_METADATA_KEY,
    COMFY_FORMAT,
    KIND_NAMES,
    LORA_KIND,
    adapter_kinds,
    convert_to_comfy,
    detect_lora_format,
    format_metadata,
    group_by_module,
    load_lora_file,
    save_lora_file,
    to_sd_scripts_with_alpha,
)
from networks.lora_tools import SAVE_PRECISIONS, check_device, check_inputs_exist, check_output_path, run_cli

DYNAMIC_METHODS = ("sv_ratio", "sv_cumulative", "sv_fro")
ZERO_SINGULAR_VALUE = 1e-6  # a module whose largest singular value is below this is all zero: kept at rank 1


@dataclass(frozen=True)
class ResizedModule:
    lora_name: str
    old_rank: int
    new_rank: int
    alpha: float
    fro_kept: float  # share of ‖ΔW‖_F kept, in [0, 1]


def low_rank_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of up @ down (up [out, r], down [r, in]) without forming it: returns U [out, r], S [r], Vh [r, in]."""
    q_up, r_up = torch.linalg.qr(up)  # [out, r], [r, r]
    q_down, r_down = torch.linalg.qr(down.T)  # [in, r], [r, r]
    u_core, s, vh_core = torch.linalg.svd(r_up @ r_down.T)  # the r x r core
    return q_up @ u_core, s, vh_core @ q_down.T


def choose_rank(s: torch.Tensor, max_rank: int, method: str | None, param: float | None) -> int:
    """Rank to keep for singular values s (descending), capped at max_rank; at least 1."""
    if float(s[0]) <= ZERO_SINGULAR_VALUE:
        return 1
    if method is None:
        rank = max_rank
    elif method == "sv_ratio":
        rank = int((s > s[0] / param).sum())
    else:
        values = s if method == "sv_cumulative" else s.square()
        target = param if method == "sv_cumulative" else param**2
        shares = values.cumsum(0) / values.sum()
        rank = int(torch.searchsorted(shares, torch.tensor(target - 1e-7, dtype=shares.dtype))) + 1
    return max(1, min(rank, max_rank, len(s)))


def resize_state_dict(
    sd: Mapping[str, torch.Tensor],
    new_rank: int,
    method: str | None = None,
    param: float | None = None,
    device: str | torch.device = "cpu",
    save_dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], list[ResizedModule]]:
    """sd-scripts keys with an alpha on every module -> resized state dict and one report row per module."""
    out: dict[str, torch.Tensor] = {}
    report = []
    with torch.no_grad():
        for lora_name, parts in group_by_module(sd).items():
            down = parts["lora_down.weight"].to(device, torch.float32)
            up = parts["lora_up.weight"].to(device, torch.float32)
            old_rank = down.shape[0]
            scale = float(parts["alpha"].float()) / old_rank
            u, s, vh = low_rank_svd(up, down)
            rank = choose_rank(s, min(new_rank, old_rank), method, param)
            total = float(s.square().sum())
            fro_kept = (float(s[:rank].square().sum()) / total) ** 0.5 if total > 0 else 1.0
            alpha = scale * rank
            out[f"{lora_name}.lora_up.weight"] = (u[:, :rank] * s[:rank]).to("cpu", save_dtype).contiguous()
            out[f"{lora_name}.lora_down.weight"] = vh[:rank].to("cpu", save_dtype).contiguous()
            out[f"{lora_name}.alpha"] = torch.tensor(alpha, dtype=save_dtype)
            report.append(ResizedModule(lora_name, old_rank, rank, alpha, fro_kept))
    return out, report


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m networks.resize_lora",
                                     description="Change the rank of an Anima LoRA by SVD.")
    parser.add_argument("--model", required=True, help="LoRA to resize (.safetensors, either key layout)")
    parser.add_argument("--save_to", required=True, help="output file (.safetensors keeps metadata; .pt/.ckpt)")
    parser.add_argument("--new_rank", type=int, default=4,
                        help="rank of the output (with --dynamic_method: the largest rank allowed)")
    parser.add_argument("--new_conv_rank", type=int, default=None,
                        help="sd-scripts' rank for convolution modules; Anima LoRAs have none, so it has no "
                        "effect (warned)")
    parser.add_argument("--save_precision", choices=list(SAVE_PRECISIONS), default="float",
                        help="dtype of the saved tensors")
    parser.add_argument("--dynamic_method", choices=DYNAMIC_METHODS, default=None,
                        help="choose each module's rank from its singular values (see --dynamic_param)")
    parser.add_argument("--dynamic_param", type=float, default=None,
                        help="target of --dynamic_method: ratio >= 1 for sv_ratio, share in (0, 1] otherwise")
    parser.add_argument("--device", default="cpu", help="device for the SVDs, e.g. cuda")
    parser.add_argument("--verbose", action="store_true", help="print the rank and kept norm of every module")
    return parser


def check_args(args: argparse.Namespace) -> None:
    check_inputs_exist([args.model], "--model")
    check_output_path(args.save_to, [args.model])
    check_device(args.device, "--device")
    if args.new_rank < 1:
        raise AnimaError(f"--new_rank must be at least 1, got {args.new_rank}")
    if args.new_conv_rank is not None:
        print(f"warning: --new_conv_rank {args.new_conv_rank} has no effect: the Anima DiT has no convolution "
              "layers, so its LoRAs hold none; ignored", file=sys.stderr)
    if args.dynamic_method is None and args.dynamic_param is not None:
        raise AnimaError("--dynamic_param needs --dynamic_method (sv_ratio, sv_cumulative or sv_fro)")
    if args.dynamic_method is not None:
        param = args.dynamic_param
        if param is None:
            raise AnimaError(f"--dynamic_method {args.dynamic_method} needs --dynamic_param")
        if args.dynamic_method == "sv_ratio" and not param >= 1:
            raise AnimaError(f"--dynamic_param {param}: sv_ratio needs a ratio >= 1")
        if args.dynamic_method != "sv_ratio" and not 0 < param <= 1:
            raise AnimaError(f"--dynamic_param {param}: {args.dynamic_method} needs a share in (0, 1]")


def _rank_range(ranks) -> str:
    ranks = sorted(set(ranks))
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"


def resize_file(args: argparse.Namespace) -> list[ResizedModule]:
    check_args(args)
    tensors, metadata = load_lora_file(args.model, flag="--model")
    source_format = detect_lora_format(tensors)
    folded = source_format == COMFY_FORMAT and not any(key.endswith(".alpha") for key in tensors)
    sd, metadata = to_sd_scripts_with_alpha(tensors, metadata)
    kinds = adapter_kinds(sd)
    if kinds != {LORA_KIND}:
        found = " and ".join(KIND_NAMES[k] for k in sorted(kinds))
        raise AnimaError(f"--model {args.model} holds {found} modules; the rank resize works on LoRA modules only")
    resized, report = resize_state_dict(sd, args.new_rank, args.dynamic_method, args.dynamic_param,
                                        device=args.device, save_dtype=SAVE_PRECISIONS[args.save_precision])
    old, new = _rank_range(row.old_rank for row in report), _rank_range(row.new_rank for row in report)
    # The comment names the largest rank before and after, as sd-scripts writes it ("from 8 to 4").
    old_max, new_max = max(row.old_rank for row in report), max(row.new_rank for row in report)
    comment = metadata.get("ss_training_comment", "")
    if args.dynamic_method is None:
        # As sd-scripts: the rank resized to (modules below it, e.g. all-zero ones kept at rank 1, do not count)
        # and the alpha of the modules at that rank ("Dynamic" when those differ: sd-scripts writes the last one's).
        alphas = {row.alpha for row in report if row.new_rank == new_max}
        metadata["ss_network_dim"] = str(new_max)
        metadata["ss_network_alpha"] = str(alphas.pop()) if len(alphas) == 1 else "Dynamic"
        metadata["ss_training_comment"] = f"dimension is resized from {old_max} to {new_max}; {comment}"
    else:
        metadata["ss_network_dim"] = metadata["ss_network_alpha"] = "Dynamic"
        metadata["ss_training_comment"] = (
            f"Dynamic resize with {args.dynamic_method}: {args.dynamic_param} from {old_max}; {comment}")
    if source_format == COMFY_FORMAT:
        resized = convert_to_comfy(resized, fold_alpha=folded)
    metadata = {k: v for k, v in metadata.items() if not k.startswith("sshs_") and k != ALPHA_FOLDED_METADATA_KEY}
    metadata.update(format_metadata(source_format, folded))
    save_lora_file(args.save_to, resized, metadata)

    if args.verbose:
        width = max(len(row.lora_name) for row in report)
        for row in report:
            print(f"{row.lora_name:<{width}}  rank {row.old_rank:>4} -> {row.new_rank:<4}  alpha {row.alpha:<8g}  "
                  f"Frobenius norm kept {row.fro_kept:.1%}")
    kept = [row.fro_kept for row in report]
    print(f"{args.model} -> {args.save_to}: {len(report)} modules, rank {old} -> {new}; Frobenius norm kept: "
          f"mean {sum(kept) / len(kept):.2%}, min {min(kept):.2%}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv, resize_file)


if __name__ == "__main__":
    sys.exit(main())

"""LoKr (low-rank Kronecker product) network for Anima: ``--network_module networks.lokr``.

For a layer W [out, in], out = out_l * out_k and in = in_m * in_n are split by ``factorization``, and the
update is ``ΔW = kron(w1, w2) * alpha / rank`` with w1 [out_l, in_m] and w2 [out_k, in_n]. w2 is the low-rank
product ``lokr_w2_a [out_k, r] @ lokr_w2_b [r, in_n]`` unless the rank is at least half its larger side (or
``full_matrix=true``), then a full ``lokr_w2``; with ``decompose_both=true`` w1 is decomposed the same way
(``lokr_w1_a`` / ``lokr_w1_b``). A module whose factors are both full matrices is applied at scale 1 (its
alpha is written as the rank), as LyCORIS, sd-scripts and ComfyUI do. Tensor names are sd-scripts' and
LyCORIS' (``lora_unet_<path>.lokr_w1`` ...), so ComfyUI's LoKr loader reads the files.

``--network_args``: the layer choice of networks.lora_anima (train_llm_adapter, include/exclude_patterns,
network_reg_dims/lrs, rank/module dropout, LoRA+ ratios: LoRA+ trains w1 at lr x ratio), plus ``factor``
(-1: balanced split; n: split off n), ``decompose_both`` and ``full_matrix``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from library.errors import AnimaError
from networks.lora_format import LOKR_KIND
from networks.network_base import (
    CONV_ARG_PARSERS,
    AdapterModule,
    NetworkOptions,
    network_entry_points,
    parse_bool,
    parse_int,
    valid_network_args,
)


def _parse_factor(key: str, value: Any) -> int:
    factor = parse_int(key, value)
    if factor == 0 or factor < -1:
        raise AnimaError(f"--network_args {key}={value!r}: expected -1 (balanced) or a positive integer")
    return factor


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into (m, n), m <= n, m * n = dimension (LyCORIS' rule).

    factor > 0 dividing dimension: (factor, dimension // factor), ordered. Otherwise the most balanced split
    whose smaller side is at most ``factor`` (any, for -1): 128 -> (8, 16), 1024 -> (32, 32), 2048 -> (32, 64).
    """
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    limit = dimension if factor < 0 else factor
    m = max(d for d in range(1, math.isqrt(dimension) + 1) if dimension % d == 0 and d <= limit)
    return m, dimension // m


@dataclass(frozen=True)
class LoKrLayout:
    """Shapes of one LoKr module: w1 [out_l, in_m], w2 [out_k, in_n]; a rank of None is a full matrix."""

    out_l: int
    out_k: int
    in_m: int
    in_n: int
    w1_rank: int | None
    w2_rank: int | None

    @classmethod
    def for_layer(
        cls, in_features: int, out_features: int, rank: int, factor: int, decompose_both: bool, full_matrix: bool
    ) -> LoKrLayout:
        in_m, in_n = factorization(in_features, factor)
        out_l, out_k = factorization(out_features, factor)
        w1_low = decompose_both and not full_matrix and rank < max(out_l, in_m) / 2
        w2_low = not full_matrix and rank < max(out_k, in_n) / 2
        return cls(out_l, out_k, in_m, in_n, rank if w1_low else None, rank if w2_low else None)

    @classmethod
    def from_parts(cls, parts: Mapping[str, torch.Tensor]) -> LoKrLayout:
        def sides(name: str) -> tuple[tuple[int, int], int | None]:
            if name in parts:
                return tuple(parts[name].shape), None
            a, b = parts[name + "_a"], parts[name + "_b"]
            return (a.shape[0], b.shape[1]), b.shape[0]

        (out_l, in_m), w1_rank = sides("lokr_w1")
        (out_k, in_n), w2_rank = sides("lokr_w2")
        return cls(out_l, out_k, in_m, in_n, w1_rank, w2_rank)


class LoKrModule(AdapterModule):
    """``ΔW = kron(w1, w2) * alpha / rank`` for one nn.Linear (see the module docstring)."""

    KIND = LOKR_KIND
    PLUS_NAMES = ("lokr_w1",)
    OPTION_PARSERS = {
        "factor": _parse_factor,
        "decompose_both": parse_bool,
        "full_matrix": parse_bool,
        **CONV_ARG_PARSERS,
    }
    NEURON_DROPOUT = False  # no rank activations to drop out (rank_dropout acts on the output features)

    def init_parameters(
        self, factor: int = -1, decompose_both: bool = False, full_matrix: bool = False, layout: LoKrLayout | None = None
    ) -> None:
        """layout (from a file) overrides rank's choice of shapes by factor / decompose_both / full_matrix."""
        rank, in_features, out_features = self.rank, self.in_features, self.out_features
        if layout is None:
            layout = LoKrLayout.for_layer(in_features, out_features, rank, factor, decompose_both, full_matrix)
        if layout.out_l * layout.out_k != out_features or layout.in_m * layout.in_n != in_features:
            raise AnimaError(
                f"LoKr module '{self.lora_name}': factors w1 [{layout.out_l}, {layout.in_m}] x w2 [{layout.out_k}, "
                f"{layout.in_n}] do not make the layer's [{out_features}, {in_features}]"
            )
        self.layout = layout
        if self.full:
            self.alpha.fill_(float(rank))  # both factors full: scale 1, alpha written as the rank
        if layout.w1_rank is None:
            self.lokr_w1 = nn.Parameter(torch.empty(layout.out_l, layout.in_m))
            nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        else:
            self.lokr_w1_a = nn.Parameter(torch.empty(layout.out_l, layout.w1_rank))
            self.lokr_w1_b = nn.Parameter(torch.empty(layout.w1_rank, layout.in_m))
            nn.init.kaiming_uniform_(self.lokr_w1_a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lokr_w1_b, a=math.sqrt(5))
        if layout.w2_rank is None:
            self.lokr_w2 = nn.Parameter(torch.zeros(layout.out_k, layout.in_n))  # kron(w1, 0) = 0: a no-op start
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(layout.out_k, layout.w2_rank))
            self.lokr_w2_b = nn.Parameter(torch.zeros(layout.w2_rank, layout.in_n))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))

    @property
    def full(self) -> bool:
        return self.layout.w1_rank is None and self.layout.w2_rank is None

    def refresh_scale(self) -> None:
        self.scale = 1.0 if self.full else float(self.alpha) / self.rank

    def w1(self) -> torch.Tensor:
        return self.lokr_w1 if self.layout.w1_rank is None else self.lokr_w1_a @ self.lokr_w1_b

    def w2(self) -> torch.Tensor:
        return self.lokr_w2 if self.layout.w2_rank is None else self.lokr_w2_a @ self.lokr_w2_b

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.skipped():
            return None
        layout = self.layout
        # kron(w1, w2) x without building the [out, in] matrix: with x viewed as X [in_m, in_n],
        # the output viewed as [out_l, out_k] is w1 @ X @ w2^T.
        lead = x.shape[:-1]
        x2 = x.reshape(*lead, layout.in_m, layout.in_n)  # [B, ..., in_m, in_n]
        if layout.w2_rank is None:
            h = x2 @ self.lokr_w2.to(x.dtype).T  # [B, ..., in_m, out_k]
        else:
            h = (x2 @ self.lokr_w2_b.to(x.dtype).T) @ self.lokr_w2_a.to(x.dtype).T  # [.., in_m, r] -> [.., in_m, out_k]
        y = (self.w1().to(x.dtype) @ h).reshape(*lead, self.out_features)  # [B, ..., out_l * out_k]
        return self.output_rank_dropout(y) * (self.multiplier * self.scale)

    def delta_weight(self) -> torch.Tensor:
        return torch.kron(self.w1().float(), self.w2().float()) * self.scale

    def delta_factors(self) -> list[torch.Tensor]:
        w1 = [self.lokr_w1] if self.layout.w1_rank is None else [self.lokr_w1_a, self.lokr_w1_b]
        w2 = [self.lokr_w2] if self.layout.w2_rank is None else [self.lokr_w2_a, self.lokr_w2_b]
        return w1 + w2

    def folded_alpha_parameter(self) -> torch.Tensor:
        return self.lokr_w1 if self.layout.w1_rank is None else self.lokr_w1_a

    @classmethod
    def kwargs_from_parts(cls, parts: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        layout = LoKrLayout.from_parts(parts)
        kwargs = super().kwargs_from_parts(parts)
        if kwargs["rank"] is None:  # both full: the rank only names the module's size (sd-scripts' convention)
            kwargs["rank"] = max(layout.out_k, layout.in_n)
        return {**kwargs, "layout": layout}

    @classmethod
    def module_kwargs(cls, options: NetworkOptions) -> dict[str, Any]:
        extras = options.extras
        return {
            "factor": extras.get("factor", -1),
            "decompose_both": extras.get("decompose_both", False),
            "full_matrix": extras.get("full_matrix", False),
        }


VALID_NETWORK_ARGS = valid_network_args(LoKrModule)
create_network, create_network_from_weights = network_entry_points(LoKrModule)  # sd-scripts' entry points

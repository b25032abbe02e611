"""LoHa (low-rank Hadamard product) network for Anima: ``--network_module networks.loha``.

For a layer W [out, in] the update is ``ΔW = (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) * alpha / r``
with ``*_a`` [out, r] and ``*_b`` [r, in] (element-wise product of two rank-r matrices, so rank up to r²).
Tensor names are sd-scripts' and LyCORIS' (``lora_unet_<path>.hada_w1_a`` ...), so ComfyUI's LoHa loader
reads the files.

``--network_args``: the layer choice of networks.lora_anima (train_llm_adapter, include/exclude_patterns,
network_reg_dims/lrs, rank/module dropout, LoRA+ ratios: LoRA+ trains hada_w2_a at lr x ratio).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import AnimaError
from networks.lora_format import LOHA_KIND
from networks.network_base import CONV_ARG_PARSERS, AdapterModule, network_entry_points, valid_network_args


class LoHaModule(AdapterModule):
    """``ΔW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank`` for one nn.Linear."""

    KIND = LOHA_KIND
    PLUS_NAMES = ("hada_w2_a",)
    OPTION_PARSERS = CONV_ARG_PARSERS
    NEURON_DROPOUT = False  # no rank activations to drop out (rank_dropout acts on the output features)

    def init_parameters(self) -> None:
        rank, in_features, out_features = self.rank, self.in_features, self.out_features
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, rank))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, in_features))
        self.hada_w2_a = nn.Parameter(torch.zeros(out_features, rank))  # zero: the network starts as a no-op
        self.hada_w2_b = nn.Parameter(torch.empty(rank, in_features))
        # sd-scripts' / LyCORIS' initialisation.
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w2_b, std=1.0)

    def _delta(self, dtype: torch.dtype) -> torch.Tensor:
        w1 = self.hada_w1_a.to(dtype) @ self.hada_w1_b.to(dtype)  # [out, in]
        w2 = self.hada_w2_a.to(dtype) @ self.hada_w2_b.to(dtype)  # [out, in]
        return w1 * w2 * self.scale

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.skipped():
            return None
        y = F.linear(x, self._delta(x.dtype))  # [B, ..., out]
        return self.output_rank_dropout(y) * self.multiplier

    def delta_weight(self) -> torch.Tensor:
        return self._delta(torch.float32)

    def delta_factors(self) -> list[torch.Tensor]:
        return [self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b]

    def folded_alpha_parameter(self) -> torch.Tensor:
        return self.hada_w1_a

    @classmethod
    def kwargs_from_parts(cls, parts: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        rank, rank2 = parts["hada_w1_b"].shape[0], parts["hada_w2_b"].shape[0]
        if rank != rank2:
            raise AnimaError(
                f"LoHa files with two different ranks ({rank} and {rank2}) in one module are not supported"
            )
        return super().kwargs_from_parts(parts)


VALID_NETWORK_ARGS = valid_network_args(LoHaModule)
create_network, create_network_from_weights = network_entry_points(LoHaModule)  # sd-scripts' entry points

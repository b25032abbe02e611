"""The non-finite guard: a step whose loss or gradient is NaN/inf changes nothing, and a run that keeps producing
them stops with a resumable state instead of training on NaN.

The check costs one device->host transfer per optimizer step: the loss and the total gradient norm are reduced
to one flag on the device, and only that flag is read (`step_is_finite`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def total_grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor | None:
    """L2 norm over every gradient, on the device, without a host sync (None when no parameter has one).
    Non-finite entries make it non-finite, which is all the guard needs."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    norms = torch._foreach_norm(grads, 2.0)  # one fused kernel per dtype/device group
    return torch.linalg.vector_norm(torch.stack([n.float().to(grads[0].device) for n in norms]), 2.0)


def finite_flag(*values: torch.Tensor | None) -> torch.Tensor:
    """A 0-dim float tensor on the device: 1 when every given tensor is finite, else 0 (no host sync)."""
    present = [v.detach().float().reshape(-1) for v in values if v is not None]
    return torch.isfinite(torch.cat(present)).all().float()


class NonFiniteGuard:
    """Counts consecutive non-finite steps; `limit` of them in a row end the run (0: never stop)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.consecutive = 0
        self.skipped = 0

    def record(self, finite: bool) -> bool:
        """Record one optimizer step; True when the run must stop."""
        if finite:
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.skipped += 1
        return bool(self.limit) and self.consecutive >= self.limit

"""The non-finite guard: a step whose loss or gradient is NaN/inf changes nothing, and a run that keeps producing
them stops with a resumable state instead of training on NaN.

The check costs one device->host transfer per optimizer step: the loss and the total gradient norm are reduced
to one flag on the device, and only that flag is read, in the same transfer as the
reporter's queued values (`TrainingReporter.read_with`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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
    """Collects the finite flags of a step's micro-batch losses and gradients on the device, and counts
    consecutive non-finite steps: `limit` of them in a row end the run (0: never stop)."""

    def __init__(self, limit: int, num_processes: int = 1) -> None:
        self.limit = limit
        self.num_processes = num_processes
        self.consecutive = 0
        self.skipped = 0
        self.losses_flag: torch.Tensor | None = None  # product of the micro-batch loss flags since the last step
        self.streak_start: Any = None  # what the caller recorded at the first step of the current bad streak

    def add_loss(self, loss: torch.Tensor) -> None:
        flag = finite_flag(loss)
        self.losses_flag = flag if self.losses_flag is None else self.losses_flag * flag

    def step_flag(self, clipped_norm: torch.Tensor | None, params: Iterable[torch.Tensor],
                  check_gradients: bool) -> torch.Tensor:
        """The flag of the whole optimizer step (the losses so far, and with `check_gradients` the gradient
        norm), agreed over processes. With a loss scaler (fp16) overflowing gradients are the scaler's business
        (it skips the step and lowers the scale): the caller passes check_gradients=False."""
        flag, self.losses_flag = self.losses_flag, None
        if check_gradients:
            norm = clipped_norm if clipped_norm is not None else total_grad_norm(params)
            if norm is not None:
                flag = finite_flag(norm) if flag is None else flag * finite_flag(norm)
        if flag is None:
            return torch.ones(())
        return self.agreed(flag)

    def agreed(self, flag: torch.Tensor) -> torch.Tensor:
        """The minimum of `flag` over processes, so that every process takes the same decision."""
        if self.num_processes > 1:
            import torch.distributed as dist

            flag = flag.reshape(1).clone()
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return flag.reshape(())

    def record(self, finite: bool, start: Any = None) -> bool:
        """Record one optimizer step (`start`: the caller's record of where a bad step began, kept for the first
        of a streak); True when the run must stop."""
        if finite:
            self.consecutive = 0
            return False
        if self.consecutive == 0:
            self.streak_start = start
        self.consecutive += 1
        self.skipped += 1
        return bool(self.limit) and self.consecutive >= self.limit

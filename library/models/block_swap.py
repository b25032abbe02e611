"""Block swap: keep only some DiT blocks' weights on the accelerator, stream the others in from CPU memory.

Layout before each forward ("initial layout"): the first N - n blocks hold their weights on the device, the last
n blocks point at their CPU copies. The device holds exactly N - n "slots" (one block's worth of weight tensors
each); a swap hands the slot of a block that has just run to a block that is about to run and copies the incoming
weights into it, so the device footprint stays constant.

Schedules (N blocks, n swapped):
* training (grad enabled): after block i's forward, for i < n, block i leaves and block N - n + i arrives. In
  backward, just before block i's backward runs, block i + 1 (if it is one of the last n) leaves and block
  i + 1 + n - N arrives, then block i is waited for. A full forward + backward returns to the initial layout.
* forward only (no grad, or inference mode): after every block i, block i leaves and block (N - n + i) mod N
  arrives; a full forward returns to the initial layout.

Every block keeps a permanent CPU copy of its weights (pinned on CUDA), so "leaving" costs no transfer: the
parameters just point at the CPU copy again. This needs the block weights to be frozen and unchanged while swap
is enabled, which holds for LoRA training and is checked (``requires_grad``) at every forward.

On CUDA the host->device copies run on a side stream; events order them after the outgoing block's kernels and
before the incoming block's kernels, so the host never waits. On other devices the copies are synchronous, but
the same bookkeeping, schedule and checks run (this is what the CPU tests exercise).
"""

from __future__ import annotations

import torch
from torch import nn

from library.errors import AnimaError


class _BackwardSwapPoint(torch.autograd.Function):
    """Identity on the hidden states after block i; its backward runs right before block i's backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, swapper: BlockSwapper, block_index: int) -> torch.Tensor:
        ctx.swapper = swapper
        ctx.block_index = block_index
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.swapper.before_block_backward(ctx.block_index)
        return grad, None, None


class BlockSwapper:
    """Moves the weights of ``blocks`` between the device and CPU memory following the schedules above."""

    def __init__(self, blocks: nn.ModuleList, blocks_to_swap: int, device: torch.device | str):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.num_blocks = len(blocks)
        max_swap = self.num_blocks - 2
        if not 1 <= blocks_to_swap <= max_swap:
            raise AnimaError(
                f"--blocks_to_swap {blocks_to_swap}: must be between 1 and {max_swap} for a DiT with "
                f"{self.num_blocks} blocks"
            )
        self.blocks_to_swap = blocks_to_swap
        self.num_resident = self.num_blocks - blocks_to_swap
        self.forward_only = False
        self._is_cuda = self.device.type == "cuda"
        self._side_stream = torch.cuda.Stream(self.device) if self._is_cuda else None

        self._params: list[list[nn.Parameter]] = [list(block.parameters()) for block in blocks]
        reference = [(p.shape, p.dtype) for p in self._params[0]]
        for index, params in enumerate(self._params):
            if [(p.shape, p.dtype) for p in params] != reference:
                raise AnimaError(f"block swap needs identical DiT blocks; block {index} differs in shape or dtype")
        # Permanent CPU copies; every block starts out pointing at them.
        self._host: list[list[torch.Tensor]] = [[self._host_copy(p.data) for p in params] for params in self._params]
        for params, hosts in zip(self._params, self._host):
            for p, host in zip(params, hosts):
                p.data = host
        self._slots: list[list[torch.Tensor]] = []  # device tensors, allocated on first prepare
        self._slot_of: list[int | None] = [None] * self.num_blocks
        self._ready: dict[int, torch.cuda.Event] = {}  # block -> copy-finished event (CUDA only)
        self._backward_schedule = False

    def _host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        host = tensor.detach()
        if host.device.type != "cpu":
            host = host.to("cpu")
        elif not self._is_cuda:
            host = host.clone()  # a distinct "device" storage on CPU keeps the copies real
        if self._is_cuda and not host.is_pinned():
            host = host.pin_memory()  # page-locked: asynchronous, faster H2D copies
        return host

    # ---- layout ------------------------------------------------------------------------------------------------

    def is_resident(self, block_index: int) -> bool:
        return self._slot_of[block_index] is not None

    def resident_blocks(self) -> list[int]:
        return [i for i in range(self.num_blocks) if self.is_resident(i)]

    def resident_weight_bytes(self) -> int:
        """Bytes of block weights held on the device (the slots)."""
        return sum(t.numel() * t.element_size() for slot in self._slots for t in slot)

    def prepare(self) -> None:
        """Restore the initial layout: blocks [0, N - n) on the device, the last n on CPU."""
        self._check_unchanged()
        if self._is_cuda:
            # Pending side-stream copies must land before their slots are handed out again.
            torch.cuda.current_stream(self.device).wait_stream(self._side_stream)
        self._ready.clear()
        wanted = set(range(self.num_resident))
        free_slots = []
        for index in self.resident_blocks():
            if index not in wanted:
                free_slots.append(self._release(index))
        for index in sorted(wanted):
            if self.is_resident(index):
                continue
            if free_slots:
                slot = free_slots.pop()
            else:
                slot = len(self._slots)
                self._slots.append([torch.empty_like(h, device=self.device) for h in self._host[index]])
            with torch.no_grad():
                for dev, host in zip(self._slots[slot], self._host[index]):
                    dev.copy_(host, non_blocking=True)  # ordered on the current stream
            self._assign(index, slot)

    def _release(self, index: int) -> int:
        slot = self._slot_of[index]
        for p, host in zip(self._params[index], self._host[index]):
            p.data = host
        self._slot_of[index] = None
        return slot

    def _assign(self, index: int, slot: int) -> None:
        for p, dev in zip(self._params[index], self._slots[slot]):
            p.data = dev
        self._slot_of[index] = slot

    def _check_unchanged(self) -> None:
        """Fail loudly if the weights were moved, replaced or made trainable behind the swapper's back."""
        for index, params in enumerate(self._params):
            slot = self._slot_of[index]
            expected = self._host[index] if slot is None else self._slots[slot]
            for p, tensor in zip(params, expected):
                if p.data_ptr() != tensor.data_ptr() or p.device != tensor.device:
                    raise AnimaError(
                        f"DiT block {index} weights were moved or replaced after block swap was enabled; move the "
                        "model with move_to_device_except_swap_blocks(device), not .to(device), and enable block "
                        "swap after loading/casting the weights"
                    )

    def _swap(self, out_index: int, in_index: int) -> None:
        """Block out_index gives its device slot to block in_index (weights copied from CPU into the slot)."""
        if not self.is_resident(out_index) or self.is_resident(in_index):
            raise RuntimeError(
                f"block swap schedule out of order (moving out block {out_index}, in block {in_index}; resident: "
                f"{self.resident_blocks()}); call prepare_block_swap_before_forward() after an interrupted step"
            )
        slot = self._release(out_index)
        with torch.no_grad():
            if self._is_cuda:
                # Start copying only once the outgoing block's queued kernels are done with the slot.
                self._side_stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self._side_stream):
                    for dev, host in zip(self._slots[slot], self._host[in_index]):
                        dev.copy_(host, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self._side_stream)
                self._ready[in_index] = ready
            else:
                for dev, host in zip(self._slots[slot], self._host[in_index]):
                    dev.copy_(host)
        self._assign(in_index, slot)

    def _wait_for(self, index: int) -> None:
        if not self.is_resident(index):
            raise RuntimeError(
                f"block swap: block {index} is needed but its weights are not on {self.device} "
                f"(resident: {self.resident_blocks()})"
            )
        ready = self._ready.pop(index, None)
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)  # device-side wait, the host goes on

    # ---- hooks called by the model -----------------------------------------------------------------------------

    def begin_forward(self) -> None:
        """Pick the schedule for this forward; re-prepare if the last step left another layout (e.g. no backward)."""
        if any(p.requires_grad for params in self._params for p in params):
            raise AnimaError(
                "--blocks_to_swap needs frozen DiT block weights (LoRA training), but a block parameter requires grad"
            )
        self._check_unchanged()
        if self.resident_blocks() != list(range(self.num_resident)):
            self.prepare()
        self._backward_schedule = not self.forward_only and torch.is_grad_enabled()

    def before_block(self, index: int) -> None:
        self._wait_for(index)

    def after_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Start the swaps due after block ``index``'s forward; returns x (with a backward swap point if training)."""
        n, big_n = self.blocks_to_swap, self.num_blocks
        if self._backward_schedule:
            if index < n:
                self._swap(index, big_n - n + index)
            if x.requires_grad:
                x = _BackwardSwapPoint.apply(x, self, index)
        else:
            self._swap(index, (big_n - n + index) % big_n)
        return x

    def before_block_backward(self, index: int) -> None:
        """Block index + 1's backward has finished; block index's is next."""
        leaving = index + 1
        if leaving >= self.num_blocks - self.blocks_to_swap and leaving < self.num_blocks:
            self._swap(leaving, leaving + self.blocks_to_swap - self.num_blocks)
        self._wait_for(index)

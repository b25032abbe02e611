"""Block swap: keep only some DiT blocks' weights on the accelerator, stream the others in from CPU memory.

Layout before each forward ("initial layout"): the first N - n blocks hold their weights on the device, the last
n blocks point at their CPU copies. The device holds exactly N - n "slots" (one block's worth of weight tensors
each); a swap hands the slot of a block that has just run to a block that is about to run and copies the incoming
weights into it, so the device footprint stays constant.

Schedules (N blocks, n swapped):
* training (grad enabled): after block i's forward, for i < n, block i leaves and block N - n + i arrives. In
  backward, just before block i's backward runs, block i + 1 (if it is one of the last n) leaves and block
  i + 1 + n - N arrives, then block i is waited for. A full forward + backward returns to the initial layout.
* forward only (no grad, or inference mode: sampling, validation): blocks [0, P) with P = N - n - 2 stay on the
  device; the n + 2 blocks [P, N) stream through the two remaining slots (double buffering: block j + 2 is copied
  while block j + 1 runs). After block j (P <= j < N - 2), block j leaves and block j + 2 arrives. A forward ends
  with blocks N - 2 and N - 1 in the two streaming slots; the next forward starts by copying P and P + 1 into
  them, which overlaps the compute of blocks [0, P). So a forward copies n blocks after `prepare()` and n + 2 in
  a row of forwards, instead of all N (the copies of a block that leaves are free, see below). Training after
  that restores the initial layout with `prepare()` (2 copies).

Every block keeps a permanent CPU copy of its weights (pinned on CUDA), so "leaving" costs no transfer: the
parameters just point at the CPU copy again. This needs the block weights to be frozen and unchanged while swap
is enabled, which holds for LoRA training and is checked (``requires_grad``) at every forward.

On CUDA the host->device copies run on a side stream; events order them after the outgoing block's kernels and
before the incoming block's kernels, so the host never waits. On other devices the copies are synchronous, but
the same bookkeeping, schedule and checks run (this is what the CPU tests exercise).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from library.errors import AnimaError
from library.models.precision import residual_stream_dtype

logger = logging.getLogger(__name__)

# At least two blocks stay on the device: one runs while the next one's weights land in the other slot.
MIN_RESIDENT_BLOCKS = 2


def max_blocks_to_swap(num_blocks: int) -> int:
    """The largest --blocks_to_swap for a DiT of `num_blocks` blocks (the one place this rule lives)."""
    return max(num_blocks - MIN_RESIDENT_BLOCKS, 0)


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
        max_swap = max_blocks_to_swap(self.num_blocks)
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
        self.blocks_copied = 0  # host -> device block copies so far (what the tests and benchmarks count)
        self.bytes_copied = 0
        self._block_bytes = sum(h.numel() * h.element_size() for h in self._host[0])

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
            self._count_copy()
            self._assign(index, slot)

    def _count_copy(self) -> None:
        self.blocks_copied += 1
        self.bytes_copied += self._block_bytes

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
        self._count_copy()
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
        self._backward_schedule = not self.forward_only and torch.is_grad_enabled()
        resident = self.resident_blocks()
        initial = list(range(self.num_resident))
        if resident == initial:
            return
        streamed_from = self.num_resident - 2  # P: blocks below it never leave in a forward-only pass
        if not self._backward_schedule and resident[:streamed_from] == initial[:streamed_from]:
            # The layout a forward-only pass ends with: copy the first streamed blocks into the streaming slots
            # (asynchronously on CUDA, behind the compute of the blocks that stay).
            leaving = [i for i in resident if i >= self.num_resident]
            arriving = [i for i in initial if i not in resident]
            for out_index, in_index in zip(leaving, arriving):
                self._swap(out_index, in_index)
            return
        self.prepare()  # after a training step without backward or an interrupted forward

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
        elif self.num_resident - 2 <= index < big_n - 2 and not self.is_resident(index + 2):
            self._swap(index, index + 2)
        return x

    def before_block_backward(self, index: int) -> None:
        """Block index + 1's backward has finished; block index's is next."""
        leaving = index + 1
        if leaving >= self.num_blocks - self.blocks_to_swap and leaving < self.num_blocks:
            self._swap(leaving, leaving + self.blocks_to_swap - self.num_blocks)
        self._wait_for(index)


# ---- planning --blocks_to_swap auto ----------------------------------------------------------------------------

CHECKPOINTING_MODES = ("none", "ckpt", "cpu_offload", "unsloth")
# Tensors one DiT block's forward saves for backward, per image token, in units of [D] activations (bf16), on
# top of the two [F] MLP activations (layer1 output and GELU output). Measured with saved-tensor hooks on a
# LoRA-wrapped block: 25.1-25.6 D-units per token in total at D = 512 and 2048 (F = 4D), i.e. about 17.5 beyond
# the MLP's 8; 20 leaves room for the float32 LayerNorm outputs of CUDA autocast (3 more units).
SAVED_D_UNITS_PER_TOKEN = 20
# Per context token: k and v of the cross-attention (bf16) and the float32 input of its k RMSNorm (2 units).
SAVED_D_UNITS_PER_CONTEXT_TOKEN = 4
# Of the per-token units, the hidden states entering the cross-attention and the MLP (saved by their LayerNorms):
# these are in the residual-stream dtype, float32 under fp16 (``precision.residual_stream_dtype``).
SAVED_RESIDUAL_STATES = 2
# Kept free besides the estimate: cuBLAS/attention workspaces, allocator rounding and fragmentation.
RESERVE_BYTES = 1 << 30
RESERVE_FRACTION = 0.1  # of the activation estimate


def block_activation_bytes(*, batch_size: int, tokens: int, context_tokens: int, model_channels: int,
                           mlp_channels: int, element_size: int = 2, residual_element_size: int | None = None) -> int:
    """Bytes one DiT block saves for backward in a training forward (no checkpointing):

        B · (e · (L · (20·D + 2·F) + 4 · Lc · D) + 2 · (er − e) · L · D)

    B batch, L image tokens ((H/16)·(W/16) for the 2×2-patched latent of an H×W image), Lc context tokens
    (--t5_max_token_length), D model width, F MLP width, e the activation element size (2 for bf16/fp16), er that
    of the residual stream (default e; 4 under fp16), in which two of the saved hidden states are kept.
    """
    residual_element_size = element_size if residual_element_size is None else residual_element_size
    per_sample = tokens * (SAVED_D_UNITS_PER_TOKEN * model_channels + 2 * mlp_channels)
    per_sample += SAVED_D_UNITS_PER_CONTEXT_TOKEN * context_tokens * model_channels
    residual_extra = SAVED_RESIDUAL_STATES * (residual_element_size - element_size) * tokens * model_channels
    return batch_size * (element_size * per_sample + residual_extra)


def block_weight_bytes(block: nn.Module, fp8: bool = False) -> int:
    """Measured device bytes of one block's weights (sum of its parameters' nbytes). With `fp8` (--fp8_base), the
    2-D Linear weights outside the adaLN modulation count one byte per element plus a float32 scale per output
    row; everything else keeps its dtype. Weights already stored in float8 are counted as they are."""
    total = 0
    for name, p in block.named_parameters():
        quantizable = fp8 and p.ndim == 2 and "adaln_modulation" not in name and p.element_size() > 1
        total += p.numel() + 4 * p.shape[0] if quantizable else p.numel() * p.element_size()
    return total


@dataclass(frozen=True)
class TrainingMemory:
    """What a training step keeps on the device, as the planner sees it (bytes)."""

    num_blocks: int
    block_weights: int  # one block's weights (`block_weight_bytes`)
    other_weights: int  # non-block DiT weights, plus the LoRA parameters, gradients and optimizer state
    block_activations: int  # saved by one block's forward (`block_activation_bytes`)
    block_input: int  # one block's input [B, L, D]
    other_activations: int = 0  # outside the blocks (embedders, final layer, LLM adapter)

    def peak_bytes(self, blocks_to_swap: int, checkpointing: str) -> int:
        """Estimated peak with `blocks_to_swap` blocks streamed and the given checkpointing mode:

        weights:  other + (N − n) · W                        (block swap keeps N − n slots, whatever n)
        none:     N · A + A                                   (every block's saved tensors + one block's backward)
        ckpt:     N · X + 2 · A                               (block inputs + one block recomputed and its backward)
        cpu_offload / unsloth:  2 · X + 2 · A                 (inputs live in CPU memory; two in flight)
        plus the activations outside the blocks, and a reserve of 1 GiB + 10 % of the activations.
        """
        if checkpointing not in CHECKPOINTING_MODES:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING_MODES}, got {checkpointing!r}")
        n, a, x = self.num_blocks, self.block_activations, self.block_input
        weights = self.other_weights + (n - blocks_to_swap) * self.block_weights
        blocks = {"none": n * a + a, "ckpt": n * x + 2 * a}.get(checkpointing, 2 * x + 2 * a)
        activations = blocks + self.other_activations
        return weights + activations + RESERVE_BYTES + int(RESERVE_FRACTION * activations)


@dataclass(frozen=True)
class SwapPlan:
    blocks_to_swap: int
    peak_bytes: int  # estimated peak with that choice
    free_bytes: int
    fits: bool  # False: even the largest swap count is estimated not to fit

    def describe(self) -> str:
        gib = 2**30
        verdict = "fits" if self.fits else "does NOT fit (the most blocks that can be swapped; expect out-of-memory)"
        return (f"--blocks_to_swap auto: {self.blocks_to_swap} blocks swapped, estimated peak "
                f"{self.peak_bytes / gib:.2f} GiB of {self.free_bytes / gib:.2f} GiB free: {verdict}")


def dit_training_memory(dit: nn.Module, *, batch_size: int, tokens: int, context_tokens: int,
                        adapter_context_tokens: int, fp8: bool, trainable_bytes: int,
                        compute_dtype: torch.dtype = torch.bfloat16) -> TrainingMemory:
    """The planner's view of a LoRA training step of `dit` (an `Anima`; its weights may still be in CPU memory).

    batch_size x tokens: the largest batch's image tokens; context_tokens: T5 tokens (the DiT's context and the
    adapter's queries); adapter_context_tokens: Qwen3 tokens; fp8 (--fp8_base): block projections counted in
    float8; trainable_bytes: the LoRA weights, counted 4 times (weights, gradients, two optimizer states);
    compute_dtype: the --mixed_precision dtype (activations; block inputs in the DiT's residual-stream dtype).
    """
    config = dit.config
    element_size = compute_dtype.itemsize
    residual_element_size = residual_stream_dtype(compute_dtype).itemsize
    block_ids = {id(p) for p in dit.blocks.parameters()}
    non_block = sum(p.numel() * p.element_size() for p in dit.parameters() if id(p) not in block_ids)
    block_input = batch_size * tokens * config.model_channels * residual_element_size
    activations = block_activation_bytes(batch_size=batch_size, tokens=tokens, context_tokens=context_tokens,
                                         model_channels=config.model_channels, mlp_channels=config.mlp_channels,
                                         element_size=element_size, residual_element_size=residual_element_size)
    # The LLM adapter keeps as much per token as a DiT block when its LoRA trains, over the T5 tokens.
    adapter = config.adapter_num_layers * block_activation_bytes(
        batch_size=batch_size, tokens=context_tokens, context_tokens=adapter_context_tokens,
        model_channels=config.adapter_model_dim, mlp_channels=config.adapter_mlp_channels, element_size=element_size)
    return TrainingMemory(num_blocks=config.num_blocks, block_weights=block_weight_bytes(dit.blocks[0], fp8=fp8),
                          other_weights=non_block + 4 * trainable_bytes, block_activations=activations,
                          block_input=block_input, other_activations=4 * block_input + adapter)


def plan_blocks_to_swap(memory: TrainingMemory, free_bytes: int, checkpointing: str) -> SwapPlan:
    """The smallest swap count whose estimated peak fits in `free_bytes` (a pure function of its inputs)."""
    largest = max_blocks_to_swap(memory.num_blocks)
    for n in range(largest + 1):
        peak = memory.peak_bytes(n, checkpointing)
        if peak <= free_bytes:
            return SwapPlan(n, peak, free_bytes, True)
    return SwapPlan(largest, memory.peak_bytes(largest, checkpointing), free_bytes, False)


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device (`torch.cuda.mem_get_info`); None for other devices.

    The caching allocator's unused blocks are handed back to the driver first: the planner runs after the
    caches were written and the text encoder freed, whose memory PyTorch still reserves and the driver would
    count as used (the plan would swap blocks that fit)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]

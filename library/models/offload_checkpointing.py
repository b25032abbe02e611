"""Gradient checkpointing that keeps each checkpointed block's hidden-state input in CPU memory.

Per block, the forward runs without building a graph and keeps only a CPU copy of the hidden-state input (the
other inputs -- time embedding, text context, RoPE tables, adaLN-LoRA term -- are shared by all blocks and kept
by reference). The backward copies the input back, re-runs the block with grad under the forward's RNG and
autocast state, back-propagates, and returns the gradients of every tensor input that needs one. Trainable
parameters used inside the block (e.g. LoRA weights attached by hooks) receive their gradients from that inner
backward, as with re-entrant checkpointing; so, like it, this path supports ``loss.backward()`` but not
``torch.autograd.grad(..., inputs=params)``.

Two flavours (``--cpu_offload_checkpointing`` / ``--unsloth_offload_checkpointing``):
* synchronous: blocking copies on the compute stream; simplest, the host waits for each copy;
* asynchronous: the device->host copy runs on a side stream into pinned memory and the host->device copy in
  backward is non-blocking, so neither stalls the host.
On a CPU "device" both make a real copy, so the logic is the same one the tests exercise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from library.errors import AnimaError

CPU_OFFLOAD = "cpu_offload"
UNSLOTH_OFFLOAD = "unsloth_offload"
OFFLOAD_MODES = (CPU_OFFLOAD, UNSLOTH_OFFLOAD)


def checkpoint_offload_mode(cpu_offload: bool, unsloth_offload: bool, block_swap: bool = False) -> str | None:
    """The offload mode the checkpointing flags choose (None: plain checkpointing). The two modes exclude each
    other, and either excludes block swap (both move block activations or weights over the same link)."""
    if cpu_offload and unsloth_offload:
        raise AnimaError("--unsloth_offload_checkpointing and --cpu_offload_checkpointing exclude each other; keep one")
    mode = CPU_OFFLOAD if cpu_offload else UNSLOTH_OFFLOAD if unsloth_offload else None
    if mode is not None and block_swap:
        raise AnimaError(f"--blocks_to_swap cannot be combined with --{mode}_checkpointing; keep one (block swap "
                         "works with plain --gradient_checkpointing)")
    return mode

_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _offload_stream(device: torch.device) -> torch.cuda.Stream:
    stream = _side_streams.get(device)
    if stream is None:
        stream = _side_streams[device] = torch.cuda.Stream(device)
    return stream


def _uses_streams(device: torch.device) -> bool:
    """Whether copies from and to `device` take the stream path (CUDA; the tests' fake streams on the CPU)."""
    return device.type == "cuda"


def _pinned_empty(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)


def _copy_to_host(x: torch.Tensor, asynchronous: bool) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A CPU copy of x (pinned when x is on CUDA) and, for asynchronous copies, the event marking its end."""
    if not _uses_streams(x.device):
        return x.detach().to("cpu", copy=True), None
    host = _pinned_empty(x)
    if not asynchronous:
        host.copy_(x)
        return host, None
    side = _offload_stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))  # x is complete before it is read
    with torch.cuda.stream(side):
        host.copy_(x, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(side)
    x.record_stream(side)  # x's memory is not reused before the side-stream read finished
    return host, copied


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function, asynchronous, _grad_anchor, hidden_states, *others):
        device = hidden_states.device
        ctx.function = function
        ctx.asynchronous = asynchronous
        ctx.device = device
        ctx.autocast = (
            torch.is_autocast_enabled(device.type),
            torch.get_autocast_dtype(device.type),
            torch.is_autocast_cache_enabled(),
        )
        ctx.cpu_rng_state = torch.get_rng_state()
        ctx.device_rng_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        ctx.host_input, ctx.copied = _copy_to_host(hidden_states, asynchronous)
        ctx.save_for_backward(*others)
        return function(hidden_states, *others)  # Function.forward already runs without grad

    @staticmethod
    def backward(ctx, grad_output):
        device = ctx.device
        if ctx.copied is not None:
            torch.cuda.current_stream(device).wait_event(ctx.copied)
        hidden_states = ctx.host_input.to(device, non_blocking=ctx.asynchronous)
        ctx.host_input = None
        needs = ctx.needs_input_grad[3:]
        inputs = [hidden_states, *ctx.saved_tensors]
        inputs = [t.detach().requires_grad_(need) for t, need in zip(inputs, needs)]

        rng_devices = [device] if device.type == "cuda" else []
        enabled, dtype, cache = ctx.autocast
        with torch.random.fork_rng(devices=rng_devices, device_type="cuda"):
            torch.set_rng_state(ctx.cpu_rng_state)
            if ctx.device_rng_state is not None:
                torch.cuda.set_rng_state(ctx.device_rng_state, device)
            with torch.enable_grad(), torch.autocast(device.type, dtype=dtype, enabled=enabled, cache_enabled=cache):
                output = ctx.function(*inputs)
        if output.requires_grad:
            torch.autograd.backward(output, grad_output)
        grads = tuple(t.grad if need else None for t, need in zip(inputs, needs))
        return (None, None, None, *grads)


def checkpoint_with_cpu_offload(
    function: Callable[..., torch.Tensor],
    hidden_states: torch.Tensor,
    *others: torch.Tensor,
    asynchronous: bool,
) -> torch.Tensor:
    """function(hidden_states, *others) -> Tensor, checkpointed with hidden_states kept in CPU memory.

    Non-tensor arguments must be bound into ``function`` (e.g. with functools.partial).
    """
    # The anchor requires grad so the output does too: parameters inside the block (LoRA) need the backward even
    # when no tensor input requires grad (e.g. the first block).
    anchor = torch.empty(0, device=hidden_states.device, requires_grad=True)
    return _OffloadedCheckpoint.apply(function, asynchronous, anchor, hidden_states, *others)

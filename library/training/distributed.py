"""Multi-process training through accelerate's DistributedDataParallel wrapper.

The LoRA layers are forward hooks on the DiT's (and text encoder's) Linear modules, so they run inside the
frozen model's forward, not inside a forward of the network module itself. DDP only arms its gradient hooks
for a forward that runs through the wrapper, so the trainer wraps a small `TrainingModule` that owns the
network (its parameters are what DDP reduces) and whose forward runs the whole training loss (text encoding,
DiT forward, loss). The frozen models are not submodules, so DDP neither broadcasts nor reduces their weights.

What DDP gives over a hand-written loop: gradients are averaged in buckets (`bucket_cap_mb`) and the
all-reduce of a bucket starts as soon as its gradients are ready, overlapping the rest of the backward;
`accelerator.accumulate(model)` skips the all-reduce on accumulation micro-steps (`no_sync`); the constructor
broadcasts the main process's LoRA weights, so every process starts from the same weights.

`--fused_backward_pass` steps each parameter inside backward, before DDP would have averaged its gradient;
it is refused with more than one process (`optimizers.install_fused_backward_pass`).
"""

from __future__ import annotations

import argparse
import datetime
import os
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from library.errors import AnimaError


class TrainingModule(torch.nn.Module):
    """Owns the trained network; `forward(loss_fn, *args, **kwargs)` returns `loss_fn(*args, **kwargs)`.

    Passed to `accelerator.prepare`, which wraps it in DDP under several processes. The loss function runs
    exactly as it would unwrapped: accelerate's autocast around a prepared model's forward is switched off
    here (the loss code enables autocast itself around the model calls), and torch.compile of this wrapper
    is skipped (it would trace the whole Python loss code; compilation belongs to the model's blocks).
    """

    def __init__(self, network: torch.nn.Module, device_type: str) -> None:
        super().__init__()
        self.network = network
        self.device_type = device_type

    @torch.compiler.disable
    def forward(self, loss_fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(self.device_type, enabled=False):
            return loss_fn(*args, **kwargs)


def uses_module_dropout(network: torch.nn.Module) -> bool:
    """True when some LoRA module may skip itself in a step (`module_dropout`): its parameters then get no
    gradient on that process, which DDP must be told about (`find_unused_parameters`)."""
    return any(getattr(m, "module_dropout", None) for m in network.modules())


def allow_module_dropout(accelerator: Any, network: torch.nn.Module, args: argparse.Namespace) -> None:
    """Under several processes, a network with `module_dropout` needs DDP's search for unused parameters; refuse
    the combinations where that cannot work."""
    if accelerator.num_processes == 1 or not uses_module_dropout(network):
        return
    if args.ddp_static_graph:
        raise AnimaError("--ddp_static_graph cannot be combined with module_dropout in --network_args "
                         "(a dropped module changes the set of trained parameters); drop one")
    if args.cpu_offload_checkpointing or args.unsloth_offload_checkpointing:
        # DDP finds the unused parameters in the forward graph, which the offloaded blocks leave out.
        raise AnimaError("module_dropout in --network_args does not work with --cpu_offload_checkpointing "
                         "or --unsloth_offload_checkpointing on several processes; drop one or use "
                         "--gradient_checkpointing alone")
    accelerator.ddp_handler.find_unused_parameters = True


# Set by MPI launchers for each rank: with them `accelerate launch --cpu` does start several processes.
_MPI_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


def lone_cpu_launch_warning(environ: Any = None) -> str | None:
    """`accelerate launch --cpu --num_processes N` (N > 1) without mpirun starts ONE process: accelerate's
    simple launcher sets the rendezvous address for N but leaves starting them to mpirun. That shows as
    ACCELERATE_USE_CPU with MASTER_ADDR set and neither a WORLD_SIZE nor an MPI size. Returns the warning to
    log, or None."""
    env = os.environ if environ is None else environ
    if str(env.get("ACCELERATE_USE_CPU", "")).lower() not in ("1", "true", "yes"):
        return None
    if "MASTER_ADDR" not in env or "WORLD_SIZE" in env or any(name in env for name in _MPI_SIZE_VARIABLES):
        return None
    return ("accelerate launch --cpu with --num_processes above 1 started one process (accelerate's --cpu mode "
            "expects mpirun to start the others); for several CPU processes run `ACCELERATE_USE_CPU=1 accelerate "
            "launch --multi_gpu --num_processes N ...` instead; this run trains on one process")


def process_group_kwargs(args: argparse.Namespace) -> list[Any]:
    """accelerate kwargs handlers for the process group and the DDP wrapper, from the `--ddp_*` flags."""
    handlers: list[Any] = []
    if args.ddp_timeout:
        handlers.append(InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=args.ddp_timeout)))
    # DistributedDataParallel options: --ddp_gradient_as_bucket_view (gradients are views into the all-reduce
    # buckets: one copy less), --ddp_static_graph (the same parameters are used in every step).
    handlers.append(DistributedDataParallelKwargs(
        gradient_as_bucket_view=bool(args.ddp_gradient_as_bucket_view),
        static_graph=bool(args.ddp_static_graph),
    ))
    return handlers

"""Device-to-host reads (host syncs) per steady-state training step, counted on a real tiny CPU run.

Each optimizer trains the tiny Anima setup (`library.models.tiny`) through the real trainer
(`AnimaNetworkTrainer`, cached latents and text, LoRA on the DiT and the LLM adapter). After `--warmup` steps,
a `TorchDispatchMode` counts every op that hands a tensor's value to Python for `--steps` steps: the loop body,
the data loading of the next batch and the reporting included.

Counted ops (each one blocks the host until the device has computed the value on a CUDA run):
`_local_scalar_dense` (`.item()`, `float(t)`, `bool(t)`, `int(t)`), `is_nonzero`, `nonzero` / `argwhere` /
`masked_select` / `unique` (output size depends on values), `equal`, and the `Tensor.tolist()` /
`Tensor.numpy()` methods (seen by a `TorchFunctionMode`: they read without dispatching a scalar op). Not counted: reads of tensors that a CUDA run keeps in host memory by design, i.e.
`torch.optim` step counters (`state["step"]`, a CPU tensor unless `capturable`/`fused`), and the reads made by
`torch.utils.data` itself (the loader draws its per-epoch seed from a CPU generator). Reading those costs no
device sync. Everything else is counted, even though on this CPU run every tensor lives on the CPU.

    python bench/bench_host_syncs.py --json                 # every optimizer; last line one JSON object
    python bench/bench_host_syncs.py --optimizers AdamW --steps 20 --verbose
    python bench/bench_host_syncs.py --fp16_loss_scaler --json   # AdamW under fp16 with a loss scaler

`--fp16_loss_scaler` runs AdamW with `--mixed_precision fp16` and torch's GradScaler on the CPU, standing in for
the scaler accelerate creates on CUDA (it creates none on the CPU); its JSON key is `AdamW+fp16_loss_scaler`.

The JSON maps the configuration to host syncs per step: the optimizer (`Adafactor+fused` = Adafactor with
`--fused_backward_pass`), and AdamW with `--scale_weight_norms` or with latents encoded live every step.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# (name in the JSON, trainer flags)
OPTIMIZERS: dict[str, list[str]] = {
    "AdamW": ["--optimizer_type", "AdamW"],
    "AdamW8bit": ["--optimizer_type", "AdamW8bit"],
    "Adafactor": ["--optimizer_type", "Adafactor"],
    "Adafactor+fused": ["--optimizer_type", "Adafactor", "--fused_backward_pass"],
    # Other step paths (AdamW): max-norm regularisation of every module, latents encoded live by the VAE.
    "AdamW+scale_weight_norms": ["--optimizer_type", "AdamW", "--scale_weight_norms", "0.02"],
    "AdamW+live_latents": ["--optimizer_type", "AdamW", "--no_cache_latents"],
}
SYNC_OPS = frozenset({"_local_scalar_dense", "is_nonzero", "nonzero", "nonzero_static", "argwhere", "equal",
                      "masked_select", "unique", "_unique2", "unique_consecutive", "repeat_interleave"})
HOST_READ_METHODS = frozenset({"tolist", "numpy"})
_HOST_LOADER_CODE = "torch/utils/data/"


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        # repeat_interleave only reads the device when given a tensor of repeats and no output size.
        if name in SYNC_OPS and not (name == "repeat_interleave" and (kwargs or {}).get("output_size")):
            self.counter.record(name, args[0] if args else None)
        return func(*args, **(kwargs or {}))


class _FunctionCounter(TorchFunctionMode):
    """`Tensor.tolist()` and `Tensor.numpy()` read the values without dispatching a scalar op."""

    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READ_METHODS:
            self.counter.record(name, args[0] if args else None)
        return func(*args, **(kwargs or {}))


class HostSyncCounter:
    """Context manager counting the ops that read a tensor's value back to the host (SYNC_OPS and
    HOST_READ_METHODS), except reads of `host_tensors` (data_ptr) and reads made by `torch.utils.data`."""

    def __init__(self, host_tensors: set[int] | None = None) -> None:
        self.host_tensors = host_tensors or set()  # data_ptr of tensors a CUDA run keeps on the host
        self.counts: collections.Counter[str] = collections.Counter()
        self.sites: collections.Counter[str] = collections.Counter()
        self._modes = [_FunctionCounter(self), _DispatchCounter(self)]

    def record(self, name: str, tensor: object) -> None:
        stack = traceback.extract_stack()[:-2]
        files = [f.filename.replace("\\", "/") for f in stack]
        if isinstance(tensor, torch.Tensor) and tensor.data_ptr() in self.host_tensors:
            return
        if any(_HOST_LOADER_CODE in name_ for name_ in files):
            return
        self.counts[name] += 1
        frames = [f for f, path in zip(stack, files) if "torch/" not in path]
        self.sites[f"{name} at " + " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[-3:][::-1])] += 1

    def __enter__(self) -> HostSyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def optimizer_host_tensors(optimizer: torch.optim.Optimizer) -> set[int]:
    """data_ptr of the torch.optim step counters: CPU tensors on a CUDA run too (non-capturable, non-fused)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not type(inner).__module__.startswith("torch.optim"):
        return set()
    defaults = inner.defaults
    if defaults.get("capturable") or defaults.get("fused"):
        return set()
    return {s["step"].data_ptr() for s in inner.state.values()
            if isinstance(s.get("step"), torch.Tensor) and s["step"].device.type == "cpu"}


FP16_LOSS_SCALER = "AdamW+fp16_loss_scaler"
FP16_LOSS_SCALER_FLAGS = ["--optimizer_type", "AdamW", "--mixed_precision", "fp16"]


def with_cpu_loss_scaler(accelerator_class: type, **scaler_options) -> type:
    """An Accelerator that, under fp16, has the loss scaler accelerate creates on CUDA only (a CPU GradScaler with
    `scaler_options`, e.g. init_scale, growth_interval; the tests use it too)."""

    class ScalingAccelerator(accelerator_class):
        options = scaler_options

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.mixed_precision == "fp16":
                self.scaler = torch.amp.GradScaler("cpu", **self.options)
                self.native_amp = True

    return ScalingAccelerator


def count_run(setup, out_dir: Path, optimizer_flags: list[str], warmup: int, steps: int,
              loss_scaler: bool = False) -> HostSyncCounter:
    """Train warmup + steps + 1 steps; count from the start of step warmup+1 to the start of step warmup+steps+1.
    `loss_scaler`: train through a CPU GradScaler (with fp16 flags; see `with_cpu_loss_scaler`)."""
    from accelerate.state import AcceleratorState

    import train_network
    from anima_train_network import AnimaNetworkTrainer
    from library.training.args import parse_args

    argv = [
        "--pretrained_model_name_or_path", str(setup.dit), "--qwen3", str(setup.qwen3_dir), "--vae", str(setup.vae),
        "--t5_tokenizer_path", str(setup.t5_tokenizer_dir), "--dataset_config", str(setup.dataset_toml),
        "--output_dir", str(out_dir), "--output_name", "syncs", "--network_module", "networks.lora_anima",
        "--network_dim", "4", "--network_alpha", "4", "--seed", "3", "--max_data_loader_n_workers", "0",
        "--qwen3_max_token_length", "8", "--t5_max_token_length", "8", "--cache_latents",
        "--cache_text_encoder_outputs", "--max_train_steps", str(warmup + steps + 1), "--learning_rate", "1e-3",
        "--max_grad_norm", "1.0", *optimizer_flags,
    ]
    if "--no_cache_latents" in optimizer_flags:  # encode the images with the VAE every step
        argv = [a for a in argv if a not in ("--cache_latents", "--no_cache_latents")]
    args, _ = parse_args(argv)
    counter_box: dict[str, HostSyncCounter] = {}

    class CountedTrainer(AnimaNetworkTrainer):
        def train_step(self, args, batch):
            done = self.global_step  # optimizer steps finished before this one (one batch per step here)
            if done == warmup:
                counter_box["c"] = HostSyncCounter(optimizer_host_tensors(self.optimizer))
                counter_box["c"].__enter__()
            elif done == warmup + steps:
                counter_box["c"].__exit__(None, None, None)
            return super().train_step(args, batch)

    plain_accelerator = train_network.Accelerator
    AcceleratorState._reset_state(reset_partial_state=True)  # another --mixed_precision than the run before
    if loss_scaler:
        train_network.Accelerator = with_cpu_loss_scaler(plain_accelerator)
    try:
        CountedTrainer().train(args)
    finally:
        train_network.Accelerator = plain_accelerator
        AcceleratorState._reset_state(reset_partial_state=True)
    return counter_box["c"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS))
    parser.add_argument("--warmup", type=int, default=2, help="uncounted steps first (state initialisation)")
    parser.add_argument("--steps", type=int, default=10, help="counted steps")
    parser.add_argument("--verbose", action="store_true", help="print where the counted reads happen")
    parser.add_argument("--json", action="store_true", help="end with one JSON line {optimizer: syncs per step}")
    parser.add_argument("--fp16_loss_scaler", action="store_true",
                        help=f"also count {FP16_LOSS_SCALER}: AdamW under fp16 with a CPU GradScaler")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import logging

    from library.models.tiny import write_tiny_anima_setup

    logging.disable(logging.WARNING)
    result: dict[str, float] = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        setup = write_tiny_anima_setup(Path(tmp) / "tiny")
        cases = [(name, OPTIMIZERS[name], False) for name in args.optimizers]
        if args.fp16_loss_scaler:
            cases.append((FP16_LOSS_SCALER, FP16_LOSS_SCALER_FLAGS, True))
        for name, flags, loss_scaler in cases:
            counter = count_run(setup, Path(tmp) / name, flags, args.warmup, args.steps, loss_scaler=loss_scaler)
            per_step = counter.total / args.steps
            result[name] = round(per_step, 3)
            rows.append((name, counter.total, per_step, dict(counter.counts)))
            if args.verbose:
                for site, n in counter.sites.most_common(12):
                    print(f"  {name}: {n:5d}  {site}")
    print(f"host syncs per training step (tiny CPU run, {args.steps} steps after {args.warmup} warm-up steps)")
    print(f"{'optimizer':18s} {'total':>7s} {'per step':>9s}  ops")
    for name, total, per_step, ops in rows:
        print(f"{name:18s} {total:7d} {per_step:9.2f}  {ops}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

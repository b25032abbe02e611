"""What a training run tells the user: progress bar, per-step log lines, experiment trackers, pictures and
the end summary.

Only the main process reports. In an interactive terminal a tqdm bar shows loss, lr and s/it, and log lines
are printed above it (tqdm's logging redirection); when stdout is not a terminal (logs, CI, nohup) one plain
line per optimizer step is printed instead, so log files stay readable.

The per-step loss (and an LR the optimizer computes on the device) stays a device tensor until it is reported:
reading a CUDA value on the host waits for the queued work, which empties the GPU's queue every step. The
reporter queues the steps; their values travel with the next step's one read (the non-finite guard's flag,
`read_with`), are shown every `LOSS_READ_INTERVAL` steps, and are read before any other output (messages,
scalars, the epoch average, samples, pictures, the summary), so every line
and scalar keeps its value and its order; the bar still advances at every step.

Trackers (`--log_with`) run through accelerate (`Accelerator(log_with=...)`, `init_trackers`), with sd-scripts'
names and behaviour: the run folder `<logging_dir>/<log_prefix><timestamp>`, the project name
`--log_tracker_name` (default `network_train`), init kwargs from `--log_tracker_config`, `--wandb_run_name`,
`--wandb_api_key`, hyperparameters with `--log_config`, and sd-scripts' scalar names (`loss/current`,
`loss/average`, `loss/epoch_average`, `loss/validation/{step,epoch}_{average,divergence}`, `lr/<group>`,
`lr/d*lr/<group>`, `max_norm/*`, `norm/avg_key_norm`). TensorBoard gets the optimizer step as its x value (the
epoch for the per-epoch scalars); wandb gets `global_step` and `epoch` as values, so its own step keeps increasing.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from library.training import pictures

logger = logging.getLogger("anima_train")
# Optimizer steps whose losses are read from the device together (one host sync per interval).
LOSS_READ_INTERVAL = 10
# Parents of the module loggers (`logging.getLogger(__name__)`) in the project's packages.
PACKAGE_LOGGERS = ("library", "networks")


def setup_console_logging(level: str | None = None, log_file: str | None = None, simple: bool = False) -> None:
    """Console (and optional file) logging for the trainer's messages."""
    fmt = "%(message)s" if simple else "%(asctime)s %(levelname)s %(message)s"
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    # The trainer's own logger and the package loggers (cache reuse, skipped images, LoRA setup, ...). The
    # package loggers keep propagating, so handlers on the root logger (pytest's caplog) still see them.
    # Under `accelerate launch` every process runs this; only the main one (RANK 0) shows more than errors,
    # so each message and warning appears once, not once per process.
    if int(os.environ.get("RANK", "0")) > 0:
        level = "ERROR"
    for name in (logger.name, *PACKAGE_LOGGERS):
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).setLevel(level or "INFO")
    logger.propagate = False


class LossRecorder:
    """`loss/average`, as sd-scripts computes it: the mean of the latest loss of every batch slot of an epoch.
    Every micro-batch counts (with gradient accumulation, each of a step's batches); a batch of a later epoch
    replaces the loss of the same batch of the epoch before, so the mean moves over the last epoch's worth of
    batches and is never reset (after the last batch of an epoch it is that epoch's mean)."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}  # batch index in its epoch (0-based) -> latest loss
        self.total = 0.0

    def add(self, batch: int, loss: float) -> None:
        self.total += loss - self.losses.get(batch, 0.0)
        self.losses[batch] = loss

    @property
    def average(self) -> float:
        return self.total / max(len(self.losses), 1)


def read_scalars(values: list[float | torch.Tensor]) -> list[float]:
    """Python floats of `values` (floats and 0-dim tensors), reading the tensors with one transfer per device."""
    out: list[float | None] = [v if not isinstance(v, torch.Tensor) else None for v in values]
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(i)
    for indices in by_device.values():
        stacked = torch.stack([values[i].detach().float().reshape(()) for i in indices])  # [n] float32
        for i, number in zip(indices, stacked.tolist()):
            out[i] = number
    return [float(v) for v in out]


DEFAULT_TRACKER_NAME = "network_train"  # sd-scripts' project name for network training
# Not sent to trackers by --log_config (as sd-scripts): secrets, and local paths, which may name people/places.
SECRET_ARGS = ("wandb_api_key", "huggingface_token")
PATH_ARGS = ("pretrained_model_name_or_path", "qwen3", "vae", "llm_adapter_path", "qwen3_tokenizer_path",
             "t5_tokenizer_path", "tokenizer_cache_dir", "train_data_dir", "conditioning_data_dir", "reg_data_dir",
             "output_dir", "logging_dir", "dataset_config", "config_file", "network_weights", "base_weights",
             "sample_prompts", "resume", "console_log_file", "log_tracker_config")


def run_logging_dir(logging_dir: str | None, log_prefix: str | None) -> str | None:
    """This run's tracker folder: `<logging_dir>/<log_prefix><YYYYmmddHHMMSS>` (sd-scripts' layout)."""
    if not logging_dir:
        return None
    return os.path.join(logging_dir, f"{log_prefix or ''}{time.strftime('%Y%m%d%H%M%S', time.localtime())}")


def prepare_tracker_environment(args: argparse.Namespace, run_dir: str | None) -> None:
    """Before the Accelerator starts its trackers: wandb writes under the run folder and logs in with
    `--wandb_api_key` (sd-scripts does the same)."""
    if args.log_with not in ("wandb", "all"):
        return
    try:
        import wandb
    except ImportError:
        return  # "all" without wandb installed: accelerate starts only the installed trackers
    if run_dir is not None:
        os.makedirs(run_dir, exist_ok=True)
        os.environ["WANDB_DIR"] = run_dir
    if args.wandb_api_key:
        wandb.login(key=args.wandb_api_key)


def sanitized_config(args: argparse.Namespace, run_values: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """`--log_config`: the arguments as tracker hyperparameters (None when off). Values a tracker stores
    (None, bool, int, float, str) are kept; lists and other objects become their text; secrets and local
    paths are left out. `run_values` replace flags by what the run uses (the drawn seed, the step count of
    --max_train_epochs, ...), as sd-scripts logs its arguments after filling them in."""
    if not args.log_config:
        return None
    config: dict[str, Any] = {}
    for key, value in {**vars(args), **(run_values or {})}.items():
        if key in SECRET_ARGS or key in PATH_ARGS:
            continue
        config[key] = value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
    return config


def init_trackers(accelerator: Any, args: argparse.Namespace, run_values: dict[str, Any] | None = None) -> None:
    """Start the `--log_with` trackers on the main process (a no-op without trackers); `run_values`: see
    `sanitized_config`."""
    if not args.log_with or not accelerator.is_main_process:
        return
    from library.training.args import read_tracker_config

    init_kwargs: dict[str, dict[str, Any]] = {}
    if args.log_tracker_config:
        init_kwargs = read_tracker_config(args.log_tracker_config)
    if args.wandb_run_name:
        # The flag names the run unless the tracker config already does.
        init_kwargs.setdefault("wandb", {}).setdefault("name", args.wandb_run_name)
    accelerator.init_trackers(args.log_tracker_name or DEFAULT_TRACKER_NAME, config=sanitized_config(args, run_values),
                              init_kwargs=init_kwargs)
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            run = tracker.tracker
            for metric in ("global_step", "epoch"):
                run.define_metric(metric, hidden=True)


@dataclass
class _QueuedStep:
    """An optimizer step waiting to be shown: its values may still be device tensors."""

    global_step: int
    epoch: int
    batch: int  # index in its epoch of the step's last batch
    loss: float | torch.Tensor
    earlier: list[float | torch.Tensor]  # losses of the step's earlier (accumulation) batches, in order
    logs: dict[str, float | torch.Tensor]
    seconds: float
    average: float | None = None  # loss/average once the losses counted in the moving average

    def values(self) -> list[float | torch.Tensor]:
        return [self.loss, *self.earlier, *self.logs.values()]

    def record(self, losses: LossRecorder) -> None:
        """Count the step's batch losses (read) in the moving average and keep the average of the step."""
        for i, loss in enumerate(self.earlier):
            losses.add(self.batch - len(self.earlier) + i, float(loss))
        losses.add(self.batch, float(self.loss))
        self.average = losses.average

    @property
    def is_read(self) -> bool:
        return not any(isinstance(v, torch.Tensor) for v in self.values())


class TrainingReporter:
    """Progress display, per-step lines, tracker logs, run pictures and the end summary of one run
    (no-op on non-main processes). `accelerator` carries the trackers (None: console only)."""

    def __init__(self, *, total_steps: int, initial_step: int, is_main_process: bool, accelerator: Any = None,
                 interactive: bool | None = None) -> None:
        self.is_main = is_main_process
        self.total_steps = total_steps
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        self.start_time = time.time()
        self.last_step_time = self.start_time
        self.initial_step = initial_step
        self.losses = LossRecorder()
        self._pending: list[_QueuedStep] = []  # optimizer steps not shown yet
        self._conditions: list[tuple[torch.Tensor, str]] = []  # (device flag, warning), see warn_if
        self.trackers = list(accelerator.trackers) if accelerator is not None and is_main_process else []
        self.epoch = 0
        self.history = pictures.RunHistory()
        self.latest_samples: list[tuple[Path, str]] = []
        self.pictures: dict[str, Path] = {}
        self.missing_pictures: set[str] = set()
        self.excluded_seconds: dict[str, float] = {}
        self.paused_since_last_step = 0.0
        self.bar = None
        self.redirect: contextlib.ExitStack | None = None
        if self.is_main and self.interactive:
            self.bar = tqdm(total=total_steps, initial=initial_step, desc="steps", smoothing=0.1, dynamic_ncols=True)
            console_loggers = [lg for lg in (logger, *map(logging.getLogger, PACKAGE_LOGGERS), logging.getLogger())
                               if any(_is_console_handler(h) for h in lg.handlers)]
            if console_loggers:  # log lines go above the bar instead of breaking it
                self.redirect = contextlib.ExitStack()
                self.redirect.enter_context(logging_redirect_tqdm(loggers=console_loggers))

    # --- per step ---------------------------------------------------------------------------------------------

    def train_step(self, global_step: int, epoch: int, batch: int, loss: float | torch.Tensor,
                   logs: dict[str, float | torch.Tensor], earlier_losses: Sequence[float | torch.Tensor] = ()) -> None:
        """Report one optimizer step: `loss/current` (`loss`, of the step's last batch, index `batch` in its
        epoch), `loss/average` (see `LossRecorder`; `earlier_losses` are the losses of the step's earlier
        gradient-accumulation batches, which count there too) and `logs`.

        Tensor values are read later (see the module docstring); the bar advances now."""
        if not self.is_main:
            return
        now = time.time()
        seconds_per_step = now - self.last_step_time - self.paused_since_last_step
        self.last_step_time = now
        self.paused_since_last_step = 0.0
        if self.bar is not None:
            self.bar.update(1)
        step = _QueuedStep(global_step, epoch, batch, loss, list(earlier_losses), dict(logs), seconds_per_step)
        if not any(isinstance(v, torch.Tensor) for v in (loss, *step.earlier)) and not self._deferred_average():
            # Losses already on the host count in the moving average now, so the epoch's end needs no read.
            step.record(self.losses)
        self._pending.append(step)
        # Every LOSS_READ_INTERVAL steps the queue is shown. Steps whose values `read_with` already read cost no
        # transfer; when no read carried the older steps' values (only the newest step may wait for the next
        # one), they are all read here at once.
        read = next((i for i, queued in enumerate(self._pending) if not queued.is_read), len(self._pending))
        if read >= LOSS_READ_INTERVAL:
            self.flush(read)
        elif len(self._pending) >= LOSS_READ_INTERVAL and read < len(self._pending) - 1:
            self.flush()

    def _deferred_average(self) -> bool:
        """Whether a queued step still waits for its loss to enter the epoch average."""
        return any(queued.average is None for queued in self._pending)

    def warn_if(self, flag: torch.Tensor, message: str) -> None:
        """Log `message` as a warning if the device value `flag` turns out nonzero; it is read with the next
        step's values (every process keeps its own, the warning names what that process saw)."""
        self._conditions.append((flag.detach().reshape(()), message))

    def _read_conditions(self, numbers: list[float]) -> None:
        conditions, self._conditions = self._conditions, []
        for (_, message), value in zip(conditions, numbers):
            if value:
                logger.warning(message)

    def read_with(self, *values: torch.Tensor) -> list[float]:
        """`values` read together with every queued step's device values (and the flags of `warn_if`), in one
        transfer. The trainer reads its non-finite flag (and the step's loss) through here, so that a
        steady-state step costs one host sync."""
        conditions = [flag for flag, _ in self._conditions]
        queued = [v for q in self._pending for v in q.values()]  # empty on other processes
        numbers = iter(read_scalars([*values, *conditions, *queued]))
        result = [next(numbers) for _ in values]
        self._read_conditions([next(numbers) for _ in conditions])
        for q in self._pending:
            q.loss = next(numbers)
            q.earlier = [next(numbers) for _ in q.earlier]
            q.logs = {key: next(numbers) for key in q.logs}
        return result

    def flush(self, count: int | None = None) -> None:
        """Read the first `count` (default all) queued steps' values (one transfer) and write their bar postfix,
        lines and scalars."""
        count = len(self._pending) if count is None else count
        pending, self._pending = self._pending[:count], self._pending[count:]
        if not pending:
            return
        numbers = iter(read_scalars([v for queued in pending for v in queued.values()]))
        for queued in pending:
            queued.loss = next(numbers)
            queued.earlier = [next(numbers) for _ in queued.earlier]
            if queued.average is None:
                queued.record(self.losses)
            read = {"loss/current": queued.loss, "loss/average": queued.average}
            read.update({key: next(numbers) for key in queued.logs})
            self._show(queued.global_step, queued.epoch, read, queued.seconds)

    def epoch_average(self) -> float:
        if self._deferred_average():
            self.flush()
        return self.losses.average

    def _show(self, global_step: int, epoch: int, logs: dict[str, float], seconds_per_step: float) -> None:
        shown = {"loss": f"{logs.get('loss/current', float('nan')):.4f}",
                 "avr_loss": f"{logs.get('loss/average', float('nan')):.4f}"}
        lr = next((v for k, v in logs.items() if k.startswith("lr/")), None)
        if lr is not None:
            shown["lr"] = f"{lr:.3g}"
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
        else:
            fields = " ".join(f"{k}={v}" for k, v in shown.items())
            print(f"step {global_step}/{self.total_steps} epoch {epoch} {fields} {seconds_per_step:.2f}s/it",
                  flush=True)
        self.epoch = epoch
        self.history.add_step(global_step, logs)
        self._write_scalars(global_step, logs)

    def scalars(self, global_step: int, logs: dict[str, float]) -> None:
        """Log scalars (after the queued steps) to every tracker, at the step."""
        if not self.is_main:
            return
        self.flush()
        self._add_validation(global_step, logs)
        self._write_scalars(global_step, logs)

    def _add_validation(self, global_step: int, logs: dict[str, float]) -> None:
        for name in ("loss/validation/step_average", "loss/validation/epoch_average"):
            if name in logs:  # the loss plot marks every validation at its step
                self.history.add_validation(global_step, logs[name])

    def epoch_scalars(self, global_step: int, epoch: int, logs: dict[str, float]) -> None:
        """Per-epoch scalars (`loss/epoch_average`): plotted against the epoch, as sd-scripts does."""
        if not self.is_main:
            return
        if self._deferred_average():
            self.flush()
        self.epoch = epoch
        self._add_validation(global_step, logs)
        self._write_scalars(global_step, logs, x_value=epoch)

    def _write_scalars(self, global_step: int, logs: dict[str, float], *, x_value: int | None = None) -> None:
        """TensorBoard and the others plot the values at `x_value` (default: the step); wandb gets the step and
        the epoch as values (its own step must only grow)."""
        for tracker in self.trackers:
            if tracker.name == "wandb":
                tracker.log({**logs, "global_step": global_step, "epoch": self.epoch})
            else:
                tracker.log(logs, step=global_step if x_value is None else x_value)

    def samples(self, step: int, samples: Sequence[tuple[Path, str]]) -> None:
        """The images of one sampling round: kept for the grid picture and sent to trackers that show images
        (TensorBoard, wandb) as `sample_<i>`."""
        if not self.is_main or not samples:
            return
        self.flush()
        self.latest_samples = list(samples)
        if not any(t.name in ("tensorboard", "wandb") for t in self.trackers):
            return
        from PIL import Image

        arrays = []
        for path, prompt in samples:
            with Image.open(path) as image:
                arrays.append((np.asarray(image.convert("RGB")), prompt))  # [H, W, 3] uint8
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({f"sample_{i}": pixels[None] for i, (pixels, _) in enumerate(arrays)},
                                   step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({**{f"sample_{i}": wandb.Image(pixels, caption=prompt)
                                for i, (pixels, prompt) in enumerate(arrays)},
                             "global_step": step, "epoch": self.epoch})

    # --- time that is not training ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def excluded(self, kind: str) -> Iterator[None]:
        """Time spent on `kind` (sampling, validation, saving) is left out of the training s/step."""
        start = time.time()
        try:
            yield
        finally:
            seconds = time.time() - start
            self.excluded_seconds[kind] = self.excluded_seconds.get(kind, 0.0) + seconds
            self.paused_since_last_step += seconds

    # --- pictures and messages ----------------------------------------------------------------------------------

    def write_pictures(self, output_dir: str | Path, output_name: str | None) -> None:
        """The loss/learning-rate plot and the grid of the latest samples (see library/training/pictures.py)."""
        if not self.is_main:
            return
        self.flush()
        try:
            plot = pictures.write_loss_plot(pictures.loss_plot_path(output_dir, output_name), self.history)
        except ImportError:  # an environment without matplotlib (a requirement) still trains and saves
            if "loss plot" not in self.missing_pictures:
                self.missing_pictures.add("loss plot")
                logger.warning("no loss plot: matplotlib is not installed (pip install matplotlib)")
            plot = None
        if plot is not None:
            self.pictures["loss plot"] = plot
        grid = pictures.write_sample_grid(pictures.sample_grid_path(output_dir, output_name), self.latest_samples)
        if grid is not None:
            self.pictures["sample grid"] = grid

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        self.flush()
        if self.bar is not None and self.redirect is None:
            self.bar.write(text)
        else:
            logger.info(text)

    def close(self) -> None:
        """Close the bar (the trackers are finished by `accelerator.end_training()`)."""
        self.flush()
        if self._conditions:
            self.read_with()  # the warn_if flags still unread
        if self.redirect is not None:
            self.redirect.close()
            self.redirect = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self, *, steps: int, output_file: str | None, device: torch.device) -> str:
        """One block of text at the end: steps, wall time, training s/step (sampling, validation and saving
        left out), peak accelerator memory, output file and pictures."""
        self.flush()
        elapsed = time.time() - self.start_time
        run_steps = steps - self.initial_step
        if self.initial_step:  # resumed: say what this run did
            lines = [f"training finished at step {steps}: {run_steps} steps in this run, {format_duration(elapsed)}"]
        else:
            lines = [f"training finished: {steps} steps in {format_duration(elapsed)}"]
        if run_steps > 0:
            training = elapsed - sum(self.excluded_seconds.values())
            excluded = ", ".join(f"{kind} {sec:.1f} s" for kind, sec in self.excluded_seconds.items())
            lines.append(f"  training {training / run_steps:.2f} s/step" + (f" ({excluded} not counted)"
                                                                             if excluded else ""))
        peak, kind = peak_memory_bytes(device)
        lines.append(f"  peak memory: {peak / 2**30:.2f} GiB ({kind})" if peak is not None
                     else "  peak memory: not tracked on this device")
        if output_file:
            lines.append(f"  output: {output_file}")
        for name, path in self.pictures.items():
            lines.append(f"  {name}: {path}")
        text = "\n".join(lines)
        if self.is_main:
            print(text, flush=True)
        return text


def _is_console_handler(handler: logging.Handler) -> bool:
    return type(handler) is logging.StreamHandler and getattr(handler, "stream", None) in (sys.stdout, sys.stderr)


def lr_logs(lr_scheduler: Any, descriptions: list[str], optimizer: Any = None) -> dict[str, float | torch.Tensor]:
    """`lr/<group description>` for every optimizer parameter group (`lr/unet`, `lr/textencoder 1`, ...; a
    tensor where the optimizer computes its LR on the device: the reporter reads it at log time), and for
    D-Adaptation / Prodigy (groups holding their estimate `d`) the effective `lr/d*lr/<group>`: their scheduled
    lr is a factor (usually 1.0), d times it is the step size actually used. ProdigyPlusScheduleFree logs the
    first group's as `lr/d*lr`, as sd-scripts names it."""
    lrs = lr_scheduler.get_last_lr()
    groups = optimizer.param_groups if optimizer is not None else []
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    prodigy_plus = type(inner).__name__.lower().endswith("prodigyplusschedulefree")
    logs: dict[str, float | torch.Tensor] = {}
    for i, lr in enumerate(lrs):
        name = descriptions[i] if i < len(descriptions) and descriptions[i] else f"group{i}"
        lr = lr.detach() if isinstance(lr, torch.Tensor) else float(lr)
        logs[f"lr/{name}"] = lr
        d = groups[i].get("d") if i < len(groups) else None
        if d is not None and (i == 0 or not prodigy_plus):
            logs["lr/d*lr" if prodigy_plus else f"lr/d*lr/{name}"] = (
                d.detach() if isinstance(d, torch.Tensor) else float(d)) * lr
    return logs


def peak_memory_bytes(device: torch.device) -> tuple[int | None, str]:
    """Peak memory of the training device: allocated CUDA memory, or this process's peak RSS on the CPU."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device), "CUDA allocated"
    if device.type == "cpu":
        try:
            import resource
        except ImportError:  # not on Windows
            return None, ""
        # ru_maxrss is KiB on Linux, bytes on macOS.
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "process RSS"
    return None, ""


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"

"""What a training run tells the user: progress bar, per-step log lines, TensorBoard scalars, end summary.

Only the main process reports. In an interactive terminal a tqdm bar shows loss, lr and s/it; when stdout is
not a terminal (logs, CI, nohup) one plain line per optimizer step is printed instead, so log files stay
readable.

The per-step loss (and an LR the optimizer computes on the device) stays a device tensor until it is reported:
reading a CUDA value on the host waits for the queued work, which empties the GPU's queue every step. The
reporter queues the steps and reads all their values with one transfer every `LOSS_READ_INTERVAL` steps, and
before any other output (messages, scalars, the epoch average, the summary), so every line and scalar keeps its
value and its order; the bar still advances at every step.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

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
    for name in (logger.name, *PACKAGE_LOGGERS):
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).setLevel(level or "INFO")
    logger.propagate = False


class LossRecorder:
    """Moving average of the per-step loss over the current epoch (`loss/average`)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.total = 0.0

    def add(self, epoch_step: int, loss: float) -> None:
        # epoch_step counts from 0 inside an epoch; a new epoch overwrites the list slot by slot.
        if epoch_step < len(self.losses):
            self.total -= self.losses[epoch_step]
            self.losses[epoch_step] = loss
        else:
            self.losses.append(loss)
        self.total += loss

    def reset(self) -> None:
        self.losses.clear()
        self.total = 0.0

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


class TrainingReporter:
    """Progress display, per-step lines and TensorBoard scalars of one run (no-op on non-main processes)."""

    def __init__(self, *, total_steps: int, initial_step: int, is_main_process: bool, logging_dir: str | None,
                 log_prefix: str | None = None, interactive: bool | None = None) -> None:
        self.is_main = is_main_process
        self.total_steps = total_steps
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        self.start_time = time.time()
        self.last_step_time = self.start_time
        self.initial_step = initial_step
        self.losses = LossRecorder()
        # Queued optimizer steps: (global step, epoch, step in epoch, loss, other logs, seconds the step took).
        self._pending: list[tuple[int, int, int, float | torch.Tensor, dict[str, Any], float]] = []
        self.bar = None
        if self.is_main and self.interactive:
            self.bar = tqdm(total=total_steps, initial=initial_step, desc="steps", smoothing=0.1, dynamic_ncols=True)
        self.writer = None
        self.run_dir: Path | None = None
        if self.is_main and logging_dir:
            from torch.utils.tensorboard import SummaryWriter  # imported only when asked for

            self.run_dir = Path(logging_dir) / f"{log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}"
            self.writer = SummaryWriter(log_dir=str(self.run_dir))

    def train_step(self, global_step: int, epoch: int, step_in_epoch: int, loss: float | torch.Tensor,
                   logs: dict[str, float | torch.Tensor]) -> None:
        """Report one optimizer step: `loss/current`, `loss/average` (over the epoch so far) and `logs`.

        Tensor values are read later (see the module docstring); the bar advances now."""
        if not self.is_main:
            return
        now = time.time()
        seconds_per_step = now - self.last_step_time
        self.last_step_time = now
        if self.bar is not None:
            self.bar.update(1)
        self._pending.append((global_step, epoch, step_in_epoch, loss, logs, seconds_per_step))
        if len(self._pending) >= LOSS_READ_INTERVAL:
            self.flush()

    def flush(self) -> None:
        """Read the queued steps' values (one transfer) and write their bar postfix, lines and scalars."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        flat: list[float | torch.Tensor] = []
        for _, _, _, loss, logs, _ in pending:
            flat.append(loss)
            flat.extend(logs.values())
        numbers = iter(read_scalars(flat))
        for global_step, epoch, step_in_epoch, _, logs, seconds_per_step in pending:
            loss = next(numbers)
            self.losses.add(step_in_epoch, loss)
            read = {"loss/current": loss, "loss/average": self.losses.average}
            read.update({key: next(numbers) for key in logs})
            self._show(global_step, epoch, read, seconds_per_step)

    def new_epoch(self) -> None:
        """Start the epoch's loss average afresh (after reporting the queued steps of the last epoch)."""
        self.flush()
        self.losses.reset()

    def epoch_average(self) -> float:
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
        self._write_scalars(global_step, logs)

    def scalars(self, global_step: int, logs: dict[str, float]) -> None:
        self.flush()
        self._write_scalars(global_step, logs)

    def _write_scalars(self, global_step: int, logs: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in logs.items():
                self.writer.add_scalar(key, value, global_step)

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        self.flush()
        if self.bar is not None:
            self.bar.write(text)
        else:
            logger.info(text)

    def close(self) -> None:
        self.flush()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None

    def summary(self, *, steps: int, output_file: str | None, device: torch.device) -> str:
        """One block of text at the end: steps, wall time, peak accelerator memory, output file."""
        self.flush()
        elapsed = time.time() - self.start_time
        if self.initial_step:  # resumed: say what this run did
            lines = [f"training finished at step {steps}: {steps - self.initial_step} steps in this run, "
                     f"{format_duration(elapsed)}"]
        else:
            lines = [f"training finished: {steps} steps in {format_duration(elapsed)}"]
        if steps > self.initial_step:
            lines.append(f"  average {elapsed / (steps - self.initial_step):.2f} s/step")
        peak, kind = peak_memory_bytes(device)
        lines.append(f"  peak memory: {peak / 2**30:.2f} GiB ({kind})" if peak is not None
                     else "  peak memory: not tracked on this device")
        if output_file:
            lines.append(f"  output: {output_file}")
        text = "\n".join(lines)
        if self.is_main:
            print(text, flush=True)
        return text


def lr_logs(lr_scheduler: Any, descriptions: list[str]) -> dict[str, float | torch.Tensor]:
    """`lr/<group description>` for every optimizer parameter group (a tensor where the optimizer computes its
    LR on the device: the reporter reads it at log time)."""
    lrs = lr_scheduler.get_last_lr()
    logs: dict[str, float | torch.Tensor] = {}
    for i, lr in enumerate(lrs):
        name = descriptions[i] if i < len(descriptions) and descriptions[i] else f"group{i}"
        logs[f"lr/{name}"] = lr.detach() if isinstance(lr, torch.Tensor) else float(lr)
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

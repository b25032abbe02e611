"""What a training run tells the user: progress bar, per-step log lines, TensorBoard scalars, end summary.

Only the main process reports. In an interactive terminal a tqdm bar shows loss, lr and s/it; when stdout is
not a terminal (logs, CI, nohup) one plain line per optimizer step is printed instead, so log files stay
readable.
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
        self.bar = None
        if self.is_main and self.interactive:
            self.bar = tqdm(total=total_steps, initial=initial_step, desc="steps", smoothing=0.1, dynamic_ncols=True)
        self.writer = None
        self.run_dir: Path | None = None
        if self.is_main and logging_dir:
            from torch.utils.tensorboard import SummaryWriter  # imported only when asked for

            self.run_dir = Path(logging_dir) / f"{log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}"
            self.writer = SummaryWriter(log_dir=str(self.run_dir))

    def step(self, global_step: int, epoch: int, logs: dict[str, float]) -> None:
        """Report one optimizer step: bar postfix or a log line, and TensorBoard scalars."""
        if not self.is_main:
            return
        now = time.time()
        seconds_per_step = now - self.last_step_time
        self.last_step_time = now
        shown = {"loss": f"{logs.get('loss/current', float('nan')):.4f}",
                 "avr_loss": f"{logs.get('loss/average', float('nan')):.4f}"}
        lr = next((v for k, v in logs.items() if k.startswith("lr/")), None)
        if lr is not None:
            shown["lr"] = f"{lr:.3g}"
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
        else:
            fields = " ".join(f"{k}={v}" for k, v in shown.items())
            print(f"step {global_step}/{self.total_steps} epoch {epoch} {fields} {seconds_per_step:.2f}s/it",
                  flush=True)
        self.scalars(global_step, logs)

    def scalars(self, global_step: int, logs: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in logs.items():
                self.writer.add_scalar(key, value, global_step)

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            logger.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None

    def summary(self, *, steps: int, output_file: str | None, device: torch.device) -> str:
        """One block of text at the end: steps, wall time, peak accelerator memory, output file."""
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


def lr_logs(lr_scheduler: Any, descriptions: list[str]) -> dict[str, float]:
    """`lr/<group description>` for every optimizer parameter group."""
    lrs = lr_scheduler.get_last_lr()
    logs = {}
    for i, lr in enumerate(lrs):
        name = descriptions[i] if i < len(descriptions) and descriptions[i] else f"group{i}"
        logs[f"lr/{name}"] = float(lr)
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

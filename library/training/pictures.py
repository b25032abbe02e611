"""Pictures of a run, written into --output_dir at every save and at the end (main process only):

* `<output_name>_loss.png`: the loss per step (current and the epoch's moving average, validation points)
  above the learning rate(s) per step (the effective d*lr for D-Adaptation/Prodigy);
* `<output_name>_samples.png`: the latest sample images side by side, each with its prompt underneath.

`<output_name>` falls back to "last" like the final LoRA file. Both are written atomically (a temporary file
moved into place), so a viewer never sees half a picture. The plot uses matplotlib's Agg canvas directly
(no pyplot, no global backend switch, no display needed).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from library.io.files import atomic_write

LOSS_PLOT_SUFFIX = "_loss.png"
SAMPLE_GRID_SUFFIX = "_samples.png"
GRID_TILE = 256  # longest side of one sample in the grid, pixels
CAPTION_LINES = 3


@dataclass
class RunHistory:
    """Per-step values the loss plot draws (kept by the reporter)."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    average: list[float] = field(default_factory=list)
    lrs: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # name -> (step, lr)
    validation: list[tuple[int, float]] = field(default_factory=list)

    def add_step(self, step: int, logs: dict[str, float]) -> None:
        if "loss/current" in logs:
            self.steps.append(step)
            self.loss.append(float(logs["loss/current"]))
            self.average.append(float(logs.get("loss/average", logs["loss/current"])))
        effective = {k.removeprefix("lr/d*lr/") for k in logs if k.startswith("lr/d*lr/")}
        for key, value in logs.items():
            if not key.startswith("lr/"):
                continue
            name = key.removeprefix("lr/")
            if name in effective:  # the scheduled factor (often 1.0): its d*lr is what moves the weights
                continue
            self.lrs.setdefault(name, []).append((step, float(value)))

    def add_validation(self, step: int, loss: float) -> None:
        self.validation.append((step, float(loss)))


def loss_plot_path(output_dir: str | Path, output_name: str | None) -> Path:
    return Path(output_dir) / f"{output_name or 'last'}{LOSS_PLOT_SUFFIX}"


def sample_grid_path(output_dir: str | Path, output_name: str | None) -> Path:
    return Path(output_dir) / f"{output_name or 'last'}{SAMPLE_GRID_SUFFIX}"


def write_loss_plot(path: Path, history: RunHistory) -> Path | None:
    """Loss (top) and learning rate (bottom) against the optimizer step; None when no step was recorded."""
    if not history.steps:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    loss_axes.plot(history.steps, history.loss, color="#9ab", linewidth=0.8, label="loss/current")
    loss_axes.plot(history.steps, history.average, color="#136", linewidth=1.6, label="loss/average")
    if history.validation:
        steps, values = zip(*history.validation)
        loss_axes.plot(steps, values, "o-", color="#c50", markersize=3, linewidth=1.0,
                       label="validation loss")
    loss_axes.set_ylabel("loss")
    loss_axes.grid(alpha=0.3)
    loss_axes.legend(loc="upper right", fontsize="small")
    for name, points in history.lrs.items():
        steps, values = zip(*points)
        lr_axes.plot(steps, values, linewidth=1.2, label=name)
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("step")
    lr_axes.grid(alpha=0.3)
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if history.lrs:
        lr_axes.legend(loc="upper right", fontsize="small")
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def write_sample_grid(path: Path, samples: Sequence[tuple[Path, str]]) -> Path | None:
    """The sample images (each scaled to fill a GRID_TILE square, aspect kept) in a near-square grid, each with the first
    lines of its prompt underneath; None when there is no sample."""
    tiles = []
    for image_path, prompt in samples:
        with Image.open(image_path) as image:
            tile = image.convert("RGB")
        scale = min(GRID_TILE / tile.width, GRID_TILE / tile.height)
        size = (max(round(tile.width * scale), 1), max(round(tile.height * scale), 1))
        # Small samples are enlarged with square pixels (nothing invented), large ones reduced smoothly.
        tile = tile.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
        tiles.append((tile, prompt))
    if not tiles:
        return None
    font = ImageFont.load_default()
    line_height = font.getbbox("Ag")[3] + 4
    caption_height = CAPTION_LINES * line_height + 6
    columns = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    cell_w, cell_h = GRID_TILE + 8, GRID_TILE + caption_height + 8
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    chars_per_line = max(GRID_TILE // max(font.getbbox("x")[2], 1), 8)
    for i, (tile, prompt) in enumerate(tiles):
        x, y = (i % columns) * cell_w + 4, (i // columns) * cell_h + 4
        grid.paste(tile, (x + (GRID_TILE - tile.width) // 2, y + (GRID_TILE - tile.height) // 2))
        lines = textwrap.wrap(prompt, chars_per_line, max_lines=CAPTION_LINES, placeholder=" ...") or [""]
        for j, line in enumerate(lines):
            draw.text((x, y + GRID_TILE + 4 + j * line_height), line, fill="black", font=font)
    return atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))

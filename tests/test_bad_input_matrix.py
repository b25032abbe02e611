"""Bad input and faults, case by case: flags and argparse, the run lock, leftover files, damaged caches and failed
writes. Each case asserts exactly one `error:` line on stderr and no traceback, the exit code, that no model
was loaded before the error (where the input can be judged without one), and that the
output, cache and dataset folders are unchanged (no file or folder appears, changes or goes; a run that got
past its input checks removes its run lock and the output folder the lock created).

The CLI runs in-process through `anima_train_network.main(argv)` (fast); two cases run it as a subprocess."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from test_damaged_caches import corrupt_member
from test_run_safety import hold_lock_in_subprocess
from train_helpers import tiny_train_argv

import anima_train_network
from anima_train_network import AnimaNetworkTrainer
from library.data.cache_files import text_npz_path
from library.io.npz import read_npz, save_npz_atomic

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Case:
    argv: list[str]
    expected: str  # a part of the error line
    code: int = 2
    folders: list[Path] = field(default_factory=list)  # checked unchanged besides --output_dir and the dataset
    holder: subprocess.Popen | None = None  # a process holding the run lock, killed after the case
    before_models: bool = True  # the error comes before any model weights are loaded


@dataclass
class World:
    """A private copy of the tiny dataset (cache files can be written and damaged) plus an output folder."""

    tiny: object
    tmp: Path
    images: Path
    dataset: Path
    out: Path
    monkeypatch: pytest.MonkeyPatch

    def argv(self, *extra: str) -> list[str]:
        return tiny_train_argv(self.tiny, self.out, "--max_train_steps", "1", *extra, dataset=self.dataset)

    def missing(self, name: str) -> str:
        return str(self.tmp / "missing" / name)


def make_world(tiny, tmp: Path, monkeypatch) -> World:
    images = tmp / "images"
    shutil.copytree(tiny.image_dir, images)
    dataset = tmp / "dataset.toml"
    dataset.write_text(tiny.dataset_toml.read_text(encoding="utf-8").replace(str(tiny.image_dir), str(images)),
                       encoding="utf-8")
    return World(tiny, tmp, images, dataset, tmp / "out", monkeypatch)


def snapshot(folder: Path) -> dict[str, bytes | None] | None:
    """Every file (its bytes) and folder (None) under `folder`; None if `folder` does not exist."""
    if not folder.exists():
        return None
    if folder.is_file():
        return {"": folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def write_disk_caches(world: World) -> None:
    argv = world.argv("--cache_only", "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk")
    assert anima_train_network.main(argv) == 0


def first_image(world: World) -> Path:
    return sorted(world.images.glob("*.png"))[0]


def must_not_run(*_args, **_kwargs):
    raise AssertionError("models were loaded before the bad input was reported")


def raise_enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# --- the cases ----------------------------------------------------------------------------------------------

CASES: dict[str, Callable[[World], Case]] = {}


def case(function: Callable[[World], Case]) -> Callable[[World], Case]:
    CASES[function.__name__] = function
    return function


# Flags and argparse.

@case
def misspelt_flag(w):
    return Case(w.argv("--learnign_rate", "1e-4"), "(--learnign_rate: did you mean --learning_rate?)")


@case
def unknown_flag_without_a_close_match(w):
    return Case(w.argv("--qqqqqq"), "unrecognized arguments: --qqqqqq; see anima_train_network.py --help")


@case
def integer_flag_given_a_word(w):
    return Case(w.argv("--max_train_steps", "many"), "argument --max_train_steps: invalid int value: 'many'")


@case
def invalid_choice(w):
    return Case(w.argv("--mixed_precision", "fp32"), "argument --mixed_precision: invalid choice: 'fp32'")


@case
def zero_train_steps(w):
    return Case(w.argv("--max_train_steps", "0"), "--max_train_steps must be at least 1")


@case
def min_timestep_above_1000(w):
    return Case(w.argv("--min_timestep", "1001"), "--min_timestep 1001: must be between 0 and 1000")


@case
def min_timestep_above_max_timestep(w):
    return Case(w.argv("--min_timestep", "900", "--max_timestep", "100"), "must not exceed --max_timestep 100")


@case
def full_fp16_without_fp16(w):
    return Case(w.argv("--full_fp16"), "--full_fp16 needs --mixed_precision fp16")


@case
def too_many_blocks_to_swap(w):
    return Case(w.argv("--blocks_to_swap", "99"), "--blocks_to_swap 99: must be between 1 and")


@case
def inference_only_attention(w):
    return Case(w.argv("--attn_mode", "sageattn"), "--attn_mode sageattn is inference only")


@case
def warmup_with_the_constant_scheduler(w):
    return Case(w.argv("--lr_warmup_steps", "10"), "--lr_warmup_steps must be 0 with the constant scheduler")


@case
def cache_only_without_disk_caches(w):
    return Case(w.argv("--cache_only"), "--cache_only writes disk caches")


@case
def missing_tracker_config(w):
    return Case(w.argv("--logging_dir", str(w.tmp / "logs"), "--log_tracker_config", w.missing("trackers.toml")),
                "--log_tracker_config")


@case
def deepspeed(w):
    return Case(w.argv("--deepspeed"), "--deepspeed: DeepSpeed is not supported")


@case
def missing_config_file(w):
    return Case(w.argv("--config_file", w.missing("run.toml")), "--config_file")


@case
def misspelt_key_in_config_file(w):
    config = w.tmp / "run.toml"
    config.write_text("learnign_rate = 1e-4\n", encoding="utf-8")
    return Case(w.argv("--config_file", str(config)), "unknown key 'learnign_rate'", folders=[w.tmp / "run.toml"])


@case
def output_config_that_exists(w):
    config = w.tmp / "run.toml"
    config.write_text("learning_rate = 1e-4\n", encoding="utf-8")
    return Case(w.argv("--output_config", str(config)), "already exists", folders=[config])


@case
def missing_resume_folder(w):
    return Case(w.argv("--resume", w.missing("tiny-state")), "--resume")


@case
def missing_dataset_config(w):
    argv = w.argv()
    argv[argv.index("--dataset_config") + 1] = w.missing("dataset.toml")
    return Case(argv, "--dataset_config")


@case
def missing_sample_prompts(w):
    return Case(w.argv("--sample_prompts", w.missing("prompts.txt")), "--sample_prompts")


@case
def missing_network_weights(w):
    return Case(w.argv("--network_weights", w.missing("lora.safetensors")), "--network_weights")


@case
def unknown_network_arg(w):
    return Case(w.argv("--network_args", "no_such_option=1"), "--network_args")


# The run lock and the output folder.

@case
def output_folder_locked_by_a_running_process(w):
    holder = hold_lock_in_subprocess(w.out, "tiny")
    return Case(w.argv(), f"another run is writing these files (pid {holder.pid} on ", holder=holder)


@case
def output_dir_under_a_file(w):
    (w.tmp / "a_file").write_text("x")
    argv = w.argv()
    w.out = w.tmp / "a_file" / "out"
    argv[argv.index("--output_dir") + 1] = str(w.out)
    return Case(argv, "--output_dir", folders=[w.tmp / "a_file"])


@case
def leftovers_stay_when_the_input_is_bad(w):
    w.out.mkdir()
    (w.out / f".tiny.tmp{dead_pid()}.safetensors").write_bytes(b"half")
    argv = w.argv()
    argv[argv.index("--vae") + 1] = str(w.tiny.dit)
    return Case(argv, "--vae")


# Caches.

@case
def images_sharing_a_cache_file(w):
    png = first_image(w)
    shutil.copy(png, png.with_suffix(".webp"))
    return Case(w.argv("--cache_latents_to_disk"), "would share the cache file", before_models=False)


@case
def damaged_latent_cache_reused_with_skip_cache_check(w):
    write_disk_caches(w)
    [path] = w.images.glob(f"{first_image(w).stem}_*_anima.npz")
    arrays = read_npz(str(path))
    key = next(k for k in arrays if k.startswith("latents_"))
    arrays[key] = np.zeros((16, 1, 1), np.float32)
    save_npz_atomic(str(path), arrays)
    # One epoch (5 batches), so every cached file is read.
    return Case(w.argv("--cache_latents_to_disk", "--skip_cache_check", "--max_train_steps", "5"),
                f"latent cache {path} is damaged", before_models=False)


@case
def damaged_text_cache_reused_with_skip_cache_check(w):
    write_disk_caches(w)
    path = Path(text_npz_path(first_image(w)))
    corrupt_member(str(path), "prompt_embeds.npy")  # the zip directory stays intact: only reading shows it
    return Case(w.argv("--cache_text_encoder_outputs_to_disk", "--skip_cache_check", "--max_train_steps", "5"),
                f"text cache {path} cannot be read", before_models=False)


@case
def damaged_text_cache_read_by_a_dataloader_worker(w):
    write_disk_caches(w)
    path = Path(text_npz_path(first_image(w)))
    corrupt_member(str(path), "prompt_embeds.npy")
    # The worker's AnimaError reaches the main process as its one line, not as the worker's traceback.
    return Case(w.argv("--cache_text_encoder_outputs_to_disk", "--skip_cache_check", "--max_train_steps", "5",
                       "--max_data_loader_n_workers", "1"), f"text cache {path} cannot be read (BadZipFile",
                before_models=False)


# Failed writes.

@case
def disk_full_while_caching_latents(w):
    w.monkeypatch.setattr(np, "savez", raise_enospc)
    return Case(w.argv("--cache_latents_to_disk"), "_anima.npz: the disk is full; nothing was replaced and the "
                "files written before are intact", before_models=False)


@case
def disk_full_while_saving_the_lora(w):
    from safetensors import SafetensorError

    def full(*_args, **_kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    w.monkeypatch.setattr("networks.lora_format.save_file", full)
    return Case(w.argv(), f"cannot write {w.out / 'tiny.safetensors'}: the disk is full", before_models=False)


@case
def permission_denied_while_saving_the_state(w):
    def denied(*_args, **_kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    w.monkeypatch.setattr(torch, "save", denied)
    return Case(w.argv("--save_state"), f"cannot write {w.out / 'tiny-state'}: permission denied",
                before_models=False)


@case
def disk_full_while_saving_a_sample_image(w):
    prompts = w.tmp / "prompts.txt"
    prompts.write_text("a red square --w 64 --h 64 --s 1 --d 1\n", encoding="utf-8")
    w.monkeypatch.setattr("PIL.Image.Image.save", raise_enospc)
    return Case(w.argv("--sample_prompts", str(prompts), "--sample_at_first"), "the disk is full",
                folders=[prompts], before_models=False)


def assert_one_error_line(stderr: str, expected: str) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_ends_with_one_error_line_and_changes_nothing(name, tiny_setup, tmp_path, monkeypatch, capsys):
    world = make_world(tiny_setup, tmp_path, monkeypatch)
    bad = CASES[name](world)
    watched = [world.out, world.images, *bad.folders]
    if bad.before_models:
        for phase in ("load_frozen_models", "write_caches_only", "load_dit"):
            monkeypatch.setattr(AnimaNetworkTrainer, phase, must_not_run)
    before = [snapshot(folder) for folder in watched]
    capsys.readouterr()
    try:
        code = anima_train_network.main(bad.argv)
    finally:
        if bad.holder is not None:
            bad.holder.kill()
            bad.holder.wait()
    err = capsys.readouterr().err
    assert code == bad.code, err[-3000:]
    assert_one_error_line(err, bad.expected)
    assert [snapshot(folder) for folder in watched] == before


def test_case_count_covers_the_areas():
    assert len(CASES) >= 30


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["misspelt_flag", "locked_output"])
def test_bad_input_through_the_command_line_script(kind, tiny_setup, tmp_path, monkeypatch):
    world = make_world(tiny_setup, tmp_path, monkeypatch)
    holder = hold_lock_in_subprocess(world.out, "tiny") if kind == "locked_output" else None
    argv = world.argv("--learnign_rate", "1") if kind == "misspelt_flag" else world.argv()
    expected = "did you mean --learning_rate?" if holder is None else f"(pid {holder.pid} on "
    before = snapshot(world.out), snapshot(world.images)
    try:
        done = subprocess.run([sys.executable, "anima_train_network.py", *argv], cwd=REPO, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    assert done.returncode == 2, done.stderr[-3000:]
    assert_one_error_line(done.stderr, expected)
    assert (snapshot(world.out), snapshot(world.images)) == before

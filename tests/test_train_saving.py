"""Checkpoint names, pruning windows, atomic writes and state counters."""

from __future__ import annotations

import argparse
import json
import os
import stat

import pytest
import torch

from library.errors import AnimaError
from library.io import files
from library.training import outputs
from library.training.schedule import Position
from library.training.state import TrainState, read_train_state, write_train_state


def names_args(**kw) -> argparse.Namespace:
    return argparse.Namespace(output_name=kw.get("output_name"), save_model_as=kw.get("save_model_as", "safetensors"))


def test_file_names_follow_the_sd_scripts_patterns():
    args = names_args(output_name="my")
    assert outputs.epoch_model_name(args, 3) == "my-000003.safetensors"
    assert outputs.step_model_name(args, 50) == "my-step00000050.safetensors"
    assert outputs.last_model_name(args) == "my.safetensors"
    assert outputs.epoch_state_name(args, 3) == "my-000003-state"
    unnamed = names_args(save_model_as="pt")
    assert outputs.epoch_model_name(unnamed, 1) == "epoch-000001.pt"
    assert outputs.step_model_name(unnamed, 2) == "at-step00000002.pt"
    assert outputs.last_state_name(unnamed) == "last-state"


def test_step_pruning_keeps_the_last_n_steps():
    # Saves every 10 steps, keep the last 20 steps: after saving 40, step 10 goes (20 and 30 stay).
    assert outputs.step_to_prune(40, 10, 20) == 10
    assert outputs.step_to_prune(20, 10, 20) is None
    assert outputs.step_to_prune(40, 10, None) is None


def test_epoch_pruning_keeps_the_last_n_epoch_files():
    assert outputs.epoch_to_prune(5, 1, 2) == 3
    assert outputs.epoch_to_prune(2, 1, 2) is None
    assert outputs.epoch_to_prune(6, 2, 2) == 2


def test_atomic_dir_replaces_an_old_state_and_leaves_no_temp(tmp_path):
    target = tmp_path / "s"
    files.atomic_write_dir(target, lambda d: (d / "a.txt").write_text("1"))
    files.atomic_write_dir(target, lambda d: (d / "b.txt").write_text("2"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_failed_atomic_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "x.safetensors"
    target.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(AnimaError, match="cannot write .*x.safetensors: disk full; nothing was replaced"):
        files.atomic_write(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


@pytest.mark.parametrize(("position", "current_epoch"), [
    (Position(epoch=2, batches_done=3, global_step=17), 3),  # part-way through the third epoch
    (Position(epoch=2, batches_done=5, global_step=15), 3),  # after the third epoch's last step, before its end
    (Position(epoch=3, batches_done=0, global_step=15), 3),  # written by the third epoch's end
])
def test_train_state_json_holds_sd_scripts_counters(tmp_path, position, current_epoch):
    # sd-scripts writes current_epoch (the 1-based epoch the state's last step is in) and current_step (the
    # optimizer steps done); the exact position is kept beside them and read back.
    write_train_state(tmp_path, TrainState(position=position, seed=1))
    data = json.loads((tmp_path / "train_state.json").read_text())
    assert (data["current_epoch"], data["current_step"]) == (current_epoch, position.global_step)
    assert read_train_state(tmp_path).position == position


def test_train_state_of_the_previous_format_still_reads(tmp_path):
    # Format 2 kept the 0-based epoch in progress under current_epoch.
    (tmp_path / "train_state.json").write_text(
        '{"format": 2, "kind": "periodic", "current_epoch": 1, "epoch_step": 4, "global_step": 9, "seed": 3}')
    assert read_train_state(tmp_path).position == Position(epoch=1, batches_done=4, global_step=9)


def test_a_state_folder_written_by_sd_scripts_is_refused_naming_its_lora_weights(tmp_path):
    (tmp_path / "train_state.json").write_text('{"current_epoch": 2, "current_step": 40}')
    with pytest.raises(AnimaError, match=r"written by sd-scripts.*--network_weights .*model\.safetensors"):
        read_train_state(tmp_path)


def test_train_state_round_trip_and_bad_folder(tmp_path):
    state = TrainState(position=Position(epoch=2, batches_done=3, global_step=17), seed=5, kind="periodic",
                       facts={"batches_per_epoch": 9}, settings={"learning_rate": 0.5})
    write_train_state(tmp_path, state)
    assert read_train_state(tmp_path) == state
    with pytest.raises(AnimaError, match="--resume"):
        read_train_state(tmp_path / "nothing")
    (tmp_path / "train_state.json").write_text('{"current_epoch": 1, "global_step": -4}')
    with pytest.raises(AnimaError, match="damaged"):
        read_train_state(tmp_path)


def test_train_state_of_the_earlier_format_reads_with_its_counters(tmp_path):
    (tmp_path / "train_state.json").write_text('{"current_epoch": 1, "global_step": 7, "epoch_step": 2}')
    state = read_train_state(tmp_path)
    assert state.position == Position(epoch=1, batches_done=2, global_step=7)
    assert state.seed is None and state.settings is None


def test_end_summary_reports_steps_output_and_cpu_peak_memory():
    from library.training.reporting import TrainingReporter

    reporter = TrainingReporter(total_steps=3, initial_step=0, is_main_process=True, interactive=False)
    text = reporter.summary(steps=3, output_file="out/last.safetensors", device=torch.device("cpu"))
    reporter.close()
    assert "3 steps" in text and "out/last.safetensors" in text
    peak_line = next(line for line in text.splitlines() if "peak memory" in line)
    assert "GiB (process RSS)" in peak_line and float(peak_line.split(":")[1].split()[0]) > 0


def test_saved_files_get_the_users_normal_permissions(tmp_path):
    # safetensors creates files as 0600; a LoRA must stay readable by another account (e.g. a ComfyUI service).
    from safetensors.torch import save_file

    old_mask = os.umask(0o022)
    try:
        path = files.atomic_write(tmp_path / "lora.safetensors",
                                   lambda tmp: save_file({"w": torch.zeros(1)}, str(tmp)))
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_end_summary_after_resume_counts_the_steps_of_this_run():
    from library.training.reporting import TrainingReporter

    reporter = TrainingReporter(total_steps=200, initial_step=120, is_main_process=True, interactive=False)
    text = reporter.summary(steps=200, output_file=None, device=torch.device("cpu"))
    reporter.close()
    assert "at step 200: 80 steps in this run" in text.splitlines()[0]

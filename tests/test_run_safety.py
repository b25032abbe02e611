"""A run never loses or mixes up files: one run per output (an OS lock a killed run cannot leave behind),
leftovers of killed runs removed at the next start, a state-folder swap that survives a kill between its two
renames, and failed writes (disk full, permission) reported as one line with the earlier files intact."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from library.errors import AnimaError
from library.io import files
from library.io.npz import save_npz_atomic
from library.io.run_lock import acquire_run_lock, lock_path
from networks.lora_format import save_lora_file

REPO = Path(__file__).resolve().parent.parent


def dead_pid() -> int:
    """The id of a process that has ended (a finished child; ids are not reused this quickly)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    return int(child.stdout)


def hold_lock_in_subprocess(output_dir: Path, name: str) -> subprocess.Popen:
    """A second process that takes the run lock and then waits (until killed)."""
    code = textwrap.dedent(f"""
        import time
        from library.io.run_lock import acquire_run_lock
        lock = acquire_run_lock({str(output_dir)!r}, {name!r})
        print("locked", flush=True)
        time.sleep(120)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


# --- run lock -----------------------------------------------------------------------------------------------


def test_second_process_on_the_same_output_is_refused_naming_the_holder(tmp_path):
    holder = hold_lock_in_subprocess(tmp_path, "tiny")
    try:
        with pytest.raises(AnimaError) as caught:
            acquire_run_lock(tmp_path, "tiny")
        message = str(caught.value)
        assert f"pid {holder.pid}" in message and os.uname().nodename in message and "started" in message
        assert "--output_name" in message and "\n" not in message
        acquire_run_lock(tmp_path, "other").release()  # another name in the same folder is free
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_sigkilled_run_does_not_block_the_next_run(tmp_path):
    holder = hold_lock_in_subprocess(tmp_path, "tiny")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock_path(tmp_path, "tiny").exists()  # the file stays; the OS released the lock with the process
    acquire_run_lock(tmp_path, "tiny").release()


def test_released_lock_removes_its_file_and_the_output_folder_it_created(tmp_path):
    out = tmp_path / "new" / "out"
    lock = acquire_run_lock(out, "tiny")
    assert lock_path(out, "tiny").is_file()
    lock.release()
    assert not out.exists() and (tmp_path / "new").is_dir()
    (tmp_path / "kept").mkdir()
    lock = acquire_run_lock(tmp_path / "kept", "tiny")
    (tmp_path / "kept" / "tiny.safetensors").write_bytes(b"lora")
    lock.release()
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["tiny.safetensors"]


def test_lock_file_removed_by_its_holder_between_open_and_lock_is_opened_again(tmp_path, monkeypatch):
    from library.io import run_lock

    real_try_lock, calls = run_lock._try_lock, []

    def holder_removes_the_file_first(fd):
        calls.append(fd)
        if len(calls) == 1:
            lock_path(tmp_path, "tiny").unlink()  # as a holder does when it releases
        return real_try_lock(fd)

    monkeypatch.setattr(run_lock, "_try_lock", holder_removes_the_file_first)
    lock = acquire_run_lock(tmp_path, "tiny")
    assert len(calls) == 2 and lock_path(tmp_path, "tiny").is_file()
    lock.release()


def test_lock_is_reentrant_within_one_process_and_freed_on_release(tmp_path):
    first = acquire_run_lock(tmp_path, "tiny")
    second = acquire_run_lock(tmp_path, "tiny")
    second.release()
    first.release()
    probe = subprocess.run([sys.executable, "-c", "from library.io.run_lock import acquire_run_lock; "
                            f"acquire_run_lock({str(tmp_path)!r}, 'tiny')"], cwd=REPO)
    assert probe.returncode == 0


# --- leftovers and the state-folder swap --------------------------------------------------------------------


def test_leftovers_of_dead_runs_are_removed_and_live_ones_kept(tmp_path, caplog):
    dead, live = dead_pid(), os.getppid()
    (tmp_path / f".tiny.tmp{dead}.safetensors").write_bytes(b"half")
    (tmp_path / f".tiny-state.tmp{dead}").mkdir()
    (tmp_path / f".tiny-state.tmp{dead}" / "optimizer.pt").write_bytes(b"half")
    (tmp_path / f"._anima.tmp{dead}.npz").write_bytes(b"half")
    kept = [tmp_path / f".tiny.tmp{live}.safetensors", tmp_path / "tiny.safetensors", tmp_path / ".tiny.lock",
            tmp_path / f"notes.tmp{dead}.txt"]
    for path in kept:
        path.write_bytes(b"keep")
    with caplog.at_level(logging.INFO, logger="library.io.files"):
        removed = files.remove_leftovers(tmp_path)
    assert len(removed) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in kept)
    assert any("removed 3 temporary file(s) left by stopped runs" in r.message for r in caplog.records)


def kill_between_renames(folder: Path, contents: str) -> None:
    """Replace `folder` with atomic_write_dir in a subprocess that is killed between the two renames."""
    code = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from library.io.files import atomic_write_dir
        atomic_write_dir(Path({str(folder)!r}),
                         lambda tmp: (tmp / "train_state.json").write_text({contents!r}),
                         _between_renames=lambda: os.kill(os.getpid(), 9))
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO)
    assert result.returncode == -signal.SIGKILL


def test_kill_between_the_renames_of_a_state_replace_is_repaired_at_the_next_start(tmp_path):
    state = tmp_path / "tiny-state"
    files.atomic_write_dir(state, lambda tmp: (tmp / "train_state.json").write_text("old"))
    kill_between_renames(state, "new")
    assert not state.exists()  # the kill left the state only under hidden names
    assert {p.name.split(".")[2][:3] for p in tmp_path.iterdir()} == {"old", "tmp"}
    files.remove_leftovers(tmp_path)
    assert (state / "train_state.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-state"]


def test_next_replace_of_the_same_folder_restores_it_first(tmp_path):
    state = tmp_path / "tiny-state"
    files.atomic_write_dir(state, lambda tmp: (tmp / "train_state.json").write_text("old"))
    kill_between_renames(state, "new")
    seen = []
    files.atomic_write_dir(state, lambda tmp: seen.append(state.exists()) or (tmp / "train_state.json").write_text("3"))
    assert seen == [True] and (state / "train_state.json").read_text() == "3"


def test_failed_second_rename_puts_the_previous_folder_back(tmp_path):
    state = tmp_path / "tiny-state"
    files.atomic_write_dir(state, lambda tmp: (tmp / "train_state.json").write_text("old"))

    def fail():
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(AnimaError, match="cannot write .*tiny-state.*intact"):
        files.atomic_write_dir(state, lambda tmp: (tmp / "train_state.json").write_text("new"), _between_renames=fail)
    assert (state / "train_state.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-state"]


# --- failed writes ------------------------------------------------------------------------------------------


def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_disk_full_during_a_write_is_one_line_and_keeps_the_previous_version(kind, tmp_path):
    target = tmp_path / ("tiny.safetensors" if kind == "file" else "tiny-state")
    writer = files.atomic_write if kind == "file" else files.atomic_write_dir
    writer(target, lambda tmp: tmp.write_text("v1") if kind == "file" else (tmp / "a").write_text("v1"))

    def write_then_fail(tmp: Path) -> None:
        (tmp if kind == "file" else tmp / "a").write_text("v2 partial")
        enospc()

    with pytest.raises(AnimaError) as caught:
        writer(target, write_then_fail)
    message = str(caught.value)
    assert str(target) in message and "disk is full" in message and "intact" in message and "\n" not in message
    assert (target.read_text() if kind == "file" else (target / "a").read_text()) == "v1"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_permission_error_names_the_file(tmp_path):
    with pytest.raises(AnimaError, match="cannot write .*x.txt: permission denied"):
        files.atomic_write(tmp_path / "x.txt", lambda tmp: (_ for _ in ()).throw(PermissionError(errno.EACCES, "no")))
    assert not list(tmp_path.iterdir())


def test_errors_that_are_not_write_failures_pass_through(tmp_path):
    with pytest.raises(ValueError, match="bug"):
        files.atomic_write(tmp_path / "x.txt", lambda tmp: (_ for _ in ()).throw(ValueError("bug")))
    assert not list(tmp_path.iterdir())


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs: real ENOSPC from every writer (needs root and mount)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tiny tmpfs here ({result.stderr.strip() or 'mount failed'}); the "
                    "monkeypatched ENOSPC tests cover the same code")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_real_disk_full_on_a_tiny_tmpfs_for_lora_npz_and_state_writers(tiny_tmpfs):
    big = {"lora_unet_x.lora_down.weight": torch.zeros(64, 512)}  # 128 KiB: does not fit
    save_lora_file(tiny_tmpfs / "tiny.safetensors", {"lora_unet_x.lora_down.weight": torch.zeros(4, 4)})
    before = (tiny_tmpfs / "tiny.safetensors").read_bytes()
    writers = {
        "tiny.safetensors": lambda: save_lora_file(tiny_tmpfs / "tiny.safetensors", big),
        "img_anima_te.npz": lambda: save_npz_atomic(str(tiny_tmpfs / "img_anima_te.npz"),
                                                    {"prompt_embeds": np.zeros((64, 512), np.float32)}),
        "tiny-state": lambda: files.atomic_write_dir(tiny_tmpfs / "tiny-state",
                                                     lambda tmp: torch.save(big, tmp / "optimizer.pt")),
    }
    for name, write in writers.items():
        with pytest.raises(AnimaError) as caught:
            write()
        assert f"{name}: the disk is full" in str(caught.value), caught.value
    assert (tiny_tmpfs / "tiny.safetensors").read_bytes() == before
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["tiny.safetensors"]


def test_torch_and_safetensors_write_failures_are_recognised():
    from safetensors import SafetensorError

    assert files.is_write_failure(SafetensorError("Error while serializing: I/O error: No space left on device"))
    assert files.is_write_failure(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576"))
    assert not files.is_write_failure(RuntimeError("shape mismatch"))


# --- where leftovers are removed ----------------------------------------------------------------------------


def test_claiming_an_output_locks_it_and_clears_dead_runs_leftovers(tmp_path):
    from library.training.args import parse_args
    from library.training.outputs import claim_output

    dead = dead_pid()
    (tmp_path / f".tiny.tmp{dead}.safetensors").write_bytes(b"half")
    args, _ = parse_args(["--output_dir", str(tmp_path), "--output_name", "tiny"])
    lock = claim_output(args)
    try:
        assert not (tmp_path / f".tiny.tmp{dead}.safetensors").exists()
        probe = subprocess.run([sys.executable, "-c", "from library.io.run_lock import acquire_run_lock; "
                                f"acquire_run_lock({str(tmp_path)!r}, 'tiny')"], cwd=REPO, capture_output=True,
                               text=True)
        assert probe.returncode != 0 and "another run is writing these files" in probe.stderr
    finally:
        lock.release()
    args.cache_only = True
    assert claim_output(args) is None  # a caching-only run writes nothing into --output_dir


def test_disk_caching_clears_dead_runs_leftovers_beside_the_images(tmp_path):
    from test_dataset_cache import FakeVAE, cache_latents, make_args, write_image

    write_image(tmp_path / "img" / "a.png", 64, 64)
    (tmp_path / "img" / "a.txt").write_text("a")
    dead, live = dead_pid(), os.getppid()
    stale = tmp_path / "img" / f".a_0064x0064_anima.tmp{dead}.npz"
    running = tmp_path / "img" / f".a_0064x0064_anima.tmp{live}.npz"
    for path in (stale, running):
        path.write_bytes(b"half")
    cache_latents(make_args(tmp_path, "--cache_latents_to_disk"), FakeVAE())
    assert not stale.exists() and running.exists()
    assert (tmp_path / "img" / "a_0064x0064_anima.npz").is_file()


def test_resume_from_a_state_a_kill_left_under_its_hidden_name_finds_it(tmp_path):
    from library.training.args import parse_args

    state = tmp_path / "tiny-state"
    files.atomic_write_dir(state, lambda tmp: (tmp / "train_state.json").write_text("old"))
    kill_between_renames(state, "new")
    args, _ = parse_args(["--resume", str(state)])
    assert (state / "train_state.json").read_text() == "old" and args.resume == str(state)


def test_failed_write_removes_the_folders_it_created_and_keeps_existing_ones(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(AnimaError, match="disk is full"):
        files.atomic_write(tmp_path / "out" / "sample" / "day" / "a.png", lambda tmp: enospc())
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not list((tmp_path / "out").iterdir())
    with pytest.raises(AnimaError, match="disk is full"):
        files.atomic_write_dir(tmp_path / "new" / "tiny-state", lambda tmp: enospc())
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_only_the_main_process_of_a_launch_takes_the_lock(tmp_path, monkeypatch):
    from library.training.args import parse_args
    from library.training.outputs import claim_output

    args, _ = parse_args(["--output_dir", str(tmp_path / "out"), "--output_name", "tiny"])
    monkeypatch.setenv("RANK", "1")
    assert claim_output(args) is None and not (tmp_path / "out").exists()
    monkeypatch.setenv("RANK", "0")
    lock = claim_output(args)
    assert lock is not None and lock_path(tmp_path / "out", "tiny").is_file()
    lock.release()

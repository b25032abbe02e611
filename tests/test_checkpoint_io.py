"""library.io.checkpoints: one reader for every checkpoint format, header-only inspection, one-line errors."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from library.errors import AnimaError
from library.io import checkpoints as checkpoint_io
from library.io.checkpoints import (
    find_prefix,
    guess_checkpoint_kind,
    load_state_dict,
    open_checkpoint,
    strip_prefix,
)
from library.models.dit_loading import load_anima_model

WEIGHTS = {
    "net.a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "net.b.bias": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
    "net.steps": torch.tensor([7, 8], dtype=torch.int64),
}


def _one_line_error(call, match: str) -> str:
    with pytest.raises(AnimaError, match=match) as raised:
        call()
    assert "\n" not in str(raised.value)
    return str(raised.value)


def test_safetensors_keys_shapes_and_metadata_without_reading(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(WEIGHTS, str(path), metadata={"note": "x"})
    with open_checkpoint(path, "--flag", "a test file") as checkpoint:
        assert checkpoint.format == "safetensors"
        assert sorted(checkpoint.keys()) == sorted(WEIGHTS)
        assert checkpoint.shapes() == {"net.a.weight": (2, 3), "net.b.bias": (2,), "net.steps": (2,)}
        meta = checkpoint.meta_state_dict()
        assert all(t.is_meta for t in meta.values())
        assert {k: t.dtype for k, t in meta.items()} == {k: t.dtype for k, t in WEIGHTS.items()}
        assert checkpoint.metadata() == {"note": "x"}


def test_reading_casts_floats_only(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(WEIGHTS, str(path))
    loaded = load_state_dict(path, "--flag", "a test file", dtype=torch.float16)
    assert loaded["net.a.weight"].dtype == torch.float16 and loaded["net.b.bias"].dtype == torch.float16
    assert loaded["net.steps"].dtype == torch.int64 and torch.equal(loaded["net.steps"], WEIGHTS["net.steps"])
    assert torch.equal(loaded["net.a.weight"].float(), WEIGHTS["net.a.weight"])
    kept = load_state_dict(path, "--flag", "a test file")
    assert all(kept[k].dtype == t.dtype and torch.equal(kept[k], t) for k, t in WEIGHTS.items())


def test_read_can_rename_and_select_keys(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(WEIGHTS, str(path))
    with open_checkpoint(path, "--flag", "a test file") as checkpoint:
        renamed = checkpoint.read({"a": "net.a.weight"})
    assert list(renamed) == ["a"] and torch.equal(renamed["a"], WEIGHTS["net.a.weight"])


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".bin"])
def test_torch_files_unwrap_nested_state_dicts_and_skip_non_tensors(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    torch.save({"epoch": 3, "state_dict": {"model": dict(WEIGHTS)}}, path)
    with open_checkpoint(path, "--flag", "a test file") as checkpoint:
        assert checkpoint.format == "torch"
        assert checkpoint.shapes()["net.a.weight"] == (2, 3)
        assert checkpoint.meta_state_dict()["net.b.bias"].dtype == torch.bfloat16
        loaded = checkpoint.read(dtype=torch.float32)
    assert sorted(loaded) == sorted(WEIGHTS)
    assert loaded["net.b.bias"].dtype == torch.float32 and loaded["net.steps"].dtype == torch.int64


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_loaded_tensors_do_not_depend_on_the_file(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    torch.save(dict(WEIGHTS), path) if suffix == ".pt" else save_file(WEIGHTS, str(path))
    loaded = load_state_dict(path, "--flag", "a test file")
    with open(path, "r+b") as handle:  # overwrite the (memory-mapped) file in place after loading
        handle.write(b"\x7f" * path.stat().st_size)
    assert torch.equal(loaded["net.a.weight"], WEIGHTS["net.a.weight"])


def _resident_file_mib() -> float:
    """This process's resident file-backed memory (memory-mapped files), from /proc (Linux)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile line")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads resident memory from /proc")
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_reading_a_large_file_keeps_only_a_window_of_it_mapped(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"big{suffix}"
    tensors = {f"t{i}": torch.full((1024, 1024), float(i), dtype=torch.bfloat16) for i in range(48)}  # 96 MiB
    torch.save(tensors, path) if suffix == ".pt" else save_file(tensors, str(path))
    monkeypatch.setattr(checkpoint_io, "REMAP_BYTES", 8 * 2**20)
    opened = []
    if suffix == ".pt":
        real_load = torch.load
        monkeypatch.setattr(torch, "load", lambda *a, **kw: opened.append(a) or real_load(*a, **kw))
    else:
        real_safe_open = checkpoint_io.safe_open
        monkeypatch.setattr(checkpoint_io, "safe_open", lambda *a, **kw: opened.append(a) or real_safe_open(*a, **kw))
    before = _resident_file_mib()
    most = 0.0
    with open_checkpoint(path, "--flag", "a test file") as checkpoint:
        loaded = {}
        for key in checkpoint.keys():
            loaded[key] = checkpoint.tensor(key, dtype=torch.float32)
            most = max(most, _resident_file_mib() - before)
    assert all(torch.equal(loaded[k], t.float()) for k, t in tensors.items())
    assert len(opened) == 1 + 96 // 8  # the first map, then one every 8 MiB read
    assert most < 32, f"{most:.0f} MiB of the 96 MiB file stayed mapped"  # without reopening: all 96


def test_a_file_replaced_while_it_is_read_ends_in_one_error(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(1024), "b": torch.ones(1024)}, str(path))
    monkeypatch.setattr(checkpoint_io, "REMAP_BYTES", 1)
    with open_checkpoint(path, "--flag", "a test file") as checkpoint:
        replacement = tmp_path / "new.safetensors"
        save_file({"a": torch.zeros(8), "b": torch.ones(8)}, str(replacement))
        replacement.replace(path)
        _one_line_error(lambda: checkpoint.tensor("a"), "changed while it was being read")


def test_legacy_torch_format_is_read_without_mmap(tmp_path):
    path = tmp_path / "old.pth"
    torch.save(dict(WEIGHTS), path, _use_new_zipfile_serialization=False)
    loaded = load_state_dict(path, "--flag", "a test file")
    assert torch.equal(loaded["net.a.weight"], WEIGHTS["net.a.weight"])


def test_files_without_a_known_extension_are_recognised_by_content(tmp_path):
    safetensors_blob, torch_blob = tmp_path / "blob_a", tmp_path / "blob_b.weights"
    save_file(WEIGHTS, str(safetensors_blob))
    torch.save(dict(WEIGHTS), torch_blob)
    assert open_checkpoint(safetensors_blob, "--flag", "x").format == "safetensors"
    assert open_checkpoint(torch_blob, "--flag", "x").format == "torch"
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    _one_line_error(lambda: open_checkpoint(text, "--flag", "x"), r"--flag: .*notes\.txt is neither")


def test_missing_file_and_folder_name_the_flag(tmp_path):
    _one_line_error(lambda: open_checkpoint(tmp_path / "nope.safetensors", "--vae", "the VAE"), "--vae: file not found")
    _one_line_error(lambda: open_checkpoint(tmp_path, "--vae", "the VAE"), "--vae: .* is a folder")


def test_corrupt_and_truncated_files_give_one_line(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"definitely not safetensors")
    _one_line_error(lambda: open_checkpoint(garbage, "--flag", "x"), r"--flag: cannot read .*garbage\.safetensors")
    whole = tmp_path / "whole.safetensors"
    save_file({"a": torch.zeros(1000)}, str(whole))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(whole.read_bytes()[:-100])

    def read_truncated():
        with open_checkpoint(truncated, "--flag", "x") as checkpoint:
            checkpoint.read()

    _one_line_error(read_truncated, r"--flag: cannot read .*truncated\.safetensors")
    broken_zip = tmp_path / "broken.pt"
    broken_zip.write_bytes(b"PK\x03\x04 not really a zip")
    _one_line_error(lambda: open_checkpoint(broken_zip, "--flag", "x"), r"cannot read .*broken\.pt as a PyTorch")


class ArbitraryObject:
    """Stands for any pickled object that is not plain weights."""


def test_pickled_objects_are_never_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(1), "obj": ArbitraryObject()}, path)  # refused by weights_only
    _one_line_error(lambda: open_checkpoint(path, "--flag", "x"), r"cannot read .*evil\.pt")


def test_files_without_tensors_are_rejected(tmp_path):
    path = tmp_path / "empty.pt"
    torch.save({"a": [1, 2]}, path)
    _one_line_error(lambda: open_checkpoint(path, "--flag", "the VAE"), r"empty\.pt holds no tensors.*the VAE")
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    _one_line_error(lambda: open_checkpoint(empty, "--flag", "the VAE"), "holds no tensors")


def test_prefix_helpers():
    assert strip_prefix("net.blocks.0", ("model.diffusion_model.", "net.")) == "blocks.0"
    assert strip_prefix("blocks.0", ("net.",)) == "blocks.0"
    keys = {"vae.encoder.conv1.weight", "other"}
    assert find_prefix(keys, "encoder.conv1.weight", ("first_stage_model.", "vae.")) == "vae."
    assert find_prefix(keys, "encoder.conv_in.weight", ("vae.",)) is None
    assert find_prefix({"encoder.conv1.weight"}, "encoder.conv1.weight", ("vae.",)) == ""


def test_guess_checkpoint_kind_names_the_right_flag():
    assert "--pretrained_model_name_or_path" in guess_checkpoint_kind(["net.x_embedder.proj.1.weight"])
    assert "--vae" in guess_checkpoint_kind(["encoder.down_blocks.0.norm1.gamma"])
    assert "--qwen3" in guess_checkpoint_kind(["model.embed_tokens.weight"])
    assert "LoRA" in guess_checkpoint_kind(["lora_unet_x.lora_down.weight"])
    assert "SD/SDXL" in guess_checkpoint_kind(["encoder.down_blocks.0.resnets.0.conv1.weight"])


def test_dit_loader_checks_shapes_before_reading_any_weight(golden_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    weights = load_file(str(golden_dir / "dit_tiny.safetensors"))
    weights["net.blocks.1.self_attn.q_proj.weight"] = torch.zeros(128, 64)
    path = tmp_path / "bad_shape.safetensors"
    save_file(weights, str(path))
    reads = []
    original = checkpoint_io.CheckpointFile.tensor
    monkeypatch.setattr(
        checkpoint_io.CheckpointFile, "tensor", lambda self, key, *a, **k: reads.append(key) or original(self, key, *a, **k)
    )
    with pytest.raises(AnimaError, match="inconsistent shape"):
        load_anima_model(path)
    assert reads == []
    model = load_anima_model(golden_dir / "dit_tiny.safetensors", dtype=torch.bfloat16)
    assert len(reads) == len(model.state_dict())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads resident memory from /proc")
def test_checkpoint_load_bench_reports_the_mapped_window(tmp_path, capsys):
    from bench.bench_checkpoint_load import main

    main(["--work", str(tmp_path), "--size_mib", "64", "--dtypes", "float32", "--remap_mib", "0", "8"])
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(figures) == {"float32/remap0", "float32/remap8"}
    assert figures["float32/remap0"]["mapped_gib"] >= 0.06  # all 64 MiB of the file
    assert figures["float32/remap8"]["mapped_gib"] <= 0.03


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_all_finite_finds_one_nan_or_infinity_anywhere(dtype):
    from library.io.files import all_finite

    for length in (1, 7, 33, 1000):  # below, across and beyond the vector widths of the min/max kernels
        base = torch.linspace(-3, 3, length, dtype=dtype)
        assert all_finite(base) and all_finite(base[::2]) and all_finite(base.reshape(1, -1).t())
        for position in range(length):
            for bad in (float("nan"), float("inf"), -float("inf")):
                tensor = base.clone()
                tensor[position] = bad
                assert not all_finite(tensor), (length, position, bad)
    assert all_finite(torch.empty(0, 3, dtype=dtype))
    big = torch.full((2048, 2048), 65000.0, dtype=dtype)  # large but finite (float16's max is 65504)
    assert all_finite(big)
    big[2047, 2047] = float("nan")
    assert not all_finite(big)


def test_all_finite_handles_float8():
    from library.io.files import all_finite

    values = torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn)
    assert all_finite(values)
    assert not all_finite(torch.tensor([0.5, float("nan")]).to(torch.float8_e4m3fn))

"""Damaged cache data (a broken member inside an intact zip, wrong shapes or dtypes, NaN/inf values) is found by
the cache check and re-encoded with a log line; read at train time (--skip_cache_check) it is one clear error,
also when a DataLoader worker reads it."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_dataset_cache import FakeTextEncoding, FakeVAE, cache_latents, make_args

from library.data.cache_files import latents_npz_path, load_cached_text, text_npz_path
from library.data.config import build_dataset_groups
from library.data.text_cache import cache_group_text
from library.errors import AnimaError
from library.io.npz import read_npz, save_npz_atomic


@pytest.fixture
def images(tmp_path: Path) -> Path:
    from test_dataset_cache import write_image

    img = tmp_path / "img"
    write_image(img / "a.png", 64, 64, seed=1)
    write_image(img / "b.png", 64, 64, seed=2)
    for name in ("a", "b"):
        (img / f"{name}.txt").write_text(f"caption {name}", encoding="utf-8")
    return img


def corrupt_member(npz: str, member: str) -> None:
    """Flip bytes in the array data of one member; the zip directory and every other member stay intact."""
    with zipfile.ZipFile(npz) as archive:
        info = archive.getinfo(member)
    with open(npz, "r+b") as handle:
        handle.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(handle.read(2), "little") for _ in range(2))
        data_start = info.header_offset + 30 + name_len + extra_len
        handle.seek(data_start + info.file_size - 8)
        tail = handle.read(8)
        handle.seek(data_start + info.file_size - 8)
        handle.write(bytes(b ^ 0xFF for b in tail))
    with zipfile.ZipFile(npz) as archive:
        assert archive.testzip() == member  # only that member's CRC fails


def rewrite_array(npz: str, key: str, value: np.ndarray) -> None:
    arrays = read_npz(npz)
    arrays[key] = value
    save_npz_atomic(npz, arrays)


def cache_text(args, encoding=None, skip_check=False):
    train, _ = build_dataset_groups(args)
    encoding = encoding or FakeTextEncoding()
    cache_group_text(train, encoding, batch_size=4, to_disk=True, skip_check=skip_check)
    return train, encoding


def test_text_cache_with_a_damaged_prompt_embeds_member_is_reencoded(tmp_path, images, caplog):
    args = make_args(tmp_path, "--cache_text_encoder_outputs_to_disk")
    cache_text(args)
    path = text_npz_path(images / "a.png")
    corrupt_member(path, "prompt_embeds.npy")
    with caplog.at_level(logging.INFO):
        train, encoding = cache_text(args)
    assert encoding.seen == ["caption a"]
    assert any("re-encoding 1 text cache(s): unreadable" in r.getMessage() for r in caplog.records)
    assert read_npz(path)["prompt_embeds"].shape == (8, 4)
    load_cached_text(train.image_infos()[0][1])


@pytest.mark.parametrize(("key", "value", "reason"), [
    ("prompt_embeds", np.full((8, 4), np.nan, np.float32), "prompt_embeds has NaN/inf values"),
    ("prompt_embeds", np.zeros((8,), np.float32), "not float [tokens, features]"),
    ("prompt_embeds", np.zeros((8, 4), np.int32), "not float [tokens, features]"),
    ("attn_mask", np.ones((5,), np.int64), "attn_mask has 5 tokens, prompt_embeds 8"),
    ("attn_mask", np.ones((8,), np.float32), "attn_mask is float32 [8], not integer"),
    ("t5_attn_mask", np.ones((2,), np.int32), "t5_input_ids has 6 tokens, t5_attn_mask 2"),
])
def test_text_cache_with_inconsistent_arrays_is_reencoded(key, value, reason, tmp_path, images, caplog):
    args = make_args(tmp_path, "--cache_text_encoder_outputs_to_disk")
    cache_text(args)
    rewrite_array(text_npz_path(images / "b.png"), key, value)
    with caplog.at_level(logging.INFO):
        _, encoding = cache_text(args)
    assert encoding.seen == ["caption b"]
    assert any(reason in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize(("value", "reason"), [
    (np.zeros((16, 4, 4), np.float32), "latent shape [16, 4, 4] differs from [16, 8, 8]"),
    (np.zeros((8, 8, 8), np.float32), "latent shape [8, 8, 8] differs"),
    (np.zeros((16, 8, 8), np.int16), "latent dtype int16 is not a float type"),
    (np.full((16, 8, 8), np.inf, np.float32), "latent has NaN/inf values"),
])
def test_latent_cache_with_wrong_shape_dtype_or_values_is_reencoded(value, reason, tmp_path, images, caplog):
    args = make_args(tmp_path, "--cache_latents_to_disk")
    cache_latents(args, FakeVAE())
    path = latents_npz_path(images / "a.png", (64, 64))
    rewrite_array(path, "latents_8x8", value)
    vae = FakeVAE()
    with caplog.at_level(logging.INFO):
        cache_latents(args, vae)
    assert vae.encoded == 1
    assert any(reason in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert read_npz(path)["latents_8x8"].dtype == np.float32


def test_latent_cache_with_a_damaged_member_is_reencoded(tmp_path, images, caplog):
    args = make_args(tmp_path, "--cache_latents_to_disk")
    cache_latents(args, FakeVAE())
    corrupt_member(latents_npz_path(images / "b.png", (64, 64)), "latents_8x8.npy")
    vae = FakeVAE()
    with caplog.at_level(logging.INFO):
        cache_latents(args, vae)
    assert vae.encoded == 1 and any("unreadable" in r.getMessage() for r in caplog.records)


def test_damaged_latent_read_at_train_time_is_one_error_line(tmp_path, images):
    args = make_args(tmp_path, "--cache_latents_to_disk")
    cache_latents(args, FakeVAE())
    rewrite_array(latents_npz_path(images / "a.png", (64, 64)), "latents_8x8", np.zeros((16, 2, 2), np.float32))
    train = cache_latents(args, FakeVAE(), skip_check=True)  # keys present: reused without looking inside
    with pytest.raises(AnimaError, match=r"latent cache .*a_0064x0064_anima.npz is damaged \(latent shape"):
        for index in range(len(train)):
            train[index]


def test_damaged_text_cache_read_in_a_dataloader_worker_is_one_error_line(tmp_path, images):
    args = make_args(tmp_path, "--cache_text_encoder_outputs_to_disk")
    cache_text(args)
    corrupt_member(text_npz_path(images / "a.png"), "prompt_embeds.npy")
    train, _ = cache_text(args, skip_check=True)
    loader = torch.utils.data.DataLoader(train, batch_size=None, num_workers=1)
    with pytest.raises(AnimaError) as caught:
        for _ in loader:
            pass
    message = str(caught.value)
    assert message.startswith("text cache ") and "a_anima_te.npz cannot be read (BadZipFile" in message
    assert "\n" not in message and "Traceback" not in message


def test_anima_error_rebuilt_from_a_worker_traceback_keeps_the_original_line():
    worker_text = ("Caught AnimaError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                   '  File "x.py", line 1, in f\nlibrary.errors.AnimaError: text cache a.npz cannot be read\n')
    assert str(AnimaError(worker_text)) == "text cache a.npz cannot be read"
    assert str(AnimaError("two\nlines stay")) == "two\nlines stay"

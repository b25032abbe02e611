"""The --metadata_* flags become modelspec.* keys written as sd-scripts writes them."""

from __future__ import annotations

import base64

import pytest
from PIL import Image

from library.errors import AnimaError
from library.training.args import parse_args
from library.training.outputs import model_spec

SIX_FLAGS = {
    "trigger_phrase": "sks cat",
    "usage_hint": "Use keyword 'sks'",
    "merged_from": "base, style",
    "preprocessor": "none",
    "is_negative_embedding": "false",
}


def test_the_six_metadata_flags_become_modelspec_keys_with_the_thumbnail_as_a_data_url(tmp_path):
    thumbnail = tmp_path / "thumb.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(thumbnail)
    argv = ["--metadata_thumbnail", str(thumbnail)]
    for field, value in SIX_FLAGS.items():
        argv += [f"--metadata_{field}", value]
    args, warnings = parse_args(argv)
    assert warnings == []
    spec = model_spec(args, 1_700_000_000.0)
    for field, value in SIX_FLAGS.items():
        assert spec[f"modelspec.{field}"] == value
    prefix = "data:image/png;base64,"
    assert spec["modelspec.thumbnail"].startswith(prefix)
    assert base64.b64decode(spec["modelspec.thumbnail"][len(prefix):]) == thumbnail.read_bytes()


def test_a_thumbnail_given_as_a_data_url_is_written_unchanged():
    args, _ = parse_args(["--metadata_thumbnail", "data:image/png;base64,AAAA"])
    assert model_spec(args, 0.0)["modelspec.thumbnail"] == "data:image/png;base64,AAAA"


def test_unset_metadata_flags_write_no_keys():
    args, _ = parse_args([])
    spec = model_spec(args, 0.0)
    assert not {f"modelspec.{field}" for field in (*SIX_FLAGS, "thumbnail")} & spec.keys()


@pytest.mark.parametrize("name", ["missing.png", "notes.txt"])
def test_a_thumbnail_that_is_not_an_image_file_fails_before_training(tmp_path, name):
    if name == "notes.txt":
        (tmp_path / name).write_text("hello")
    with pytest.raises(AnimaError, match="--metadata_thumbnail"):
        parse_args(["--metadata_thumbnail", str(tmp_path / name)])

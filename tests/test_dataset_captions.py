"""Caption processing: each option with a fixed seed, in the documented order."""

from __future__ import annotations

import random

import pytest

from library.data.captions import (
    CaptionOptions,
    caption_file_candidates,
    expand_wildcards,
    is_caption_dropped,
    process_caption,
    read_caption_file,
    transform_caption,
)
from library.errors import AnimaError

CAPTION = "a, b, c, d, e, f"


def run(caption: str, epoch: int = 1, step: int = 0, max_steps: int = 0, seed: int = 0, **options) -> str:
    return process_caption(caption, CaptionOptions(**options), random.Random(seed), epoch=epoch, step=step,
                           max_train_steps=max_steps)


def test_plain_caption_is_unchanged():
    assert run(CAPTION) == CAPTION


def test_prefix_and_suffix_are_joined_with_spaces():
    assert run("x", caption_prefix="pre,", caption_suffix=", post") == "pre, x , post"


def test_shuffle_keeps_the_first_keep_tokens_in_place_and_is_seeded():
    first = run(CAPTION, shuffle_caption=True, keep_tokens=2, seed=3)
    again = run(CAPTION, shuffle_caption=True, keep_tokens=2, seed=3)
    assert first == again
    tags = first.split(", ")
    assert tags[:2] == ["a", "b"] and sorted(tags) == ["a", "b", "c", "d", "e", "f"]
    assert any(run(CAPTION, shuffle_caption=True, keep_tokens=2, seed=s) != CAPTION for s in range(5))


def test_keep_tokens_separator_fixes_head_and_tail():
    caption = "a, b ||| c, d, e ||| f"
    for seed in range(5):
        tags = run(caption, shuffle_caption=True, keep_tokens_separator="|||", seed=seed).split(", ")
        assert tags[:2] == ["a", "b"] and tags[-1] == "f" and sorted(tags[2:5]) == ["c", "d", "e"]


def test_keep_tokens_separator_is_removed_even_without_tag_operations():
    assert run("a, b ||| c, d", keep_tokens_separator="|||") == "a, b, c, d"


def test_caption_dropout_rate_one_and_zero():
    assert run(CAPTION, caption_dropout_rate=1.0) == ""
    assert run(CAPTION, caption_dropout_rate=0.0) == CAPTION


def test_caption_dropout_rate_is_seeded_and_roughly_the_rate():
    drops = [run(CAPTION, caption_dropout_rate=0.3, seed=s) == "" for s in range(400)]
    assert drops == [run(CAPTION, caption_dropout_rate=0.3, seed=s) == "" for s in range(400)]
    assert 80 < sum(drops) < 160


def test_caption_dropout_every_n_epochs_drops_on_multiples():
    assert [run(CAPTION, epoch=e, caption_dropout_every_n_epochs=2) == "" for e in (1, 2, 3, 4)] == [
        False, True, False, True]


def test_tag_dropout_only_drops_flexible_tags():
    assert run(CAPTION, caption_tag_dropout_rate=1.0, keep_tokens=1) == "a"
    kept = run(CAPTION, caption_tag_dropout_rate=0.5, keep_tokens=1, seed=1).split(", ")
    assert kept[0] == "a" and set(kept) <= set(CAPTION.split(", "))


def test_secondary_separator_moves_as_one_tag_then_becomes_the_separator():
    caption = "sky;;;cloud;;;day, b, c"
    for seed in range(5):
        out = run(caption, shuffle_caption=True, secondary_separator=";;;", seed=seed)
        assert "sky,cloud,day" in out and ";;;" not in out
    assert run("sky;;;cloud", secondary_separator=";;;") == "sky,cloud"


def test_wildcards_choose_an_option_and_keep_double_braces():
    outs = {run("{simple|white} background, {{retro style}}", enable_wildcard=True, seed=s) for s in range(20)}
    assert outs == {"simple background, {retro style}", "white background, {retro style}"}


def test_one_line_wildcard_caption_draws_only_its_choices_from_the_generator():
    # sd-scripts picks a line only when the caption has several, so a one-line caption uses the generator for its
    # {..} choice and the shuffle alone; the same seed then gives sd-scripts' result.
    options = CaptionOptions(enable_wildcard=True, shuffle_caption=True)
    for seed in range(5):
        rng = random.Random(seed)
        out = transform_caption("{a|b|c} x, y, z", options, rng)
        ref = random.Random(seed)
        head = ref.choice(["a", "b", "c"]) + " x"
        tags = [head, "y", "z"]
        ref.shuffle(tags)
        assert out == ", ".join(tags) and rng.random() == ref.random()
    rng, ref = random.Random(7), random.Random(7)
    out = transform_caption("one\ntwo\nthree", CaptionOptions(enable_wildcard=True), rng)
    assert out == ref.choice(["one", "two", "three"]) and rng.random() == ref.random()


def test_wildcard_group_is_a_brace_with_no_closing_brace_inside():
    wild = CaptionOptions(enable_wildcard=True)
    assert transform_caption("a {} b", wild, random.Random(0)) == "a {} b"
    assert {transform_caption("{a{b|c}", wild, random.Random(s)) for s in range(20)} == {"a{b", "c"}


def test_multiline_caption_picks_one_line_with_wildcards_and_first_line_without():
    caption = "line one\nline two"
    assert run(caption) == "line one"
    assert {run(caption, enable_wildcard=True, seed=s) for s in range(20)} == {"line one", "line two"}


def test_token_warmup_keeps_growing_prefix_of_flexible_tags():
    opts = dict(token_warmup_min=1, token_warmup_step=10, keep_tokens=1)
    assert run(CAPTION, step=0, **opts) == "a, b"
    assert run(CAPTION, step=5, **opts) == "a, b, c, d"
    assert run(CAPTION, step=10, **opts) == CAPTION


def test_token_warmup_fraction_uses_max_train_steps():
    assert run(CAPTION, step=0, max_steps=100, token_warmup_step=0.5) == "a"
    assert run(CAPTION, step=50, max_steps=100, token_warmup_step=0.5) == CAPTION


def test_spec_example_c_prefix_and_suffix_with_separators():
    options = dict(keep_tokens_separator="|||", shuffle_caption=True, secondary_separator=";;;",
                   enable_wildcard=True, caption_prefix="1girl, hatsune miku, vocaloid |||",
                   caption_suffix=", anime screencap ||| masterpiece, rating: general")
    tags = run("smile, {blue|green} hair, sky;;;cloud", seed=2, **options).split(", ")
    assert tags[:3] == ["1girl", "hatsune miku", "vocaloid"]
    assert tags[-2:] == ["masterpiece", "rating: general"]
    assert "anime screencap" in tags and "sky,cloud" in tags
    assert ("blue hair" in tags) != ("green hair" in tags)


def test_transform_caption_never_drops():
    assert transform_caption(CAPTION, CaptionOptions(caption_dropout_rate=1.0), random.Random(0)) == CAPTION
    assert is_caption_dropped(CaptionOptions(caption_dropout_rate=1.0), random.Random(0), 1)


def test_expand_wildcards_without_braces_is_identity():
    assert expand_wildcards("a, b", random.Random(0)) == "a, b"


def test_caption_file_reading(tmp_path):
    (tmp_path / "a.txt").write_text("\ufefffirst line\n\nsecond\n", encoding="utf-8")
    assert read_caption_file(tmp_path / "a.txt", enable_wildcard=False) == "first line"
    assert read_caption_file(tmp_path / "a.txt", enable_wildcard=True) == "first line\nsecond"
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(AnimaError, match="empty.txt is empty"):
        read_caption_file(tmp_path / "empty.txt", enable_wildcard=False)
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(AnimaError, match="not UTF-8"):
        read_caption_file(tmp_path / "latin.txt", enable_wildcard=False)


def test_face_crop_names_also_look_for_the_base_caption(tmp_path):
    names = [p.name for p in caption_file_candidates(tmp_path / "img_a_10_20_30_40.png", ".txt")]
    assert names == ["img_a_10_20_30_40.txt", "img_a.txt"]

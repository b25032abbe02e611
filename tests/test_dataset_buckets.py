"""Bucket lists and image-to-bucket assignments, checked against the computed examples of the dataset spec."""

from __future__ import annotations

import pytest

from library.data.buckets import BucketManager, make_bucket_resolutions, prepare_bucket_range
from library.errors import AnimaError


def test_bucket_list_for_512_has_the_17_expected_buckets():
    buckets = make_bucket_resolutions((512, 512), 256, 1024, 64)
    half = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576)]
    expected = sorted(set(half + [(h, w) for w, h in half] + [(512, 512)]))
    assert buckets == expected


@pytest.mark.parametrize(("lo", "hi", "step", "count"), [(512, 2048, 64, 33), (256, 1024, 64, 25), (256, 2048, 16, 161)])
def test_bucket_counts_for_1024(lo, hi, step, count):
    assert len(make_bucket_resolutions((1024, 1024), lo, hi, step)) == count


def test_default_max_reso_caps_every_1024_bucket_at_1024():
    buckets = make_bucket_resolutions((1024, 1024), 256, 1024, 64)
    assert all(max(b) == 1024 for b in buckets)
    assert (256, 1024) in buckets and (1024, 1024) in buckets


def test_bucket_list_contains_spec_examples_for_1024_up_to_2048():
    buckets = make_bucket_resolutions((1024, 1024), 512, 2048, 64)
    for bucket in [(768, 1280), (832, 1216), (896, 1152), (960, 1088), (1024, 1024), (2048, 512)]:
        assert bucket in buckets
    assert all(w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)


@pytest.mark.parametrize(("size", "bucket", "resized"), [
    ((1920, 1080), (1344, 768), (1365, 768)),
    ((800, 1200), (832, 1216), (832, 1248)),
    ((640, 480), (1152, 896), (1195, 896)),
])
def test_upscale_mode_assignments(size, bucket, resized):
    manager = BucketManager((1024, 1024), 64, min_size=256, max_size=2048)
    got_bucket, got_resized, _ = manager.select_bucket(*size)
    assert (got_bucket, got_resized) == (bucket, resized)


@pytest.mark.parametrize(("size", "bucket", "resized"), [
    ((1920, 1080), (1344, 768), (1365, 768)),
    ((800, 1200), (768, 1152), (800, 1200)),
    ((640, 480), (640, 448), (640, 480)),
    ((1000, 1000), (960, 960), (1000, 1000)),
])
def test_no_upscale_mode_assignments(size, bucket, resized):
    manager = BucketManager((1024, 1024), 64, no_upscale=True)
    got_bucket, got_resized, _ = manager.select_bucket(*size)
    assert (got_bucket, got_resized) == (bucket, resized)


@pytest.mark.parametrize("size", [(1, 1), (10, 3000), (3000, 10), (30, 20), (15, 64), (64, 15), (5000, 7)])
@pytest.mark.parametrize("no_upscale", [False, True])
def test_any_image_size_gets_a_valid_nonempty_bucket_it_covers(size, no_upscale):
    if no_upscale:
        manager = BucketManager((256, 256), 16, no_upscale=True)
    else:
        manager = BucketManager((256, 256), 16, min_size=64, max_size=512)
    bucket, resized, _ = manager.select_bucket(*size)
    assert bucket[0] >= 16 and bucket[1] >= 16
    assert bucket[0] % 16 == 0 and bucket[1] % 16 == 0
    assert resized[0] >= bucket[0] and resized[1] >= bucket[1]


def test_fixed_mode_cover_resizes_to_the_resolution():
    manager = BucketManager((512, 512), None, fixed=True)
    bucket, resized, _ = manager.select_bucket(1000, 500)
    assert bucket == (512, 512) and resized == (1024, 512)


def test_bucket_range_is_rounded_and_checked():
    assert prepare_bucket_range((512, 512), 250, 1000, 64, "ds") == (192, 1024)
    with pytest.raises(AnimaError, match="max_bucket_reso"):
        prepare_bucket_range((1024, 1024), 256, 512, 64, "ds")
    with pytest.raises(AnimaError, match="min_bucket_reso"):
        prepare_bucket_range((256, 256), 512, 1024, 64, "ds")
    with pytest.raises(AnimaError, match="at least bucket_reso_steps"):
        prepare_bucket_range((256, 256), 32, 1024, 64, "ds")

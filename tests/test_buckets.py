import math

import pytest

from dinocache.buckets import assign_bucket, crop_box, generate_sizes, make_buckets, round_to_patch


def test_round_to_patch_nearest_multiple_half_up():
    assert round_to_patch(210, 16) == 208  # 13.125 -> 13
    assert round_to_patch(300, 16) == 304  # 18.75 -> 19
    assert round_to_patch(200, 16) == 208  # 12.5 -> 13: halves go up, not to even
    assert round_to_patch(1024, 16) == 1024
    assert round_to_patch(5, 16) == 16  # never below one patch


def test_bucket_records_both_sizes_and_grid():
    (b,) = make_buckets([(210, 300)], 16)
    assert (b.width, b.height, b.input_width, b.input_height) == (210, 300, 208, 304)
    assert b.grid == (19, 13)  # rows = 304 / 16, cols = 208 / 16
    assert b.num_patches == 19 * 13


def test_assignment_is_nearest_aspect_in_log_space():
    buckets = make_buckets([(1024, 1024), (832, 1216), (1216, 832), (1344, 704)], 16)
    assert assign_bucket(4000, 3000, buckets).name == "1216x832"  # 1.333 is nearest to 1.46 in log space
    assert assign_bucket(3000, 4000, buckets).name == "832x1216"
    assert assign_bucket(1920, 1000, buckets).name == "1344x704"
    assert assign_bucket(500, 510, buckets).name == "1024x1024"
    # log-space: 1.2 is nearer to 1 (|log 1.2| = .182) than to 1.4615 (|log(1.4615/1.2)| = .197)
    assert assign_bucket(1200, 1000, buckets).name == "1024x1024"


def test_assignment_ties_go_to_the_first_listed_bucket():
    buckets = make_buckets([(512, 512), (1024, 1024)], 16)
    assert assign_bucket(700, 700, buckets).index == 0
    buckets = make_buckets([(200, 100), (100, 200)], 16)  # a square is equally far from both
    assert assign_bucket(50, 50, buckets).index == 0


def test_crop_box_stretch_keeps_everything():
    (b,) = make_buckets([(1024, 1024)], 16)
    assert crop_box(4000, 3000, b, "stretch") == (0, 0, 4000, 3000)


def test_crop_box_crop_is_centred_with_bucket_aspect():
    (b,) = make_buckets([(1024, 1024)], 16)
    assert crop_box(4000, 3000, b, "crop") == (500, 0, 3500, 3000)
    (tall,) = make_buckets([(832, 1216)], 16)
    left, top, right, bottom = crop_box(1000, 1000, tall, "crop")
    assert (left, right) == (158, 842)  # width 684 = round(1000 * 832 / 1216)
    assert (top, bottom) == (0, 1000)
    left, top, right, bottom = crop_box(1000, 3000, tall, "crop")
    assert (left, right) == (0, 1000) and bottom - top == round(1000 * 1216 / 832)
    with pytest.raises(ValueError):
        crop_box(10, 10, tall, "zoom")


def test_generated_buckets_are_within_limits_and_symmetric():
    sizes = generate_sizes(1024, step=64, min_side=512, max_side=2048, max_aspect=2.0)
    assert (1024, 1024) in sizes
    for w, h in sizes:
        assert w * h <= 1024 * 1024
        assert w % 64 == 0 and h % 64 == 0
        assert max(w / h, h / w) <= 2.0
        assert (h, w) in sizes
    aspects = [math.log(w / h) for w, h in sizes]
    assert aspects == sorted(aspects)
    assert len(set(sizes)) == len(sizes)


def test_generated_sides_stay_on_the_step_grid_when_the_limits_are_not_on_it():
    sizes = generate_sizes(700, step=48, min_side=250, max_side=1000, max_aspect=3.0)
    assert sizes and all(w % 48 == 0 and h % 48 == 0 for w, h in sizes)
    assert all(250 <= min(w, h) and max(w, h) <= 1000 for w, h in sizes)

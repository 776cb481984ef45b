"""Unit tests of each pure-numpy preprocessing function, with hand-checkable numbers."""

from __future__ import annotations

import numpy as np
import pytest

from synthmri.channels import DEFAULT_LABEL_LEVELS
from training.preprocess import (
    SliceParams,
    brain_mask,
    crop_pad,
    normalise_percentile,
    pad_to,
    percentile_slices,
    research_decode_seg,
    research_keep,
    research_seg,
    research_slices,
    research_uint8,
    resize_image,
    resize_nearest,
    select_slices,
    slice_brain_fraction,
    square_brain_box,
    to_model,
    tumour_fraction_indices,
)

LEVELS = sorted(float(np.float32(v)) for v in DEFAULT_LABEL_LEVELS.values())


def test_brain_mask_is_nonzero_in_any_sequence() -> None:
    vols = {m: np.zeros((4, 4, 2), np.float32) for m in ("t1", "t1ce", "t2", "flair")}
    vols["t1"][0, 0, 0] = 5
    vols["flair"][1, 2, 1] = 0.1
    mask = brain_mask(vols)
    assert mask.sum() == 2 and mask[0, 0, 0] and mask[1, 2, 1]


def test_normalise_percentile_clips_scales_and_sets_background() -> None:
    vol = np.zeros((10, 10, 10), np.float32)
    mask = np.zeros_like(vol, dtype=bool)
    mask[:, :, :5] = True  # 500 brain voxels with values 1..500
    vol[mask] = np.arange(1, 501, dtype=np.float32)
    vol[0, 0, 0] = 1e6  # an outlier is clipped, not allowed to squash the range
    out = normalise_percentile(vol, mask, 0.5, 99.5)
    assert out.dtype == np.float32
    assert (out[~mask] == -1).all()
    assert out[mask].min() == -1 and out[mask].max() == 1
    lo, hi = np.percentile(vol[mask], [0.5, 99.5])
    v = vol[3, 4, 2]
    assert out[3, 4, 2] == pytest.approx((v - lo) / (hi - lo) * 2 - 1, abs=1e-6)
    flat = normalise_percentile(np.where(mask, 7.0, 0.0), mask)
    assert (flat[mask] == 0).all() and (flat[~mask] == -1).all()


def test_slice_selection_by_brain_fraction() -> None:
    mask = np.zeros((10, 10, 3), bool)
    mask[:2, :, 0] = True  # 20 % brain
    mask[:1, :, 1] = True  # 10 %
    mask[:1, :5, 2] = True  # 5 %
    np.testing.assert_allclose(slice_brain_fraction(mask), [0.2, 0.1, 0.05])
    np.testing.assert_array_equal(select_slices(mask, 0.1), [0, 1])
    np.testing.assert_array_equal(select_slices(mask, 0.15), [0])


def test_square_brain_box_and_crop_pad() -> None:
    mask = np.zeros((20, 30), bool)
    mask[5:9, 10:20] = True  # 4 × 10 brain
    a0, a1, b0, b1 = square_brain_box(mask, margin=1)
    assert a1 - a0 == b1 - b0 == 12  # the longer side plus margins
    assert a0 <= 4 and a1 >= 10 and b0 <= 9 and b1 >= 21
    img = np.arange(20 * 30, dtype=np.float32).reshape(20, 30)
    out = crop_pad(img, (-2, 3, 28, 33), fill=-1.0)
    assert out.shape == (5, 5)
    assert (out[:2] == -1).all() and (out[:, 2:] == -1).all()
    np.testing.assert_array_equal(out[2:, :2], img[0:3, 28:30])


def test_resize_area_bilinear_and_nearest() -> None:
    img = np.arange(16, dtype=np.float32).reshape(4, 4)
    down = resize_image(img, 2)
    np.testing.assert_allclose(down, [[2.5, 4.5], [10.5, 12.5]])  # exact 2×2 block means
    odd = np.random.default_rng(0).random((3, 60, 60)).astype(np.float32)
    # area averaging keeps the mean (mass) even for a non-integer ratio
    np.testing.assert_allclose(resize_image(odd, 32).mean((1, 2)), odd.mean((1, 2)), rtol=1e-5)
    ramp = np.tile(np.arange(8, dtype=np.float32), (8, 1))
    up = resize_image(ramp, 16)
    np.testing.assert_allclose(np.diff(up[0, 2:-2]), 0.5, atol=1e-6)  # bilinear: linear stays linear
    np.testing.assert_allclose(resize_image(np.full((7, 5), 3.0), 4), np.full((4, 4), 3.0), rtol=1e-6)
    seg = np.zeros((4, 4), np.uint8)
    seg[:2, :2] = 4
    seg[2:, 2:] = 1
    np.testing.assert_array_equal(resize_nearest(seg, 2), [[4, 0], [0, 1]])
    assert set(np.unique(resize_nearest(seg, 7)).tolist()) == {0, 1, 4}


def test_research_uint8_truncates_like_the_original() -> None:
    vol = np.array([0.0, 100.0, 199.9, 200.0])
    np.testing.assert_array_equal(research_uint8(vol), [0, 127, 254, 255])  # 127.5 → 127
    np.testing.assert_array_equal(research_uint8(np.zeros(3)), [0, 0, 0])


def test_research_seg_is_label_over_5_times_255() -> None:
    seg = np.array([0, 1, 2, 4], np.uint8)
    stored = research_seg(seg)
    np.testing.assert_array_equal(stored, [0, 51, 102, 204])
    np.testing.assert_array_equal(research_decode_seg(stored), seg)
    np.testing.assert_array_equal(research_decode_seg(np.array([50, 53, 100, 200])), [1, 1, 2, 4])


def test_pad_240_to_256_adds_8_zero_pixels_each_side() -> None:
    vol = np.ones((240, 240, 3), np.uint8)
    out = pad_to(vol)
    assert out.shape == (256, 256, 3)
    assert out[8:248, 8:248].all() and out.sum() == vol.sum()
    assert not out[:8].any() and not out[248:].any() and not out[:, :8].any() and not out[:, 248:].any()


def test_research_keep_needs_more_than_15_percent_above_50() -> None:
    n = 256 * 256
    t1 = np.zeros((256, 256, 4), np.uint8)
    at_limit = int(0.15 * n)  # 9830 pixels: exactly 15.0 % is not "more than"
    t1.reshape(n, 4)[: at_limit, 0] = 51
    t1.reshape(n, 4)[: at_limit + 1, 1] = 51  # one pixel more: kept
    t1.reshape(n, 4)[:, 2] = 50  # everything at 50: not > 50
    t1.reshape(n, 4)[: n // 2, 3] = 255
    assert 0.15 * n >= at_limit and (at_limit + 1) / n > 0.15
    np.testing.assert_array_equal(research_keep(t1), [1, 3])


def test_research_slices_reproduce_the_8_bit_pipeline() -> None:
    rng = np.random.default_rng(0)
    shape = (240, 240, 6)
    vols: dict[str, np.ndarray] = {m: np.zeros(shape, np.float32) for m in ("t1", "t1ce", "t2", "flair")}
    for m in ("t1", "t1ce", "t2", "flair"):
        vols[m][40:200, 30:210, 1:5] = rng.uniform(100, 900, (160, 180, 4))
    vols["t1"][:, :, 4] = 0
    vols["t1"][40:80, 30:60, 4] = 900  # a small slice: too little T1 > 50 → skipped
    seg = np.zeros(shape, np.uint8)
    seg[100:120, 100:110, 2] = 4
    seg[100:104, 100:104, 2] = 1
    vols["seg"] = seg
    params = SliceParams(("t1", "t1ce", "t2", "flair", "seg"), 256, mode="research")
    out = research_slices(vols, params)
    np.testing.assert_array_equal(out.z, [1, 2, 3])
    assert out.data.dtype == np.uint8 and out.data.shape == (3, 5, 256, 256)
    expected_t2 = (vols["t2"] / vols["t2"].max() * 255).astype(np.uint8)
    np.testing.assert_array_equal(out.data[1, 2, 8:248, 8:248], expected_t2[:, :, 2])
    assert not out.data[:, :, :8].any()
    np.testing.assert_array_equal(out.data[1, 4, 108:128, 108:118][4:, :], 204)
    np.testing.assert_array_equal(out.data[1, 4, 108:112, 108:112], 51)
    np.testing.assert_array_equal(out.has_tumour, [False, True, False])
    model = to_model(out.data, "research", seg_index=4)
    assert model[1, 0].min() >= -1 and model[1, 0].max() <= 1
    np.testing.assert_allclose(model[1, 2], out.data[1, 2] / 127.5 - 1, atol=1e-7)
    assert model[1, 4, 110, 110] == DEFAULT_LABEL_LEVELS[1] and model[1, 4, 125, 110] == 1.0
    assert set(np.unique(model[:, 4]).tolist()) <= set(LEVELS)


def test_percentile_slices_on_a_phantom(tiny_volumes: list[dict]) -> None:
    params = SliceParams(("t1", "t1ce", "t2", "flair", "seg"), 32, min_brain_fraction=0.1)
    vols = tiny_volumes[0]
    out = percentile_slices(vols, params)
    mask = brain_mask(vols)
    np.testing.assert_array_equal(out.z, np.flatnonzero(mask.mean((0, 1)) >= 0.1))
    assert out.data.dtype == np.float16 and out.data.shape == (len(out.z), 5, 32, 32)
    x = to_model(out.data, "percentile", seg_index=4)
    assert x.min() == -1 and x[:, :4].max() <= 1 and x[:, :4].max() > 0.9
    assert (x[:, :4, 0, 0] == -1).all()  # the crop margin is background
    assert set(np.unique(x[:, 4]).tolist()) <= set(LEVELS) and (x[:, 4] == 1.0).any()
    np.testing.assert_array_equal(out.has_tumour, (vols["seg"][:, :, out.z] > 0).any((0, 1)))


def test_to_model_snaps_float16_seg_levels_exactly() -> None:
    stored = np.array([[[[-1.0, -1 / 3]], [[1 / 3, 1.0]]]], dtype=np.float16)  # (1, 2, 1, 2)
    x = to_model(stored, "percentile", seg_index=1)
    assert x[0, 1, 0, 0] == np.float32(1 / 3) and x[0, 1, 0, 1] == 1.0
    assert x[0, 0, 0, 1] == np.float32(np.float16(-1 / 3))  # images are just widened


@pytest.mark.parametrize("how", ["oversample", "filter"])
@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.9])
def test_tumour_fraction_indices(how: str, fraction: float) -> None:
    has = np.zeros(100, bool)
    has[:30] = True
    idx = tumour_fraction_indices(has, fraction, np.random.default_rng(0), how)
    assert abs(has[idx].mean() - fraction) < 0.02
    if how == "oversample":
        assert set(idx.tolist()) == set(range(100))  # nothing dropped
    else:
        assert len(set(idx.tolist())) == len(idx)  # nothing repeated
    np.testing.assert_array_equal(tumour_fraction_indices(has, 1.0, np.random.default_rng(0)), np.arange(30))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        tumour_fraction_indices(has, 1.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="with and without"):
        tumour_fraction_indices(np.zeros(5, bool), 0.5, np.random.default_rng(0))

"""The evaluation's figures on real phantom slices: each check is shown to fail on what it must catch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from synthmri.channels import DEFAULT_LABEL_LEVELS, SEG
from training.evaluation import features as feat
from training.evaluation.morphology import decode, slice_figures

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FIVE = ("t1", "t1ce", "t2", "flair", SEG)


@pytest.fixture(scope="module")
def encoder(phantom_slices: tuple[np.ndarray, np.ndarray]) -> feat.SliceEncoder:
    return feat.train_encoder(phantom_slices[0], steps=300, seed=0)


def _halves(subject: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.flatnonzero(subject < 2), np.flatnonzero(subject >= 2)


def _with_images(x: np.ndarray, images: np.ndarray) -> np.ndarray:
    out = x.copy()
    out[:, :4] = images
    return out


@pytest.mark.slow  # trains the feature encoder: ~75 s on one core
def test_frechet_distance_sits_at_its_floor_and_grows_with_noise_and_blur(
    phantom_slices: tuple[np.ndarray, np.ndarray], encoder: feat.SliceEncoder
) -> None:
    x, subject = phantom_slices
    a_idx, b_idx = _halves(subject)
    fa, fb = feat.embed(encoder, x[a_idx]), feat.embed(encoder, x[b_idx])
    floor = feat.frechet_distance(fa, fb)
    assert feat.frechet_distance(fa, fa) < 1e-6 * max(1.0, floor)
    rng = np.random.default_rng(0)
    b = x[b_idx]

    def fd_to_a(images: np.ndarray) -> float:
        return feat.frechet_distance(fa, feat.embed(encoder, _with_images(b, images)))

    noisy = [fd_to_a(np.clip(b[:, :4] + s * rng.standard_normal(b[:, :4].shape), -1, 1))
             for s in (0.2, 0.4, 0.8, 1.2)]
    blurred = [fd_to_a(ndimage.gaussian_filter(b[:, :4], sigma=(0, 0, s, s))) for s in (0.7, 1.2, 2.0)]
    assert floor < noisy[0] < noisy[1] < noisy[2] < noisy[3], (floor, noisy)
    assert floor < blurred[0] < blurred[1] < blurred[2], (floor, blurred)
    assert noisy[-1] > 2 * floor and blurred[-1] > 2 * floor
    lo_hi = feat.frechet_with_interval(fa, fb, boot=30)
    assert lo_hi[1] <= floor * 1.5 and lo_hi[2] >= floor * 0.5


def test_mask_checks_catch_scattered_pixels_and_tumour_outside_the_brain(
    phantom_slices: tuple[np.ndarray, np.ndarray],
) -> None:
    x, _ = phantom_slices
    d = decode(x, FIVE)
    # the slices with the most tumour: a tumour's first and last slices carry genuine specks
    area = (d.labels > 0).reshape(len(x), -1).sum(axis=1)
    clean = x[np.argsort(area)[::-1][:8]].copy()
    base = slice_figures(decode(clean, FIVE))
    assert base["tumour_outside_brain"] == 0.0 and base["isolated_tumour_pixels"] < 1.0
    assert base["clean_label_levels"] == 1.0

    speckled = clean.copy()
    ref = decode(clean, FIVE)
    rng = np.random.default_rng(1)
    for i in range(len(speckled)):
        # healthy brain pixels at least two pixels from the edge and from any tumour
        away = ndimage.binary_erosion(ref.brain[i], iterations=2) & ~ndimage.binary_dilation(
            ref.labels[i] > 0, iterations=2)
        ys, xs = np.nonzero(away)
        for y, x_ in zip(*(a[rng.choice(len(ys), 40, replace=False)] for a in (ys, xs)), strict=True):
            if not (decode(speckled[i : i + 1], FIVE).labels[0][y - 1 : y + 2, x_ - 1 : x_ + 2] > 0).any():
                speckled[i, 4, y, x_] = DEFAULT_LABEL_LEVELS[2]
    speck = slice_figures(decode(speckled, FIVE))
    assert speck["isolated_tumour_pixels"] > base["isolated_tumour_pixels"] + 5
    assert speck["tumour_components"] > base["tumour_components"] + 5

    outside = clean.copy()
    outside[:, 4, :3, :3] = DEFAULT_LABEL_LEVELS[1]  # the corner is background in every slice
    assert not decode(clean, FIVE).brain[:, :3, :3].any()
    assert slice_figures(decode(outside, FIVE))["tumour_outside_brain"] == 1.0

    blurry = clean.copy()
    blurry[:, 4] = ndimage.uniform_filter(blurry[:, 4], size=(1, 3, 3))  # mixed levels at every edge
    assert slice_figures(decode(blurry, FIVE))["clean_label_levels"] < 0.97


def test_exact_denoiser_samples_score_like_the_real_slices(
    phantom_slices: tuple[np.ndarray, np.ndarray],
) -> None:
    """Posterior-mean sampling of known slices with the product's recipe: the figures match those slices'."""
    from model.config import DiffusionConfig
    from model.diffusion import GaussianDiffusion
    from model.samplers import sample_dpmpp_2m
    from model.seeding import PerSampleNoise
    from tests.exact_denoiser import SliceSetDenoiser

    x, subject = phantom_slices
    known = x[subject == 0][::2][:12]
    recipe = DiffusionConfig(noise_schedule="cosine", prediction="v", weighting="min-snr")
    d = GaussianDiffusion.from_config(recipe)
    noise = PerSampleNoise(3, range(24))
    samples = sample_dpmpp_2m(SliceSetDenoiser(d, torch.from_numpy(known)), d,
                              noise.randn(known.shape[1:]), steps=20, noise=noise.randn_like)
    samples_np = samples.clamp(-1, 1).numpy()
    real, syn = slice_figures(decode(known, FIVE)), slice_figures(decode(samples_np, FIVE))
    assert abs(syn["background_fraction"] - real["background_fraction"]) < 0.05
    assert syn["tumour_outside_brain"] == 0.0
    assert syn["isolated_tumour_pixels"] <= real["isolated_tumour_pixels"] + 0.3
    assert syn["clean_label_levels"] > 0.98
    # ... and memorisation flags them: every sample is (nearly) a copy of a known slice.
    others = x[subject == 3]
    unseen = np.median(feat.nearest_distances(others, known))
    assert feat.nearest_distances(samples_np, known).max() < 0.5 * unseen


@pytest.mark.slow  # trains the segmenter: ~50 s on one core
def test_segmenter_learns_phantom_tumours(phantom_slices: tuple[np.ndarray, np.ndarray]) -> None:
    from training.evaluation.segmenter import dice_scores, predict, split_images_labels, train_segmenter

    x, subject = phantom_slices
    train, test = split_images_labels(x[subject != 3], FIVE), split_images_labels(x[subject == 3], FIVE)
    net = train_segmenter(train, steps=150, seed=0)
    dice = dice_scores(predict(net, test[0]), test[1])
    assert dice["WT"] > 0.7, dice  # 0.86 measured
    chance = dice_scores(torch.zeros_like(test[1]), test[1])
    assert chance["WT"] == 0.0


def test_dice_scores_pool_regions() -> None:
    from training.evaluation.segmenter import dice_scores

    truth = torch.tensor([[[0, 1, 2, 3]]])
    assert dice_scores(truth, truth) == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
    pred = torch.tensor([[[0, 2, 2, 3]]])  # NCR called oedema: WT right, TC half, ET right
    assert dice_scores(pred, truth) == {"WT": 1.0, "TC": pytest.approx(2 / 3), "ET": 1.0}


def test_evaluate_writes_report_figures_and_model_card(tiny_checkpoint: Path, tiny_2020: Path,
                                                       tmp_path: Path) -> None:
    from synthmri.modelcard import read_card
    from synthmri.registry import read_model
    from training.evaluation.run import EvalOptions, evaluate

    opts = EvalOptions(samples=8, samplers=(("dpm++", 3), ("ddim", 2)), boot=5, encoder_steps=40,
                       budgets=(8,), segmenter_seeds=(0,), segmenter_steps=10, synthetic_for_segmenter=8)
    out = tmp_path / "report"
    report = evaluate(tiny_checkpoint, tiny_2020, out, options=opts, log=lambda m: None)
    saved = json.loads((out / "report.json").read_text())
    assert saved["recommended"] == report["recommended"]
    assert [(s["sampler"], s["steps"]) for s in saved["samplers"]] == [("dpm++", 3), ("ddim", 2)]
    assert "not the model's training data" in saved["data"]["split"]
    for s in saved["samplers"]:
        assert s["network_calls"] == s["steps"] and s["frechet"]["ratio_to_floor"] > 0
        assert 0.0 <= s["figures"]["background_fraction"] <= 1.0
    summary = saved["downstream"]["summary"][0]
    assert summary["budget"] == 8 and set(summary) >= {"real", "real+synthetic", "gain_points"}
    md = (out / "report.md").read_text()
    assert "| dpm++ 3 | 3 |" in md and "real held-out" in md and "Downstream segmentation" in md
    grid = Image.open(out / "grid_recommended.png")
    assert grid.size[0] > 2 * grid.size[1] / 3 and np.asarray(grid.convert("L")).std() > 10
    # The card carries the recommendation; the registry reads it for these weights only.
    card = read_card(tiny_checkpoint)
    assert card is not None and card["recommended"] == saved["recommended"]
    info = read_model(tiny_checkpoint)
    assert info.recommended == (saved["recommended"]["sampler"], saved["recommended"]["steps"])
    assert info.sampling(None, None) == info.recommended
    (tiny_checkpoint / "config.json").write_text((tiny_checkpoint / "config.json").read_text() + " ")
    assert read_model(tiny_checkpoint).card is None  # stale: the checkpoint changed


def test_eval_cli_rejects_bad_input_in_one_line(tiny_checkpoint: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from synthmri.cli import main

    assert main(["eval", "--model", str(tiny_checkpoint), "--data", str(tmp_path / "none"),
                 "--out", str(tmp_path / "o")]) == 2
    assert main(["eval", "--model", str(tiny_checkpoint), "--data", str(tmp_path),
                 "--out", str(tmp_path / "o"), "--samplers", "euler:10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "is not a directory" in err[0] and "bad sampler setting 'euler:10'" in err[1]


def test_recommendation_prefers_clean_masks_then_fewest_calls() -> None:
    from training.evaluation.run import SamplerResult, recommend

    real = {"isolated_tumour_pixels": 0.1, "tumour_outside_brain": 0.0}

    def result(sampler: str, steps: int, fd: float, isolated: float) -> SamplerResult:
        figures = {"isolated_tumour_pixels": isolated, "tumour_outside_brain": 0.0}
        return SamplerResult(sampler, steps, steps, 0.0, figures, {}, {"value": fd}, 1.0, {}, np.zeros(0))

    fast_speckled = result("dpm++", 20, 1.0, 1.2)
    slow_clean = result("ddpm", 250, 1.3, 0.1)
    mid_clean = result("ddim", 50, 1.5, 0.2)
    assert recommend([fast_speckled, slow_clean, mid_clean], real) is mid_clean  # within 25 % of 1.3
    assert recommend([fast_speckled, slow_clean], real) is slow_clean
    fast_clean = result("dpm++", 20, 1.2, 0.25)
    assert recommend([fast_clean, slow_clean, mid_clean], real) is fast_clean
    # nobody clean: the cheapest near the best Fréchet distance
    assert recommend([fast_speckled, result("ddpm", 250, 0.9, 2.0)], real) is fast_speckled
    assert recommend([fast_speckled, result("ddpm", 250, 0.5, 2.0)], real).sampler == "ddpm"

"""The mask-conditioning study with the exact denoiser of four held-out phantom slices as the model.

The exact denoiser knows which slices exist, so an image generated for one of their masks
with guidance 256 must be that very slice: the study's conditioned Dice must then be the
real images' Dice and beat unconditional samples (other slices) paired with the masks. A
segmenter trained briefly on the other phantom subjects is the judge.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model.checkpoint import LoadedCheckpoint
from model.config import CheckpointConfig, get_preset
from model.diffusion import GaussianDiffusion
from synthmri.channels import SEG, decode_labels
from tests.exact_denoiser import SliceSetDenoiser
from training.evaluation.conditioning import mask_conditioning_study, real_segmenter, sample_given_channels
from training.evaluation.segmenter import SegNet

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FIVE = ["t1", "t1ce", "t2", "flair", SEG]


class ExactNet(nn.Module):
    """The exact denoiser in the place of a checkpoint's network (it has no weights)."""

    def __init__(self, denoiser: SliceSetDenoiser) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x, t)


def exact_checkpoint(slices: np.ndarray, channel_set: str = "t1+t1ce+t2+flair+seg") -> LoadedCheckpoint:
    preset = get_preset("tiny", channel_set)
    config = CheckpointConfig(name="exact", channel_set=preset.channel_set, model=preset.model,
                              diffusion=preset.diffusion)  # fmt: skip
    d = GaussianDiffusion.from_config(config.diffusion)
    net = ExactNet(SliceSetDenoiser(d, torch.from_numpy(slices)))
    return LoadedCheckpoint(model=net, diffusion=d, config=config, sha256="exact", path=Path("exact"))


@pytest.fixture(scope="module")
def given(phantom_slices: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Two tumour slices each of held-out subjects 2 and 3 (the largest tumour and the fourth
    largest, so the two of one subject differ clearly)."""
    x, subject = phantom_slices
    area = (decode_labels(x[:, 4]) > 0).reshape(len(x), -1).sum(axis=1)
    picked = []
    for s in (2, 3):
        rows = np.flatnonzero(subject == s)
        by_area = rows[np.argsort(area[rows], kind="stable")[::-1]]
        picked += [by_area[0], by_area[3]]
    assert (area[picked] > 20).all()
    return x[picked]


@pytest.fixture(scope="module")
def exact(given: np.ndarray) -> LoadedCheckpoint:
    return exact_checkpoint(given)


def nearest_given(samples: np.ndarray, given: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each sample, the index of the closest given slice and the largest pixel difference to it."""
    diff = np.abs(samples[:, None] - given[None]).reshape(len(samples), len(given), -1).max(axis=-1)
    return diff.argmin(axis=1), diff.min(axis=1)


@pytest.mark.parametrize(("sampler", "steps"), [("dpm++sde", 20), ("dpm++", 20), ("ddim", 50)])
def test_the_given_channel_comes_back_exactly_and_guidance_returns_its_slice(
    exact: LoadedCheckpoint, given: np.ndarray, sampler: str, steps: int
) -> None:
    plain = sample_given_channels(exact, given, [SEG], sampler=sampler, steps=steps, guidance=0.0, seed=3)
    assert plain.shape == given.shape and plain.dtype == np.float32
    assert np.abs(plain[:, 4] - given[:, 4]).max() < 1e-5
    # Sample i draws its own noise: the same in a batch of one as in a batch of four.
    alone = sample_given_channels(exact, given, [SEG], sampler=sampler, steps=steps, guidance=0.0, seed=3,
                                  batch_size=1)  # fmt: skip
    np.testing.assert_allclose(alone, plain, atol=1e-5)

    for channels in ([SEG], ["t1ce"]):  # mask → images, and T1CE → the other sequences and the mask
        guided = sample_given_channels(exact, given, channels, sampler=sampler, steps=steps, guidance=256.0,
                                       seed=3)  # fmt: skip
        nearest, error = nearest_given(guided, given)
        assert nearest.tolist() == [0, 1, 2, 3], (channels, nearest)
        assert error.max() < 1e-3, (channels, error)


@pytest.fixture(scope="module")
def segmenter(phantom_slices: tuple[np.ndarray, np.ndarray]) -> SegNet:
    """Trained on subjects 0 and 1 only; 40 steps find whole tumours (WT Dice ≈ 0.8 on `given`)."""
    x, subject = phantom_slices
    return real_segmenter(x[subject < 2], FIVE, steps=40, seed=0)


@pytest.fixture(scope="module")
def unconditional(given: np.ndarray) -> np.ndarray:
    """Images that ignore the masks: the other subject's slices. The exact denoiser's unconditional
    samples are given slices too, but by chance some would be the mask's own; none is here."""
    return np.roll(given, 2, axis=0)  # subject 2's masks get subject 3's images and the other way round


def test_study_with_the_exact_denoiser_finds_the_given_masks(
    exact: LoadedCheckpoint, given: np.ndarray, segmenter: SegNet, unconditional: np.ndarray
) -> None:
    guided = mask_conditioning_study(exact, segmenter, given, unconditional, count=4, guidance=256.0)
    report = guided.as_dict()
    assert report["count"] == guided.count == 4
    assert set(report["dice"]) == {"conditioned", "unconditional", "real"}
    assert all(set(d) == {"WT", "TC", "ET"} for d in report["dice"].values())
    assert guided.known_max_error < 1e-5
    # The generated images are the masks' own slices, so the segmenter scores them as the real ones ...
    assert guided.real["WT"] > 0.6, guided.real
    for region in ("WT", "TC", "ET"):
        assert guided.conditioned[region] == pytest.approx(guided.real[region], abs=0.01)
    # ... and well above other slices' images paired with the masks.
    assert guided.conditioned["WT"] > guided.unconditional["WT"] + 0.3, report

    # Without guidance the masks come back exactly, but some images belong to other slices.
    plain = mask_conditioning_study(exact, segmenter, given, unconditional, count=4, guidance=0.0)
    assert plain.known_max_error < 1e-5
    assert plain.unconditional == guided.unconditional and plain.real == guided.real
    assert plain.conditioned["WT"] < guided.conditioned["WT"] - 0.1, (plain.conditioned, guided.conditioned)


def test_study_refuses_what_it_cannot_measure(given: np.ndarray) -> None:
    judge = SegNet(4)  # never reached
    with pytest.raises(ValueError, match="needs a model with a seg channel"):
        mask_conditioning_study(exact_checkpoint(given[:, 1:2], "t1ce"), judge, given[:, 1:2], given[:, 1:2])
    ckpt = exact_checkpoint(given)
    healthy = given.copy()
    healthy[:, 4] = -1.0  # background everywhere
    with pytest.raises(ValueError, match="no held-out slice has a tumour"):
        mask_conditioning_study(ckpt, judge, healthy, given)
    with pytest.raises(ValueError, match="2 unconditional samples for 4 masks"):
        mask_conditioning_study(ckpt, judge, given, given[:2], count=4)

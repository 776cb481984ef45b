"""Does a joint model draw images that fit a mask it is given? Measured with a segmenter.

A segmenter trained on real slices is run on images the model generated for given real
masks (the mask channel known, everything else generated) and scored against those
masks. The same segmenter on unconditional samples, each paired with one of the given
masks, is the floor (images that ignore the mask); on the real held-out images with
their own masks, the ceiling. The caller trains the segmenter once
(`real_segmenter`), so a sweep over guidance weights or samplers scores every setting
with the same one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.checkpoint import LoadedCheckpoint
from model.conditioning import KnownChannels
from model.generate import batches
from model.samplers import SAMPLERS
from model.seeding import PerSampleNoise
from synthmri.channels import SEG, decode_labels
from training.evaluation.segmenter import SegNet, dice_scores, predict, split_images_labels, train_segmenter


@dataclass(frozen=True)
class ConditioningStudy:
    """Dice (WT, TC, ET) of one segmenter against the given masks, three ways."""

    conditioned: dict[str, float]  # images generated for the masks
    unconditional: dict[str, float]  # unconditional images paired with the masks
    real: dict[str, float]  # the held-out real images with their own masks
    known_max_error: float  # largest change of a given mask value (0: returned exactly)
    count: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "known_max_error": self.known_max_error,
            "dice": {"conditioned": self.conditioned, "unconditional": self.unconditional, "real": self.real},
        }


def sample_given_channels(
    ckpt: LoadedCheckpoint,
    known: np.ndarray,
    channels: list[str],
    *,
    sampler: str,
    steps: int,
    guidance: float,
    seed: int,
    batch_size: int = 16,
) -> np.ndarray:
    """Samples with `channels` fixed to `known` (N, C, H, W model range); float32 network, CPU."""
    d = ckpt.diffusion
    net = ckpt.model.float().eval()
    which = torch.tensor([1.0 if c in channels else 0.0 for c in ckpt.config.channels])
    out = []
    for rows in batches(range(len(known)), batch_size):
        noise = PerSampleNoise(seed, rows)
        fn = KnownChannels(lambda x, t: net(x, t), d, torch.from_numpy(known[rows]), which,
                           guidance=guidance)  # fmt: skip
        x_T = noise.randn(known.shape[1:])
        out.append(SAMPLERS[sampler](fn, d, x_T, steps=steps, noise=noise.randn_like).clamp(-1, 1).numpy())
    return np.concatenate(out).astype(np.float32)


def real_segmenter(train_real: np.ndarray, channels: list[str], *, steps: int = 600, seed: int = 0) -> SegNet:
    """The study's judge: a segmenter trained on real slices (N, C, H, W model range) alone."""
    return train_segmenter(split_images_labels(train_real, channels), steps=steps, seed=seed)


def mask_conditioning_study(
    ckpt: LoadedCheckpoint,
    segmenter: SegNet,
    heldout: np.ndarray,
    unconditional: np.ndarray,
    *,
    count: int = 64,
    sampler: str = "dpm++sde",
    steps: int = 20,
    guidance: float = 16.0,
    seed: int = 0,
) -> ConditioningStudy:
    """Masks of `count` held-out tumour slices → images; Dice of a real-trained `segmenter` on them."""
    channels = list(ckpt.config.channels)
    if SEG not in channels:
        raise ValueError("mask conditioning needs a model with a seg channel")
    k = channels.index(SEG)
    with_tumour = np.flatnonzero((decode_labels(heldout[:, k]) > 0).reshape(len(heldout), -1).any(axis=1))
    if len(with_tumour) == 0:
        raise ValueError("no held-out slice has a tumour: there is no mask to condition on")
    pick = np.random.default_rng(seed).choice(with_tumour, min(count, len(with_tumour)), replace=False)
    given = heldout[np.sort(pick)]
    if len(unconditional) < len(given):
        raise ValueError(f"{len(unconditional)} unconditional samples for {len(given)} masks: the floor "
                         "pairs one with each mask")  # fmt: skip
    generated = sample_given_channels(ckpt, given, [SEG], sampler=sampler, steps=steps, guidance=guidance,
                                      seed=seed)  # fmt: skip
    masks = split_images_labels(given, channels)[1]

    def dice_on(images_from: np.ndarray) -> dict[str, float]:
        paired = images_from.copy()
        paired[:, k] = given[:, k]
        return dice_scores(predict(segmenter, split_images_labels(paired, channels)[0]), masks)

    return ConditioningStudy(
        conditioned=dice_on(generated),
        unconditional=dice_on(unconditional[: len(given)]),
        real=dice_on(given),
        known_max_error=float(np.abs(generated[:, k] - given[:, k]).max()),
        count=len(given),
    )

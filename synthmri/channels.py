"""Channel sets and the segmentation label encoding (torch-free).

The tumour segmentation travels as one image channel: each BraTS label maps to a
fixed intensity level in [-1, 1] and decodes by nearest level, so a diffusion model
generates image and mask jointly.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
SEG = "seg"

CHANNEL_SETS: dict[str, tuple[str, ...]] = {
    "t1ce": ("t1ce",),
    "t1ce+seg": ("t1ce", "seg"),
    "t1+t1ce+t2+flair+seg": ("t1", "t1ce", "t2", "flair", "seg"),
}

BRATS_LABELS: tuple[int, ...] = (0, 1, 2, 4)
LABEL_NAMES: dict[int, str] = {0: "background", 1: "NCR", 2: "ED", 4: "ET"}

# Equally spaced levels maximise the decoding margin (2/3 of the range apart).
DEFAULT_LABEL_LEVELS: dict[int, float] = {0: -1.0, 1: -1.0 / 3.0, 2: 1.0 / 3.0, 4: 1.0}


class ChannelSetError(ValueError):
    """An unknown channel set name."""


def channels_of(channel_set: str) -> tuple[str, ...]:
    """The ordered channel names of a channel set, or a clear error."""
    try:
        return CHANNEL_SETS[channel_set]
    except KeyError:
        known = ", ".join(repr(k) for k in CHANNEL_SETS)
        raise ChannelSetError(f"unknown channel set {channel_set!r}; known: {known}") from None


def seg_index(channel_set: str) -> int | None:
    """Index of the segmentation channel, or None when the set has none."""
    names = channels_of(channel_set)
    return names.index(SEG) if SEG in names else None


def encode_labels(seg: np.ndarray, levels: Mapping[int, float] = DEFAULT_LABEL_LEVELS) -> np.ndarray:
    """BraTS labels {0,1,2,4} → float32 intensity levels; other labels are an error."""
    seg = np.asarray(seg)
    unknown = np.setdiff1d(np.unique(seg), np.array(list(levels), dtype=seg.dtype))
    if unknown.size:
        raise ValueError(f"segmentation has labels {unknown.tolist()} outside {sorted(levels)}")
    out = np.empty(seg.shape, dtype=np.float32)
    for label, level in levels.items():
        out[seg == label] = level
    return out


def decode_labels(x: np.ndarray, levels: Mapping[int, float] = DEFAULT_LABEL_LEVELS) -> np.ndarray:
    """Float channel → uint8 BraTS labels by nearest level."""
    labels = np.array(list(levels), dtype=np.uint8)
    centres = np.array(list(levels.values()), dtype=np.float32)
    nearest = np.abs(np.asarray(x, dtype=np.float32)[..., None] - centres).argmin(axis=-1)
    return labels[nearest]


def resolve_for_channels(requested: str, available: Mapping[str, str]) -> str | None:
    """Pick a model for a requested channel set: an exact match, else the smallest superset.

    `available` maps model name → its channel set. A superset model serves a subset
    request by dropping channels: the kept channels are a sample of their marginal.
    """
    wanted = set(channels_of(requested))
    exact = sorted(name for name, cs in available.items() if cs == requested)
    if exact:
        return exact[0]
    supersets = sorted(
        (len(channels_of(cs)), name)
        for name, cs in available.items()
        if cs in CHANNEL_SETS and wanted <= set(channels_of(cs))
    )
    return supersets[0][1] if supersets else None

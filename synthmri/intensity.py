"""Intensity normalisation rules shared by training and by uploaded known channels (numpy only).

The training preprocessing (training/preprocess.py) maps volumes to the model range with
these functions; the API applies the same rule to an uploaded image that is not already
in [0, 1], so a given channel lands where the model learned that sequence's intensities.
"""

from __future__ import annotations

import numpy as np


def normalise_percentile(
    volume: np.ndarray, mask: np.ndarray, low: float = 0.5, high: float = 99.5
) -> np.ndarray:
    """Clip to the [low, high] percentiles of brain voxels, scale to [-1, 1]; background −1."""
    out = np.full(volume.shape, -1.0, dtype=np.float32)
    values = volume[mask]
    if values.size == 0:
        return out
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:  # a constant volume carries no contrast: map the brain to mid-grey
        out[mask] = 0.0
        return out
    scaled = (np.clip(values, lo, hi) - lo) / (hi - lo)
    out[mask] = (scaled * 2.0 - 1.0).astype(np.float32)
    return out


def research_uint8(volume: np.ndarray) -> np.ndarray:
    """uint8(vol / vol.max() * 255): the original scaling (truncation, not rounding)."""
    peak = float(volume.max())
    if peak <= 0:
        return np.zeros(volume.shape, dtype=np.uint8)
    return (volume / peak * 255).astype(np.uint8)

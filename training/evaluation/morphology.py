"""Per-slice anatomy and mask figures of a set of slices, real or synthetic.

Every function takes slices in the model's range, (N, C, H, W) float32 in [-1, 1] with
channel names, so real and generated slices are measured by the same code. Real slices
have background at exactly −1 (see training.preprocess); a pixel belongs to the brain
when any image channel is above `BRAIN_THRESHOLD`, with holes filled (CSF can be as dark
as the background in T1 and FLAIR).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.stats import wasserstein_distance

from synthmri.channels import DEFAULT_LABEL_LEVELS, SEG, decode_labels

BRAIN_THRESHOLD = -0.9  # model range; 5 % of the intensity range above the background
# A brain piece smaller than this share of the slice is a speck, not a second brain.
MIN_PIECE_FRACTION = 0.005
LEVEL_TOLERANCE = 0.1  # a seg value this close to a label level counts as clean
EIGHT = np.ones((3, 3), dtype=bool)
FOUR = ndimage.generate_binary_structure(2, 1)
TISSUES: dict[str, tuple[int, ...]] = {
    "brain": (0, 1, 2, 4),
    "healthy": (0,),
    "NCR": (1,),
    "ED": (2,),
    "ET": (4,),
}
W1_PIXELS = 200_000  # pixels per class compared by the 1-Wasserstein distance (random subset)


@dataclass(frozen=True)
class Decoded:
    """Slices split into image channels, brain masks and (when present) labels."""

    images: np.ndarray  # (N, Ci, H, W) float32 in [-1, 1]
    image_channels: tuple[str, ...]
    brain: np.ndarray  # (N, H, W) bool
    labels: np.ndarray | None  # (N, H, W) uint8 BraTS labels
    seg_raw: np.ndarray | None  # (N, H, W) float32 seg channel before decoding


def decode(
    x: np.ndarray, channels: Sequence[str], levels: Mapping[int, float] = DEFAULT_LABEL_LEVELS
) -> Decoded:
    """Split a batch of model-range slices into images, brain masks and labels."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != len(channels):
        raise ValueError(f"expected (N, {len(channels)}, H, W) slices for {tuple(channels)}, got {x.shape}")
    image_idx = [i for i, c in enumerate(channels) if c != SEG]
    images = x[:, image_idx]
    brain = brain_masks(images)
    seg_raw = labels = None
    if SEG in channels:
        seg_raw = x[:, list(channels).index(SEG)]
        labels = decode_labels(seg_raw, levels)
    return Decoded(images, tuple(channels[i] for i in image_idx), brain, labels, seg_raw)


def brain_masks(images: np.ndarray) -> np.ndarray:
    """(N, H, W) brain masks: any image channel above the threshold, holes filled."""
    fg: np.ndarray = np.asarray((images > BRAIN_THRESHOLD).any(axis=1))
    return np.stack([ndimage.binary_fill_holes(m) for m in fg]) if len(fg) else fg


def count_pieces(mask: np.ndarray, min_size: int = 1) -> int:
    """8-connected components of a 2-D mask with at least `min_size` pixels."""
    labelled, n = ndimage.label(mask, structure=EIGHT)
    if n == 0:
        return 0
    sizes = np.bincount(labelled.ravel())[1:]
    return int((sizes >= min_size).sum())


def isolated_pixels(mask: np.ndarray) -> int:
    """Pixels of a 2-D mask none of whose 8 neighbours is in the mask (salt-and-pepper)."""
    m = mask.astype(np.int32)
    neighbours = ndimage.convolve(m, EIGHT.astype(np.int32), mode="constant") - m
    return int((mask & (neighbours == 0)).sum())


def _boundary_contacts(labels: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Labels of the 4-neighbours just outside `inside` (one entry per contact pixel)."""
    ring = ndimage.binary_dilation(inside, structure=FOUR) & ~inside
    return labels[ring]


def slice_figures(d: Decoded) -> dict[str, float]:
    """Mean per-slice anatomy and mask figures of a set (see the evaluation report for each)."""
    n, h, w = d.brain.shape
    min_piece = max(1, round(MIN_PIECE_FRACTION * h * w))
    pieces = np.array([count_pieces(m, min_piece) for m in d.brain])
    out: dict[str, float] = {
        "slices": float(n),
        "background_fraction": float(1.0 - d.brain.mean()) if n else float("nan"),
        "one_brain": float((pieces == 1).mean()) if n else float("nan"),
    }
    if d.labels is None or d.seg_raw is None:
        return out
    tumour = d.labels > 0
    has: np.ndarray = np.asarray(tumour.reshape(n, -1).any(axis=1))
    components = [count_pieces(m) for m, y in zip(tumour, has, strict=True) if y]
    # A pixel's worth of partial-volume rim is allowed around the brain outline.
    near_brain = np.stack([ndimage.binary_dilation(b, structure=EIGHT) for b in d.brain]) if n else d.brain
    outside = (tumour & ~near_brain).reshape(n, -1).any(axis=1)
    levels = np.array(list(DEFAULT_LABEL_LEVELS.values()), dtype=np.float32)
    deviation = np.abs(d.seg_raw[..., None] - levels).min(axis=-1)
    core_contacts, ncr_contacts = [], []
    for y in d.labels:
        core = (y == 1) | (y == 4)
        if core.any():
            core_contacts.append(_boundary_contacts(y, core))
        ncr = y == 1
        if ncr.any():
            ncr_contacts.append(_boundary_contacts(y, ncr))
    core_ring = np.concatenate(core_contacts) if core_contacts else np.zeros(0, np.uint8)
    ncr_ring = np.concatenate(ncr_contacts) if ncr_contacts else np.zeros(0, np.uint8)
    out.update(
        tumour_slices=float(has.mean()) if n else float("nan"),
        tumour_components=float(np.mean(components)) if components else 0.0,
        isolated_tumour_pixels=float(np.mean([isolated_pixels(m) for m in tumour])) if n else float("nan"),
        tumour_outside_brain=float(outside.mean()) if n else float("nan"),
        clean_label_levels=float((deviation <= LEVEL_TOLERANCE).mean()) if n else float("nan"),
        # Nesting: the tumour core (NCR, ET) lies inside oedema, NCR inside the enhancing rim
        # when there is one. Share of the core's outer ring that is healthy tissue (label 0).
        core_touches_healthy=float((core_ring == 0).mean()) if core_ring.size else float("nan"),
        ncr_touches_healthy=float((ncr_ring == 0).mean()) if ncr_ring.size else float("nan"),
    )
    return out


def _class_pixels(d: Decoded, channel: int, labels: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    inside = d.brain
    if d.labels is not None and labels != TISSUES["brain"]:
        inside = inside & np.isin(d.labels, labels)
    values = d.images[:, channel][inside]
    if values.size > W1_PIXELS:
        values = rng.choice(values, W1_PIXELS, replace=False)
    return values


def intensity_distances(syn: Decoded, real: Decoded, seed: int = 0) -> dict[str, dict[str, float]]:
    """1-Wasserstein distance (model units) between brain intensities, per channel and tissue class.

    Tissue classes beyond the whole brain need labels on both sides; a class with no
    pixels on either side is left out.
    """
    rng = np.random.default_rng(seed)
    classes = TISSUES if syn.labels is not None and real.labels is not None else {"brain": TISSUES["brain"]}
    out: dict[str, dict[str, float]] = {}
    for c, name in enumerate(syn.image_channels):
        per_class: dict[str, float] = {}
        for tissue, labels in classes.items():
            a, b = _class_pixels(syn, c, labels, rng), _class_pixels(real, c, labels, rng)
            if a.size and b.size:
                per_class[tissue] = float(wasserstein_distance(a, b))
        out[name] = per_class
    return out

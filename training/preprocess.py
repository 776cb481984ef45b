"""Volume → model-slice preprocessing as pure numpy functions.

Two modes:

- `percentile` (default): brain mask = voxels non-zero in any sequence; each volume is
  clipped to its 0.5–99.5th percentile over brain voxels and scaled to [-1, 1], with
  background −1; axial slices with too little brain are skipped; slices are cropped to
  the subject's brain bounding box (made square), resized to the model size (images by
  area averaging when shrinking, bilinear when enlarging; seg by nearest neighbour)
  and the seg encoded with `synthmri.channels.encode_labels`.
- `research`: the original project's 8-bit slices, exactly: each volume scaled as
  uint8(vol / vol.max() * 255), zero-padded 240→256, an axial slice kept only when more
  than 15 % of its (padded, 256×256) pixels have T1 > 50, seg stored as label/5×255;
  the model input is then uint8/127.5 − 1 and the decoded labels re-encoded.

Slice arrays follow docs/INTERFACES.md: `img[a, b] = volume[a, b, z]`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from synthmri.channels import SEG, decode_labels, encode_labels
from synthmri.intensity import normalise_percentile, research_uint8

IMAGE_MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
RESEARCH_SIZE = 256
RESEARCH_T1_THRESHOLD = 50
RESEARCH_MIN_FRACTION = 0.15


# ---------------------------------------------------------------------------
# percentile mode


def brain_mask(volumes: Mapping[str, np.ndarray], modalities: Sequence[str] = IMAGE_MODALITIES) -> np.ndarray:
    """Voxels non-zero in any sequence: BraTS volumes are skull-stripped to exactly 0."""
    mask = np.zeros(np.shape(volumes[modalities[0]]), dtype=bool)
    for m in modalities:
        mask |= volumes[m] != 0
    return mask


def slice_brain_fraction(mask: np.ndarray) -> np.ndarray:
    """(Z,) fraction of each axial slice's pixels that are brain."""
    return mask.mean(axis=(0, 1))


def select_slices(mask: np.ndarray, min_brain_fraction: float) -> np.ndarray:
    """Indices of axial slices whose brain fraction is at least `min_brain_fraction`."""
    return np.flatnonzero(slice_brain_fraction(mask) >= min_brain_fraction)


def square_brain_box(mask2d: np.ndarray, margin: int = 4) -> tuple[int, int, int, int]:
    """(a0, a1, b0, b1): a square around the brain's in-plane bounding box plus `margin`.

    The square may reach outside the image; `crop_pad` fills those pixels. An empty
    mask gives the whole image padded to a square.
    """
    h, w = mask2d.shape
    rows, cols = np.flatnonzero(mask2d.any(1)), np.flatnonzero(mask2d.any(0))
    if rows.size == 0:
        a0, a1, b0, b1 = 0, h, 0, w
    else:
        a0, a1, b0, b1 = rows[0] - margin, rows[-1] + 1 + margin, cols[0] - margin, cols[-1] + 1 + margin
    side = max(a1 - a0, b1 - b0)
    ca, cb = (a0 + a1) // 2, (b0 + b1) // 2
    return int(ca - side // 2), int(ca - side // 2 + side), int(cb - side // 2), int(cb - side // 2 + side)


def centre_box(shape: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    """A size×size box centred on an image of `shape` (padding where size is larger)."""
    h, w = shape
    a0, b0 = (h - size) // 2, (w - size) // 2
    return a0, a0 + size, b0, b0 + size


def crop_pad(img: np.ndarray, box: tuple[int, int, int, int], fill: float) -> np.ndarray:
    """img[..., a0:a1, b0:b1] where the box may extend past the edges (filled with `fill`)."""
    a0, a1, b0, b1 = box
    h, w = img.shape[-2:]
    out = np.full((*img.shape[:-2], a1 - a0, b1 - b0), fill, dtype=img.dtype)
    sa0, sa1, sb0, sb1 = max(a0, 0), min(a1, h), max(b0, 0), min(b1, w)
    if sa1 > sa0 and sb1 > sb0:
        out[..., sa0 - a0 : sa1 - a0, sb0 - b0 : sb1 - b0] = img[..., sa0:sa1, sb0:sb1]
    return out


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in): output pixel i averages input [i, i+1)·n_in/n_out by overlap length."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    pix = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, pix + 1) - np.maximum(lo, pix), 0.0, None)
    return overlap / overlap.sum(1, keepdims=True)


def _bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation at pixel centres (align_corners=False), edges clamped."""
    src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    w = np.zeros((n_out, n_in))
    np.add.at(w, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(w, (np.arange(n_out), i1), frac)
    return w


def _resize_weights(n_in: int, n_out: int) -> np.ndarray:
    if n_out < n_in:
        return _area_weights(n_in, n_out)
    if n_out > n_in:
        return _bilinear_weights(n_in, n_out)
    return np.eye(n_in)


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """(..., H, W) → (..., size, size) float32: area average when shrinking, bilinear when enlarging."""
    h, w = img.shape[-2:]
    if (h, w) == (size, size):
        return img.astype(np.float32, copy=True)
    wa = _resize_weights(h, size).astype(np.float32)
    wb = _resize_weights(w, size).astype(np.float32)
    lead = img.shape[:-2]
    # Two plain 2-D GEMMs (BLAS) instead of a broadcast stack of small matmuls.
    x = img.astype(np.float32).reshape(-1, w) @ wb.T  # (N·H, S)
    x = x.reshape(-1, h, size).transpose(0, 2, 1).reshape(-1, h) @ wa.T  # (N·S_b, S_a)
    return np.ascontiguousarray(x.reshape(-1, size, size).transpose(0, 2, 1)).reshape(*lead, size, size)


def resize_nearest(img: np.ndarray, size: int) -> np.ndarray:
    """(..., H, W) → (..., size, size) by nearest neighbour (labels stay labels)."""
    h, w = img.shape[-2:]
    ia = np.minimum(((np.arange(size) + 0.5) * (h / size)).astype(int), h - 1)
    ib = np.minimum(((np.arange(size) + 0.5) * (w / size)).astype(int), w - 1)
    return img[..., ia[:, None], ib[None, :]]


@dataclass(frozen=True)
class SliceParams:
    """Everything that shapes the slices; part of the cache fingerprint."""

    channels: tuple[str, ...]
    image_size: int
    mode: str = "percentile"
    low_percentile: float = 0.5
    high_percentile: float = 99.5
    min_brain_fraction: float = 0.1
    crop: str = "brain"  # "brain": square around the subject's brain; "full": the whole slice
    margin: int = 4


@dataclass
class SubjectSlices:
    """The kept axial slices of one subject in storage form.

    `data` is (N, C, S, S): float16 model values in percentile mode, uint8 8-bit
    values (seg as label/5×255) in research mode; `z` the source slice indices.
    """

    data: np.ndarray
    z: np.ndarray
    has_tumour: np.ndarray


def percentile_slices(volumes: Mapping[str, np.ndarray], params: SliceParams) -> SubjectSlices:
    """Percentile-mode slices of one subject's volumes (see module docstring).

    The brain mask is the union over the image volumes given, so a run reads every
    sequence the subject has even when its channels use fewer.
    """
    mask = brain_mask(volumes, [m for m in IMAGE_MODALITIES if m in volumes])
    z = select_slices(mask, params.min_brain_fraction)
    size = params.image_size
    if params.crop == "brain":
        footprint = np.asarray(mask[:, :, z].any(axis=2) if z.size else mask.any(axis=2))
        box = square_brain_box(footprint, params.margin)
    elif params.crop == "full":
        box = centre_box(mask.shape[:2], max(mask.shape[:2]))
    else:
        raise ValueError(f"unknown crop {params.crop!r}; use 'brain' or 'full'")
    channels = []
    for name in params.channels:
        if name == SEG:
            seg = np.moveaxis(volumes[SEG][:, :, z], 2, 0)
            seg = resize_nearest(crop_pad(seg, box, 0), size)
            channels.append(encode_labels(seg))
        else:
            norm = normalise_percentile(volumes[name], mask, params.low_percentile, params.high_percentile)
            img = crop_pad(np.moveaxis(norm[:, :, z], 2, 0), box, -1.0)
            channels.append(np.clip(resize_image(img, size), -1.0, 1.0))
    data = np.stack(channels, axis=1).astype(np.float16) if channels else np.zeros((0, 0, size, size))
    return SubjectSlices(data, z.astype(np.int32), _has_tumour(volumes, z))


def _has_tumour(volumes: Mapping[str, np.ndarray], z: np.ndarray) -> np.ndarray:
    if SEG not in volumes:
        return np.zeros(len(z), dtype=bool)
    return np.asarray((volumes[SEG][:, :, z] > 0).any(axis=(0, 1)), dtype=bool).reshape(len(z))


# ---------------------------------------------------------------------------
# research mode


def research_seg(seg: np.ndarray) -> np.ndarray:
    """BraTS labels → the stored 8-bit value label/5×255 (0, 51, 102, 204)."""
    return (seg.astype(np.float64) / 5 * 255).astype(np.uint8)


def research_decode_seg(stored: np.ndarray) -> np.ndarray:
    """Stored 8-bit seg → BraTS labels (nearest of label/5×255, robust to resampling)."""
    return np.rint(stored.astype(np.float32) * 5 / 255).astype(np.uint8)


def pad_to(volume: np.ndarray, size: int = RESEARCH_SIZE) -> np.ndarray:
    """Zero-pad (or centre-crop) the two in-plane axes to size×size: 240 → 256 adds 8 each side."""
    moved = np.moveaxis(volume, 2, 0) if volume.ndim == 3 else volume
    out = crop_pad(moved, centre_box(moved.shape[-2:], size), 0)
    return np.moveaxis(out, 0, 2) if volume.ndim == 3 else out


def research_keep(t1_u8_padded: np.ndarray) -> np.ndarray:
    """Axial slices where more than 15 % of the (padded) pixels have 8-bit T1 > 50."""
    frac = (t1_u8_padded > RESEARCH_T1_THRESHOLD).mean(axis=(0, 1))
    return np.flatnonzero(frac > RESEARCH_MIN_FRACTION)


def research_slices(volumes: Mapping[str, np.ndarray], params: SliceParams) -> SubjectSlices:
    """Research-mode 8-bit slices (N, C, S, S) uint8, exactly the original's at S = 256."""
    t1 = pad_to(research_uint8(volumes["t1"]))
    z = research_keep(t1)
    channels = []
    for name in params.channels:
        if name == SEG:
            stored = pad_to(research_seg(volumes[SEG]))
        else:
            stored = t1 if name == "t1" else pad_to(research_uint8(volumes[name]))
        channels.append(np.moveaxis(stored[:, :, z], 2, 0))
    data = np.stack(channels, axis=1)
    data = resize_stored(data, params.channels, params.image_size)
    return SubjectSlices(data, z.astype(np.int32), _has_tumour(volumes, z))


def resize_stored(data: np.ndarray, channels: Sequence[str], size: int) -> np.ndarray:
    """Resize (N, C, H, W) 8-bit research slices; images by area/bilinear (rounded), seg by nearest."""
    if data.shape[-1] == size and data.shape[-2] == size:
        return data
    out = np.empty((*data.shape[:2], size, size), dtype=np.uint8)
    for c, name in enumerate(channels):
        if name == SEG:
            out[:, c] = resize_nearest(data[:, c], size)
        else:
            out[:, c] = np.clip(np.rint(resize_image(data[:, c], size)), 0, 255).astype(np.uint8)
    return out


def png_slices(stacks: Mapping[str, np.ndarray], params: SliceParams) -> SubjectSlices:
    """Prepared research PNG stacks (N, 256, 256) uint8, seg as BraTS labels → stored research slices."""
    data = np.stack([research_seg(stacks[name]) if name == SEG else stacks[name] for name in params.channels],
                    axis=1)
    data = resize_stored(data, params.channels, params.image_size)
    z = np.arange(data.shape[0], dtype=np.int32)
    has_tumour = np.zeros(data.shape[0], dtype=bool)
    if SEG in stacks:
        has_tumour = np.asarray((stacks[SEG] > 0).any(axis=(1, 2)), dtype=bool).reshape(data.shape[0])
    return SubjectSlices(data, z, has_tumour)


# ---------------------------------------------------------------------------
# storage → model tensors


def to_model(stored: np.ndarray, mode: str, seg_index: int | None) -> np.ndarray:
    """Stored slice(s) (..., C, H, W) → float32 model values in [-1, 1].

    Research: images uint8/127.5 − 1, seg decoded from label/5×255 and re-encoded.
    Percentile: float16 → float32, the seg channel snapped back to its exact levels.
    """
    if mode == "research":
        x = stored.astype(np.float32) / 127.5 - 1.0
        if seg_index is not None:
            x[..., seg_index, :, :] = encode_labels(research_decode_seg(stored[..., seg_index, :, :]))
        return x
    x = stored.astype(np.float32)
    if seg_index is not None:
        x[..., seg_index, :, :] = encode_labels(decode_labels(x[..., seg_index, :, :]))
    return x


def tumour_fraction_indices(
    has_tumour: np.ndarray, fraction: float, rng: np.random.Generator, how: str = "oversample"
) -> np.ndarray:
    """Slice indices in which a `fraction` of the slices contain tumour.

    `oversample` keeps every slice and repeats the under-represented kind (sampling
    with replacement for the remainder); `filter` keeps every slice of the scarce kind
    and a random subset of the other. Returned in ascending order.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"tumour_fraction must be in [0, 1], got {fraction}")
    tumour, healthy = np.flatnonzero(has_tumour), np.flatnonzero(~np.asarray(has_tumour, dtype=bool))
    if fraction == 1.0 or fraction == 0.0:
        keep = tumour if fraction == 1.0 else healthy
        if keep.size == 0:
            raise ValueError(f"tumour_fraction {fraction} asks for slices of a kind the data has none of")
        return keep
    if tumour.size == 0 or healthy.size == 0:
        raise ValueError(f"tumour_fraction {fraction} needs slices with and without tumour")
    current = tumour.size / (tumour.size + healthy.size)
    if how == "oversample":
        if fraction > current:  # more tumour slices: n_t' / (n_t' + n_h) = fraction
            n_t, n_h = round(healthy.size * fraction / (1 - fraction)), healthy.size
        else:
            n_t, n_h = tumour.size, round(tumour.size * (1 - fraction) / fraction)
    elif how == "filter":
        if fraction > current:
            n_t, n_h = tumour.size, round(tumour.size * (1 - fraction) / fraction)
        else:
            n_t, n_h = round(healthy.size * fraction / (1 - fraction)), healthy.size
    else:
        raise ValueError(f"unknown tumour-fraction method {how!r}; use 'oversample' or 'filter'")
    return np.sort(np.concatenate([_take(tumour, n_t, rng), _take(healthy, n_h, rng)]))


def _take(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n indices from pool: whole copies first, then a random remainder without replacement."""
    reps, rest = divmod(max(n, 0), pool.size)
    return np.concatenate([np.tile(pool, reps), rng.choice(pool, rest, replace=False)])

"""Known-channel files for tests: NIfTI and PNG bytes of chosen arrays, orientations and types."""

from __future__ import annotations

import gzip
import io

import nibabel as nib
import numpy as np
from PIL import Image

from synthmri.outputs.writers import AFFINE


def nifti(array: np.ndarray, affine: np.ndarray | None = AFFINE, *, gz: bool = True, dtype: str | None = None,
          code: int = 1) -> bytes:  # fmt: skip
    """A NIfTI-1 of `array` (2-D slices get a third axis of 1) with this affine as sform and qform."""
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[:, :, None]
    if dtype is not None:
        a = a.astype(dtype)
    img = nib.Nifti1Image(a, affine if affine is not None else np.eye(4))
    img.set_sform(affine if affine is not None else np.eye(4), code=code if affine is not None else 0)
    img.set_qform(affine if affine is not None else np.eye(4), code=code if affine is not None else 0)
    raw = img.to_bytes()
    return gzip.compress(raw, mtime=0) if gz else raw


def png(array: np.ndarray, mode: str = "L") -> bytes:
    """A PNG of a (H, W) slice laid out as the service writes PNGs (transposed)."""
    a = np.asarray(array).T
    if mode == "L":
        im = Image.fromarray(a.astype(np.uint8), mode="L")
    elif mode == "I;16":
        im = Image.fromarray(a.astype(np.uint16))
    else:
        im = Image.fromarray(np.repeat(a.astype(np.uint8)[:, :, None], 3, axis=2), mode="RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def tumour(size: int = 32, shift: int = 0) -> np.ndarray:
    """(size, size) BraTS labels: oedema around necrosis with an enhancing rim, placed by `shift`."""
    seg = np.zeros((size, size), dtype=np.uint8)
    a, b = 6 + shift, 8 + shift
    seg[a : a + 12, b : b + 12] = 2
    seg[a + 3 : a + 9, b + 3 : b + 9] = 4
    seg[a + 5 : a + 7, b + 5 : b + 7] = 1
    return seg


def brain(size: int = 32, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """(size, size) float image: a noisy disc on a zero background, values up to `scale`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.4) ** 2
    return np.where(disc, rng.uniform(0.2, 1.0, (size, size)), 0.0) * scale

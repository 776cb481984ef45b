"""Real brain anatomy for the phantoms: the MNI152 2009 tissue maps nilearn ships offline.

nilearn bundles the ICBM152 2009a symmetric T1 template (skull-stripped) and its grey-
and white-matter probability maps inside its package directory; we read those files
directly (never `nilearn.datasets.fetch_*`, which may download) and without importing
nilearn itself, which is slow to import.

Geometry: a BraTS volume is 240×240×155 voxels of 1 mm whose nibabel array is
`volume[i, j, k]` with affine diag(-1, -1, 1) — i runs right→left, j anterior→posterior,
k inferior→superior. The MNI template is RAS (i left→right, j posterior→anterior), so
mapping BraTS to template flips the first two axes.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

BRATS_SHAPE: tuple[int, int, int] = (240, 240, 155)
# BraTS NIfTI affine as nibabel reports it for the challenge data (LPS-style, 1 mm).
BRATS_AFFINE = np.array(
    [[-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 239.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

# Template voxel that lands on the centre of the BraTS grid. The template brain spans
# i 26..170, j 27..207, k 0..154; BraTS brains sit centred in-plane and leave a few
# empty slices above the vertex, so the lowest brain-stem slices fall off the grid.
# Half-integers in-plane (240 is even) and an integer in z (155 is odd) put BraTS voxel
# centres exactly on template voxel centres when there is no deformation.
TEMPLATE_CENTRE = (98.5, 117.5, 87.0)


class TemplateError(RuntimeError):
    """The offline MNI152 templates are not where nilearn installs them."""


def template_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise TemplateError("nilearn is not installed; it ships the MNI152 templates the phantoms use")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


@functools.lru_cache(maxsize=1)
def load_tissue_template() -> torch.Tensor:
    """(1, 3, I, J, K) float32 tensor: grey matter, white matter, CSF probabilities in [0, 1].

    CSF is the rest of the skull-stripped brain mask (T1 > 0), so the three sum to the
    brain's partial-volume fraction and background is 0 everywhere.
    """
    folder = template_dir()
    maps = {}
    for name, file in TEMPLATE_FILES.items():
        path = folder / file
        if not path.is_file():
            raise TemplateError(f"MNI152 template {file} not found in {folder}")
        img = cast(nib.Nifti1Image, nib.load(str(path)))
        maps[name] = np.asarray(img.dataobj, dtype=np.float32) / 255.0
    gm, wm = maps["gm"], maps["wm"]
    # The T1 edge fades over a voxel or two; use it as the partial-volume brain fraction.
    brain = np.clip(maps["t1"] / 0.15, 0.0, 1.0)
    tissue = np.clip(gm + wm, 0.0, 1.0)
    csf = np.clip(brain - tissue, 0.0, 1.0)
    stack = np.stack([gm, wm, csf])
    stack *= (brain > 0)[None]
    return torch.from_numpy(np.ascontiguousarray(stack))[None]


def voxel_axes_mm(shape: tuple[int, int, int]) -> list[torch.Tensor]:
    """Voxel-centre positions in mm along each axis, relative to the centre of the BraTS field of view.

    A smaller `shape` covers the same 240×240×155 mm field with bigger voxels.
    """
    axes = []
    for n, extent in zip(shape, BRATS_SHAPE, strict=True):
        step = extent / n
        axes.append((torch.arange(n, dtype=torch.float32) + 0.5) * step - extent / 2.0)
    return axes


def voxel_grid_mm(shape: tuple[int, int, int], box: tuple[slice, ...] | None = None) -> torch.Tensor:
    """(X, Y, Z, 3) voxel-centre positions in mm (optionally only inside `box`)."""
    axes = voxel_axes_mm(shape)
    if box is not None:
        axes = [a[b] for a, b in zip(axes, box, strict=True)]
    gx, gy, gz = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([gx, gy, gz], dim=-1)


def coarse_grid_mm(shape: tuple[int, int, int], spacing_mm: float = 4.0) -> torch.Tensor:
    """(x, y, z, 3) points spanning the first to the last voxel centre of `shape` every ~spacing_mm.

    Upsampling a field defined here with trilinear `align_corners=True` lands exactly on
    the voxel centres, so smooth deformations need only be evaluated on this grid.
    """
    axes = voxel_axes_mm(shape)
    coarse = []
    for a in axes:
        m = max(2, int(np.ceil(float(a[-1] - a[0]) / spacing_mm)) + 1)
        coarse.append(torch.linspace(float(a[0]), float(a[-1]), m))
    gx, gy, gz = torch.meshgrid(*coarse, indexing="ij")
    return torch.stack([gx, gy, gz], dim=-1)


def brats_mm_to_template_voxel(q: torch.Tensor) -> torch.Tensor:
    """BraTS-frame mm (centred) → template voxel indices; flips i and j (LPS → RAS)."""
    ci, cj, ck = TEMPLATE_CENTRE
    return torch.stack([ci - q[..., 0], cj - q[..., 1], ck + q[..., 2]], dim=-1)


def template_voxel_to_brats_mm(t: np.ndarray) -> np.ndarray:
    ci, cj, ck = TEMPLATE_CENTRE
    return np.array([ci - t[0], cj - t[1], t[2] - ck], dtype=np.float64)


def sample_template(
    template: torch.Tensor, q_mm_coarse: torch.Tensor, shape: tuple[int, int, int]
) -> torch.Tensor:
    """Trilinearly sample the (1, C, I, J, K) template at a smooth deformation.

    `q_mm_coarse` (x, y, z, 3) gives, on `coarse_grid_mm(shape)`, the BraTS-frame point
    each output voxel reads from; it is upsampled to `shape` (exact for the affine part).
    Returns (C, X, Y, Z); points outside the template read 0 (no brain).
    """
    t = brats_mm_to_template_voxel(q_mm_coarse)
    size = template.shape[2:]
    # grid_sample's last grid axis indexes (W, H, D) = (K, J, I) of the input.
    norm = torch.stack([t[..., a] / (size[a] - 1) * 2.0 - 1.0 for a in (2, 1, 0)], dim=0)[None]
    grid = F.interpolate(norm, size=shape, mode="trilinear", align_corners=True)[0].permute(1, 2, 3, 0)
    out = F.grid_sample(template, grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0]

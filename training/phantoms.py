"""BraTS-like phantom subjects: real MNI152 anatomy, a glioma, four MR contrasts.

Each subject is the ICBM152 tissue maps (grey matter, white matter, CSF) pulled through
a random smooth deformation (affine + elastic + the tumour's mass effect), a tumour
with a necrotic core (label 1), an enhancing rim (4) and white-matter-following oedema
(2), tissue contrasts per sequence, a multiplicative bias field and Rician noise
(magnitude of complex Gaussian noise, Gudbjartsson & Patz 1995). Everything is drawn
from a generator seeded by (seed, index), so a subject is reproducible on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from training.anatomy import (
    BRATS_AFFINE,
    BRATS_SHAPE,
    coarse_grid_mm,
    load_tissue_template,
    sample_template,
    template_voxel_to_brats_mm,
    voxel_grid_mm,
)

MODALITIES = ("t1", "t1ce", "t2", "flair")
NCR, ED, ET = 1, 2, 4

# Relative signal per tissue class, white matter of T1 = 1. T1: WM > GM > CSF; T1CE adds
# gadolinium in the enhancing rim; T2: fluid bright; FLAIR: free fluid suppressed while
# oedema (bound water) stays bright.
CONTRAST: dict[str, dict[str, float]] = {
    "t1": {"gm": 0.70, "wm": 1.00, "csf": 0.28, "ncr": 0.30, "et": 0.62, "ed": 0.78},
    "t1ce": {"gm": 0.72, "wm": 1.00, "csf": 0.30, "ncr": 0.28, "et": 1.50, "ed": 0.76},
    "t2": {"gm": 0.62, "wm": 0.42, "csf": 1.00, "ncr": 1.05, "et": 0.65, "ed": 0.88},
    "flair": {"gm": 0.80, "wm": 0.62, "csf": 0.10, "ncr": 0.42, "et": 0.88, "ed": 1.20},
}
# Scanner gain per sequence: BraTS intensities are arbitrary units in the hundreds/thousands.
# A low-grade (non-enhancing) core is solid tumour, not fluid: T1-dark, T2/FLAIR-bright.
CONTRAST_NONENHANCING = {"t1": 0.55, "t1ce": 0.55, "t2": 0.92, "flair": 1.10}
GAIN = {"t1": (350.0, 700.0), "t1ce": (500.0, 1100.0), "t2": (600.0, 1600.0), "flair": (300.0, 700.0)}

NAMINGS = ("2020", "2021", "2023")


@dataclass(frozen=True)
class PhantomOptions:
    """Ranges the per-subject parameters are drawn from (mm, radians, fractions)."""

    rotation: tuple[float, float, float] = (0.06, 0.06, 0.12)  # max |angle| about x, y, z
    scale: tuple[float, float] = (1.03, 1.15)  # >1 shrinks: the MNI brain is larger than average
    translation_mm: float = 5.0
    elastic_mm: float = 2.5  # std of the smooth displacement at the control points
    core_radius_mm: tuple[float, float] = (9.0, 22.0)
    oedema_factor: tuple[float, float] = (1.35, 2.1)  # oedema radius / core radius
    low_grade_probability: float = 0.15  # no enhancing rim: the core is all label 1
    bias_strength: float = 0.12  # std of log bias field
    noise_fraction: float = 0.025  # Rician sigma / white-matter T1 signal


def _smooth_noise(
    gen: torch.Generator, channels: int, shape: tuple[int, ...], cells: tuple[int, ...]
) -> torch.Tensor:
    """(channels, *shape) smooth unit-ish Gaussian noise: a coarse random grid upsampled trilinearly."""
    coarse = torch.randn((1, channels, *cells), generator=gen, dtype=torch.float32)
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0]


def _rotation(angles: np.ndarray) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _pick_tumour_site(rng: np.random.Generator, template: torch.Tensor) -> np.ndarray:
    """A template voxel deep in cerebral white matter (above the tentorium), as (i, j, k)."""
    wm = template[0, 1, ::3, ::3, ::3].numpy()
    k = np.arange(wm.shape[2]) * 3
    cerebrum = (k >= 75) & (k <= 140)
    candidates = np.argwhere((wm > 0.8) & cerebrum[None, None, :])
    return candidates[rng.integers(len(candidates))].astype(np.float64) * 3


def make_subject(
    seed: int,
    index: int,
    shape: tuple[int, int, int] = BRATS_SHAPE,
    options: PhantomOptions | None = None,
    with_tissue: bool = False,
) -> dict[str, np.ndarray]:
    """One phantom subject: t1, t1ce, t2, flair (float32, background 0) and seg (uint8 {0,1,2,4}).

    `shape` other than 240×240×155 covers the same field of view with coarser voxels
    (for fast tests); the anatomy and tumour are the same subject at lower resolution.
    `with_tissue` adds the warped gm/wm/csf fractions (float32) the contrasts came from.
    """
    opt = options or PhantomOptions()
    rng = np.random.default_rng([int(seed), int(index)])
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    template = load_tissue_template()
    voxel_mm = np.array([e / n for e, n in zip(BRATS_SHAPE, shape, strict=True)])

    # Output point p samples the template at q = A·(massfx(p) + elastic(p)) + b.
    rot = _rotation(rng.uniform(-1, 1, 3) * np.array(opt.rotation))
    a_mat = rot * rng.uniform(*opt.scale)
    b_vec = rng.uniform(-1, 1, 3) * opt.translation_mm
    site_q = template_voxel_to_brats_mm(_pick_tumour_site(rng, template))
    centre = np.linalg.solve(a_mat, site_q - b_vec)  # tumour centre in output mm

    r_core = rng.uniform(*opt.core_radius_mm)
    r_oedema = r_core * rng.uniform(*opt.oedema_factor)
    r_necrosis = r_core * rng.uniform(0.35, 0.7)
    low_grade = rng.uniform() < opt.low_grade_probability

    # Every term of the deformation is smooth on the scale of millimetres, so it is
    # evaluated on a ~4 mm grid and upsampled; only the template lookup is per voxel.
    p = coarse_grid_mm(shape)
    centre_t = torch.tensor(centre, dtype=torch.float32)
    d = p - centre_t
    r2 = (d * d).sum(-1, keepdim=True)
    # Mass effect: sample nearer the centre, i.e. push surrounding tissue outwards.
    push = 0.55 * torch.exp(-r2 / (1.3 * r_core) ** 2)
    p_src = centre_t + d * (1.0 - push)
    p_src += _smooth_noise(gen, 3, tuple(p.shape[:3]), (7, 7, 5)).permute(1, 2, 3, 0) * opt.elastic_mm
    q = p_src @ torch.tensor(a_mat.T, dtype=torch.float32) + torch.tensor(b_vec, dtype=torch.float32)
    tissue = sample_template(template, q, shape).numpy()  # (3, X, Y, Z): gm, wm, csf
    gm, wm, csf = tissue
    mask = (gm + wm + csf) > 0.3

    seg, weights = _tumour(rng, gen, shape, voxel_mm, centre, r_core, r_necrosis, r_oedema, wm, csf, mask)
    contrast = {m: dict(c) for m, c in CONTRAST.items()}
    if low_grade:
        # Diffuse low-grade glioma: solid non-enhancing core, not fluid-filled necrosis.
        seg[seg == ET] = NCR
        weights["ncr"] = weights["ncr"] + weights["et"]
        weights["et"] = np.zeros_like(weights["et"])
        for m in MODALITIES:
            contrast[m]["ncr"] = CONTRAST_NONENHANCING[m]

    # Per-sequence work touches only brain voxels (about a sixth of the grid).
    inside = np.flatnonzero(mask)
    box, w = weights["box"], weights
    in_box = np.zeros(shape, dtype=bool)
    in_box[box] = True
    box_sel = in_box.ravel()[inside]  # brain voxels that lie in the tumour box
    box_idx = np.flatnonzero(mask[box])  # the same voxels, indexed within the box
    gm_i, wm_i, csf_i = gm.ravel()[inside], wm.ravel()[inside], csf.ravel()[inside]
    # Fine tissue texture (~3 mm) shared by all sequences, as real parenchyma is not flat.
    texture_cells = tuple(max(2, n // 3) for n in shape)
    texture = _smooth_noise(gen, 1, shape, texture_cells)[0].numpy().ravel()[inside]
    w_ncr, w_et, w_ed = (w[k].ravel()[box_idx] for k in ("ncr", "et", "ed"))
    w_core = w_ncr + w_et
    tumour_tex = 1.0 + 0.12 * texture[box_sel]
    oedema_tex = 1.0 + 0.05 * texture[box_sel]
    voxels = np.unravel_index(inside, shape)
    bias = _bias_fields(rng, shape, voxels, len(MODALITIES), opt.bias_strength)

    out: dict[str, np.ndarray] = {}
    for col, name in enumerate(MODALITIES):
        c = {k: v * rng.uniform(0.95, 1.05) for k, v in contrast[name].items()}
        signal = (gm_i * c["gm"] + wm_i * c["wm"] + csf_i * c["csf"]) * (1.0 + 0.03 * texture)
        sub = signal[box_sel]
        sub = sub * (1.0 - w_core) + (w_ncr * c["ncr"] + w_et * c["et"]) * tumour_tex
        blend = 0.8 * w_ed
        signal[box_sel] = sub * (1.0 - blend) + blend * c["ed"] * oedema_tex
        signal *= bias[:, col]
        sigma = opt.noise_fraction
        n_re = rng.standard_normal(signal.shape, dtype=np.float32) * sigma
        n_im = rng.standard_normal(signal.shape, dtype=np.float32) * sigma
        rician = np.sqrt((signal + n_re) ** 2 + n_im**2)
        vol = np.zeros(int(np.prod(shape)), dtype=np.float32)
        vol[inside] = rician * rng.uniform(*GAIN[name])
        out[name] = vol.reshape(shape)
    seg[~mask] = 0
    out["seg"] = seg
    if with_tissue:
        out.update(gm=gm, wm=wm, csf=csf)
    return out


def _bias_fields(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    voxels: tuple[np.ndarray, ...],
    n: int,
    strength: float,
) -> np.ndarray:
    """(len(voxels[0]), n) fields exp(cubic polynomial in position): smooth coil sensitivities.

    Higher orders get smaller coefficients, as in TorchIO's RandomBiasField. The
    polynomial is summed over z and y on small axis tables first, so each brain voxel
    costs only four look-ups per field.
    """
    ix, iy, iz = voxels
    ax = [np.linspace(-1.0, 1.0, s_, dtype=np.float32) for s_ in shape]
    x_pow = [ax[0][ix] ** i for i in range(4)]
    out = np.empty((len(ix), n), dtype=np.float32)
    for m in range(n):
        log_b = np.zeros(len(ix), dtype=np.float32)
        for i in range(4):
            table = np.zeros((shape[1], shape[2]), dtype=np.float32)
            for j in range(4 - i):
                poly_z = np.zeros(shape[2], dtype=np.float32)
                for k in range(4 - i - j):
                    if i + j + k:
                        poly_z += np.float32(rng.normal(0.0, strength / (i + j + k))) * ax[2] ** k
                table += np.outer(ax[1] ** j, poly_z)
            log_b += x_pow[i] * table[iy, iz]
        out[:, m] = np.exp(log_b)
    return out


def _tumour(
    rng: np.random.Generator,
    gen: torch.Generator,
    shape: tuple[int, int, int],
    voxel_mm: np.ndarray,
    centre: np.ndarray,
    r_core: float,
    r_necrosis: float,
    r_oedema: float,
    wm: np.ndarray,
    csf: np.ndarray,
    mask: np.ndarray,
) -> tuple[np.ndarray, dict]:
    """Nested tumour labels plus soft class weights inside a bounding box around it.

    Each compartment is a level set of (radius / R + smooth noise), so boundaries are
    irregular; oedema's threshold rises with white-matter fraction, so it spreads along
    tracts (finger-like) and stops at CSF.
    """
    half = r_oedema * 1.6 + 6.0
    lo_mm, hi_mm = centre - half, centre + half
    origin = -np.array(BRATS_SHAPE) / 2.0
    lo = np.clip(np.floor((lo_mm - origin) / voxel_mm).astype(int), 0, shape)
    hi = np.clip(np.ceil((hi_mm - origin) / voxel_mm).astype(int), 0, shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    seg = np.zeros(shape, dtype=np.uint8)
    box_shape = tuple(int(b - a) for a, b in zip(lo, hi, strict=True))
    if min(box_shape) < 1:
        zeros = np.zeros(box_shape, dtype=np.float32)
        return seg, {"box": box, "ncr": zeros, "et": zeros, "ed": zeros}
    d = voxel_grid_mm(shape, box) - torch.tensor(centre, dtype=torch.float32)
    r = torch.sqrt((d * d).sum(-1)).numpy()
    cells = tuple(max(2, int(n * v / 9.0)) for n, v in zip(box_shape, voxel_mm, strict=True))
    # Cubic-spline upsampling: trilinear noise has creases that would show up as straight
    # edges on the tumour outline.
    coarse = torch.randn((3, *cells), generator=gen, dtype=torch.float32).numpy()
    factors = [b / c for b, c in zip(box_shape, cells, strict=True)]
    n1, n2, n3 = (ndimage.zoom(c, factors, order=3, mode="nearest") for c in coarse)
    wm_b, csf_b, mask_b = wm[box], csf[box], mask[box]
    core = (r / r_core + 0.28 * n1 < 1.0) & mask_b
    necrosis = (r / r_necrosis + 0.3 * n2 < 1.0) & core
    # tanh bounds the perturbation, so oedema stays within 1.53·r_oedema, inside the box.
    oedema = (r / r_oedema + 0.3 * np.tanh(n3) - 0.45 * (wm_b - 0.5) < 1.0) & mask_b & (csf_b < 0.5) & ~core
    sub = np.zeros(box_shape, dtype=np.uint8)
    sub[oedema] = ED
    sub[core] = ET
    sub[necrosis] = NCR
    seg[box] = sub
    # Solid compartments have crisp (~0.7 mm partial-volume) borders; oedema fades out.
    sharp, soft = 0.7 / voxel_mm, 1.8 / voxel_mm
    weights = {
        "box": box,
        "ncr": ndimage.gaussian_filter(necrosis.astype(np.float32), sharp),
        "et": ndimage.gaussian_filter((core & ~necrosis).astype(np.float32), sharp),
        "ed": ndimage.gaussian_filter(oedema.astype(np.float32), soft) * ~core,
    }
    return seg, weights


# ---------------------------------------------------------------------------
# Writing subjects in the challenge layouts.

FILE_SUFFIX = {
    "2020": {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"},
    "2021": {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"},
    "2023": {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"},
}


def subject_name(index: int, naming: str = "2020") -> str:
    """Challenge-style subject id: BraTS20_Training_001, BraTS2021_00000, BraTS-GLI-00000-000."""
    if naming == "2020":
        return f"BraTS20_Training_{index + 1:03d}"
    if naming == "2021":
        return f"BraTS2021_{index:05d}"
    if naming == "2023":
        return f"BraTS-GLI-{index:05d}-000"
    raise ValueError(f"unknown naming {naming!r}; use one of {', '.join(NAMINGS)}")


def file_name(subject: str, modality: str, naming: str) -> str:
    sep = "-" if naming == "2023" else "_"
    return f"{subject}{sep}{FILE_SUFFIX[naming][modality]}.nii.gz"


def write_subject(folder: Path, subject: str, volumes: dict[str, np.ndarray], naming: str) -> list[Path]:
    """Write the five NIfTI files of one subject (int16 images like the challenge data, uint8 seg)."""
    folder.mkdir(parents=True, exist_ok=True)
    shape = volumes["seg"].shape
    affine = BRATS_AFFINE.copy()
    zooms = [e / n for e, n in zip(BRATS_SHAPE, shape, strict=True)]
    affine[:3, :3] = np.diag([-zooms[0], -zooms[1], zooms[2]])
    affine[1, 3] = (shape[1] - 1) * zooms[1]
    paths = []
    for modality in (*MODALITIES, "seg"):
        vol = volumes[modality]
        if modality == "seg":
            data = vol.astype(np.uint8)
            if naming == "2023":
                data = np.where(data == ET, np.uint8(3), data)
        else:
            data = np.clip(np.rint(vol), 0, np.iinfo(np.int16).max).astype(np.int16)
        img = nib.Nifti1Image(data, affine)
        img.header.set_xyzt_units("mm", "sec")
        path = folder / file_name(subject, modality, naming)
        nib.save(img, str(path))
        paths.append(path)
    return paths


def write_phantoms(
    out: str | Path,
    subjects: int | Iterable[int],
    seed: int = 0,
    naming: str = "2020",
    shape: tuple[int, int, int] = BRATS_SHAPE,
    progress: bool = False,
) -> list[Path]:
    """Write phantom subjects as `out/<subject>/<subject>_<modality>.nii.gz`; returns the folders.

    `subjects` is a count (indices 0..N-1) or explicit indices; subject `i` is the same
    volume whatever else is written, because it depends only on (seed, i).
    """
    if naming not in NAMINGS:
        raise ValueError(f"unknown naming {naming!r}; use one of {', '.join(NAMINGS)}")
    indices = list(range(subjects)) if isinstance(subjects, int) else [int(i) for i in subjects]
    root = Path(out)
    folders = []
    iterator: Iterable[int] = indices
    if progress:
        from tqdm import tqdm

        iterator = tqdm(indices, desc="phantoms", unit="subject")
    for i in iterator:
        name = subject_name(i, naming)
        write_subject(root / name, name, make_subject(seed, i, shape=shape), naming)
        folders.append(root / name)
    return folders

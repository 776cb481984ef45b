"""Phantom-data fixtures shared by the training tests (built once per session).

Most tests use coarse phantoms (4 mm voxels, 60×60×39) so a subject costs well under a
second; one fixture writes a real 240×240×155 subject through the CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import pytest

TINY_SHAPE = (60, 60, 39)
TINY_SUBJECTS = 4


@pytest.fixture(scope="session")
def tiny_volumes() -> list[dict[str, np.ndarray]]:
    """Coarse phantom subjects 0..3 of seed 0 (with their tissue fractions)."""
    from training.phantoms import make_subject

    return [make_subject(0, i, shape=TINY_SHAPE, with_tissue=True) for i in range(TINY_SUBJECTS)]


def nii(path: Path) -> nib.Nifti1Image:
    return cast(nib.Nifti1Image, nib.load(path))


def write_tiny(root: Path, volumes: list[dict[str, np.ndarray]], naming: str) -> Path:
    from training.phantoms import subject_name, write_subject

    for i, vols in enumerate(volumes):
        name = subject_name(i, naming)
        write_subject(root / name, name, vols, naming)
    return root


@pytest.fixture(scope="session")
def tiny_2020(tmp_path_factory: pytest.TempPathFactory, tiny_volumes: list[dict[str, np.ndarray]]) -> Path:
    return write_tiny(tmp_path_factory.mktemp("brats2020"), tiny_volumes, "2020")


@pytest.fixture(scope="session")
def tiny_2021(tmp_path_factory: pytest.TempPathFactory, tiny_volumes: list[dict[str, np.ndarray]]) -> Path:
    return write_tiny(tmp_path_factory.mktemp("brats2021"), tiny_volumes, "2021")


@pytest.fixture(scope="session")
def tiny_2023(tmp_path_factory: pytest.TempPathFactory, tiny_volumes: list[dict[str, np.ndarray]]) -> Path:
    return write_tiny(tmp_path_factory.mktemp("brats2023"), tiny_volumes, "2023")


@pytest.fixture(scope="session")
def phantom_slices(
    tiny_2020: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[np.ndarray, np.ndarray]:
    """(slices (N, 5, 32, 32) in the model range, subject index per slice) of the 4 coarse phantoms."""
    from training.dataset import prepare_cache
    from training.preprocess import to_model

    # A cache of its own: the default lies inside the data folder, which other tests list.
    cache, _ = prepare_cache(tiny_2020, "t1+t1ce+t2+flair+seg", 32, need_tumour_flags=True,
                             cache_dir=tmp_path_factory.mktemp("phantom-cache"))  # fmt: skip
    x = to_model(np.asarray(cache.open()), "percentile", 4).astype(np.float32)
    return x, np.asarray(cache.slice_subject)


@pytest.fixture(scope="session")
def full_size_2020(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real-layout subject (240×240×155, 1 mm) written by `synthmri phantoms`."""
    from training.phantoms_cli import main

    out = tmp_path_factory.mktemp("full")
    assert main(["--subjects", "1", "--out", str(out), "--seed", "7"]) == 0
    return out


PNG_FOLDERS = {"t1": "T1", "t1ce": "T1CE", "t2": "T2", "flair": "FLAIR", "seg": "Seg"}


def write_png_dataset(root: Path, slices: dict[str, dict[str, np.ndarray]]) -> Path:
    """Research PNG folders. slices: file name → modality → 256×256 uint8 image as stored."""
    from PIL import Image

    for name, images in slices.items():
        for m, arr in images.items():
            (root / PNG_FOLDERS[m]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / PNG_FOLDERS[m] / name)
    return root

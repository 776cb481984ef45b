"""The phantom generator: determinism, anatomy, tumour structure, contrasts, file layout."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from tests.training.conftest import TINY_SHAPE, nii
from training.anatomy import TEMPLATE_FILES, load_tissue_template, template_dir
from training.phantoms import make_subject, subject_name, write_phantoms


def test_templates_ship_with_nilearn_and_load_offline() -> None:
    folder = template_dir()
    for file in TEMPLATE_FILES.values():
        assert (folder / file).is_file()
    tissue = load_tissue_template()[0].numpy()
    assert tissue.shape == (3, 197, 233, 189)
    assert tissue.min() >= 0 and tissue.sum(0).max() <= 1.0 + 1e-6
    assert tissue[:, 0, 0, 0].sum() == 0  # skull-stripped: the corner is background


def test_same_seed_and_index_give_the_same_subject() -> None:
    a = make_subject(3, 1, shape=TINY_SHAPE)
    b = make_subject(3, 1, shape=TINY_SHAPE)
    c = make_subject(3, 2, shape=TINY_SHAPE)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["t1"], c["t1"])
    assert not np.array_equal(a["seg"], c["seg"])


def test_subject_has_brain_in_the_middle_and_zero_background(tiny_volumes: list[dict]) -> None:
    for vols in tiny_volumes:
        brain = vols["t1"] > 0
        for m in ("t1ce", "t2", "flair"):
            assert vols[m].dtype == np.float32
            # one skull-stripped mask: every sequence is zero exactly where T1 is
            np.testing.assert_array_equal(vols[m] > 0, brain)
        voxel_ml = (240 / 60) * (240 / 60) * (155 / 39) / 1000
        assert 900 < brain.sum() * voxel_ml < 2100  # adult brain volume, millilitres
        assert brain[0].sum() == brain[:, 0].sum() == brain[:, :, -1].sum() == 0
        centre = np.argwhere(brain).mean(0) / np.array(TINY_SHAPE)
        assert np.all(np.abs(centre[:2] - 0.5) < 0.08)


def test_orientation_is_brats_anterior_at_low_j(tiny_volumes: list[dict]) -> None:
    # Array axis 1 runs anterior → posterior: the lowest brain slices are cerebellum,
    # which lies posterior, so their voxels sit at high j.
    brain = tiny_volumes[0]["t1"] > 0
    ks = np.flatnonzero(brain.any((0, 1)))
    low = np.argwhere(brain[:, :, ks[0] : ks[0] + 4])
    assert low[:, 1].mean() > TINY_SHAPE[1] / 2 + 3


def test_tumour_is_nested_core_rim_and_oedema(tiny_volumes: list[dict]) -> None:
    for vols in tiny_volumes:
        seg = vols["seg"]
        assert seg.dtype == np.uint8 and set(np.unique(seg).tolist()) <= {0, 1, 2, 4}
        assert (seg == 1).any() and (seg == 2).any()
        assert not (seg[vols["t1"] == 0]).any()  # tumour only inside the brain
        core = (seg == 1) | (seg == 4)
        whole = seg > 0
        # the necrotic core is enclosed: its neighbours are tumour, not healthy tissue
        ncr_shell = ndimage.binary_dilation(seg == 1) & ~(seg == 1)
        if (seg == 4).any():
            assert whole[ncr_shell].mean() > 0.95
        # oedema surrounds the core: most of the core's outer shell is oedema
        shell = ndimage.binary_dilation(core, iterations=1) & ~core & (vols["t1"] > 0)
        assert (seg[shell] == 2).mean() > 0.5
        assert (seg == 2).sum() > core.sum() * 0.5


def test_most_subjects_have_an_enhancing_rim() -> None:
    seg_has_et = [(make_subject(1, i, shape=(40, 40, 26))["seg"] == 4).any() for i in range(8)]
    assert sum(seg_has_et) >= 5


def _mean(vol: np.ndarray, where: np.ndarray) -> float:
    assert where.sum() > 3
    return float(vol[where].mean())


def test_tissue_contrasts_per_sequence(tiny_volumes: list[dict]) -> None:
    for vols in tiny_volumes:
        seg = vols["seg"]
        healthy = seg == 0
        wm = (vols["wm"] > 0.9) & healthy
        gm = (vols["gm"] > 0.7) & healthy
        csf = (vols["csf"] > 0.8) & healthy
        t1, t1ce, t2, flair = (vols[m] for m in ("t1", "t1ce", "t2", "flair"))
        assert _mean(t1, wm) > _mean(t1, gm) > _mean(t1, csf)
        assert _mean(t2, csf) > _mean(t2, gm) > _mean(t2, wm)
        assert _mean(flair, gm) > _mean(flair, wm) > _mean(flair, csf)
        ed = seg == 2
        assert _mean(flair, ed) > _mean(flair, wm)
        assert _mean(t2, ed) > _mean(t2, wm)
        if (seg == 4).sum() > 3:
            assert _mean(t1ce, seg == 4) > _mean(t1ce, wm)  # gadolinium enhancement
            assert _mean(t1ce, seg == 4) > 1.2 * _mean(t1ce, seg == 1)


def test_noise_is_rician_and_field_is_biased() -> None:
    from training.phantoms import PhantomOptions

    clean = make_subject(0, 0, shape=TINY_SHAPE, options=PhantomOptions(noise_fraction=0.0), with_tissue=True)
    noisy = make_subject(0, 0, shape=TINY_SHAPE, with_tissue=True)
    wm = (noisy["wm"] > 0.9) & (noisy["seg"] == 0)
    ratio = noisy["t1"][wm] / clean["t1"][wm]
    # the same subject, only the noise differs: ~2.5 % of the WM signal
    assert 0.01 < ratio.std() < 0.05
    assert (noisy["t1"] >= 0).all()  # magnitude images are never negative


def test_write_phantoms_layouts(tmp_path: Path) -> None:
    shape = (40, 40, 26)
    expected = {
        "2020": ("BraTS20_Training_001", ["t1", "t1ce", "t2", "flair", "seg"], "_"),
        "2021": ("BraTS2021_00000", ["t1", "t1ce", "t2", "flair", "seg"], "_"),
        "2023": ("BraTS-GLI-00000-000", ["t1n", "t1c", "t2w", "t2f", "seg"], "-"),
    }
    for naming, (name, suffixes, sep) in expected.items():
        assert subject_name(0, naming) == name
        folders = write_phantoms(tmp_path / naming, 1, seed=5, naming=naming, shape=shape)
        assert folders == [tmp_path / naming / name]
        files = sorted(p.name for p in folders[0].iterdir())
        assert files == sorted(f"{name}{sep}{s}.nii.gz" for s in suffixes)
        seg = np.asarray(nii(folders[0] / f"{name}{sep}seg.nii.gz").dataobj)
        et_label = 3 if naming == "2023" else 4
        ref = make_subject(5, 0, shape=shape)["seg"]
        np.testing.assert_array_equal(seg == et_label, ref == 4)
        assert seg.dtype == np.uint8 and seg.shape == shape


def test_cli_writes_a_real_brats_sized_subject(full_size_2020: Path) -> None:
    folder = full_size_2020 / "BraTS20_Training_001"
    img = nii(folder / "BraTS20_Training_001_t1ce.nii.gz")
    assert img.shape == (240, 240, 155)
    assert img.header.get_zooms() == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(np.diag(img.affine), [-1, -1, 1, 1])
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    data = np.asarray(img.dataobj)
    assert data.dtype == np.int16 and data.max() > 100 and data.min() == 0
    seg = np.asarray(nii(folder / "BraTS20_Training_001_seg.nii.gz").dataobj)
    assert set(np.unique(seg).tolist()) <= {0, 1, 2, 4} and (seg > 0).sum() > 1000


def test_cli_reports_bad_arguments_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from synthmri.cli import main

    assert main(["phantoms", "--subjects", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "synthmri phantoms: error: --subjects must be at least 1"
    (tmp_path / "file").write_text("x")
    assert main(["phantoms", "--subjects", "1", "--out", str(tmp_path / "file")]) == 2
    assert "not a folder" in capsys.readouterr().err

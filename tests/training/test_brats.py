"""Finding and reading BraTS subjects in every supported layout, and the errors for bad data."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from tests.training.conftest import nii, write_png_dataset
from training.brats import IMAGE_MODALITIES, DataError, find_subjects, load_png_subject, load_subject


@pytest.mark.parametrize(
    ("fixture", "naming", "first"),
    [
        ("tiny_2020", "2020", "BraTS20_Training_001"),
        ("tiny_2021", "2021", "BraTS2021_00000"),
        ("tiny_2023", "2023", "BraTS-GLI-00000-000"),
    ],
)
def test_all_three_namings_harmonise_to_one_scheme(
    fixture: str, naming: str, first: str, request: pytest.FixtureRequest, tiny_volumes: list[dict]
) -> None:
    root = request.getfixturevalue(fixture)
    subjects = find_subjects(root)
    assert [s.naming for s in subjects] == [naming] * len(tiny_volumes)
    assert subjects[0].id == first
    assert set(subjects[0].files) == {"t1", "t1ce", "t2", "flair", "seg"}
    vols = load_subject(subjects[0])
    ref = tiny_volumes[0]
    assert vols["seg"].dtype == np.uint8
    # 2023 stores ET as 3 on disk; read back it is 4 again, voxel for voxel
    np.testing.assert_array_equal(vols["seg"], ref["seg"])
    assert (vols["seg"] == 4).any() and not (vols["seg"] == 3).any()
    for m in ("t1", "t1ce", "t2", "flair"):
        assert vols[m].dtype == np.float32 and vols[m].shape == ref[m].shape
        np.testing.assert_allclose(vols[m], np.clip(np.rint(ref[m]), 0, None), atol=0)


def test_2023_file_really_holds_label_3(tiny_2023: Path) -> None:
    seg = np.asarray(nii(tiny_2023 / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-seg.nii.gz").dataobj)
    assert 3 in seg and 4 not in seg


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_validation_subjects_without_seg(tiny_2020: Path, tmp_path: Path) -> None:
    root = tmp_path / "val"
    folder = root / "BraTS20_Validation_001"
    folder.mkdir(parents=True)
    for m in ("t1", "t1ce", "t2", "flair"):
        shutil.copy(
            tiny_2020 / "BraTS20_Training_001" / f"BraTS20_Training_001_{m}.nii.gz",
            folder / f"BraTS20_Validation_001_{m}.nii.gz",
        )
    with pytest.raises(DataError, match=r"^BraTS20_Validation_001: missing seg \(expected "):
        find_subjects(root)
    (subject,) = find_subjects(root, IMAGE_MODALITIES)
    assert subject.id == "BraTS20_Validation_001" and not subject.has_seg
    assert set(load_subject(subject)) == {"t1", "t1ce", "t2", "flair"}


def test_brats2020_subject_355_misnamed_seg_is_found(tiny_2020: Path, tmp_path: Path) -> None:
    root = _copy(tiny_2020, tmp_path / "d")
    folder = root / "BraTS20_Training_002"
    (folder / "BraTS20_Training_002_seg.nii.gz").rename(folder / "W39_1998.09.19_Segm.nii.gz")
    subject = find_subjects(root)[1]
    assert subject.files["seg"].name == "W39_1998.09.19_Segm.nii.gz"
    assert (load_subject(subject)["seg"] > 0).any()


def test_missing_modality_names_subject_and_file(tiny_2023: Path, tmp_path: Path) -> None:
    root = _copy(tiny_2023, tmp_path / "d")
    (root / "BraTS-GLI-00002-000" / "BraTS-GLI-00002-000-t2f.nii.gz").unlink()
    with pytest.raises(DataError) as e:
        find_subjects(root)
    msg = str(e.value)
    assert msg.startswith("BraTS-GLI-00002-000: missing flair (expected BraTS-GLI-00002-000-t2f.nii.gz")
    assert "\n" not in msg


def test_wrong_shape_names_subject_and_file(tiny_2020: Path, tmp_path: Path) -> None:
    root = _copy(tiny_2020, tmp_path / "d")
    bad = root / "BraTS20_Training_002" / "BraTS20_Training_002_t2.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((60, 60, 30), np.int16), np.eye(4)), bad)
    subject = find_subjects(root)[1]
    with pytest.raises(DataError, match=r"^BraTS20_Training_002: BraTS20_Training_002_t2.nii.gz has shape "
                       r"\(60, 60, 30\), expected \(60, 60, 39\)"):
        load_subject(subject)


def test_unreadable_file_names_subject_and_file(tiny_2021: Path, tmp_path: Path) -> None:
    root = _copy(tiny_2021, tmp_path / "d")
    (root / "BraTS2021_00001" / "BraTS2021_00001_t1ce.nii.gz").write_bytes(b"not a nifti at all")
    subject = find_subjects(root)[1]
    with pytest.raises(DataError) as e:
        load_subject(subject)
    assert str(e.value).startswith("BraTS2021_00001: cannot read BraTS2021_00001_t1ce.nii.gz: ")
    assert "\n" not in str(e.value)


def test_unknown_labels_are_reported(tiny_2020: Path, tmp_path: Path) -> None:
    root = _copy(tiny_2020, tmp_path / "d")
    path = root / "BraTS20_Training_001" / "BraTS20_Training_001_seg.nii.gz"
    img = nii(path)
    seg = np.asarray(img.dataobj).copy()
    seg[30, 30, 20] = 3  # label 3 is not in the 2020 scheme
    nib.save(nib.Nifti1Image(seg, img.affine), path)
    expected = r"^BraTS20_Training_001: BraTS20_Training_001_seg.nii.gz has labels \[3\]"
    with pytest.raises(DataError, match=expected):
        load_subject(find_subjects(root)[0])


def test_empty_or_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no BraTS subjects under"):
        find_subjects(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        find_subjects(tmp_path / "nope")


# ---------------------------------------------------------------------------
# prepared PNG folders


def _png_slices(rng: np.random.Generator, names: list[str]) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for name in names:
        images = {m: rng.integers(0, 256, (256, 256), dtype=np.uint8) for m in ("t1", "t1ce", "t2", "flair")}
        images["seg"] = (rng.choice([0, 1, 2, 4], (256, 256)) / 5 * 255).astype(np.uint8)
        out[name] = images
    return out


def test_png_folders_group_slices_by_subject(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    names = ["BraTS20_Training_001_70.png", "BraTS20_Training_001_9.png", "BraTS20_Training_002_80.png"]
    slices = _png_slices(rng, names)
    root = write_png_dataset(tmp_path / "png", slices)
    subjects = find_subjects(root)
    assert [s.id for s in subjects] == ["BraTS20_Training_001", "BraTS20_Training_002"]
    assert subjects[0].naming == "png"
    # slices in numeric order, not string order
    assert subjects[0].slices == ("BraTS20_Training_001_9.png", "BraTS20_Training_001_70.png")
    stacks = load_png_subject(subjects[0])
    np.testing.assert_array_equal(stacks["t1ce"][1], slices["BraTS20_Training_001_70.png"]["t1ce"])
    # masks are stored as label/5×255 and read back as BraTS labels
    np.testing.assert_array_equal(stacks["seg"][0] * 51, slices["BraTS20_Training_001_9.png"]["seg"])


def test_png_errors_name_subject_and_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    root = write_png_dataset(tmp_path / "png", _png_slices(rng, ["s1_1.png", "s1_2.png", "s2_1.png"]))
    (root / "FLAIR" / "s1_2.png").unlink()
    with pytest.raises(DataError, match=r"^s1: s1_2.png is in T1/ but missing from FLAIR/$"):
        find_subjects(root)
    Image.fromarray(np.zeros((240, 240), np.uint8)).save(root / "FLAIR" / "s1_2.png")
    subjects = find_subjects(root)
    expected = r"^s1: FLAIR/s1_2.png has shape \(240, 240\), expected \(256, 256\)$"
    with pytest.raises(DataError, match=expected):
        load_png_subject(subjects[0])
    (root / "FLAIR" / "s1_2.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"^s1: cannot read FLAIR/s1_2.png: "):
        load_png_subject(subjects[0])

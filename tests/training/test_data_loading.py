"""Data the way users have it on disk: each problem proven end to end where it matters.

Research PNG folders grouped into subjects from their file names (built-in patterns and
--slice-pattern), masks that never cross subjects in a flat folder, PNG masks in every
encoding (or refused naming the file), one-line errors from `synthmri train`, macOS
archive leftovers, --skip-bad-subjects, and a T1CE run that needs only T1CE.
Images are constant per slice, so every slice tells which file it was read from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from synthmri.channels import decode_labels, encode_labels
from synthmri.cli import main as synthmri_main
from tests.training.conftest import nii, write_png_dataset
from training.brats import IMAGE_MODALITIES, DataError, find_subjects, load_subject
from training.dataset import SliceDataset, build_datasets
from training.phantoms import write_subject
from training.preprocess import SliceParams, percentile_slices

FIVE = "t1+t1ce+t2+flair+seg"
SLICE_NUMBERS = (9, 36, 110)  # numeric order differs from string order


def code(subject: int, k: int) -> int:
    """The grey value of the k-th slice of a subject: unique per file."""
    return 30 + 50 * subject + 10 * k


def which(x: torch.Tensor) -> tuple[int, int]:
    """(subject, k) of a model tensor whose channel 0 is a slice written with `code`."""
    value = round((float(x[0].mean()) + 1.0) * 127.5)
    subject, rest = divmod(value - 30, 50)
    assert rest % 10 == 0, f"grey value {value} was not written by code()"
    return subject, rest // 10


def constant(value: int) -> np.ndarray:
    return np.full((256, 256), value, dtype=np.uint8)


def label_map(subject: int, k: int) -> np.ndarray:
    """BraTS labels for slice k of a subject: none in the first slice, then tumours of all three labels."""
    lab = np.zeros((256, 256), dtype=np.uint8)
    if k == 0:
        return lab
    top = 40 + 30 * subject
    lab[top : top + 60, 50:150] = 2
    lab[top + 10 : top + 50, 60:100] = 1
    lab[top + 10 : top + 50, 100:140] = 4
    return lab


def write_t1ce_slices(root: Path, name: str, subjects: int = 4) -> dict[str, list[tuple[int, int]]]:
    """T1CE/ PNGs named by the format `name` (fields s, z); returns file stem → its (subject, k) list."""
    written: dict[str, list[tuple[int, int]]] = {}
    for s in range(subjects):
        for k, z in enumerate(SLICE_NUMBERS):
            stem = name.format(s=s, z=z)
            write_png_dataset(root, {f"{stem}.png": {"t1ce": constant(code(s, k))}})
            written.setdefault(stem, []).append((s, k))
    return written


def error_line(err: str) -> str:
    """The line a CLI printed after its progress bar (which updates in place with \\r)."""
    assert "Traceback" not in err and err.endswith("\n")
    return err.split("\n")[-2]


def report_lines(err: str) -> list[str]:
    """The skip report a CLI printed on stderr (after its progress bar)."""
    lines = err.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("skipped "))
    return [line for line in lines[start:] if line.startswith(("skipped ", "  "))]


def rows_by_subject(ds: SliceDataset) -> dict[str, list[tuple[int, int]]]:
    """subject id → the (subject, k) each of its rows was read from, in row order."""
    out: dict[str, list[tuple[int, int]]] = {}
    for i in range(len(ds)):
        out.setdefault(ds.subject_of(i), []).append(which(ds[i]))
    return out


# ---------------------------------------------------------------------------
# research PNG folders: grouped by subject


@pytest.mark.parametrize(
    ("name", "subject"),
    [
        ("subj{s:03d}_slice{z:03d}", "subj{s:03d}"),
        ("subj{s:03d}-slice-{z}", "subj{s:03d}"),
        ("P{s}_Slice{z}", "P{s}"),
        ("case{s}_z{z:03d}", "case{s}"),
        ("BraTS20_Training_{s:03d}_{z}", "BraTS20_Training_{s:03d}"),
        ("BraTS-GLI-0000{s}-000-{z}", "BraTS-GLI-0000{s}-000"),
    ],
)
def test_png_slices_are_grouped_by_subject_and_split_by_subject(name: str, subject: str,
                                                                 tmp_path: Path) -> None:
    root = tmp_path / "png"
    write_t1ce_slices(root, name)
    ids = [subject.format(s=s) for s in range(4)]
    subjects = find_subjects(root, ["t1ce"])
    assert [s.id for s in subjects] == ids
    assert [s.slices for s in subjects] == [tuple(f"{name.format(s=s, z=z)}.png" for z in SLICE_NUMBERS)
                                            for s in range(4)]

    train, val, _ = build_datasets(root, "t1ce", 32, val_fraction=0.25, seed=0, cache_dir=tmp_path / "c")
    assert len(val.subjects) == 1 and set(train.subjects).isdisjoint(val.subjects)
    assert sorted(train.subjects + val.subjects) == ids
    for ds in (train, val):
        rows = rows_by_subject(ds)
        assert sorted(rows) == sorted(ds.subjects)
        for sid, read in rows.items():
            # every row of a subject came from that subject's own files, in slice-number order
            assert read == [(ids.index(sid), k) for k in range(3)]


def test_png_names_that_tell_no_subject_are_refused(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "png"
    write_t1ce_slices(root, "subj{s:03d}_slice{z:03d}", subjects=2)
    write_png_dataset(root, {"scan.png": {"t1ce": constant(7)}})
    expected = ("T1CE/scan.png: cannot tell the subject from the file name (expected <subject>_slice<n>.png "
                "or <subject>_<n>.png; for other names give --slice-pattern, a regular expression with a "
                "(?P<subject>...) group)")
    with pytest.raises(DataError) as e:
        find_subjects(root, ["t1ce"])
    assert str(e.value) == expected
    args = ["prepare", "--data", str(root), "--channels", "t1ce", "--size", "32",
            "--cache", str(tmp_path / "c")]
    assert synthmri_main(args) == 2
    assert capsys.readouterr().err == f"synthmri prepare: error: {expected}\n"


def test_slice_pattern_option_groups_other_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "png"
    write_t1ce_slices(root, "{z:03d}_pt{s}")  # slice number first: no built-in pattern fits
    with pytest.raises(DataError, match=r"^T1CE/009_pt0.png: cannot tell the subject from the file name"):
        find_subjects(root, ["t1ce"])
    pattern = r"(?P<slice>\d+)_(?P<subject>pt\d+)"
    subjects = find_subjects(root, ["t1ce"], slice_pattern=pattern)
    assert [s.id for s in subjects] == ["pt0", "pt1", "pt2", "pt3"]
    assert subjects[1].slices == ("009_pt1.png", "036_pt1.png", "110_pt1.png")

    args = ["prepare", "--data", str(root), "--channels", "t1ce", "--size", "32",
            "--cache", str(tmp_path / "c"), "--val-fraction", "0.25", "--slice-pattern", pattern]
    assert synthmri_main(args) == 0
    assert "4 subjects (3 train / 1 val), 12 slices (masks not read for t1ce)" in capsys.readouterr().out
    _, val, _ = build_datasets(root, "t1ce", 32, val_fraction=0.25, cache_dir=tmp_path / "c",
                               slice_pattern=pattern)
    assert rows_by_subject(val) == {val.subjects[0]: [(int(val.subjects[0][2:]), k) for k in range(3)]}

    for bad, message in [
        ("(?P<subject>", "slice pattern '(?P<subject>' is not a regular expression: missing ), "
                         "unterminated subpattern at position 0"),
        (r"(?P<slice>\d+)_.*", r"slice pattern '(?P<slice>\d+)_.*' has no (?P<subject>...) group"),
        (r"(?P<slice>\d+)_(?P<subject>.+)", None),
    ]:
        assert synthmri_main([*args[:-1], bad]) == (2 if message else 0)
        err = capsys.readouterr().err
        if message:
            assert err == f"synthmri prepare: error: {message}\n"


# ---------------------------------------------------------------------------
# a mask never crosses subjects


def test_flat_folder_never_gives_a_subject_another_subjects_mask(
    tiny_volumes: list[dict[str, np.ndarray]], tmp_path: Path
) -> None:
    root = tmp_path / "flat"
    write_subject(root, "BraTS20_Training_001", tiny_volumes[0], "2020")
    write_subject(root, "BraTS20_Validation_001", tiny_volumes[1], "2020")
    (root / "BraTS20_Validation_001_seg.nii.gz").unlink()  # validation subjects come without masks

    by_id = {s.id: s for s in find_subjects(root, IMAGE_MODALITIES)}
    assert by_id["BraTS20_Training_001"].files["seg"] == root / "BraTS20_Training_001_seg.nii.gz"
    assert "seg" not in by_id["BraTS20_Validation_001"].files
    assert "seg" not in load_subject(by_id["BraTS20_Validation_001"])
    np.testing.assert_array_equal(load_subject(by_id["BraTS20_Training_001"])["seg"], tiny_volumes[0]["seg"])
    missing = f"BraTS20_Validation_001: missing seg (expected BraTS20_Validation_001_seg.nii.gz in {root})"
    with pytest.raises(DataError) as e:
        find_subjects(root)
    assert str(e.value) == missing

    # The odd-name fallback (BraTS 2020 subject 355's mask) cannot tell whose mask it is here.
    (root / "BraTS20_Training_001_seg.nii.gz").rename(root / "W39_1998.09.19_Segm.nii.gz")
    assert all("seg" not in s.files for s in find_subjects(root, IMAGE_MODALITIES))

    # A mask-needing run leaves the mask-less subject out when asked to, and says so.
    (root / "W39_1998.09.19_Segm.nii.gz").rename(root / "BraTS20_Training_001_seg.nii.gz")
    train, _, _ = build_datasets(root, "t1ce+seg", 32, val_fraction=0.0, cache_dir=tmp_path / "c",
                                 skip_bad_subjects=True)
    assert train.subjects == ["BraTS20_Training_001"] and train.cache.skipped == [missing]
    params = SliceParams(channels=("t1ce", "seg"), image_size=32)
    own = decode_labels(percentile_slices(load_subject(by_id["BraTS20_Training_001"]), params).data[:, 1])
    read = decode_labels(torch.stack([train[i][1] for i in range(len(train))]).numpy())
    assert (own > 0).any()
    np.testing.assert_array_equal(read, own)


# ---------------------------------------------------------------------------
# PNG masks: every encoding decodes, anything else is refused at prepare time


@pytest.mark.parametrize(
    "stored",
    [
        {1: 51, 2: 102, 4: 204},  # the research code's label/5×255
        {1: 1, 2: 2, 4: 4},  # labels as values
        {1: 1, 2: 2, 4: 3},  # BraTS 2023 labels as values: enhancing tumour is 3
    ],
    ids=["label-over-5-times-255", "labels-0124", "labels-0123"],
)
def test_png_masks_decode_to_their_labels_in_every_encoding(
    stored: dict[int, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "png"
    lut = np.zeros(256, dtype=np.uint8)
    for label, value in stored.items():
        lut[label] = value
    for s in range(2):
        for k, z in enumerate(SLICE_NUMBERS):
            images = {"t1ce": constant(code(s, k)), "seg": lut[label_map(s, k)]}
            write_png_dataset(root, {f"subj{s:03d}_{z:03d}.png": images})

    cache = tmp_path / "c"
    args = ["prepare", "--data", str(root), "--channels", "t1ce+seg", "--size", "256", "--cache", str(cache)]
    assert synthmri_main(args) == 0
    assert "2 subjects (1 train / 1 val), 6 slices (4 with tumour)" in capsys.readouterr().out
    train, _, _ = build_datasets(root, "t1ce+seg", 256, val_fraction=0.0, cache_dir=cache)
    assert len(train) == 6
    for i in range(len(train)):
        s, k = which(train[i])
        np.testing.assert_array_equal(train[i][1].numpy(), encode_labels(label_map(s, k)))


def test_png_masks_of_no_known_encoding_are_refused_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def dataset(name: str, masks: dict[str, np.ndarray]) -> list[str]:
        root = tmp_path / name
        for stem, mask in masks.items():
            write_png_dataset(root, {f"{stem}.png": {"t1ce": constant(100), "seg": mask}})
        return ["prepare", "--data", str(root), "--channels", "t1ce+seg", "--size", "32",
                "--cache", str(tmp_path / "c")]

    as_stored = (label_map(0, 1).astype(np.float64) / 5 * 255).astype(np.uint8)
    cases = {
        "binary": (
            {"subj000_001": as_stored, "subj001_001": (label_map(1, 1) > 0).astype(np.uint8) * 255},
            "subj001: Seg/subj001_001.png has mask values [255]; expected BraTS labels 0/1/2/4 "
            "(or 0/1/2/3) or labels stored as label/5×255 (0/51/102/204)",
        ),
        "mixed": (
            {"subj000_001": as_stored, "subj001_001": label_map(1, 1)},
            "subj001: Seg/subj001_001.png stores labels as values (0/1/2/4) but "
            "Seg/subj000_001.png stores labels as label/5×255 (0/51/102/204); "
            "one dataset's masks must all use one encoding",
        ),
        "three-and-four": (
            {"subj000_001": np.where(label_map(0, 1) == 1, 3, label_map(0, 1)).astype(np.uint8)},
            "subj000: Seg/subj000_001.png has both 3 and 4 in one mask; the enhancing tumour is 4 "
            "(BraTS 2020/2021) or 3 (BraTS 2023), not both",
        ),
    }
    for name, (masks, message) in cases.items():
        assert synthmri_main(dataset(name, masks)) == 2, name
        assert error_line(capsys.readouterr().err) == f"synthmri prepare: error: {message}"


# ---------------------------------------------------------------------------
# `synthmri train`: data errors in one line; skipping bad subjects


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--steps", "1",
            "--sample-count", "0", "--val-samples", "0", "--val-batches", "0", "--progress", "false",
            "--cache-dir", str(out.parent / "cache"), *extra]


def test_train_reports_data_errors_in_one_line(
    tiny_2020: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nifti = tmp_path / "nifti"
    shutil.copytree(tiny_2020, nifti)
    (nifti / "BraTS20_Training_003" / "BraTS20_Training_003_t1ce.nii.gz").unlink()
    png = tmp_path / "png"
    write_png_dataset(png, {"subj000_slice001.png": {"t1ce": constant(9), "seg": constant(7)}})
    cases = [
        (nifti, (), f"BraTS20_Training_003: missing t1ce (expected BraTS20_Training_003_t1ce.nii.gz in "
                    f"{nifti / 'BraTS20_Training_003'})"),
        (png, (), "subj000: Seg/subj000_slice001.png has mask values [7]; expected BraTS labels 0/1/2/4 "
                  "(or 0/1/2/3) or labels stored as label/5×255 (0/51/102/204)"),
        (png, ("--slice-pattern", "(?P<subj>.+)"),
         "slice pattern '(?P<subj>.+)' has no (?P<subject>...) group"),
    ]
    for data, extra, message in cases:
        assert synthmri_main(_train_args(data, tmp_path / "run", *extra)) == 2
        assert error_line(capsys.readouterr().err) == f"synthmri train: error: {message}"


def test_skip_bad_subjects_leaves_them_out_and_lists_why(
    tiny_2020: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "d"
    shutil.copytree(tiny_2020, root)
    (root / "BraTS20_Training_002" / "BraTS20_Training_002_t1ce.nii.gz").write_bytes(b"not a nifti")
    (root / "BraTS20_Training_004" / "BraTS20_Training_004_t2.nii.gz").unlink()
    missing = (f"BraTS20_Training_004: missing t2 (expected BraTS20_Training_004_t2.nii.gz in "
               f"{root / 'BraTS20_Training_004'})")
    unreadable = "BraTS20_Training_002: cannot read BraTS20_Training_002_t1ce.nii.gz: "
    args = ["prepare", "--data", str(root), "--channels", FIVE, "--size", "32",
            "--cache", str(tmp_path / "c")]
    assert synthmri_main(args) == 2
    assert capsys.readouterr().err == f"synthmri prepare: error: {missing}\n"

    assert synthmri_main([*args, "--skip-bad-subjects"]) == 0
    captured = capsys.readouterr()
    report = report_lines(captured.err)
    assert report[:2] == ["skipped 2 subjects with problems:", f"  {missing}"]
    assert report[2].startswith(f"  {unreadable}") and len(report) == 3
    assert "2 subjects (1 train / 1 val)" in captured.out
    fingerprint = captured.out.split("fingerprint ")[1].strip()
    index = json.loads((tmp_path / "c" / fingerprint[:16] / "index.json").read_text())
    assert [s["id"] for s in index["subjects"]] == ["BraTS20_Training_001", "BraTS20_Training_003"]

    # The cache built while skipping is not taken by a run that skips nothing.
    shutil.copy(tiny_2020 / "BraTS20_Training_004" / "BraTS20_Training_004_t2.nii.gz",
                root / "BraTS20_Training_004")
    assert synthmri_main([*args, "--skip-bad-subjects"]) == 0
    assert report_lines(capsys.readouterr().err)[0] == "skipped 1 subject with problems:"
    with pytest.raises(DataError, match=f"^{unreadable}"):
        build_datasets(root, FIVE, 32, cache_dir=tmp_path / "c")

    out = tmp_path / "run"
    assert synthmri_main(_train_args(root, out, "--skip-bad-subjects", "--val-fraction", "0.34")) == 0
    report = report_lines(capsys.readouterr().err)
    assert report[0] == "skipped 1 subject with problems:" and report[1].startswith(f"  {unreadable}")
    assert (out / "model.safetensors").is_file()


# ---------------------------------------------------------------------------
# macOS archive leftovers


def test_macos_archive_leftovers_are_ignored(tiny_2020: Path, tmp_path: Path) -> None:
    root = tmp_path / "unzipped"
    shutil.copytree(tiny_2020, root)
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "
    for subject in ("BraTS20_Training_001", "BraTS20_Training_002"):
        (root / "__MACOSX" / subject).mkdir(parents=True)
        for f in (root / subject).iterdir():
            (root / "__MACOSX" / subject / f"._{f.name}").write_bytes(apple_double)
    (root / "BraTS20_Training_003" / "._BraTS20_Training_003_seg.nii.gz").write_bytes(apple_double)
    subjects = find_subjects(root)
    assert [s.id for s in subjects] == [f"BraTS20_Training_00{i}" for i in range(1, 5)]
    assert subjects[2].files["seg"].name == "BraTS20_Training_003_seg.nii.gz"
    clean, _, _ = build_datasets(tiny_2020, "t1ce+seg", 32, val_fraction=0.0, cache_dir=tmp_path / "c")
    unzipped, _, _ = build_datasets(root, "t1ce+seg", 32, val_fraction=0.0, cache_dir=tmp_path / "c")
    assert len(unzipped) == len(clean)

    png = tmp_path / "png"
    write_t1ce_slices(png, "subj{s:03d}_slice{z:03d}", subjects=2)
    (png / "T1CE" / "._subj000_slice009.png").write_bytes(apple_double)
    (png / "__MACOSX" / "T1CE").mkdir(parents=True)
    (png / "__MACOSX" / "T1CE" / "._subj001_slice036.png").write_bytes(apple_double)
    assert [s.slices for s in find_subjects(png, ["t1ce"])] == [
        tuple(f"subj{s:03d}_slice{z:03d}.png" for z in SLICE_NUMBERS) for s in range(2)
    ]


# ---------------------------------------------------------------------------
# a run needs only what its channel set uses


def test_t1ce_run_needs_only_t1ce(tiny_2020: Path, tmp_path: Path) -> None:
    only = tmp_path / "t1ce-only"
    for folder in sorted(tiny_2020.iterdir()):
        (only / folder.name).mkdir(parents=True)
        shutil.copy(folder / f"{folder.name}_t1ce.nii.gz", only / folder.name)
    train, val, _ = build_datasets(only, "t1ce", 32, val_fraction=0.25, cache_dir=tmp_path / "c")
    assert sorted(train.subjects + val.subjects) == [f"BraTS20_Training_00{i}" for i in range(1, 5)]
    # the brain mask is the T1CE's own: the slices are exactly those of the T1CE volume alone
    first = find_subjects(only, ["t1ce"])[0]
    alone = percentile_slices(load_subject(first), SliceParams(channels=("t1ce",), image_size=32)).data
    read = [ds[i] for ds in (train, val) for i in range(len(ds)) if ds.subject_of(i) == first.id]
    torch.testing.assert_close(torch.stack(read), torch.from_numpy(alone.astype(np.float32)), rtol=0, atol=0)
    # research mode picks its slices by T1
    with pytest.raises(DataError, match=r"^BraTS20_Training_001: missing t1 \(expected \w+_001_t1\.nii"):
        build_datasets(only, "t1ce", 32, mode="research", cache_dir=tmp_path / "c")

    # A mask that a T1CE run does not use may be invalid; a run that uses masks refuses it.
    full = tmp_path / "full"
    shutil.copytree(tiny_2020, full)
    seg_path = full / "BraTS20_Training_002" / "BraTS20_Training_002_seg.nii.gz"
    img = nii(seg_path)
    seg = np.asarray(img.dataobj).copy()
    seg[seg == 1] = 3  # not a BraTS 2020 label
    nib.save(nib.Nifti1Image(seg, img.affine), seg_path)
    build_datasets(full, "t1ce", 32, cache_dir=tmp_path / "c")
    bad = r"^BraTS20_Training_002: BraTS20_Training_002_seg.nii.gz has labels \[3\] outside \[0, 1, 2, 4\]"
    with pytest.raises(DataError, match=bad):
        build_datasets(full, "t1ce+seg", 32, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=bad):
        build_datasets(full, "t1ce", 32, cache_dir=tmp_path / "c", tumour_fraction=0.5)

    # Tumour flags are read when asked for, into the same cache entry (the slices are the same).
    shutil.copy(tiny_2020 / "BraTS20_Training_002" / "BraTS20_Training_002_seg.nii.gz", seg_path)
    plain, _, fp_plain = build_datasets(full, "t1ce", 32, val_fraction=0.0, cache_dir=tmp_path / "c")
    assert plain.cache.index["tumour_flags"] is False and not plain.cache.has_tumour.any()
    flagged, _, fp_flagged = build_datasets(full, "t1ce", 32, val_fraction=0.0, cache_dir=tmp_path / "c",
                                            tumour_fraction=0.5)
    assert fp_flagged == fp_plain and flagged.cache.has_tumour.any()
    assert plain.cache.folder == flagged.cache.folder

"""`synthmri export-nnunet`: jobs (+ real BraTS subjects) → an nnU-Net v2 raw dataset.

Jobs are real job outputs: one sampled with `synthmri sample` from the tiny t1ce+seg
checkpoint, and a 4-modality worker-style job folder (with its archive.zip) written with
the project's writers from known arrays, so every exported voxel can be checked. Real
data are coarse phantom subjects in the 2020 and 2023 namings. nnU-Net's own
`verify_dataset_integrity` and MONAI's `LoadImage` then read the result.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import pytest

from synthmri.cli import main as cli
from synthmri.outputs.nnunet import EXPORT_RECORD, ExportError, write_job_zip
from training.export_nnunet import export_nnunet

JOB_ID = "0123456789abcdef"
FOUR = ("t1", "t1ce", "t2", "flair", "seg")
SHAPE = (24, 20)  # not square: a transposed export would not match
PHANTOM_SHAPE = (60, 60, 39)


def nii(path: Path) -> nib.Nifti1Image:
    return cast(nib.Nifti1Image, nib.load(str(path)))


def known_samples(n: int, channels: tuple[str, ...], seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        sample = {c: rng.random(SHAPE).astype(np.float32) for c in channels if c != "seg"}
        if "seg" in channels:
            seg = np.array([0, 1, 2, 4], dtype=np.uint8)[rng.integers(0, 4, SHAPE)]
            seg[0, :4] = [0, 1, 2, 4]  # every label present
            sample["seg"] = seg
        samples.append(sample)
    return samples


def write_job(directory: Path, samples: list[dict[str, np.ndarray]], channels: tuple[str, ...]) -> Path:
    """A finished worker-style job folder (NIfTI, PNG, manifest, archive.zip) from known arrays."""
    from synthmri.outputs import writers

    directory.mkdir(parents=True)
    files: list[str] = []
    for i, sample in enumerate(samples):
        files += [p.name for p in writers.write_sample(directory, JOB_ID, i, sample)]
    manifest = writers.make_manifest(
        seed=7, sampler="ddim", steps=2, sha256="0" * 64, model="test-model", channel_set="+".join(channels),
        channels=channels, image_size=SHAPE[0], indices=range(len(samples)), files=files, timings={},
        version="test", job_id=JOB_ID, request={"channels": "+".join(channels), "count": len(samples)},
        formats=["nifti", "png"], device="cpu", precision="fp32",
    )  # fmt: skip
    writers.write_manifest(directory / "manifest.json", manifest)
    writers.write_zip(directory / "archive.zip", [*files, "manifest.json"], directory)
    return directory


@pytest.fixture(scope="module")
def four_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, np.ndarray]]]:
    samples = known_samples(3, FOUR)
    return write_job(tmp_path_factory.mktemp("jobs") / JOB_ID, samples, FOUR), samples


@pytest.fixture(scope="module")
def sampled_job(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint_readonly: Path) -> Path:
    """Two samples of the tiny t1ce+seg checkpoint, written by `synthmri sample`."""
    import torch

    out = tmp_path_factory.mktemp("sampled") / "job"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["sample", "--model", str(tiny_checkpoint_readonly), "--count", "2", "--seed", "3",
                "--sampler", "ddim", "--steps", "2", "--name", "tiny", "--out", str(out),
                "--no-progress"]  # fmt: skip
        assert cli(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def real_2020(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.phantoms import write_phantoms

    root = tmp_path_factory.mktemp("brats2020")
    write_phantoms(root, 2, seed=0, naming="2020", shape=PHANTOM_SHAPE)
    return root


@pytest.fixture(scope="module")
def real_2023(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.phantoms import write_phantoms

    root = tmp_path_factory.mktemp("brats2023")
    write_phantoms(root, 1, seed=1, naming="2023", shape=PHANTOM_SHAPE)
    return root


# nnunetv2 dataset_conversion/Dataset137_BraTS21.py: NCR 1 → 2, ED 2 → 1, ET 4 → 3 (written out
# here, not imported, so a wrong table in the module fails the test).
NNUNET_BRATS = {0: 0, 1: 2, 2: 1, 4: 3}


def expected_labels(brats: np.ndarray) -> np.ndarray:
    out = np.full(brats.shape, 255, dtype=np.uint8)
    for b, n in NNUNET_BRATS.items():
        out[brats == b] = n
    return out


# ---------------------------------------------------------------------------
# Values


def test_four_modality_job_exports_every_voxel(four_job: tuple[Path, list], tmp_path: Path) -> None:
    job, samples = four_job
    ds = export_nnunet([job], tmp_path / "raw", dataset_id=502, name="Four")
    assert ds == tmp_path / "raw" / "Dataset502_Four"
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"}
    assert meta["labels"] == {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
                              "enhancing tumor": [3]}  # fmt: skip
    assert meta["regions_class_order"] == [1, 2, 3]
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    cases = [f"synth_000_{i:04d}.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (ds / "labelsTr").iterdir()) == cases
    assert len(list((ds / "imagesTr").iterdir())) == 3 * 4
    for i, sample in enumerate(samples):
        case = f"synth_000_{i:04d}"
        source_seg = nii(job / f"{JOB_ID}_{i:04d}_seg.nii.gz")
        label = nii(ds / "labelsTr" / f"{case}.nii.gz")
        assert label.shape == (*SHAPE, 1) and label.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(label.dataobj)[:, :, 0], expected_labels(sample["seg"]))
        assert set(np.unique(np.asarray(label.dataobj)).tolist()) == {0, 1, 2, 3}
        np.testing.assert_array_equal(label.affine, source_seg.affine)
        for k, channel in enumerate(("t1", "t1ce", "t2", "flair")):
            img = nii(ds / "imagesTr" / f"{case}_{k:04d}.nii.gz")
            source = nii(job / f"{JOB_ID}_{i:04d}_{channel}.nii.gz")
            assert img.get_data_dtype() == np.float32 and img.shape == (*SHAPE, 1)
            np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(source.dataobj))
            np.testing.assert_array_equal(np.asarray(img.dataobj)[:, :, 0], sample[channel])
            np.testing.assert_array_equal(img.affine, source.affine)
            assert img.header.get_zooms() == label.header.get_zooms() == (1.0, 1.0, 1.0)
            assert int(img.header["sform_code"]) == int(source.header["sform_code"]) == 1
    record = json.loads((ds / EXPORT_RECORD).read_text())
    assert record["jobs"][0]["job_id"] == JOB_ID
    assert record["cases"]["synth_000_0002"] == {"job": 0, "index": 2}


def test_archive_zip_and_folder_give_the_same_dataset(four_job: tuple[Path, list], tmp_path: Path) -> None:
    job, _ = four_job
    from_dir = export_nnunet([job], tmp_path / "a")
    from_zip = export_nnunet([job / "archive.zip"], tmp_path / "b")
    for sub in ("imagesTr", "labelsTr"):
        names = sorted(p.name for p in (from_dir / sub).iterdir())
        assert names == sorted(p.name for p in (from_zip / sub).iterdir())
        for name in names:
            a, b = nii(from_dir / sub / name), nii(from_zip / sub / name)
            np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))


def test_job_id_is_found_in_the_results_dir(four_job: tuple[Path, list], tmp_path: Path) -> None:
    job, _ = four_job
    ds = export_nnunet([JOB_ID], tmp_path / "raw", results_dir=job.parent)
    assert json.loads((ds / "dataset.json").read_text())["numTraining"] == 3


def test_sampled_job_with_real_2023_subject(sampled_job: Path, real_2023: Path, tmp_path: Path) -> None:
    """A t1ce+seg job (one image channel) mixed with a real BraTS 2023 subject (ET stored as 3)."""
    assert cli(["export-nnunet", "--jobs", str(sampled_job), "--out", str(tmp_path / "raw"),
                "--real", str(real_2023)]) == 0  # fmt: skip
    ds = tmp_path / "raw" / "Dataset501_SynthMRI"
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1ce"} and meta["numTraining"] == 3
    for i in range(2):
        img = nii(ds / "imagesTr" / f"synth_000_{i:04d}_0000.nii.gz")
        source = nii(sampled_job / f"tiny_{i:04d}_t1ce.nii.gz")
        assert img.shape == (32, 32, 1)
        np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(source.dataobj))
        seg = np.asarray(nii(sampled_job / f"tiny_{i:04d}_seg.nii.gz").dataobj)
        label = np.asarray(nii(ds / "labelsTr" / f"synth_000_{i:04d}.nii.gz").dataobj)
        np.testing.assert_array_equal(label, expected_labels(seg))
    assert not (ds / "imagesTr" / "synth_000_0000_0001.nii.gz").exists()

    sid = "BraTS-GLI-00000-000"
    src = real_2023 / sid
    stored = np.asarray(nii(src / f"{sid}-seg.nii.gz").dataobj)
    assert 3 in stored  # GLI numbering: 3 = enhancing tumour, which nnU-Net's scheme also calls 3
    label = nii(ds / "labelsTr" / f"{sid}.nii.gz")
    want = np.select([stored == 1, stored == 2, stored == 3], [2, 1, 3], 0).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(label.dataobj), want)
    img = nii(ds / "imagesTr" / f"{sid}_0000.nii.gz")
    t1c = nii(src / f"{sid}-t1c.nii.gz")
    assert img.get_data_dtype() == np.float32 and img.shape == PHANTOM_SHAPE
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(t1c.dataobj).astype(np.float32))
    np.testing.assert_allclose(img.affine, t1c.affine)
    np.testing.assert_allclose(label.affine, t1c.affine)


# ---------------------------------------------------------------------------
# nnU-Net and MONAI read what we wrote


@pytest.fixture(scope="module")
def mixed_dataset(
    four_job: tuple[Path, list], real_2020: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Four-modality job (folder and zip: two jobs) + two real BraTS 2020 subjects."""
    job, _ = four_job
    out = tmp_path_factory.mktemp("nnUNet_raw")
    return export_nnunet([job, job / "archive.zip"], out, real=real_2020, dataset_id=503, name="Mixed")


def nnunet_environment(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nnU-Net reads its folders from the environment (and warns when they are unset)."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / var).mkdir()
        monkeypatch.setenv(var, str(root / var))


def verify_with_nnunet(ds: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """nnU-Net's own `verify_dataset_integrity`: it raises on errors and only prints geometry
    mismatches, from worker processes, so their output is captured at the file descriptor."""
    pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (pip install -e '.[dev]')")
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    capfd.readouterr()
    verify_dataset_integrity(str(ds), num_processes=1)
    printed = capfd.readouterr().out
    assert "Done" in printed
    assert "Warning" not in printed and "Error" not in printed, printed


def test_nnunet_verify_dataset_integrity(
    mixed_dataset: Path, sampled_job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    nnunet_environment(tmp_path, monkeypatch)
    small = export_nnunet([sampled_job], tmp_path / "raw")
    for ds in (mixed_dataset, small):
        verify_with_nnunet(ds, capfd)


def test_monai_load_image_reads_every_file(mixed_dataset: Path) -> None:
    pytest.importorskip("monai", reason="monai is not installed (pip install -e '.[dev]')")
    from monai.transforms import LoadImage

    load = LoadImage(image_only=True)
    meta = json.loads((mixed_dataset / "dataset.json").read_text())
    assert meta["numTraining"] == 3 + 3 + 2
    labels = sorted((mixed_dataset / "labelsTr").iterdir())
    assert len(labels) == meta["numTraining"]
    for label_path in labels:
        case = label_path.name.removesuffix(".nii.gz")
        shape = (*SHAPE, 1) if case.startswith("synth_") else PHANTOM_SHAPE
        label = load(str(label_path))
        assert tuple(label.shape) == shape, label_path.name
        assert set(np.unique(np.asarray(label)).tolist()) <= {0, 1, 2, 3}
        for k in range(4):
            img = load(str(mixed_dataset / "imagesTr" / f"{case}_{k:04d}.nii.gz"))
            assert tuple(img.shape) == shape
            assert img.dtype.is_floating_point
    real = load(str(mixed_dataset / "labelsTr" / "BraTS20_Training_001.nii.gz"))
    assert {1, 2}.issubset(set(np.unique(np.asarray(real)).tolist()))  # the phantom has a tumour


# ---------------------------------------------------------------------------
# A job's nnunet.zip: what the worker writes at finalisation for "nnunet" in formats


def unzip(archive: Path, into: Path) -> Path:
    with zipfile.ZipFile(archive) as zf:
        tops = {name.split("/")[0] for name in zf.namelist()}
        zf.extractall(into)
    assert len(tops) == 1, tops  # one dataset folder, nothing beside it
    return into / tops.pop()


def test_job_zip_is_the_command_line_dataset(four_job: tuple[Path, list], tmp_path: Path) -> None:
    job, _ = four_job
    work = tmp_path / "job"
    shutil.copytree(job, work)
    archive = write_job_zip(work, work / "nnunet.zip", label=JOB_ID)
    ds = unzip(archive, tmp_path / "unzipped")
    cli_ds = export_nnunet([job], tmp_path / "raw")
    assert ds.name == cli_ds.name == "Dataset501_SynthMRI"
    files = sorted(p.relative_to(ds).as_posix() for p in ds.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(cli_ds).as_posix() for p in cli_ds.rglob("*") if p.is_file())
    assert len(files) == 2 + 3 * 4 + 3
    for name in files:
        if name != EXPORT_RECORD:
            assert (ds / name).read_bytes() == (cli_ds / name).read_bytes(), name
    record, cli_record = (json.loads((d / EXPORT_RECORD).read_text()) for d in (ds, cli_ds))
    # The service's zip names the job by id, never by its server path.
    assert record["jobs"][0]["source"] == JOB_ID and cli_record["jobs"][0]["source"] == str(job.resolve())
    assert record["cases"] == cli_record["cases"]
    # Rebuilt from the same job (a second finalisation), the zip is the same bytes, and the
    # hidden build folder is gone.
    first = archive.read_bytes()
    assert write_job_zip(work, work / "nnunet.zip", label=JOB_ID).read_bytes() == first
    assert not [p for p in work.iterdir() if p.name.startswith(".nnunet-")]


def test_job_zip_of_a_job_without_seg_is_refused(tmp_path: Path) -> None:
    job = write_job(tmp_path / "t1ce", known_samples(1, ("t1ce",)), ("t1ce",))
    with pytest.raises(ExportError, match=r"no seg channel \(channels t1ce\): an nnU-Net dataset needs"):
        write_job_zip(job, job / "nnunet.zip", label=JOB_ID)
    assert sorted(p.name for p in job.iterdir() if "nnunet" in p.name) == []


# ---------------------------------------------------------------------------
# Refusals: one line, exit code 2


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert cli(["export-nnunet", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("synthmri export-nnunet: error: ") and err.count("\n") == 1, err
    return err


def test_unfinished_job_is_refused(four_job: tuple[Path, list], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    job = shutil.copytree(four_job[0], tmp_path / "job")
    (job / "manifest.json").unlink()
    assert "no manifest.json; the job is not finished" in refused(["--jobs", str(job), "--out",
                                                                   str(tmp_path / "o")], capsys)  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_job_missing_a_file_is_refused(four_job: tuple[Path, list], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    job = shutil.copytree(four_job[0], tmp_path / "job")
    (job / f"{JOB_ID}_0001_t2.nii.gz").unlink()
    err = refused(["--jobs", str(job), "--out", str(tmp_path / "o")], capsys)
    assert f"{JOB_ID}_0001_t2.nii.gz is missing" in err


def test_different_channel_sets_are_refused(four_job: tuple[Path, list], sampled_job: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    err = refused(["--jobs", str(four_job[0]), str(sampled_job), "--out", str(tmp_path / "o")], capsys)
    assert "different channels" in err and "t1ce+seg" in err


def test_job_without_seg_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path / "t1ce", known_samples(1, ("t1ce",)), ("t1ce",))
    assert "no seg channel" in refused(["--jobs", str(job), "--out", str(tmp_path / "o")], capsys)


def test_existing_dataset_is_refused_unless_forced(four_job: tuple[Path, list], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    argv = ["--jobs", str(four_job[0]), "--out", str(tmp_path / "o")]
    assert cli(["export-nnunet", *argv]) == 0
    assert "already exists (use --force" in refused(argv, capsys)
    (tmp_path / "o" / "Dataset501_SynthMRI" / "stale.txt").write_text("old")
    assert cli(["export-nnunet", *argv, "--force"]) == 0
    assert not (tmp_path / "o" / "Dataset501_SynthMRI" / "stale.txt").exists()
    assert "Dataset501_SynthMRI with dataset id 501" in refused([*argv, "--name", "Other"], capsys)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["Dataset501_SynthMRI"]  # no leftovers


def test_real_data_missing_a_modality_is_refused(four_job: tuple[Path, list], real_2020: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    real = shutil.copytree(real_2020, tmp_path / "real")
    (real / "BraTS20_Training_002" / "BraTS20_Training_002_flair.nii.gz").unlink()
    err = refused(["--jobs", str(four_job[0]), "--out", str(tmp_path / "o"), "--real", str(real)], capsys)
    assert "BraTS20_Training_002: missing flair" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_bad_labels_and_names(four_job: tuple[Path, list], tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from synthmri.outputs.nnunet import convert_labels

    with pytest.raises(ExportError, match=r"labels \[3\]"):
        convert_labels(np.array([[0, 3]]))
    assert "--dataset-id must be in 1..999" in refused(
        ["--jobs", str(four_job[0]), "--out", str(tmp_path / "o"), "--dataset-id", "1000"], capsys)
    assert "no such job folder or zip" in refused(["--jobs", str(tmp_path / "nope"), "--out", str(tmp_path)],
                                                  capsys)  # fmt: skip

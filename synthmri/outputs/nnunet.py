"""Finished jobs as an nnU-Net v2 raw dataset: the builder behind `synthmri export-nnunet` and a
job's `nnunet.zip`.

Layout (nnU-Net v2 `nnUNet_raw`): `Dataset{ID:03d}_{NAME}/dataset.json`,
`imagesTr/{case}_{k:04d}.nii.gz` (one file per image channel, in nnU-Net's BraTS order
t1, t1ce, t2, flair as far as the jobs have them) and `labelsTr/{case}.nii.gz`.

- Each synthetic sample is a 2-D case: its NIfTIs (H×W×1) are copied as float32 images
  with the job's geometry; the seg becomes the label map. Case ids are
  `synth_{j:03d}_{i:04d}` (job `j` of the export, sample `i`).
- Labels follow nnU-Net's BraTS converter (nnunetv2 dataset_conversion/Dataset137_BraTS21.py):
  BraTS 0/1 NCR/2 ED/4 ET → 0 background, 2 necrosis, 1 oedema, 3 enhancing, trained as the
  regions whole tumour [1, 2, 3], tumour core [2, 3] and enhancing tumour [3].

`synthmri_export.json` next to dataset.json records where every case came from. Jobs are
read from their finished folders (the NIfTIs and manifest.json), so the service's zip and
the command line's export are one code path. Torch-free; real BraTS subjects are added by
`training.export_nnunet`, which composes the steps below.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import tempfile
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np

from synthmri import __version__
from synthmri.channels import BRATS_LABELS, MODALITIES, SEG
from synthmri.contract import JOB_ID_PATTERN, nnunet_unfit
from synthmri.outputs.layout import MANIFEST, sample_filename
from synthmri.outputs.writers import MANIFEST_FORMAT, write_zip

FILE_ENDING = ".nii.gz"
EXPORT_RECORD = "synthmri_export.json"
EXPORT_FORMAT = "synthmri-nnunet-export/1"
DEFAULT_DATASET_ID = 501
DEFAULT_NAME = "SynthMRI"

# nnU-Net's BraTS channel names, in its channel order (Dataset137_BraTS21.py).
NNUNET_CHANNEL_NAMES: dict[str, str] = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "Flair"}
# BraTS label → nnU-Net BraTS label (Dataset137_BraTS21.py: 1 NCR → 2, 2 ED → 1, 4 ET → 3).
BRATS_TO_NNUNET: dict[int, int] = {0: 0, 1: 2, 2: 1, 4: 3}
NNUNET_LABELS: dict[str, int | list[int]] = {
    "background": 0,
    "whole tumor": [1, 2, 3],
    "tumor core": [2, 3],
    "enhancing tumor": [3],
}
REGIONS_CLASS_ORDER = [1, 2, 3]

_JOB_ID = re.compile(JOB_ID_PATTERN)


class ExportError(ValueError):
    """Input that cannot become an nnU-Net dataset; the message says which and why."""


@dataclass(frozen=True)
class Job:
    """One finished job's output folder (a zip is unpacked to a temporary folder first)."""

    source: str  # as the user named it (error messages)
    label: str  # how the export record names it: a resolved local path, or the job id
    directory: Path
    prefix: str  # the sample file name prefix: the job id, or `synthmri sample --name`
    channels: tuple[str, ...]
    indices: tuple[int, ...]
    manifest: dict[str, Any]

    def nifti(self, index: int, channel: str) -> Path:
        return self.directory / sample_filename(self.prefix, index, channel, FILE_ENDING.lstrip("."))


def convert_labels(seg: np.ndarray, where: str = "seg") -> np.ndarray:
    """BraTS labels {0, 1, 2, 4} → nnU-Net's BraTS labels {0, 2, 1, 3} (uint8)."""
    seg = np.asarray(seg)
    if np.issubdtype(seg.dtype, np.floating) and not np.array_equal(seg, np.round(seg)):
        raise ExportError(f"{where} has non-integer labels")
    found = {int(v) for v in np.unique(seg)}
    unknown = sorted(found - set(BRATS_LABELS))
    if unknown:
        raise ExportError(f"{where} has labels {unknown} outside the BraTS labels {list(BRATS_LABELS)}")
    lut = np.zeros(max(BRATS_LABELS) + 1, dtype=np.uint8)
    for brats, nnunet in BRATS_TO_NNUNET.items():
        lut[brats] = nnunet
    return lut[seg.astype(np.intp)]


def image_channels(channels: Sequence[str]) -> list[str]:
    """The image channels of a job in nnU-Net's BraTS order (t1, t1ce, t2, flair)."""
    return [m for m in MODALITIES if m in channels]


# ---------------------------------------------------------------------------
# Reading jobs


def _default_results_dir() -> Path:
    from synthmri.settings import Settings

    return Path(Settings().results_dir)


def _locate(source: str | Path, results_dir: Path | None) -> Path:
    path = Path(source)
    if path.exists():
        return path
    if _JOB_ID.match(str(source)):
        results = results_dir if results_dir is not None else _default_results_dir()
        if (results / str(source)).is_dir():
            return results / str(source)
        raise ExportError(f"{source}: no such folder or zip, and no job {source} in {results}")
    raise ExportError(f"{source}: no such job folder or zip")


def _unpack(archive: Path, stack: ExitStack) -> Path:
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            if MANIFEST not in names:
                raise ExportError(f"{archive}: no {MANIFEST} at the top level of the zip (not a job archive)")
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="synthmri-job-")))
            zf.extractall(folder)  # zipfile drops absolute paths and `..`; nothing lands outside
    except (zipfile.BadZipFile, OSError) as e:
        raise ExportError(f"{archive}: cannot read the zip: {e}") from None
    return folder


def read_job(source: str | Path, stack: ExitStack, results_dir: Path | None = None) -> Job:
    """A finished job from its folder, its archive zip or (in the results directory) its id."""
    path = _locate(source, results_dir)
    directory = _unpack(path, stack) if path.is_file() else path
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise ExportError(f"{source}: no {MANIFEST}; the job is not finished (or this is not a job folder)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{source}: cannot read {MANIFEST}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ExportError(f"{source}: {MANIFEST} is not a SynthMRI manifest (format {found!r})")
    prefix = manifest.get("job_id") or (manifest.get("request") or {}).get("name")
    channels = manifest.get("channels")
    indices = manifest.get("indices")
    if not isinstance(prefix, str) or not isinstance(channels, list) or not isinstance(indices, list):
        raise ExportError(f"{source}: {MANIFEST} lacks job_id (or request.name), channels or indices")
    if "formats" in manifest and "nifti" not in manifest["formats"]:
        raise ExportError(f"{source}: the job has no NIfTI files (formats {manifest['formats']}); "
                          "request it with the nifti format")  # fmt: skip
    label = str(Path(source).resolve()) if Path(source).exists() else str(source)
    job = Job(str(source), label, directory, prefix, tuple(channels), tuple(map(int, indices)), manifest)
    for i in job.indices:
        for c in job.channels:
            if not job.nifti(i, c).is_file():
                raise ExportError(f"{source}: {job.nifti(i, c).name} is missing (an incomplete job folder?)")
    return job


def check_jobs(jobs: Sequence[Job]) -> tuple[str, ...]:
    """The channels every job shares; refuses jobs without a seg or image channel, or with
    differing channels."""
    if not jobs:
        raise ExportError("no jobs given")
    for job in jobs:
        unfit = nnunet_unfit(job.channels)
        if unfit is not None:
            raise ExportError(f"{job.source}: {unfit}")
    first = jobs[0]
    for job in jobs[1:]:
        if set(job.channels) != set(first.channels):
            raise ExportError(
                f"jobs have different channels: {first.source} has {'+'.join(first.channels)}, {job.source} "
                f"has {'+'.join(job.channels)}; one dataset needs one channel set"
            )
    return first.channels


# ---------------------------------------------------------------------------
# Writing


def load_nifti(path: Path, where: str) -> tuple[nib.Nifti1Image, np.ndarray]:
    """A NIfTI and its voxels; an ExportError naming `where` when it cannot be read."""
    try:
        img = cast(nib.Nifti1Image, nib.load(str(path)))
        return img, np.asarray(img.dataobj)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, ValueError) as e:
        raise ExportError(f"{where}: cannot read {path.name}: {e}") from None


def nifti_like(
    data: np.ndarray, ref: nib.Nifti1Image, cal: tuple[float, float] | None = None
) -> nib.Nifti1Image:
    """A NIfTI of `data` with `ref`'s geometry (affine, qform/sform and their codes, units)."""
    img = nib.Nifti1Image(data, ref.affine)
    qform, qcode = ref.get_qform(coded=True)
    sform, scode = ref.get_sform(coded=True)
    img.set_qform(qform if qform is not None else ref.affine, code=int(qcode))
    img.set_sform(sform if sform is not None else ref.affine, code=int(scode))
    img.header.set_xyzt_units(*ref.header.get_xyzt_units())
    img.header.set_data_dtype(data.dtype)
    if cal is not None:
        img.header["cal_min"], img.header["cal_max"] = cal
    return img


def save_nifti(img: nib.Nifti1Image, path: Path) -> None:
    """Gzipped with no timestamp, so the same dataset is the same bytes (a job's zip is rebuilt
    identically when its finalisation runs twice)."""
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))


def _same_geometry(a: nib.Nifti1Image, b: nib.Nifti1Image) -> bool:
    return a.shape[:3] == b.shape[:3] and np.allclose(a.affine, b.affine, atol=1e-5)


def _write_sample(job: Job, index: int, case: str, images: Sequence[str], root: Path) -> None:
    where = f"{job.source} sample {index}"
    seg_img, seg = load_nifti(job.nifti(index, SEG), where)
    if seg.ndim == 2:
        seg = seg[:, :, None]
    if seg.ndim != 3 or seg.shape[2] != 1:
        raise ExportError(f"{where}: {job.nifti(index, SEG).name} has shape {seg.shape}, expected H×W×1")
    for k, channel in enumerate(images):
        img, data = load_nifti(job.nifti(index, channel), where)
        if data.ndim == 2:
            data = data[:, :, None]
        if data.shape != seg.shape or not _same_geometry(img, seg_img):
            raise ExportError(f"{where}: {channel} and seg differ in shape or affine")
        image = nifti_like(data.astype(np.float32), img)
        save_nifti(image, root / "imagesTr" / f"{case}_{k:04d}{FILE_ENDING}")
    label = convert_labels(seg, f"{where}: {job.nifti(index, SEG).name}")
    save_nifti(nifti_like(label, seg_img, cal=(0.0, 3.0)), root / "labelsTr" / f"{case}{FILE_ENDING}")


def start_dataset(root: Path) -> None:
    """The dataset folder with its empty imagesTr/ and labelsTr/."""
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)


def write_job_cases(root: Path, jobs: Sequence[Job], images: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Every sample of `jobs` as a 2-D case under `root`; returns {case id: where it came from}."""
    cases: dict[str, dict[str, Any]] = {}
    for j, job in enumerate(jobs):
        for i in job.indices:
            case = f"synth_{j:03d}_{i:04d}"
            if case in cases:
                raise ExportError(f"{job.source}: sample index {i} appears twice in its {MANIFEST}")
            _write_sample(job, i, case, images, root)
            cases[case] = {"job": j, "index": i}
    return cases


def dataset_json(images: Sequence[str], num_training: int, name: str, description: str) -> dict[str, Any]:
    """dataset.json in nnU-Net v2's format, with BraTS regions."""
    return {
        "channel_names": {str(k): NNUNET_CHANNEL_NAMES[c] for k, c in enumerate(images)},
        "labels": NNUNET_LABELS,
        "regions_class_order": REGIONS_CLASS_ORDER,
        "numTraining": num_training,
        "file_ending": FILE_ENDING,
        "name": name,
        "description": description,
    }


def write_metadata(
    root: Path, name: str, images: Sequence[str], jobs: Sequence[Job], cases: Mapping[str, Mapping[str, Any]],
    real: str | None = None,
) -> None:  # fmt: skip
    """dataset.json and the export record, once every case is written (`real`: where real
    subjects came from, if any were added)."""
    n_synth = sum(len(job.indices) for job in jobs)
    n_real = len(cases) - n_synth
    description = f"SynthMRI: {n_synth} synthetic 2-D slices from {len(jobs)} job(s)" + (
        f" and {n_real} real 3-D BraTS subject(s)" if n_real else ""
    )
    _write_json(root / "dataset.json", dataset_json(images, len(cases), name, description))
    record = {
        "format": EXPORT_FORMAT,
        "version": __version__,
        "jobs": [_job_record(job) for job in jobs],
        "real": real,
        "labels": {"brats_to_nnunet": {str(k): v for k, v in BRATS_TO_NNUNET.items()}},
        "cases": dict(cases),
    }
    _write_json(root / EXPORT_RECORD, record)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def write_job_zip(
    directory: Path, dest: Path, *, label: str, dataset_id: int = DEFAULT_DATASET_ID, name: str = DEFAULT_NAME
) -> Path:
    """The finished job in `directory` as a zip holding one dataset folder `Dataset{ID:03d}_{name}/`
    (a job's `nnunet.zip`); `label` names the job in the export record instead of its path.
    Built in a hidden folder beside `dest` and written atomically, with the same bytes every time."""
    with ExitStack() as stack:
        job = replace(read_job(directory, stack), label=label)
        images = image_channels(check_jobs([job]))
        build = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".nnunet-", dir=dest.parent)))
        folder = dataset_folder_name(dataset_id, name)
        root = build / folder
        start_dataset(root)
        cases = write_job_cases(root, [job], images)
        write_metadata(root, folder, images, [job], cases)
        return write_zip(dest, sorted(p for p in root.rglob("*") if p.is_file()), build)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _job_record(job: Job) -> dict[str, Any]:
    m = job.manifest
    return {
        "source": job.label,
        "job_id": m.get("job_id"),
        "prefix": job.prefix,
        "model": m.get("model"),
        "sha256": m.get("sha256"),
        "seed": m.get("seed"),
        "sampler": m.get("sampler"),
        "steps": m.get("steps"),
        "channels": list(job.channels),
        "manifest_sha256": _sha256(job.directory / MANIFEST),
    }


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

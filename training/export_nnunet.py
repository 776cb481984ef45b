"""`synthmri export-nnunet`: finished jobs' samples (optionally with real BraTS subjects) as an
nnU-Net v2 raw dataset.

Layout (nnU-Net v2 `nnUNet_raw`): `OUT/Dataset{ID:03d}_{NAME}/dataset.json`,
`imagesTr/{case}_{k:04d}.nii.gz` (one file per image channel, in nnU-Net's BraTS order
t1, t1ce, t2, flair as far as the jobs have them) and `labelsTr/{case}.nii.gz`.

- Each synthetic sample is a 2-D case: its NIfTIs (H×W×1) are copied as float32 images
  with the job's geometry; the seg becomes the label map. Case ids are
  `synth_{j:03d}_{i:04d}` (job `j` of `--jobs`, sample `i`).
- A real subject (BraTS 2020/2021/2023 naming, read with `training.brats`) is a 3-D case
  under its subject id, images float32, geometry of its own files.
- Labels follow nnU-Net's BraTS converter (nnunetv2 dataset_conversion/Dataset137_BraTS21.py):
  BraTS 0/1 NCR/2 ED/4 ET → 0 background, 2 necrosis, 1 oedema, 3 enhancing, trained as the
  regions whole tumour [1, 2, 3], tumour core [2, 3] and enhancing tumour [3].

`synthmri_export.json` next to dataset.json records where every case came from. The
dataset is built in a hidden folder and renamed into place, so a failed export leaves
nothing behind. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np

from synthmri import __version__
from synthmri.channels import BRATS_LABELS, MODALITIES, SEG
from synthmri.cli import CliError, make_parser
from synthmri.contract import JOB_ID_PATTERN
from synthmri.outputs.layout import MANIFEST, sample_filename
from synthmri.outputs.writers import MANIFEST_FORMAT
from training.brats import DataError, Subject, find_subjects, load_subject

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

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_JOB_ID = re.compile(JOB_ID_PATTERN)


class ExportError(ValueError):
    """Input that cannot become an nnU-Net dataset; the message says which and why."""


@dataclass(frozen=True)
class Job:
    """One finished job's output folder (a zip is unpacked to a temporary folder first)."""

    source: str  # as the user named it
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
    job = Job(str(source), directory, prefix, tuple(channels), tuple(int(i) for i in indices), manifest)
    for i in job.indices:
        for c in job.channels:
            if not job.nifti(i, c).is_file():
                raise ExportError(f"{source}: {job.nifti(i, c).name} is missing (an incomplete job folder?)")
    return job


def check_jobs(jobs: Sequence[Job]) -> tuple[str, ...]:
    """The channels every job shares; refuses jobs without a seg or with differing channels."""
    if not jobs:
        raise ExportError("no jobs given")
    for job in jobs:
        if SEG not in job.channels:
            raise ExportError(f"{job.source}: no seg channel (channels {'+'.join(job.channels)}): "
                              "nnU-Net needs labels; export jobs of a channel set with seg")  # fmt: skip
        if not image_channels(job.channels):
            raise ExportError(f"{job.source}: the job has no image channel")
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


def _load(path: Path, where: str) -> tuple[nib.Nifti1Image, np.ndarray]:
    try:
        img = cast(nib.Nifti1Image, nib.load(str(path)))
        return img, np.asarray(img.dataobj)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, ValueError) as e:
        raise ExportError(f"{where}: cannot read {path.name}: {e}") from None


def _like(data: np.ndarray, ref: nib.Nifti1Image, cal: tuple[float, float] | None = None) -> nib.Nifti1Image:
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


def _save(img: nib.Nifti1Image, path: Path) -> None:
    nib.save(img, str(path))


def _same_geometry(a: nib.Nifti1Image, b: nib.Nifti1Image) -> bool:
    return a.shape[:3] == b.shape[:3] and np.allclose(a.affine, b.affine, atol=1e-5)


def _export_sample(job: Job, index: int, case: str, images: Sequence[str], root: Path) -> None:
    where = f"{job.source} sample {index}"
    seg_img, seg = _load(job.nifti(index, SEG), where)
    if seg.ndim == 2:
        seg = seg[:, :, None]
    if seg.ndim != 3 or seg.shape[2] != 1:
        raise ExportError(f"{where}: {job.nifti(index, SEG).name} has shape {seg.shape}, expected H×W×1")
    for k, channel in enumerate(images):
        img, data = _load(job.nifti(index, channel), where)
        if data.ndim == 2:
            data = data[:, :, None]
        if data.shape != seg.shape or not _same_geometry(img, seg_img):
            raise ExportError(f"{where}: {channel} and seg differ in shape or affine")
        _save(_like(data.astype(np.float32), img), root / "imagesTr" / f"{case}_{k:04d}{FILE_ENDING}")
    label = convert_labels(seg, f"{where}: {job.nifti(index, SEG).name}")
    _save(_like(label, seg_img, cal=(0.0, 3.0)), root / "labelsTr" / f"{case}{FILE_ENDING}")


def _real_subjects(real: Path, images: Sequence[str]) -> list[Subject]:
    try:
        subjects = find_subjects(real, [*images, SEG])
    except DataError as e:
        raise ExportError(f"--real {real}: {e}") from None
    png = [s.id for s in subjects if s.naming == "png"]
    if png:
        raise ExportError(f"--real {real}: holds prepared PNG slices; the export needs NIfTI subjects")
    return subjects


def _export_subject(subject: Subject, images: Sequence[str], root: Path) -> None:
    try:
        volumes = load_subject(subject, [*images, SEG])
    except DataError as e:
        raise ExportError(str(e)) from None
    for k, modality in enumerate(images):
        ref, _ = _load(subject.files[modality], subject.id)
        data = volumes[modality].astype(np.float32, copy=False)
        _save(_like(data, ref), root / "imagesTr" / f"{subject.id}_{k:04d}{FILE_ENDING}")
    ref, _ = _load(subject.files[SEG], subject.id)
    label = convert_labels(volumes[SEG], f"{subject.id}: {subject.files[SEG].name}")
    _save(_like(label, ref, cal=(0.0, 3.0)), root / "labelsTr" / f"{subject.id}{FILE_ENDING}")


def dataset_json(images: Sequence[str], num_training: int, description: str) -> dict[str, Any]:
    """dataset.json in nnU-Net v2's format, with BraTS regions."""
    return {
        "channel_names": {str(k): NNUNET_CHANNEL_NAMES[c] for k, c in enumerate(images)},
        "labels": NNUNET_LABELS,
        "regions_class_order": REGIONS_CLASS_ORDER,
        "numTraining": num_training,
        "file_ending": FILE_ENDING,
        "name": "",  # filled by the caller
        "description": description,
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def _check_target(out: Path, dataset_id: int, name: str, force: bool) -> Path:
    if not 1 <= dataset_id <= 999:
        raise ExportError(f"--dataset-id must be in 1..999 (nnU-Net's three digits), got {dataset_id}")
    if not _NAME.match(name):
        raise ExportError(f"--name {name!r} must be letters, digits, '_' or '-' (≤ 64), not first '_'")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    target = out / dataset_folder_name(dataset_id, name)
    if out.is_dir():
        prefix = f"Dataset{dataset_id:03d}_"
        others = sorted(p.name for p in out.iterdir() if p.name.startswith(prefix) and p != target)
        if others:
            raise ExportError(f"{out} already has {others[0]} with dataset id {dataset_id}; nnU-Net needs "
                              "one dataset per id: choose another --dataset-id")  # fmt: skip
    if target.exists() and not force:
        raise ExportError(f"{target} already exists (use --force to replace it)")
    return target


def export_nnunet(
    jobs: Sequence[str | Path],
    out: str | Path,
    real: str | Path | None = None,
    dataset_id: int = DEFAULT_DATASET_ID,
    name: str = DEFAULT_NAME,
    *,
    force: bool = False,
    results_dir: str | Path | None = None,
) -> Path:
    """Write `out/Dataset{ID}_{name}` from finished jobs (folders, zips or ids) and optional real
    BraTS subjects; returns the dataset folder. Raises ExportError with a one-line reason."""
    out = Path(out)
    target = _check_target(out, dataset_id, name, force)
    with ExitStack() as stack:
        loaded = [read_job(j, stack, Path(results_dir) if results_dir is not None else None) for j in jobs]
        images = image_channels(check_jobs(loaded))
        subjects = _real_subjects(Path(real), images) if real is not None else []
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=out))  # hidden: nnU-Net skips it
        try:
            _write_dataset(tmp, target, loaded, images, subjects, real)
            if target.exists():  # --force: the old dataset goes only once the new one is complete
                shutil.rmtree(target)
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _write_dataset(
    root: Path, target: Path, jobs: Sequence[Job], images: Sequence[str], subjects: Sequence[Subject],
    real: str | Path | None,
) -> None:
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir()
    cases: dict[str, dict[str, Any]] = {}
    for j, job in enumerate(jobs):
        for i in job.indices:
            case = f"synth_{j:03d}_{i:04d}"
            if case in cases:
                raise ExportError(f"{job.source}: sample index {i} appears twice in its {MANIFEST}")
            _export_sample(job, i, case, images, root)
            cases[case] = {"job": j, "index": i}
    for subject in subjects:
        if subject.id in cases:
            raise ExportError(f"--real {real}: subject {subject.id} clashes with a synthetic case id")
        _export_subject(subject, images, root)
        cases[subject.id] = {"real": subject.id, "naming": subject.naming}
    n_synth = sum(len(job.indices) for job in jobs)
    description = f"SynthMRI: {n_synth} synthetic 2-D slices from {len(jobs)} job(s)" + (
        f" and {len(subjects)} real 3-D BraTS subject(s)" if subjects else ""
    )
    meta = dataset_json(images, len(cases), description)
    meta["name"] = target.name
    _write_json(root / "dataset.json", meta)
    record = {
        "format": EXPORT_FORMAT,
        "version": __version__,
        "jobs": [_job_record(job) for job in jobs],
        "real": str(Path(real).resolve()) if real is not None else None,
        "labels": {"brats_to_nnunet": {str(k): v for k, v in BRATS_TO_NNUNET.items()}},
        "cases": cases,
    }
    _write_json(root / EXPORT_RECORD, record)


def _job_record(job: Job) -> dict[str, Any]:
    m = job.manifest
    return {
        "source": str(Path(job.source).resolve()) if Path(job.source).exists() else job.source,
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


# ---------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str]) -> int:
    p = make_parser("export-nnunet", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--jobs", nargs="+", required=True, metavar="DIR_OR_ID",
                   help="finished jobs: result folders, their zips, or job ids in SYNTHMRI_RESULTS_DIR")
    p.add_argument("--out", type=Path, required=True, help="nnU-Net raw folder (nnUNet_raw) to write into")
    p.add_argument("--real", type=Path, default=None,
                   help="a BraTS folder (2020/2021/2023 naming) whose subjects are added as 3-D cases")
    p.add_argument("--dataset-id", type=int, default=DEFAULT_DATASET_ID, help="nnU-Net dataset id (1..999)")
    p.add_argument("--name", default=DEFAULT_NAME, help="dataset name: Dataset{ID:03d}_{NAME}")
    p.add_argument("--force", action="store_true", help="replace an existing Dataset{ID:03d}_{NAME}")
    args = p.parse_args(list(argv))
    try:
        target = export_nnunet(args.jobs, args.out, args.real, args.dataset_id, args.name, force=args.force)
    except ExportError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"cannot write to {args.out}: {e.strerror or e}") from None
    meta = json.loads((target / "dataset.json").read_text(encoding="utf-8"))
    channels = ", ".join(meta["channel_names"].values())
    d = args.dataset_id
    print(f"wrote {target} ({meta['numTraining']} cases, channels {channels}); next: "
          f"nnUNetv2_plan_and_preprocess -d {d} --verify_dataset_integrity; "
          f"nnUNetv2_train {d} 2d 0")  # fmt: skip
    return 0

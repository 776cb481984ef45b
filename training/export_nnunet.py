"""`synthmri export-nnunet`: finished jobs' samples (optionally with real BraTS subjects) as an
nnU-Net v2 raw dataset.

The jobs' part (layout, labels, the export record) is `synthmri.outputs.nnunet`, which also
builds a service job's `nnunet.zip`; this module adds real subjects and writes the dataset
into an `nnUNet_raw` folder. A real subject (BraTS 2020/2021/2023 naming, read with
`training.brats`) is a 3-D case under its subject id, images float32, geometry of its own
files. The dataset is built in a hidden folder and renamed into place, so a failed export
leaves nothing behind. Torch-free.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from synthmri.channels import SEG
from synthmri.cli import CliError, make_parser
from synthmri.outputs.nnunet import (
    DEFAULT_DATASET_ID,
    DEFAULT_NAME,
    FILE_ENDING,
    ExportError,
    Job,
    check_jobs,
    convert_labels,
    dataset_folder_name,
    image_channels,
    load_nifti,
    nifti_like,
    read_job,
    save_nifti,
    start_dataset,
    write_job_cases,
    write_metadata,
)
from training.brats import DataError, Subject, find_subjects, load_subject

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


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
        ref, _ = load_nifti(subject.files[modality], subject.id)
        data = volumes[modality].astype(np.float32, copy=False)
        save_nifti(nifti_like(data, ref), root / "imagesTr" / f"{subject.id}_{k:04d}{FILE_ENDING}")
    ref, _ = load_nifti(subject.files[SEG], subject.id)
    label = convert_labels(volumes[SEG], f"{subject.id}: {subject.files[SEG].name}")
    save_nifti(nifti_like(label, ref, cal=(0.0, 3.0)), root / "labelsTr" / f"{subject.id}{FILE_ENDING}")


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
    start_dataset(root)
    cases = write_job_cases(root, jobs, images)
    for subject in subjects:
        if subject.id in cases:
            raise ExportError(f"--real {real}: subject {subject.id} clashes with a synthetic case id")
        _export_subject(subject, images, root)
        cases[subject.id] = {"real": subject.id, "naming": subject.naming}
    where_real = str(Path(real).resolve()) if real is not None else None
    write_metadata(root, target.name, images, jobs, cases, where_real)


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

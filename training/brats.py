"""Find and read BraTS subjects in any of the layouts users have on disk.

Recognised (all harmonised to modalities t1, t1ce, t2, flair, seg with labels {0,1,2,4}):

- BraTS 2020 and earlier: `BraTS20_Training_001/BraTS20_Training_001_t1ce.nii.gz`
  (also `_Validation_` names, which have no seg);
- BraTS 2021: `BraTS2021_00000/BraTS2021_00000_t1ce.nii.gz`;
- BraTS 2023 GLI: `BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1c.nii.gz` with t1n/t1c/t2w/t2f
  and the enhancing tumour as label 3 (mapped back to 4);
- slices the research code already prepared: folders `FLAIR/ Seg/ T1/ T1CE/ T2/` of
  256×256 8-bit PNGs with matching file names, seg stored as label/5×255. Each PNG is
  `volume[:, :, z]` as saved by PIL (array rows = volume axis 0). Slices are grouped
  into subjects by their name without a trailing `_<number>` (or `-<number>`).

Every problem with the data is a `DataError` whose one-line message names the subject
and the file, so a CLI can print it instead of a stack trace.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
ALL_MODALITIES: tuple[str, ...] = (*IMAGE_MODALITIES, "seg")
BRATS_LABELS = (0, 1, 2, 4)

# File-name suffix → harmonised modality, per naming family.
_UNDERSCORE = re.compile(r"^(?P<sid>.+)_(?P<mod>t1|t1ce|t2|flair|seg)\.nii(?:\.gz)?$", re.IGNORECASE)
_GLI = re.compile(r"^(?P<sid>.+)-(?P<mod>t1n|t1c|t2w|t2f|seg)\.nii(?:\.gz)?$", re.IGNORECASE)
_GLI_MODALITY = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", "seg": "seg"}
_BRATS2021 = re.compile(r"^BraTS2021_\d+$")

PNG_FOLDERS = {"t1": "T1", "t1ce": "T1CE", "t2": "T2", "flair": "FLAIR", "seg": "Seg"}
PNG_SIZE = 256
_SLICE_SUFFIX = re.compile(r"^(?P<sid>.+?)[_-](?P<z>\d+)$")


class DataError(ValueError):
    """Unusable input data; the message names the subject and file."""


@dataclass(frozen=True)
class Subject:
    """One subject: NIfTI files per modality, or (PNG layout) its slice files.

    `naming` is "2020", "2021", "2023" or "png". For PNG subjects `files` maps each
    modality to its folder and `slices` lists the subject's PNG file names in order.
    """

    id: str
    naming: str
    files: dict[str, Path]
    slices: tuple[str, ...] = field(default=())

    @property
    def has_seg(self) -> bool:
        return "seg" in self.files

    @property
    def folder(self) -> Path:
        return next(iter(self.files.values())).parent


def _nifti_suffix(subject: str, modality: str, naming: str) -> str:
    if naming == "2023":
        inverse = {v: k for k, v in _GLI_MODALITY.items()}
        return f"{subject}-{inverse[modality]}.nii.gz"
    return f"{subject}_{modality}.nii.gz"


def find_subjects(root: str | Path, require_seg: bool = True) -> list[Subject]:
    """All subjects under `root`, sorted by id; a DataError for anything incomplete.

    NIfTI subjects are found anywhere below `root`; a `root` that holds the
    `T1/ T1CE/ T2/ FLAIR/ Seg/` folders is read as prepared PNG slices instead.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    png_root = _png_folders(root)
    if png_root is not None:
        return _find_png_subjects(root, png_root, require_seg)

    found: dict[tuple[Path, str], dict[str, Path]] = {}
    namings: dict[tuple[Path, str], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            match = _GLI.match(name)
            if match:
                naming, modality = "2023", _GLI_MODALITY[match["mod"].lower()]
            else:
                match = _UNDERSCORE.match(name)
                if not match:
                    continue
                modality = match["mod"].lower()
                naming = "2021" if _BRATS2021.match(match["sid"]) else "2020"
            key = (Path(dirpath), match["sid"])
            files = found.setdefault(key, {})
            if modality in files:
                raise DataError(
                    f"{match['sid']}: two files for {modality}: {files[modality].name} and {name}"
                )
            files[modality] = Path(dirpath) / name
            namings[key] = naming
    if not found:
        raise DataError(
            f"no BraTS subjects under {root} (expected e.g. BraTS20_Training_001/"
            "BraTS20_Training_001_t1.nii.gz, BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz, "
            "or folders T1/ T1CE/ T2/ FLAIR/ Seg/ of PNG slices)"
        )
    subjects = []
    seen: dict[str, Path] = {}
    for (folder, sid), files in sorted(found.items(), key=lambda kv: (kv[0][1], str(kv[0][0]))):
        naming = namings[(folder, sid)]
        if "seg" not in files:
            stray = _stray_seg(folder, set(files.values()))
            if stray is not None:
                files["seg"] = stray
        needed = ALL_MODALITIES if require_seg else IMAGE_MODALITIES
        for modality in needed:
            if modality not in files:
                expected = _nifti_suffix(sid, modality, naming)
                raise DataError(f"{sid}: missing {modality} (expected {expected} in {folder})")
        if sid in seen:
            raise DataError(f"{sid}: the same subject is in both {seen[sid]} and {folder}")
        seen[sid] = folder
        subjects.append(Subject(sid, naming, {m: files[m] for m in ALL_MODALITIES if m in files}))
    return subjects


def _stray_seg(folder: Path, used: set[Path]) -> Path | None:
    """The one other NIfTI with "seg" in its name, if any.

    BraTS 2020 training subject 355 ships its mask as `W39_1998.09.19_Segm.nii`.
    """
    candidates = [
        p
        for p in folder.iterdir()
        if p not in used and "seg" in p.name.lower() and p.name.lower().endswith((".nii", ".nii.gz"))
    ]
    return candidates[0] if len(candidates) == 1 else None


def load_subject(subject: Subject) -> dict[str, np.ndarray]:
    """A NIfTI subject's volumes: images float32, seg uint8 with BraTS labels {0,1,2,4}.

    Every volume must be 3-D and the same shape as the subject's T1.
    """
    if subject.naming == "png":
        raise DataError(f"{subject.id}: PNG subjects are read with load_png_subject")
    out: dict[str, np.ndarray] = {}
    shape: tuple[int, ...] | None = None
    for modality in ALL_MODALITIES:
        path = subject.files.get(modality)
        if path is None:
            continue
        data = _read_nifti(subject.id, path)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise DataError(f"{subject.id}: {path.name} has shape {data.shape}, expected a 3-D volume")
        if shape is None:
            shape = data.shape
        elif data.shape != shape:
            raise DataError(
                f"{subject.id}: {path.name} has shape {data.shape}, expected {shape} like its t1"
            )
        if modality == "seg":
            out[modality] = _harmonise_labels(subject, path, data)
        else:
            if not np.isfinite(data).all():
                raise DataError(f"{subject.id}: {path.name} contains NaN or infinite voxels")
            out[modality] = data.astype(np.float32, copy=False)
    return out


def _read_nifti(sid: str, path: Path) -> np.ndarray:
    try:
        img = cast(nib.Nifti1Image, nib.load(str(path)))
        return np.asarray(img.dataobj)
    except FileNotFoundError:
        raise DataError(f"{sid}: {path.name} disappeared while reading ({path})") from None
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{sid}: cannot read {path.name}: {reason}") from None


def _harmonise_labels(subject: Subject, path: Path, data: np.ndarray) -> np.ndarray:
    if np.issubdtype(data.dtype, np.floating) and (
        not np.isfinite(data).all() or not np.array_equal(data, np.round(data))
    ):
        raise DataError(f"{subject.id}: {path.name} has non-integer labels")
    labels = data.astype(np.int64)
    allowed = (0, 1, 2, 3) if subject.naming == "2023" else BRATS_LABELS
    found = np.unique(labels)
    unknown = sorted(set(found.tolist()) - set(allowed))
    if unknown:
        raise DataError(
            f"{subject.id}: {path.name} has labels {unknown} outside {list(allowed)} "
            f"({'BraTS 2023' if subject.naming == '2023' else 'BraTS 2020/2021'} scheme)"
        )
    seg = labels.astype(np.uint8)
    if subject.naming == "2023":
        seg[seg == 3] = 4  # GLI 2023 numbers enhancing tumour 3; the rest of SynthMRI uses 4
    return seg


# ---------------------------------------------------------------------------
# Prepared PNG slices (the research layout)


def _png_folders(root: Path) -> dict[str, Path] | None:
    """modality → folder when `root` holds the research PNG folders (case-insensitive)."""
    try:
        children = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    except OSError as e:
        raise DataError(f"cannot list {root}: {e.strerror}") from None
    folders = {m: children[name.lower()] for m, name in PNG_FOLDERS.items() if name.lower() in children}
    if "t1" in folders and "t1ce" in folders:
        return folders
    return None


def png_subject_id(stem: str) -> str:
    """Subject of a slice file: its name without a trailing `_<slice>` / `-<slice>` number."""
    match = _SLICE_SUFFIX.match(stem)
    return match["sid"] if match else stem


def _slice_key(name: str) -> tuple[str, int, str]:
    stem = Path(name).stem
    match = _SLICE_SUFFIX.match(stem)
    return (match["sid"], int(match["z"]), name) if match else (stem, -1, name)


def _find_png_subjects(root: Path, folders: dict[str, Path], require_seg: bool) -> list[Subject]:
    needed = ALL_MODALITIES if require_seg else IMAGE_MODALITIES
    for modality in needed:
        if modality not in folders:
            raise DataError(f"{root}: prepared PNG data has no {PNG_FOLDERS[modality]}/ folder")
    names = {m: {p.name for p in folders[m].iterdir() if p.suffix.lower() == ".png"} for m in folders}
    reference = names["t1"]
    if not reference:
        raise DataError(f"{root}: {PNG_FOLDERS['t1']}/ has no PNG files")
    for modality in needed:
        missing = sorted(reference - names[modality])
        extra = sorted(names[modality] - reference)
        if missing:
            sid = png_subject_id(Path(missing[0]).stem)
            raise DataError(
                f"{sid}: {missing[0]} is in {PNG_FOLDERS['t1']}/ but missing from {PNG_FOLDERS[modality]}/"
            )
        if extra:
            sid = png_subject_id(Path(extra[0]).stem)
            raise DataError(
                f"{sid}: {extra[0]} is in {PNG_FOLDERS[modality]}/ but missing from {PNG_FOLDERS['t1']}/"
            )
    groups: dict[str, list[str]] = {}
    for name in sorted(reference, key=_slice_key):
        groups.setdefault(png_subject_id(Path(name).stem), []).append(name)
    kept = {m: folders[m] for m in ALL_MODALITIES if m in folders}
    return [Subject(sid, "png", dict(kept), tuple(groups[sid])) for sid in sorted(groups)]


def load_png_subject(subject: Subject, modalities: Sequence[str] = ALL_MODALITIES) -> dict[str, np.ndarray]:
    """(n_slices, 256, 256) uint8 stacks per modality, exactly as stored."""
    out: dict[str, np.ndarray] = {}
    for modality in modalities:
        if modality not in subject.files:
            raise DataError(f"{subject.id}: prepared PNG data has no {PNG_FOLDERS[modality]}/ folder")
        folder = subject.files[modality]
        stack = np.empty((len(subject.slices), PNG_SIZE, PNG_SIZE), dtype=np.uint8)
        for k, name in enumerate(subject.slices):
            stack[k] = read_png(subject.id, folder / name)
        out[modality] = stack
    return out


def read_png(sid: str, path: Path) -> np.ndarray:
    """A 256×256 8-bit grey PNG as uint8, or a DataError naming subject and file."""
    where = f"{path.parent.name}/{path.name}"
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{sid}: cannot read {where}: {reason}") from None
    if arr.ndim == 3 and arr.shape[2] in (3, 4) and (arr[..., :3] == arr[..., :1]).all():
        arr = arr[..., 0]  # grey saved as RGB(A)
    if arr.dtype != np.uint8 or arr.ndim != 2:
        raise DataError(f"{sid}: {where} is not an 8-bit grey image (mode {mode}, shape {arr.shape})")
    if arr.shape != (PNG_SIZE, PNG_SIZE):
        raise DataError(f"{sid}: {where} has shape {arr.shape}, expected ({PNG_SIZE}, {PNG_SIZE})")
    return arr

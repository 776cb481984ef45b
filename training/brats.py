"""Find and read BraTS subjects in any of the layouts users have on disk.

Recognised (all harmonised to modalities t1, t1ce, t2, flair, seg with labels {0,1,2,4}):

- BraTS 2020 and earlier: `BraTS20_Training_001/BraTS20_Training_001_t1ce.nii.gz`
  (also `_Validation_` names, which have no seg);
- BraTS 2021: `BraTS2021_00000/BraTS2021_00000_t1ce.nii.gz`;
- BraTS 2023 GLI: `BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1c.nii.gz` with t1n/t1c/t2w/t2f
  and the enhancing tumour as label 3 (mapped back to 4);
- slices the research code already prepared: folders `FLAIR/ Seg/ T1/ T1CE/ T2/` of
  256×256 8-bit PNGs with matching file names, masks stored as label/5×255 or as the
  labels themselves (`PngMasks`). Each PNG is `volume[:, :, z]` as saved by PIL (array
  rows = volume axis 0). Slices are grouped into subjects by their file names
  (`SLICE_PATTERNS`, or a caller's regular expression with a `subject` group), because
  the training/validation split is by subject.

A run needs only the modalities it uses (`needed`); the others are kept when present.
macOS archive leftovers (`__MACOSX/`, `._*`) and other hidden entries are ignored.

Every problem with the data is a `DataError` whose one-line message names the subject
and the file, so a CLI can print it instead of a stack trace. With a `skipped` list,
problems confined to one subject drop that subject and are appended to the list instead.
"""

from __future__ import annotations

import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
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
# How slice file names (without .png) tell their subject, tried in this order; the first
# that fits every name in the folder groups it. Anything else needs a caller's pattern.
SLICE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("<subject>_slice<n>", r"(?P<subject>.+)[_-](?:slice|z)[_-]?(?P<slice>\d+)"),
    ("<subject>_<n>", r"(?P<subject>.+)[_-](?P<slice>\d+)"),
)


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


def _ignored(name: str) -> bool:
    """macOS zips carry `__MACOSX/` and AppleDouble `._<name>` twins of every file; those
    look like subjects but hold no image. Hidden entries (our own cache too) are never data."""
    return name == "__MACOSX" or name.startswith(".")


def _refuse_or_skip(root: Path, problems: Sequence[str], skipped: list[str] | None, kept: int) -> None:
    """Raise the first subject's problem, or with a `skipped` list record them all."""
    if problems and skipped is None:
        raise DataError(problems[0])
    if skipped is not None:
        skipped.extend(problems)
    if not kept:
        raise DataError(f"no usable subjects under {root}; the first problem: {problems[0]}")


def find_subjects(
    root: str | Path,
    needed: Sequence[str] = ALL_MODALITIES,
    *,
    slice_pattern: str = "",
    skipped: list[str] | None = None,
) -> list[Subject]:
    """All subjects under `root` that have every `needed` modality, sorted by id.

    NIfTI subjects are found anywhere below `root`; a `root` that holds the
    `T1/ T1CE/ T2/ FLAIR/ Seg/` folders is read as prepared PNG slices instead, grouped
    into subjects by `slice_pattern` (a regular expression with a `subject` group,
    matched against whole file names without .png) or else by SLICE_PATTERNS.
    Modalities beyond `needed` are included when present. A subject with a problem of
    its own is a DataError, or with `skipped` a line appended there and left out.
    """
    root = Path(root)
    needed = [m for m in ALL_MODALITIES if m in needed]
    if not needed:
        raise ValueError("find_subjects needs at least one modality")
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    png_root = _png_folders(root)
    if png_root is not None:
        return _find_png_subjects(root, png_root, needed, slice_pattern, skipped)
    if slice_pattern:
        raise DataError(f"{root} holds no PNG slice folders; a slice pattern only groups PNG slices")

    found: dict[tuple[Path, str], dict[str, Path]] = {}
    namings: dict[tuple[Path, str], str] = {}
    problems: dict[tuple[Path, str], str] = {}
    claimed: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _ignored(d))
        for name in sorted(filenames):
            if _ignored(name):
                continue
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
            claimed.add(Path(dirpath) / name)
            if modality in files:
                problems.setdefault(
                    key, f"{match['sid']}: two files for {modality}: {files[modality].name} and {name}"
                )
                continue
            files[modality] = Path(dirpath) / name
            namings[key] = naming
    if not found:
        raise DataError(
            f"no BraTS subjects under {root} (expected e.g. BraTS20_Training_001/"
            "BraTS20_Training_001_t1.nii.gz, BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz, "
            "or folders T1/ T1CE/ T2/ FLAIR/ Seg/ of PNG slices)"
        )
    subjects_in = Counter(folder for folder, _ in found)
    subjects = []
    bad = []
    seen: dict[str, Path] = {}
    for (folder, sid), files in sorted(found.items(), key=lambda kv: (kv[0][1], str(kv[0][0]))):
        naming = namings[(folder, sid)]
        if sid in seen:
            raise DataError(f"{sid}: the same subject is in both {seen[sid]} and {folder}")
        seen[sid] = folder
        # An oddly named mask can only be this subject's when no other subject shares the
        # folder: in a flat folder a mask-less (validation) subject would take a neighbour's.
        if "seg" not in files and subjects_in[folder] == 1:
            stray = _stray_seg(folder, claimed)
            if stray is not None:
                files["seg"] = stray
        missing = [m for m in needed if m not in files]
        if (folder, sid) in problems:
            bad.append(problems[(folder, sid)])
        elif missing:
            expected = _nifti_suffix(sid, missing[0], naming)
            bad.append(f"{sid}: missing {missing[0]} (expected {expected} in {folder})")
        else:
            subjects.append(Subject(sid, naming, {m: files[m] for m in ALL_MODALITIES if m in files}))
    _refuse_or_skip(root, bad, skipped, len(subjects))
    return subjects


def _stray_seg(folder: Path, claimed: set[Path]) -> Path | None:
    """The one NIfTI in `folder` with "seg" in its name that no subject's naming claims, if any.

    BraTS 2020 training subject 355 ships its mask as `W39_1998.09.19_Segm.nii`.
    """
    candidates = [
        p
        for p in folder.iterdir()
        if p not in claimed
        and not _ignored(p.name)
        and "seg" in p.name.lower()
        and p.name.lower().endswith((".nii", ".nii.gz"))
    ]
    return candidates[0] if len(candidates) == 1 else None


def load_subject(subject: Subject, modalities: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """A NIfTI subject's volumes: images float32, seg uint8 with BraTS labels {0,1,2,4}.

    Reads `modalities` where the subject has them (default: every file it has). Every
    volume must be 3-D and the same shape as the first one read.
    """
    if subject.naming == "png":
        raise DataError(f"{subject.id}: PNG subjects are read with load_png_subject")
    wanted = ALL_MODALITIES if modalities is None else modalities
    out: dict[str, np.ndarray] = {}
    shape: tuple[int, ...] | None = None
    for modality in [m for m in ALL_MODALITIES if m in wanted]:
        path = subject.files.get(modality)
        if path is None:
            continue
        data = _read_nifti(subject.id, path)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise DataError(f"{subject.id}: {path.name} has shape {data.shape}, expected a 3-D volume")
        if shape is None:
            shape, first = data.shape, modality
        elif data.shape != shape:
            raise DataError(
                f"{subject.id}: {path.name} has shape {data.shape}, expected {shape} like its {first}"
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


def is_png_data(root: str | Path) -> bool:
    """Whether `root` holds research PNG folders rather than NIfTI subjects."""
    return Path(root).is_dir() and _png_folders(Path(root)) is not None


def _png_folders(root: Path) -> dict[str, Path] | None:
    """modality → folder when `root` holds research PNG folders (case-insensitive), at least
    one of them an image folder with PNG files in it."""
    try:
        children = {p.name.lower(): p for p in root.iterdir() if p.is_dir() and not _ignored(p.name)}
    except OSError as e:
        raise DataError(f"cannot list {root}: {e.strerror}") from None
    folders = {m: children[name.lower()] for m, name in PNG_FOLDERS.items() if name.lower() in children}
    # any() stops at the first PNG: a folder of a whole dataset's slices is long to list
    if any(m != "seg" and any(_is_slice_file(p) for p in folder.iterdir()) for m, folder in folders.items()):
        return folders
    return None


def _is_slice_file(path: Path) -> bool:
    return path.suffix.lower() == ".png" and not _ignored(path.name)


def _png_names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if _is_slice_file(p)}


def _slice_grouping(
    where: str, names: Iterable[str], slice_pattern: str
) -> tuple[dict[str, tuple[str, int]], re.Pattern[str]]:
    """(name → (subject, slice number or -1), the pattern used) for every slice file name.

    A DataError, naming a file, when the names cannot be grouped: a subject that is split
    wrongly would put slices of one patient on both sides of the validation split.
    """
    names = sorted(names)
    if slice_pattern:
        try:
            pattern = re.compile(slice_pattern)
        except re.error as e:
            raise DataError(f"slice pattern '{slice_pattern}' is not a regular expression: {e}") from None
        if "subject" not in pattern.groupindex:
            raise DataError(f"slice pattern '{slice_pattern}' has no (?P<subject>...) group")
        candidates = [pattern]
    else:
        candidates = [re.compile(regex, re.IGNORECASE) for _, regex in SLICE_PATTERNS]
    first_misfit: list[tuple[int, str]] = []
    for pattern in candidates:
        matches = {name: pattern.fullmatch(Path(name).stem) for name in names}
        misfits = [name for name, m in matches.items() if m is None or not m["subject"]]
        if misfits:
            first_misfit.append((len(misfits), misfits[0]))
            continue
        keys = {}
        for name, m in matches.items():
            assert m is not None
            z = m.groupdict().get("slice")
            if z is not None and not z.isdigit():
                raise DataError(f"{where}/{name}: the slice pattern's slice group matched {z!r}, no number")
            keys[name] = (m["subject"], int(z) if z is not None else -1)
        return keys, pattern
    _, name = min(first_misfit)
    builtin = " or ".join(f"{label}.png" for label, _ in SLICE_PATTERNS)
    expected = f"'{slice_pattern}'" if slice_pattern else builtin
    raise DataError(
        f"{where}/{name}: cannot tell the subject from the file name (expected {expected}; for other "
        "names give --slice-pattern, a regular expression with a (?P<subject>...) group)"
    )


def _find_png_subjects(
    root: Path, folders: dict[str, Path], needed: Sequence[str], slice_pattern: str, skipped: list[str] | None
) -> list[Subject]:
    for modality in needed:
        if modality not in folders:
            raise DataError(f"{root}: prepared PNG data has no {PNG_FOLDERS[modality]}/ folder")
    names = {m: _png_names(folder) for m, folder in folders.items()}
    ref = PNG_FOLDERS[needed[0]]
    reference = names[needed[0]]
    if not reference:
        raise DataError(f"{root}: {ref}/ has no PNG files")
    keys, pattern = _slice_grouping(ref, reference, slice_pattern)

    def subject_of(name: str) -> str:
        m = pattern.fullmatch(Path(name).stem)
        return m["subject"] if m and m["subject"] else Path(name).stem

    problems: dict[str, str] = {}
    kept: dict[str, Path] = {}
    for modality, folder in folders.items():
        missing = sorted(reference - names[modality], key=lambda n: (keys[n], n))
        extra = sorted(names[modality] - reference)
        if modality not in needed:
            if not missing and not extra:
                kept[modality] = folder  # unused, but the data fingerprint has always covered it
            continue
        kept[modality] = folder
        there = PNG_FOLDERS[modality]
        for name in missing:
            sid = keys[name][0]
            problems.setdefault(sid, f"{sid}: {name} is in {ref}/ but missing from {there}/")
        for name in extra:
            sid = subject_of(name)
            problems.setdefault(sid, f"{sid}: {name} is in {there}/ but missing from {ref}/")
    groups: dict[str, list[str]] = {}
    for name in sorted(reference, key=lambda n: (keys[n], n)):
        groups.setdefault(keys[name][0], []).append(name)
    subjects = [Subject(sid, "png", dict(kept), tuple(slices)) for sid, slices in sorted(groups.items())
                if sid not in problems]
    _refuse_or_skip(root, list(problems.values()), skipped, len(subjects))
    return subjects


class PngMasks:
    """Decodes PNG masks to BraTS labels {0,1,2,4}, one encoding per dataset.

    Masks store either the research code's label/5×255 (0/51/102/204) or the labels
    themselves (0/1/2/4, or BraTS 2023's 0/1/2/3 where 3 is the enhancing tumour). The
    value sets are disjoint, so each mask with tumour tells its encoding; the first one
    that does fixes it for the dataset, and a mask that disagrees is refused, as are
    values of neither encoding (they would otherwise fail only in training, unnamed).
    """

    def __init__(self) -> None:
        self.scale: tuple[int, str] | None = None  # 1 (labels) or 51 (label/5×255), and the file that said so
        self.enhancing: tuple[int, str] | None = None  # 4 or 3, and the file that said so

    def labels(self, sid: str, path: Path, stored: np.ndarray) -> np.ndarray:
        where = f"{path.parent.name}/{path.name}"
        values = [int(v) for v in np.unique(stored) if v]
        if not values:
            return np.zeros(stored.shape, dtype=np.uint8)
        scale = 1 if max(values) <= 4 else 51
        labels = {v // scale for v in values}
        if any(v % scale for v in values) or not labels <= {1, 2, 3, 4}:
            shown = ", ".join(map(str, values[:8])) + (", …" if len(values) > 8 else "")
            raise DataError(
                f"{sid}: {where} has mask values [{shown}]; expected BraTS labels 0/1/2/4 (or 0/1/2/3) "
                "or labels stored as label/5×255 (0/51/102/204)"
            )
        if {3, 4} <= labels:
            raise DataError(
                f"{sid}: {where} has both 3 and 4 in one mask; the enhancing tumour is 4 "
                "(BraTS 2020/2021) or 3 (BraTS 2023), not both"
            )
        encoding = {1: "labels as values (0/1/2/4)", 51: "labels as label/5×255 (0/51/102/204)"}
        self.scale = self._agree(self.scale, scale, sid, where, lambda v: f"stores {encoding[v]}")
        for et in (3, 4):
            if et in labels:
                self.enhancing = self._agree(
                    self.enhancing, et, sid, where, lambda v: f"has enhancing tumour as label {v}"
                )
        lut = np.arange(256) // scale
        lut[3 * scale] = 4  # a mask whose enhancing tumour is 3 (BraTS 2023) has no other 3
        return lut.astype(np.uint8)[stored]

    @staticmethod
    def _agree(
        known: tuple[int, str] | None, value: int, sid: str, where: str, says: Callable[[int], str]
    ) -> tuple[int, str]:
        if known is not None and known[0] != value:
            raise DataError(
                f"{sid}: {where} {says(value)} but {known[1]} {says(known[0])}; one dataset's masks "
                "must all use one encoding"
            )
        return known or (value, where)


def load_png_subject(
    subject: Subject, modalities: Sequence[str] = ALL_MODALITIES, masks: PngMasks | None = None
) -> dict[str, np.ndarray]:
    """(n_slices, 256, 256) uint8 stacks per modality: images as stored, seg as BraTS labels.

    Pass one `PngMasks` for a whole dataset so that every mask is held to one encoding.
    """
    masks = masks if masks is not None else PngMasks()
    out: dict[str, np.ndarray] = {}
    for modality in modalities:
        if modality not in subject.files:
            raise DataError(f"{subject.id}: prepared PNG data has no {PNG_FOLDERS[modality]}/ folder")
        folder = subject.files[modality]
        stack = np.empty((len(subject.slices), PNG_SIZE, PNG_SIZE), dtype=np.uint8)
        for k, name in enumerate(subject.slices):
            stored = read_png(subject.id, folder / name)
            stack[k] = masks.labels(subject.id, folder / name, stored) if modality == "seg" else stored
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

"""Preprocess once, then memory-map: the slice cache keyed by a data fingerprint.

A cache entry is a folder `<cache_dir>/<fingerprint[:16]>/` with `slices.npy`
(N, C, H, W; float16 or uint8) and `index.json` (which subject and source slice each
row came from, tumour flags, parameters). The fingerprint is a sha256 over every input
file's relative name, size and mtime, the preprocessing parameters and the code
version, so a second build with the same inputs reuses the entry and any change
makes a new one. Entries are written under a temporary name and renamed into place,
so an interrupted build never leaves a half cache that looks complete.

The index also says what a build did beyond the slices: whether tumour flags were read
from the masks (a run without a mask channel reads none unless asked), and which
subjects it left out for problems of their own. An entry that lacks what a caller needs
is rebuilt in place; its slices, and so its fingerprint, are the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.brats import DataError, Subject
from training.preprocess import SliceParams, SubjectSlices

# Bump when the preprocessing output for the same inputs and parameters changes.
CODE_VERSION = "slices-1"
_HEADER_BYTES = 128  # fixed .npy header size, so the row count can be filled in at the end


def subject_files(subject: Subject) -> list[Path]:
    if subject.naming == "png":
        return [folder / name for folder in subject.files.values() for name in subject.slices]
    return list(subject.files.values())


def data_fingerprint(root: Path, subjects: Sequence[Subject], params: SliceParams) -> str:
    """sha256 over (relative name, size, mtime) of every input file + parameters + code version."""
    h = hashlib.sha256()
    h.update(json.dumps({"code": CODE_VERSION, "params": asdict(params)}, sort_keys=True).encode())
    for subject in subjects:
        h.update(f"\0subject {subject.id} {subject.naming}".encode())
        for path in subject_files(subject):
            try:
                st = path.stat()
            except OSError as e:
                raise DataError(f"{subject.id}: cannot read {path.name}: {e.strerror}") from None
            rel = os.path.relpath(path, root)
            h.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


@dataclass
class SliceCache:
    """An opened cache entry: the memory-mapped slices and their index."""

    folder: Path
    index: dict[str, Any]
    reused: bool = False  # True when an existing entry was found instead of built
    skipped: list[str] = field(default_factory=list)  # "subject: problem" for each subject left out

    @property
    def array_path(self) -> Path:
        return self.folder / "slices.npy"

    def open(self) -> np.ndarray:
        return np.load(self.array_path, mmap_mode="r")

    @property
    def fingerprint(self) -> str:
        return str(self.index["fingerprint"])

    @property
    def slice_subject(self) -> np.ndarray:
        """(N,) position in index["subjects"] of each row's subject."""
        counts = [s["count"] for s in self.index["subjects"]]
        return np.repeat(np.arange(len(counts)), counts)

    @property
    def has_tumour(self) -> np.ndarray:
        return np.array(self.index["has_tumour"], dtype=bool)


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """A version-1.0 .npy header padded to exactly _HEADER_BYTES."""
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    body_len = _HEADER_BYTES - 10
    body = text.ljust(body_len - 1) + "\n"
    if len(body) != body_len:
        raise ValueError(f"npy header for shape {shape} does not fit in {_HEADER_BYTES} bytes")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", body_len) + body.encode("latin1")


def load_cache(cache_dir: Path, fingerprint: str, need_tumour_flags: bool = False) -> SliceCache | None:
    """The complete entry for `fingerprint` (with tumour flags if needed), or None."""
    folder = cache_dir / fingerprint[:16]
    try:
        index = json.loads((folder / "index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if index.get("fingerprint") != fingerprint or not (folder / "slices.npy").is_file():
        return None
    # Entries written before PNG masks were decoded hold raw-label masks as if they were
    # label/5×255 (all background); entries from before the flag always read masks.
    png = any(entry["naming"] == "png" for entry in index["subjects"][:1])
    if png and not index.get("png_masks_decoded"):
        return None
    if need_tumour_flags and not index.get("tumour_flags", True):
        return None
    return SliceCache(folder, index)


def build_cache(
    cache_dir: Path,
    fingerprint: str,
    subjects: Sequence[Subject],
    params: SliceParams,
    make_slices: Callable[[Subject], SubjectSlices],
    dtype: np.dtype,
    progress: Callable[[Iterable[Subject]], Iterable[Subject]] | None = None,
    *,
    tumour_flags: bool = True,
    skipped: list[str] | None = None,
) -> SliceCache:
    """Preprocess every subject into a new entry (streamed to disk), or reuse a complete one.

    `tumour_flags` says that `make_slices` reads the masks. With a `skipped` list, a
    subject whose `make_slices` raises a DataError is left out and its message recorded
    (in the list and the index); without one the error propagates.
    """
    existing = load_cache(cache_dir, fingerprint, need_tumour_flags=tumour_flags)
    if existing is not None:
        existing.reused = True
        return existing
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / fingerprint[:16]
    tmp = cache_dir / f".{fingerprint[:16]}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    size = params.image_size
    shape_tail = (len(params.channels), size, size)
    rows = 0
    entries: list[dict[str, Any]] = []
    z_all: list[int] = []
    tumour_all: list[bool] = []
    try:
        with open(tmp / "slices.npy", "wb") as f:
            f.write(_npy_header((0, *shape_tail), dtype))
            for subject in progress(subjects) if progress else subjects:
                try:
                    sl = make_slices(subject)
                except DataError as e:
                    if skipped is None:
                        raise
                    skipped.append(str(e))
                    continue
                if sl.data.shape[1:] != shape_tail:
                    raise DataError(f"{subject.id}: preprocessing gave slices of shape {sl.data.shape[1:]}")
                f.write(np.ascontiguousarray(sl.data, dtype=dtype).tobytes())
                entries.append(
                    {"id": subject.id, "naming": subject.naming, "start": rows, "count": len(sl.z)}
                )
                rows += len(sl.z)
                z_all.extend(int(v) for v in sl.z)
                tumour_all.extend(bool(v) for v in sl.has_tumour)
            f.seek(0)
            f.write(_npy_header((rows, *shape_tail), dtype))
        if skipped and not entries:
            raise DataError(f"every subject has a problem; the first: {skipped[0]}")
        index = {
            "fingerprint": fingerprint,
            "code_version": CODE_VERSION,
            "params": asdict(params),
            "dtype": np.dtype(dtype).name,
            "shape": [rows, *shape_tail],
            "subjects": entries,
            "z": z_all,
            "has_tumour": tumour_all,
            "tumour_flags": tumour_flags,
            "png_masks_decoded": True,
            "skipped": list(skipped or []),
        }
        (tmp / "index.json").write_text(json.dumps(index))
        if final.exists() and load_cache(cache_dir, fingerprint, tumour_flags) is None:
            shutil.rmtree(final, ignore_errors=True)  # an incomplete, foreign or outdated entry
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished the same entry first; theirs is identical.
            if load_cache(cache_dir, fingerprint, tumour_flags) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cache = load_cache(cache_dir, fingerprint, tumour_flags)
    if cache is None:
        raise DataError(f"slice cache {final} could not be written")
    return cache

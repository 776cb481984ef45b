"""Training/validation datasets of axial slices: find → preprocess (cached) → split by subject.

`build_datasets` composes training.brats (reading), training.preprocess (pure numpy
slices) and training.cache (memory-mapped slices keyed by a data fingerprint). Items
are (C, H, W) float32 tensors in [-1, 1] with channels in CHANNEL_SETS order.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from synthmri.channels import SEG, channels_of
from training.brats import (
    ALL_MODALITIES,
    DataError,
    PngMasks,
    Subject,
    find_subjects,
    is_png_data,
    load_png_subject,
    load_subject,
)
from training.cache import SliceCache, build_cache, data_fingerprint
from training.preprocess import (
    SliceParams,
    SubjectSlices,
    percentile_slices,
    png_slices,
    research_slices,
    to_model,
    tumour_fraction_indices,
)

MODES = ("percentile", "research")
CACHE_FOLDER = ".synthmri-cache"


class SliceDataset(Dataset[torch.Tensor]):
    """Rows `indices` of a slice cache as model tensors; optional random left-right flip.

    The memory map is opened lazily in each process, so the dataset pickles cheaply
    into DataLoader workers. The flip draws from torch's global generator, which the
    training loop seeds and checkpoints.
    """

    def __init__(
        self,
        cache: SliceCache,
        indices: np.ndarray,
        channels: Sequence[str],
        mode: str,
        subjects: Sequence[str],
        hflip: bool = False,
    ) -> None:
        self.cache = cache
        self.indices = np.asarray(indices, dtype=np.int64)
        self.channels = tuple(channels)
        self.mode = mode
        self.subjects = list(subjects)  # ids of the subjects whose slices are in this split
        self.hflip = hflip
        self.seg_index = self.channels.index(SEG) if SEG in self.channels else None
        self.image_size = int(cache.index["shape"][-1])
        self.fingerprint = cache.fingerprint
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def _rows(self) -> np.ndarray:
        if self._array is None:
            self._array = self.cache.open()
        return self._array

    def __getitem__(self, i: int) -> torch.Tensor:
        x = to_model(np.asarray(self._rows()[self.indices[i]]), self.mode, self.seg_index)
        if self.hflip and bool(torch.rand(()) < 0.5):
            x = x[:, ::-1, :]  # axis H is the volume's x axis: left ↔ right
        return torch.from_numpy(np.ascontiguousarray(x))

    def subject_of(self, i: int) -> str:
        position = int(self.cache.slice_subject[self.indices[i]])
        return str(self.cache.index["subjects"][position]["id"])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_array"] = None
        return state


def skip_report(skipped: Sequence[str]) -> str:
    """What `skip_bad_subjects` left out, one subject per line, for a CLI to print."""
    lines = "".join(f"\n  {line}" for line in skipped)
    return f"skipped {len(skipped)} subject{'s' if len(skipped) != 1 else ''} with problems:{lines}"


def split_subjects(ids: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic subject-level split: val gets round(val_fraction·n) subjects (≥ 1 if > 0)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ordered = sorted(ids)
    n_val = round(val_fraction * len(ordered))
    if val_fraction > 0 and len(ordered) >= 2:
        n_val = min(max(n_val, 1), len(ordered) - 1)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    val = sorted(ordered[i] for i in perm[:n_val])
    train = sorted(ordered[i] for i in perm[n_val:])
    return train, val


def default_cache_dir(data_dir: Path) -> Path:
    """<data>/.synthmri-cache when the data folder is writable, else the user cache."""
    if os.access(data_dir, os.W_OK):
        return data_dir / CACHE_FOLDER
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "synthmri" / "slices"


def prepare_cache(
    data_dir: str | Path,
    channel_set: str,
    image_size: int,
    *,
    mode: str = "percentile",
    cache_dir: str | Path | None = None,
    min_brain_fraction: float = 0.1,
    crop: str = "brain",
    need_tumour_flags: bool = False,
    slice_pattern: str = "",
    skip_bad_subjects: bool = False,
    progress: bool = False,
) -> tuple[SliceCache, list[Subject]]:
    """Find the subjects and build (or reuse) their slice cache; returns the subjects in it.

    Reads only what the channel set uses, plus the masks when `need_tumour_flags`, T1 in
    research mode (it picks the slices) and, in percentile mode, the other sequences a
    subject has (its brain mask). With `skip_bad_subjects` a subject with a problem of
    its own is left out and listed in `cache.skipped` instead of failing the whole build.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    channels = channels_of(channel_set)
    root = Path(data_dir)
    png = is_png_data(root)
    masks = SEG in channels or need_tumour_flags
    needed = list(dict.fromkeys([*channels, *([SEG] if masks else []),
                                 *(["t1"] if mode == "research" and not png else [])]))
    find_skipped: list[str] | None = [] if skip_bad_subjects else None
    subjects = find_subjects(root, needed, slice_pattern=slice_pattern, skipped=find_skipped)
    # Prepared PNGs are already the research 8-bit slices; there are no volumes to re-normalise.
    params = SliceParams(
        channels=channels,
        image_size=image_size,
        mode="research" if png else mode,
        min_brain_fraction=min_brain_fraction,
        crop=crop,
    )
    fingerprint = data_fingerprint(root, subjects, params)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir(root)
    read = [m for m in ALL_MODALITIES if m in needed or (m != SEG and params.mode == "percentile")]
    png_masks = PngMasks()

    def make_slices(subject: Subject) -> SubjectSlices:
        if png:
            return png_slices(load_png_subject(subject, needed, png_masks), params)
        volumes = load_subject(subject, read)
        if params.mode == "research":
            return research_slices(volumes, params)
        return percentile_slices(volumes, params)

    bar = None
    if progress:
        from tqdm import tqdm

        def bar(items: Iterable[Subject]) -> Iterable[Subject]:
            return tqdm(items, desc="preprocess", unit="subject", total=len(subjects))

    dtype = np.dtype(np.uint8) if params.mode == "research" else np.dtype(np.float16)
    try:
        cache = build_cache(folder, fingerprint, subjects, params, make_slices, dtype, progress=bar,
                            tumour_flags=masks, skipped=[] if skip_bad_subjects else None)
    except OSError as e:
        raise DataError(f"cannot write the slice cache in {folder}: {e.strerror or e}") from None
    recorded = [str(line) for line in cache.index.get("skipped", [])]
    if recorded and not skip_bad_subjects:
        raise DataError(recorded[0])  # a cache built while skipping; this run skips nothing
    cache.skipped = [*(find_skipped or []), *recorded]
    kept = {entry["id"] for entry in cache.index["subjects"]}
    return cache, [s for s in subjects if s.id in kept]


def build_datasets(
    data_dir: str | Path,
    channel_set: str,
    image_size: int,
    *,
    mode: str = "percentile",
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    tumour_fraction: float | None = None,
    min_brain_fraction: float = 0.1,
    crop: str = "brain",
    hflip: bool = False,
    tumour_method: str = "oversample",
    slice_pattern: str = "",
    skip_bad_subjects: bool = False,
    progress: bool = False,
) -> tuple[SliceDataset, SliceDataset, str]:
    """(train, val, fingerprint): slice datasets split by subject, deterministic in `seed`.

    `tumour_fraction` (training split only) re-balances slices so that fraction of them
    contain tumour (`tumour_method` "oversample" repeats, "filter" drops). The datasets
    carry `.mode` — "research" for prepared PNG folders whatever `mode` says — and
    `.cache.skipped`, the subjects `skip_bad_subjects` left out and why.
    """
    cache, _ = prepare_cache(
        data_dir,
        channel_set,
        image_size,
        mode=mode,
        cache_dir=cache_dir,
        min_brain_fraction=min_brain_fraction,
        crop=crop,
        need_tumour_flags=tumour_fraction is not None,
        slice_pattern=slice_pattern,
        skip_bad_subjects=skip_bad_subjects,
        progress=progress,
    )
    ids = [entry["id"] for entry in cache.index["subjects"]]
    train_ids, val_ids = split_subjects(ids, val_fraction, seed)
    position = {sid: k for k, sid in enumerate(ids)}
    slice_subject = cache.slice_subject
    train_rows = np.flatnonzero(np.isin(slice_subject, [position[s] for s in train_ids]))
    val_rows = np.flatnonzero(np.isin(slice_subject, [position[s] for s in val_ids]))
    if train_rows.size == 0:
        raise DataError(
            f"no training slices in {data_dir}: every slice was skipped "
            f"(min_brain_fraction={min_brain_fraction}) or all subjects went to validation"
        )
    if tumour_fraction is not None:
        rng = np.random.default_rng([seed, 1])
        try:
            flags = cache.has_tumour[train_rows]
            picked = tumour_fraction_indices(flags, tumour_fraction, rng, tumour_method)
        except ValueError as e:
            raise DataError(f"{data_dir}: {e}") from None
        train_rows = train_rows[picked]
    channels = channels_of(channel_set)
    mode_used = str(cache.index["params"]["mode"])
    train = SliceDataset(cache, train_rows, channels, mode_used, train_ids, hflip=hflip)
    val = SliceDataset(cache, val_rows, channels, mode_used, val_ids, hflip=False)
    return train, val, cache.fingerprint

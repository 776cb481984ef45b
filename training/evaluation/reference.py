"""The real slices an evaluation compares against: training slices and held-out subjects.

Three ways to get them, in order of preference:
- `train_data` given: its subjects are the training reference, every subject of `data`
  is held out (e.g. fresh phantom subjects beside the phantoms a model was trained on);
- `data` is the model's own training data (same slice fingerprint as in the checkpoint's
  provenance): the model's own subject split (seed, val_fraction) is reproduced, so the
  held-out subjects are those it never saw;
- otherwise `data` is split in half by subject; memorisation is then measured against
  slices the model did not necessarily train on, which the report says.

Held-out slices are re-balanced (by dropping, never repeating) to the tumour-slice
fraction the model was trained with, so a model trained on 50 % tumour slices is not
marked down for making them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.config import CheckpointConfig
from synthmri.channels import seg_index
from training.dataset import prepare_cache, split_subjects
from training.preprocess import to_model, tumour_fraction_indices


@dataclass(frozen=True)
class ReferenceSlices:
    """Real slices in the model's range, (N, C, H, W) float32, channels as the model's."""

    train: np.ndarray
    heldout: np.ndarray
    heldout_subject: np.ndarray  # (N_heldout,) subject index of each held-out slice
    train_subjects: int
    heldout_subjects: int
    split: str  # how the split was made, in words for the report
    fingerprint: str  # slice fingerprint of the training reference (keys cached encoders)


def _rows_of(slice_subject: np.ndarray, positions: list[int]) -> np.ndarray:
    return np.flatnonzero(np.isin(slice_subject, positions))


def _load(cache: Any, rows: np.ndarray, config: CheckpointConfig) -> np.ndarray:
    mode = str(cache.index["params"]["mode"])
    stored = np.asarray(cache.open()[np.sort(rows)])
    return to_model(stored, mode, seg_index(config.channel_set)).astype(np.float32, copy=False)


def _rebalance(rows: np.ndarray, has_tumour: np.ndarray, fraction: float | None, seed: int) -> np.ndarray:
    if fraction is None or fraction < 0 or rows.size == 0:
        return rows
    flags = has_tumour[rows]
    if flags.all() or not flags.any():
        return rows
    return rows[tumour_fraction_indices(flags, fraction, np.random.default_rng(seed), "filter")]


def _cap(rows: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if limit <= 0 or rows.size <= limit:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))


def load_reference(
    config: CheckpointConfig,
    data: str | Path,
    train_data: str | Path | None = None,
    *,
    max_train: int = 4000,
    max_heldout: int = 1024,
    seed: int = 0,
    progress: bool = False,
) -> ReferenceSlices:
    """Training and held-out real slices for `config`'s channels, size and normalisation."""
    recipe = dict(config.provenance.get("recipe", {}))
    mode = str(recipe.get("mode", config.normalisation.method))
    fraction = recipe.get("tumour_fraction")
    fraction = float(fraction) if fraction is not None and float(fraction) >= 0 else None
    kw: dict[str, Any] = dict(mode=mode, need_tumour_flags=True, progress=progress,
                              slice_pattern=str(recipe.get("slice_pattern", "")),
                              skip_bad_subjects=bool(recipe.get("skip_bad_subjects", False)))
    cache, _ = prepare_cache(data, config.channel_set, config.image_size, **kw)
    ids = [entry["id"] for entry in cache.index["subjects"]]
    position = {sid: k for k, sid in enumerate(ids)}
    if train_data is not None:
        train_cache, _ = prepare_cache(train_data, config.channel_set, config.image_size, **kw)
        train_ids = [entry["id"] for entry in train_cache.index["subjects"]]
        heldout_ids = ids
        split = (
            f"training reference: all {len(train_ids)} subjects of {Path(train_data).name}; "
            f"held out: all {len(ids)} subjects of {Path(data).name}"
        )
    else:
        train_cache = cache
        if cache.fingerprint == config.provenance.get("data_fingerprint"):
            train_ids, heldout_ids = split_subjects(
                ids, float(recipe.get("val_fraction", 0.1)), int(recipe.get("seed", 0))
            )
            split = (
                f"the model's own split of {Path(data).name}: {len(train_ids)} training, "
                f"{len(heldout_ids)} validation subjects"
            )
        else:
            train_ids, heldout_ids = split_subjects(ids, 0.5, seed)
            split = (
                f"{Path(data).name} is not the model's training data: split in half by subject "
                f"({len(train_ids)} / {len(heldout_ids)}); memorisation is measured against the first half"
            )
        if not heldout_ids:
            raise ValueError(f"{data} has a single subject: nothing to hold out")
    train_position = {sid: k for k, sid in enumerate(entry["id"] for entry in train_cache.index["subjects"])}
    train_rows = _rows_of(train_cache.slice_subject, [train_position[s] for s in train_ids])
    heldout_rows = _rows_of(cache.slice_subject, [position[s] for s in heldout_ids])
    heldout_rows = _cap(_rebalance(heldout_rows, cache.has_tumour, fraction, seed), max_heldout, seed)
    train_rows = _cap(train_rows, max_train, seed)
    if heldout_rows.size < 4:
        raise ValueError(f"only {heldout_rows.size} held-out slices in {data}: need at least 4")
    return ReferenceSlices(
        train=_load(train_cache, train_rows, config),
        heldout=_load(cache, heldout_rows, config),
        heldout_subject=np.asarray(cache.slice_subject)[np.sort(heldout_rows)],
        train_subjects=len(train_ids),
        heldout_subjects=len(heldout_ids),
        split=split,
        fingerprint=train_cache.fingerprint,
    )

"""build_datasets end to end over phantom folders: namings, ranges, split, cache, research, PNGs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synthmri.channels import DEFAULT_LABEL_LEVELS
from training import preprocess
from training.brats import DataError, find_subjects, load_subject
from training.dataset import SliceDataset, build_datasets, split_subjects
from training.preprocess import SliceParams, research_slices

FIVE = "t1+t1ce+t2+flair+seg"
LEVELS = {float(np.float32(v)) for v in DEFAULT_LABEL_LEVELS.values()}


def _stack(ds: SliceDataset) -> torch.Tensor:
    return torch.stack([ds[i] for i in range(len(ds))])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slice-cache")


@pytest.mark.parametrize("fixture", ["tiny_2020", "tiny_2021", "tiny_2023"])
def test_items_are_model_tensors_in_range(
    fixture: str, request: pytest.FixtureRequest, cache_dir: Path
) -> None:
    root = request.getfixturevalue(fixture)
    train, val, fingerprint = build_datasets(root, FIVE, 32, val_fraction=0.25, seed=0, cache_dir=cache_dir)
    assert len(fingerprint) == 64 and train.fingerprint == fingerprint
    assert len(train) > 0 and len(val) > 0
    x = _stack(train)
    assert x.dtype == torch.float32 and x.shape[1:] == (5, 32, 32)
    assert x.min() == -1 and x.max() <= 1
    assert (x[:, :4, 0, 0] == -1).all()  # background outside the brain is exactly −1
    assert set(torch.unique(x[:, 4]).tolist()) <= LEVELS
    assert (x[:, 4] == 1.0).any()  # enhancing tumour (ET=4, or 3 on disk in 2023) is there


def test_three_namings_give_identical_tensors(tiny_2020: Path, tiny_2021: Path, tiny_2023: Path,
                                             cache_dir: Path) -> None:
    stacks = []
    for root in (tiny_2020, tiny_2021, tiny_2023):
        train, val, _ = build_datasets(root, FIVE, 32, val_fraction=0.0, cache_dir=cache_dir)
        assert len(val) == 0
        stacks.append(_stack(train))
    # same volumes under three layouts: same slices, labels harmonised (2023 ET 3 → 4)
    torch.testing.assert_close(stacks[0], stacks[1], rtol=0, atol=0)
    torch.testing.assert_close(stacks[0], stacks[2], rtol=0, atol=0)


def test_split_is_by_subject_and_deterministic(tiny_2021: Path, cache_dir: Path) -> None:
    train, val, _ = build_datasets(tiny_2021, "t1ce", 32, val_fraction=0.25, seed=3, cache_dir=cache_dir)
    assert len(val.subjects) == 1 and len(train.subjects) == 3
    assert not set(train.subjects) & set(val.subjects)
    assert set(train.subjects) | set(val.subjects) == {s.id for s in find_subjects(tiny_2021)}
    assert {train.subject_of(i) for i in range(len(train))} == set(train.subjects)
    assert {val.subject_of(i) for i in range(len(val))} == set(val.subjects)
    again, _, _ = build_datasets(tiny_2021, "t1ce", 32, val_fraction=0.25, seed=3, cache_dir=cache_dir)
    assert again.subjects == train.subjects
    np.testing.assert_array_equal(again.indices, train.indices)
    splits = {tuple(split_subjects([f"s{i}" for i in range(10)], 0.3, seed)[1]) for seed in range(5)}
    assert len(splits) > 1 and all(len(v) == 3 for v in splits)
    x = train[0]
    assert x.shape == (1, 32, 32)


def test_channel_sets_select_channels(tiny_2020: Path, cache_dir: Path) -> None:
    five, _, _ = build_datasets(tiny_2020, FIVE, 32, val_fraction=0.0, cache_dir=cache_dir)
    two, _, _ = build_datasets(tiny_2020, "t1ce+seg", 32, val_fraction=0.0, cache_dir=cache_dir)
    torch.testing.assert_close(_stack(two), _stack(five)[:, [1, 4]], rtol=0, atol=0)


def test_hflip_flips_left_right(tiny_2020: Path, cache_dir: Path) -> None:
    plain, _, _ = build_datasets(tiny_2020, "t1ce+seg", 32, val_fraction=0.0, cache_dir=cache_dir)
    flip, _, _ = build_datasets(tiny_2020, "t1ce+seg", 32, val_fraction=0.0, cache_dir=cache_dir, hflip=True)
    torch.manual_seed(0)
    flipped = 0
    for i in range(0, len(plain), 3):
        a, b = plain[i], flip[i]
        if torch.equal(a, b):
            continue
        torch.testing.assert_close(b, a.flip(-2), rtol=0, atol=0)  # axis H = volume x = left-right
        flipped += 1
    assert flipped > 0


def test_tumour_fraction_rebalances_training_slices(tiny_2020: Path, cache_dir: Path) -> None:
    train, _, _ = build_datasets(
        tiny_2020, "t1ce+seg", 32, val_fraction=0.25, cache_dir=cache_dir, tumour_fraction=0.9
    )
    has = train.cache.has_tumour[train.indices]
    assert abs(has.mean() - 0.9) < 0.03
    seg = _stack(train)[:, 1]
    assert abs((seg > -1).flatten(1).any(1).float().mean().item() - 0.9) < 0.03


def test_cache_is_reused_and_invalidated(
    tiny_2020: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_2020, root)
    cache = tmp_path / "cache"
    train, _, fp = build_datasets(root, "t1ce+seg", 32, cache_dir=cache)
    assert not train.cache.reused
    first = _stack(train)

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("preprocessed again although the cache is valid")

    monkeypatch.setattr(preprocess, "percentile_slices", boom)
    monkeypatch.setattr("training.dataset.percentile_slices", boom)
    again, _, fp2 = build_datasets(root, "t1ce+seg", 32, cache_dir=cache)
    assert fp2 == fp and again.cache.reused
    torch.testing.assert_close(_stack(again), first, rtol=0, atol=0)
    monkeypatch.undo()

    _, _, fp_size = build_datasets(root, "t1ce+seg", 16, cache_dir=cache)
    _, _, fp_brain = build_datasets(root, "t1ce+seg", 32, cache_dir=cache, min_brain_fraction=0.3)
    path = root / "BraTS20_Training_002" / "BraTS20_Training_002_t2.nii.gz"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed, _, fp_touched = build_datasets(root, "t1ce+seg", 32, cache_dir=cache)
    assert len({fp, fp_size, fp_brain, fp_touched}) == 4
    assert not changed.cache.reused
    assert len(list(cache.iterdir())) == 4  # one entry per distinct fingerprint, no temp leftovers


def test_default_cache_lives_next_to_the_data(tiny_2021: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_2021, root)
    train, _, fp = build_datasets(root, "t1ce", 32)
    assert train.cache.folder == root / ".synthmri-cache" / fp[:16]
    # the cache folder inside the data is not mistaken for a subject
    assert [s.id for s in find_subjects(root)] == [f"BraTS2021_0000{i}" for i in range(4)]


def test_dataset_pickles_without_the_memory_map(tiny_2020: Path, cache_dir: Path) -> None:
    import pickle

    train, _, _ = build_datasets(tiny_2020, "t1ce", 32, cache_dir=cache_dir)
    x = train[0]
    clone = pickle.loads(pickle.dumps(train))
    assert clone._array is None
    torch.testing.assert_close(clone[0], x, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# research mode on a real-size subject, and the prepared-PNG layout


def test_research_mode_numbers_on_a_brats_sized_subject(full_size_2020: Path, tmp_path: Path) -> None:
    train, _, _ = build_datasets(full_size_2020, FIVE, 256, mode="research", val_fraction=0.0,
                                 cache_dir=tmp_path / "c")
    assert train.mode == "research" and train.cache.index["dtype"] == "uint8"
    vols = load_subject(find_subjects(full_size_2020)[0])
    t1_8 = np.pad((vols["t1"] / vols["t1"].max() * 255).astype(np.uint8), ((8, 8), (8, 8), (0, 0)))
    keep = np.flatnonzero((t1_8 > 50).sum((0, 1)) > 0.15 * 256 * 256)
    np.testing.assert_array_equal(train.cache.index["z"], keep)
    assert 60 < len(keep) < 140
    k = len(keep) // 2
    x = train[k].numpy()
    np.testing.assert_allclose(x[0], t1_8[:, :, keep[k]] / 127.5 - 1, atol=1e-7)
    flair_8 = np.pad((vols["flair"] / vols["flair"].max() * 255).astype(np.uint8), ((8, 8), (8, 8), (0, 0)))
    np.testing.assert_allclose(x[3], flair_8[:, :, keep[k]] / 127.5 - 1, atol=1e-7)
    seg = np.pad(vols["seg"], ((8, 8), (8, 8), (0, 0)))[:, :, keep[k]]
    expected = np.vectorize(lambda v: DEFAULT_LABEL_LEVELS[int(v)])(seg).astype(np.float32)
    np.testing.assert_array_equal(x[4], expected)


def test_prepared_png_folders_train_unchanged(full_size_2020: Path, tmp_path: Path) -> None:
    """PNGs written the research way read back to the same tensors as research mode on the NIfTIs."""
    volumes = load_subject(find_subjects(full_size_2020)[0])
    channels = ("t1", "t1ce", "t2", "flair", "seg")
    stored = research_slices(volumes, SliceParams(channels, 256, mode="research"))
    root = tmp_path / "png"
    folders = {"t1": "T1", "t1ce": "T1CE", "t2": "T2", "flair": "FLAIR", "seg": "Seg"}
    for c, name in enumerate(channels):
        (root / folders[name]).mkdir(parents=True)
        for row, z in enumerate(stored.z):
            Image.fromarray(stored.data[row, c]).save(root / folders[name] / f"BraTS20_Training_001_{z}.png")
    png_train, _, _ = build_datasets(root, FIVE, 256, val_fraction=0.0, cache_dir=tmp_path / "c1")
    assert png_train.mode == "research"  # PNGs are research slices whatever mode was asked
    nii_train, _, _ = build_datasets(full_size_2020, FIVE, 256, mode="research", val_fraction=0.0,
                                     cache_dir=tmp_path / "c2")
    assert len(png_train) == len(nii_train) == len(stored.z)
    for i in (0, len(png_train) // 2, len(png_train) - 1):
        torch.testing.assert_close(png_train[i], nii_train[i], rtol=0, atol=0)
    small, _, _ = build_datasets(root, "t1ce+seg", 64, val_fraction=0.0, cache_dir=tmp_path / "c1")
    y = small[len(small) // 2]
    assert y.shape == (2, 64, 64) and set(torch.unique(y[1]).tolist()) <= LEVELS


def test_build_datasets_reports_bad_data_in_one_line(tiny_2020: Path, tmp_path: Path) -> None:
    root = tmp_path / "d"
    shutil.copytree(tiny_2020, root)
    (root / "BraTS20_Training_003" / "BraTS20_Training_003_t1ce.nii.gz").unlink()
    with pytest.raises(DataError, match=r"^BraTS20_Training_003: missing t1ce \(expected "
                       r"BraTS20_Training_003_t1ce.nii.gz in .*BraTS20_Training_003\)$"):
        build_datasets(root, "t1ce", 32, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="unknown channel set"):
        build_datasets(tiny_2020, "t3", 32, cache_dir=tmp_path / "c")


def test_prepare_cli(tiny_2023: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from synthmri.cli import main

    args = ["prepare", "--data", str(tiny_2023), "--channels", "t1ce+seg", "--size", "32",
            "--cache", str(tmp_path / "c")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "4 subjects (3 train / 1 val)" in out and "cache built" in out
    assert main(args) == 0
    assert "cache reused" in capsys.readouterr().out
    assert main(["prepare", "--data", str(tmp_path / "none"), "--channels", "t1ce", "--size", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("synthmri prepare: error: data folder") and "\n" not in err

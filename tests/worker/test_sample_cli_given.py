"""`synthmri sample --given`: the local run keeps a given mask exactly, records and keeps its file, and
refuses bad files with the service's own one-line reasons."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from synthmri.cli import main
from tests.given_files import nifti, png, tumour

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_sample_keeps_a_given_mask(tiny_checkpoint_readonly: Path, tmp_path: Path) -> None:
    mask = tmp_path / "mask.png"
    mask.write_bytes(png(tumour()))
    out = tmp_path / "out"
    argv = ["sample", "--model", str(tiny_checkpoint_readonly), "--count", "2", "--seed", "1", "--sampler",
            "dpm++sde", "--steps", "4", "--given", f"seg={mask}", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    for i in range(2):
        seg = np.asarray(nib.load(out / f"sample_{i:04d}_seg.nii.gz").dataobj)[:, :, 0]
        np.testing.assert_array_equal(seg, tumour())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["given"]["guidance"] == 16.0
    (entry,) = manifest["given"]["inputs"]
    assert entry["sha256"] == hashlib.sha256(mask.read_bytes()).hexdigest()
    assert entry["file"] == "inputs/seg_all.png"
    assert manifest["precision"] in ("bf16", "fp32")
    with zipfile.ZipFile(out / "sample.zip") as zf:
        assert zf.read("inputs/seg_all.png") == mask.read_bytes()


@pytest.mark.parametrize(
    ("given", "needle"),
    [
        (nifti(np.zeros((64, 64), dtype=np.uint8)), "has 64×64 slices but the model works on 32×32"),
        (nifti(np.full((32, 32), 3, dtype=np.uint8)), "map 3 → 4"),
    ],
)
def test_sample_refuses_bad_given_files_in_one_line(
    tiny_checkpoint_readonly: Path, tmp_path: Path, capsys: Any, given: bytes, needle: str
) -> None:
    path = tmp_path / "mask.nii.gz"
    path.write_bytes(given)
    argv = ["sample", "--model", str(tiny_checkpoint_readonly), "--count", "1", "--seed", "1",
            "--given", f"seg={path}", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()

"""Known channels over the real stack: multipart upload → Redis → Celery worker → files, through the
Python client and `synthmri generate`; the given mask is read back from the output NIfTIs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from synthmri.client import Client
from tests.given_files import nifti, tumour
from tests.integration.conftest import API_KEY, Api

pytestmark = pytest.mark.integration

FAST: dict[str, Any] = {"channels": "t1ce+seg", "sampler": "dpm++sde", "steps": 4}


def read(directory: Path, job_id: str, i: int, channel: str) -> np.ndarray:
    return np.asarray(nib.load(directory / f"{job_id}_{i:04d}_{channel}.nii.gz").dataobj)[:, :, 0]


def test_a_given_mask_comes_back_exactly_and_shapes_the_images(stack: Any, api: Api, tmp_path: Path) -> None:
    mask_file = tmp_path / "mask.nii.gz"
    mask_file.write_bytes(nifti(tumour()))
    with Client(stack.url, API_KEY) as client:
        job = client.submit(**FAST, count=2, seed=5, given={"seg": mask_file})
        assert (job["given"], job["guidance"]) == (["seg"], 16.0)
        job = client.wait(job["id"], timeout=180)
        assert job["state"] == "succeeded", job
        client.download_all(job["id"], tmp_path / "given")
    plain = api.run(**FAST, count=2, seed=5)
    with Client(stack.url, API_KEY) as client:
        client.download_all(plain["id"], tmp_path / "plain")
    for i in range(2):
        seg = read(tmp_path / "given", job["id"], i, "seg")
        assert seg.dtype == np.uint8
        np.testing.assert_array_equal(seg, tumour())
        conditioned = read(tmp_path / "given", job["id"], i, "t1ce")
        assert np.abs(conditioned - read(tmp_path / "plain", plain["id"], i, "t1ce")).max() > 1e-3
    manifest = json.loads((tmp_path / "given" / "manifest.json").read_text())
    (entry,) = manifest["given"]["inputs"]
    assert entry["sha256"] == hashlib.sha256(mask_file.read_bytes()).hexdigest()
    assert (entry["file"], entry["samples"], entry["applies"]) == ("inputs/seg_all.nii.gz", [0, 1], "all")
    assert (tmp_path / "given" / "inputs" / "seg_all.nii.gz").read_bytes() == mask_file.read_bytes()


def test_generate_cli_sends_given_files(stack: Any, tmp_path: Path, capsys: Any) -> None:
    from synthmri.cli import main

    masks = []
    for k in range(2):
        masks.append(tmp_path / f"mask{k}.nii.gz")
        masks[-1].write_bytes(nifti(tumour(shift=2 * k)))
    out = tmp_path / "out"
    argv = ["generate", "--url", stack.url, "--api-key", API_KEY, "--channels", "t1ce+seg", "--count", "2",
            "--seed", "3", "--steps", "3", "--given", f"seg={masks[0]}", "--given", f"seg={masks[1]}",
            "--guidance", "0", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["given"]["guidance"] == 0.0
    for k in range(2):
        np.testing.assert_array_equal(read(out, manifest["job_id"], k, "seg"), tumour(shift=2 * k))
    bad = tmp_path / "big.nii.gz"
    bad.write_bytes(nifti(np.zeros((64, 64), dtype=np.uint8)))
    argv = ["generate", "--url", stack.url, "--api-key", API_KEY, "--channels", "t1ce+seg", "--count", "1",
            "--given", f"seg={bad}", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "422" in err[0] and "32×32" in err[0]

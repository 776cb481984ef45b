"""A job's nnU-Net dataset over the real stack: submitted with "nnunet" in formats, written by the
worker at finalisation, downloaded through the API and the client, read by nnU-Net itself."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from synthmri.localstack import LocalStack
from tests.integration.conftest import API_KEY, Api
from tests.integration.test_service import FAST, archive_arrays
from tests.test_export_nnunet import expected_labels, nii, nnunet_environment, verify_with_nnunet

pytestmark = pytest.mark.integration

NNUNET_FORMATS = ["nifti", "png", "nnunet"]


def problem(r: Any, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    return str(r.json()["detail"])


def test_nnunet_zip_is_the_jobs_samples_as_a_dataset_nnunet_accepts(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    job = api.run(**FAST, count=3, seed=31, formats=NNUNET_FORMATS)
    assert job["formats"] == NNUNET_FORMATS
    assert job["links"]["nnunet"].endswith(f"/v1/jobs/{job['id']}/nnunet.zip")
    r = api.http.get(f"/v1/jobs/{job['id']}/nnunet.zip")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert f"synthmri_{job['id']}_nnunet.zip" in r.headers["content-disposition"]

    raw = tmp_path / "nnUNet_raw_download"
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        assert {n.split("/")[0] for n in zf.namelist()} == {"Dataset501_SynthMRI"}
        zf.extractall(raw)
    ds = raw / "Dataset501_SynthMRI"
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1ce"} and meta["numTraining"] == 3
    assert meta["regions_class_order"] == [1, 2, 3]
    record = json.loads((ds / "synthmri_export.json").read_text())
    assert record["jobs"][0]["source"] == job["id"] and record["jobs"][0]["seed"] == 31
    assert str(api.stack.results_dir) not in json.dumps(record)  # no server path reaches the client

    # Every voxel and label is the job's own sample, as its archive.zip holds it.
    arrays, zf = archive_arrays(api, job["id"])
    assert "nnunet.zip" not in zf.namelist()  # the archive does not repeat the dataset
    for i in range(3):
        t1ce, source = arrays[f"{job['id']}_{i:04d}_t1ce.nii.gz"]
        seg, _ = arrays[f"{job['id']}_{i:04d}_seg.nii.gz"]
        image = nii(ds / "imagesTr" / f"synth_000_{i:04d}_0000.nii.gz")
        label = nii(ds / "labelsTr" / f"synth_000_{i:04d}.nii.gz")
        assert image.get_data_dtype() == np.float32 and image.shape == (32, 32, 1)
        np.testing.assert_array_equal(np.asarray(image.dataobj), t1ce)
        np.testing.assert_array_equal(image.affine, source.affine)
        np.testing.assert_array_equal(np.asarray(label.dataobj), expected_labels(seg))
        assert label.get_data_dtype() == np.uint8
    assert sorted(p.name for p in (ds / "imagesTr").iterdir()) == [f"synth_000_{i:04d}_0000.nii.gz"
                                                                   for i in range(3)]  # fmt: skip

    nnunet_environment(tmp_path, monkeypatch)
    verify_with_nnunet(ds, capfd)

    # The client's helper unpacks the same dataset.
    from synthmri.client import Client

    with Client(api.stack.url, API_KEY) as client:
        got = client.download_nnunet(job["id"], tmp_path / "client")
    assert got == tmp_path / "client" / "Dataset501_SynthMRI"
    assert sorted(p.name for p in got.rglob("*")) == sorted(p.name for p in ds.rglob("*"))
    assert not list((tmp_path / "client").glob("*.zip"))


def test_jobs_that_cannot_be_or_did_not_ask_for_a_dataset_are_told_why(api: Api) -> None:
    r = api.http.post("/v1/jobs", json={**FAST, "channels": "t1ce", "count": 1, "formats": NNUNET_FORMATS})
    detail = problem(r, 422)
    assert "no seg channel (channels t1ce): an nnU-Net dataset needs labels" in detail
    r = api.http.post("/v1/jobs", json={**FAST, "count": 1, "formats": ["png", "nnunet"]})
    assert 'add "nifti" to formats' in problem(r, 422)

    no_seg = api.run(**{**FAST, "channels": "t1ce"}, count=1, seed=2)
    assert "nnunet" not in no_seg["links"]
    detail = problem(api.http.get(f"/v1/jobs/{no_seg['id']}/nnunet.zip"), 409)
    assert f"job {no_seg['id']} cannot be an nnU-Net dataset: no seg channel (channels t1ce)" in detail

    plain = api.run(**FAST, count=1, seed=2)
    assert "nnunet" not in plain["links"]
    detail = problem(api.http.get(f"/v1/jobs/{plain['id']}/nnunet.zip"), 409)
    assert "did not request the nnunet format (formats: nifti, png)" in detail


def test_generate_nnunet_downloads_the_dataset(stack: LocalStack, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from synthmri.cli import main

    out = tmp_path / "out"
    argv = ["generate", "--url", stack.url, "--api-key", API_KEY, "--channels", "t1ce+seg", "--count", "2",
            "--seed", "4", "--steps", "3", "--formats", "png", "--nnunet", "--out", str(out),
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert f"nnU-Net dataset: {out / 'Dataset501_SynthMRI'}" in capsys.readouterr().out
    meta = json.loads((out / "Dataset501_SynthMRI" / "dataset.json").read_text())
    assert meta["numTraining"] == 2
    assert json.loads((out / "manifest.json").read_text())["formats"] == NNUNET_FORMATS
    assert len(list(out.glob("*_seg.nii.gz"))) == 2  # --nnunet added nifti to --formats png

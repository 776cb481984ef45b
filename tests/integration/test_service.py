"""The service over the real stack: HTTP → Redis → Celery worker process → files → HTTP."""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import Api

pytestmark = pytest.mark.integration

FAST: dict[str, Any] = {"channels": "t1ce+seg", "sampler": "dpm++", "steps": 4}
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def nifti_from_bytes(data: bytes) -> Any:
    return nib.Nifti1Image.from_bytes(__import__("gzip").decompress(data))


def archive_arrays(api: Api, job_id: str) -> tuple[dict[str, np.ndarray], zipfile.ZipFile]:
    """{member name: array} of every NIfTI in the job's archive.zip."""
    r = api.http.get(f"/v1/jobs/{job_id}/archive.zip")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    zf = zipfile.ZipFile(io.BytesIO(r.content))
    arrays = {}
    for name in zf.namelist():
        if name.endswith(".nii.gz"):
            img = nifti_from_bytes(zf.read(name))
            arrays[name] = (np.asarray(img.dataobj), img)
    return arrays, zf  # type: ignore[return-value]


def test_job_end_to_end_outputs(api: Api, stack: Any) -> None:
    models = api.http.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["tiny"]
    r = api.http.post("/v1/jobs", json={**FAST, "count": 3, "seed": 11, "formats": ["nifti", "png", "npz"]})
    assert r.status_code == 202, r.text
    created = r.json()
    assert r.headers["location"] == f"/v1/jobs/{created['id']}"
    # A free worker may pick the job up before the API reads it back.
    assert created["state"] in ("queued", "running") and created["seed"] == 11 and created["steps"] == 4
    job = api.wait(created["id"])
    assert job["state"] == "succeeded", job
    assert job["progress"] == {"samples_done": 3, "samples_total": 3, "fraction": 1.0}
    assert job["timings"]["finished_at"] >= job["timings"]["started_at"] >= job["timings"]["created_at"]

    arrays, zf = archive_arrays(api, job["id"])
    expected = {f"{job['id']}_{i:04d}_{c}.nii.gz" for i in range(3) for c in ("t1ce", "seg")}
    assert set(arrays) == expected
    for name, (data, img) in arrays.items():
        assert data.shape == (32, 32, 1)
        assert np.allclose(img.affine, AFFINE)
        assert img.header.get_zooms() == (1.0, 1.0, 1.0)
        if name.endswith("_seg.nii.gz"):
            assert data.dtype == np.uint8
            assert set(np.unique(data)) <= {0, 1, 2, 4}
        else:
            assert data.dtype == np.float32
            assert data.min() >= 0.0 and data.max() <= 1.0 and data.std() > 0.01  # noise, not blank

    manifest = json.loads(zf.read("manifest.json"))
    assert manifest["sha256"] == models[0]["sha256"]
    assert (manifest["seed"], manifest["sampler"], manifest["steps"], manifest["count"]) == (
        11,
        "dpm++",
        4,
        3,
    )
    assert set(manifest["files"]) | {"manifest.json"} == set(zf.namelist())
    timings = manifest["timings"]
    assert timings["run_seconds"] > 0
    # The network's share of the run, summed over the job's ranges.
    assert 0 < timings["sampling_seconds"] < timings["run_seconds"]

    # The research layout npz holds the same samples as the NIfTIs.
    npz = np.load(io.BytesIO(zf.read("samples.npz")))["arr_0"]
    assert npz.shape == (3, 32, 32, 2) and npz.dtype == np.uint8
    t1ce0 = arrays[f"{job['id']}_0000_t1ce.nii.gz"][0][:, :, 0]
    assert np.abs(npz[0, :, :, 0].astype(float) - t1ce0 * 255).max() <= 1.0

    # The grid is exactly the writer's rendering of these samples: 3 rows × 2 channel columns.
    from synthmri.outputs.writers import render_grid

    samples = [
        {c: arrays[f"{job['id']}_{i:04d}_{c}.nii.gz"][0][:, :, 0] for c in ("t1ce", "seg")} for i in range(3)
    ]
    expected_grid, layout = render_grid(samples, ["t1ce", "seg"], row_labels=["0000", "0001", "0002"])
    assert (layout.rows, layout.cols) == (3, 2)
    grid = Image.open(io.BytesIO(api.http.get(f"/v1/jobs/{job['id']}/grid.png").content))
    assert grid.size == expected_grid.size == (layout.width, layout.height)
    assert np.array_equal(np.asarray(grid.convert("RGB")), np.asarray(expected_grid))

    # Single files: the same bytes as in the archive; PNGs of the right size.
    one = api.http.get(f"/v1/jobs/{job['id']}/samples/2/seg.nii.gz")
    assert one.status_code == 200 and one.content == zf.read(f"{job['id']}_0002_seg.nii.gz")
    png = api.http.get(f"/v1/jobs/{job['id']}/samples/1/t1ce.png")
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size[0] >= 32
    assert api.http.get(f"/v1/jobs/{job['id']}/manifest.json").json()["job_id"] == job["id"]


def test_same_request_same_images_and_count_independence(api: Api) -> None:
    a = api.run(**FAST, count=3, seed=5)
    b = api.run(**FAST, count=3, seed=5)
    c = api.run(**FAST, count=6, seed=5)
    arr_a, _ = archive_arrays(api, a["id"])
    arr_b, _ = archive_arrays(api, b["id"])
    arr_c, _ = archive_arrays(api, c["id"])

    def sample(arrs: dict[str, Any], job: dict[str, Any], i: int, ch: str) -> np.ndarray:
        return np.asarray(arrs[f"{job['id']}_{i:04d}_{ch}.nii.gz"][0], dtype=np.float64)

    for i in range(3):
        for ch in ("t1ce", "seg"):
            assert np.array_equal(sample(arr_a, a, i, ch), sample(arr_b, b, i, ch))
    # Task batches are 2 samples: sample 2 is alone in count 3 but batched with 3 in count 6.
    assert np.abs(sample(arr_a, a, 2, "t1ce") - sample(arr_c, c, 2, "t1ce")).max() <= 1e-3
    assert np.array_equal(sample(arr_a, a, 2, "seg"), sample(arr_c, c, 2, "seg"))
    # A different seed is a different image.
    assert np.abs(sample(arr_a, a, 0, "t1ce") - sample(arr_c, c, 1, "t1ce")).max() > 0.01


def test_channel_subset_from_a_superset_model(api: Api) -> None:
    job = api.run(channels="t1ce", count=1, seed=3, steps=3)
    assert job["model"] == "tiny" and job["channels"] == ["t1ce"]
    arrays, _ = archive_arrays(api, job["id"])
    assert list(arrays) == [f"{job['id']}_0000_t1ce.nii.gz"]
    r = api.http.get(f"/v1/jobs/{job['id']}/samples/0/seg.nii.gz")
    assert r.status_code == 404 and "t1ce" in r.json()["detail"]


def test_cancel_running_job_then_worker_serves_next(api: Api, results_dir: Path) -> None:
    job = api.submit(channels="t1ce+seg", count=2, seed=1, sampler="ddpm", steps=1000)
    deadline = time.monotonic() + 60
    while True:
        cur = api.http.get(f"/v1/jobs/{job['id']}").json()
        if cur["state"] == "running" and cur["progress"]["fraction"] > 0:
            break
        assert time.monotonic() < deadline, cur
        time.sleep(0.1)
    r = api.http.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"] is True
    done = api.wait(job["id"], timeout=60)
    assert done["state"] == "cancelled"
    assert done["progress"]["fraction"] < 0.5  # stopped mid-way, not run to the end
    assert not (results_dir / job["id"]).exists()
    assert api.http.get(f"/v1/jobs/{job['id']}/archive.zip").status_code == 409
    assert api.run(**FAST, count=1, seed=2)["state"] == "succeeded"


def test_cancel_queued_job_never_runs(api: Api, results_dir: Path) -> None:
    blocker = api.submit(channels="t1ce+seg", count=2, seed=1, sampler="ddpm", steps=300)
    queued = api.submit(**FAST, count=2, seed=9)
    r = api.http.post(f"/v1/jobs/{queued['id']}/cancel")
    assert r.status_code == 202 and r.json()["state"] == "cancelled"
    api.http.post(f"/v1/jobs/{blocker['id']}/cancel")
    assert api.wait(blocker["id"])["state"] == "cancelled"
    api.run(**FAST, count=1, seed=4)  # the worker has passed the cancelled job's tasks
    assert api.http.get(f"/v1/jobs/{queued['id']}").json()["timings"]["started_at"] is None
    assert not (results_dir / queued["id"]).exists()


def test_delete_forgets_a_job_and_its_files(api: Api, results_dir: Path) -> None:
    done = api.run(**FAST, count=1, seed=13)
    assert (results_dir / done["id"] / "archive.zip").is_file()
    running = api.submit(channels="t1ce+seg", count=2, seed=1, sampler="ddpm", steps=1000)
    r = api.http.delete(f"/v1/jobs/{done['id']}")
    assert r.status_code == 202 and r.json()["state"] == "succeeded"
    assert not (results_dir / done["id"]).exists()
    r = api.http.delete(f"/v1/jobs/{running['id']}")
    assert r.status_code == 202 and r.json()["state"] == "cancelled"
    for job_id in (done["id"], running["id"]):
        gone = api.http.get(f"/v1/jobs/{job_id}")
        assert gone.status_code == 404 and gone.headers["content-type"] == "application/problem+json"
        assert api.http.delete(f"/v1/jobs/{job_id}").status_code == 404
    assert not {done["id"], running["id"]} & {j["id"] for j in api.http.get("/v1/jobs").json()["jobs"]}
    assert api.run(**FAST, count=1, seed=14)["state"] == "succeeded"  # the worker moved on
    deadline = time.monotonic() + 30
    while (results_dir / running["id"]).exists():  # the stopped task removes what it wrote
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_keys_and_visibility(api: Api, other_api: Api, anon_api: Api) -> None:
    job = api.run(**FAST, count=1, seed=8)
    for path in ("", "/grid.png", "/archive.zip", "/manifest.json", "/samples/0/t1ce.png"):
        r = other_api.http.get(f"/v1/jobs/{job['id']}{path}")
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json", path
        r = anon_api.http.get(f"/v1/jobs/{job['id']}{path}")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
    assert other_api.http.delete(f"/v1/jobs/{job['id']}").status_code == 404
    assert other_api.http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
    assert job["id"] not in [j["id"] for j in other_api.http.get("/v1/jobs").json()["jobs"]]
    assert job["id"] in [j["id"] for j in api.http.get("/v1/jobs").json()["jobs"]]
    bad = Api(api.stack, "not-a-key").http.get("/v1/jobs")
    assert bad.status_code == 401 and "not recognised" in bad.json()["detail"]
    assert anon_api.http.post("/v1/jobs", json={**FAST, "count": 1}).status_code == 401


BAD_BODIES: list[Any] = [
    {**FAST, "count": 0},
    {**FAST, "count": 10**9},
    {**FAST, "count": "three"},
    {**FAST, "count": 1, "channels": "t2+seg"},
    {**FAST, "count": 1, "channels": ["t1ce"]},
    {"count": 1},
    {"channels": "t1ce+seg"},
    {**FAST, "count": 1, "seed": -1},
    {**FAST, "count": 1, "seed": "x"},
    {**FAST, "count": 1, "sampler": "euler"},
    {**FAST, "count": 1, "steps": 0},
    {**FAST, "count": 1, "steps": 5000},
    {**FAST, "count": 1, "formats": ["jpeg"]},
    {**FAST, "count": 1, "formats": []},
    {**FAST, "count": 1, "colour": "red"},
    {"model": "nope", "count": 1},
    [1, 2, 3],
    "text",
    None,
]


@pytest.mark.parametrize("body", BAD_BODIES, ids=[str(i) for i in range(len(BAD_BODIES))])
def test_invalid_bodies_are_problem_json_4xx(api: Api, body: Any) -> None:
    r = api.http.post("/v1/jobs", json=body)
    assert 400 <= r.status_code < 500, r.text
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["status"] == r.status_code and problem["instance"] == "/v1/jobs"
    assert isinstance(problem["detail"], str) and len(problem["detail"]) > 10 and problem["title"]


def test_malformed_json_and_path_params(api: Api) -> None:
    r = api.http.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    job = api.run(**FAST, count=1, seed=6)
    for path, status in [
        (f"/v1/jobs/{job['id']}/samples/1/t1ce.png", 404),
        (f"/v1/jobs/{job['id']}/samples/-1/t1ce.png", 422),
        (f"/v1/jobs/{job['id']}/samples/0/flair.nii.gz", 404),
        (f"/v1/jobs/{job['id']}/samples/0/..%2F..%2Fmanifest.png", 404),
        (f"/v1/jobs/{job['id']}/samples/x/t1ce.png", 422),
        ("/v1/jobs/..%2F..%2Fetc/grid.png", 404),
        ("/v1/jobs/0123456789abcdef", 404),
        ("/v1/nothing", 404),
    ]:
        r = api.http.get(path)
        assert r.status_code == status, (path, r.text)
        assert r.headers["content-type"] == "application/problem+json", path
    assert api.http.put("/v1/jobs").status_code == 405


def test_health_ready_metrics_openapi(api: Api, anon_api: Api) -> None:
    assert anon_api.http.get("/healthz").json() == {"status": "ok"}
    ready = anon_api.http.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["workers"] >= 1 and ready.json()["checks"]["models"] == ["tiny"]
    api.run(**FAST, count=2, seed=12)
    metrics = anon_api.http.get("/metrics").text
    samples = [line for line in metrics.splitlines() if line.startswith("synthmri_samples_generated_total")]
    assert samples and float(samples[0].split()[-1]) >= 2
    assert 'synthmri_jobs{state="succeeded"}' in metrics
    assert "synthmri_job_latency_seconds_count" in metrics and "synthmri_queue_depth" in metrics
    paths = anon_api.http.get("/openapi.json").json()["paths"]
    for path, method in [
        ("/v1/jobs", "post"),
        ("/v1/jobs", "get"),
        ("/v1/jobs/{job_id}", "get"),
        ("/v1/jobs/{job_id}", "delete"),
        ("/v1/jobs/{job_id}/grid.png", "get"),
        ("/v1/jobs/{job_id}/manifest.json", "get"),
        ("/v1/jobs/{job_id}/archive.zip", "get"),
        ("/v1/jobs/{job_id}/samples/{index}/{channel}.nii.gz", "get"),
        ("/v1/jobs/{job_id}/samples/{index}/{channel}.png", "get"),
        ("/v1/models", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ]:
        assert method in paths.get(path, {}), (path, method)
    assert anon_api.http.get("/docs").status_code == 200


def test_active_job_limit_is_429(api: Api) -> None:
    jobs = [api.submit(channels="t1ce+seg", count=2, seed=i, sampler="ddpm", steps=1000) for i in range(3)]
    try:
        r = api.http.post("/v1/jobs", json={**FAST, "count": 1})
        assert r.status_code == 429 and r.headers["content-type"] == "application/problem+json"
        assert "limit 3" in r.json()["detail"] and r.headers["retry-after"]
    finally:
        for j in jobs:
            api.http.post(f"/v1/jobs/{j['id']}/cancel")
        for j in jobs:
            assert api.wait(j["id"])["state"] == "cancelled"


@pytest.mark.slow
def test_killed_worker_task_is_redelivered(api: Api, stack: Any) -> None:
    """SIGKILL the worker mid-task; a new worker gets the task after the visibility timeout."""
    job = api.submit(channels="t1ce+seg", count=2, seed=21, sampler="ddim", steps=60)
    deadline = time.monotonic() + 60
    while api.http.get(f"/v1/jobs/{job['id']}").json()["progress"]["fraction"] <= 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    while stack.workers:
        stack.kill_worker(0)
    killed_at = time.monotonic()
    stack.start_worker()
    done = api.wait(job["id"], timeout=120)
    assert done["state"] == "succeeded", done
    assert time.monotonic() - killed_at < 75
    fresh = api.run(channels="t1ce+seg", count=2, seed=21, sampler="ddim", steps=60)
    a, _ = archive_arrays(api, job["id"])
    b, _ = archive_arrays(api, fresh["id"])
    for i in range(2):
        x = a[f"{job['id']}_{i:04d}_t1ce.nii.gz"][0]
        y = b[f"{fresh['id']}_{i:04d}_t1ce.nii.gz"][0]
        assert np.array_equal(x, y)  # same batch composition on the same device: bit-identical


def test_generate_cli_submits_and_downloads(stack: Any, tmp_path: Path, capsys: Any) -> None:
    from synthmri.cli import main
    from tests.integration.conftest import API_KEY

    out = tmp_path / "out"
    base = ["generate", "--url", stack.url, "--count", "2", "--seed", "3", "--channels", "t1ce+seg"]
    rc = main([*base, "--api-key", API_KEY, "--steps", "3", "--out", str(out), "--quiet"])
    assert rc == 0
    niftis = sorted(p.name for p in out.glob("*.nii.gz"))
    assert len(niftis) == 4 and niftis[0].endswith("_0000_seg.nii.gz")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["steps"] == 3
    assert main([*base, "--api-key", "wrong", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "401" in err[0] and "not recognised" in err[0]


def test_the_worker_gives_the_api_the_cpu_first(stack: Any) -> None:
    """`synthmri up` runs the API and a CPU worker on the same cores: the worker starts niced."""
    assert stack.api is not None and stack.workers
    assert os.getpriority(os.PRIO_PROCESS, stack.api.proc.pid) == 0
    assert [os.getpriority(os.PRIO_PROCESS, w.proc.pid) for w in stack.workers] == [10] * len(stack.workers)
    autogroup = Path(f"/proc/{stack.workers[0].proc.pid}/autogroup")
    if autogroup.exists():  # "/autogroup-N nice 10" where the kernel groups by session
        assert autogroup.read_text().split()[-1] == "10"

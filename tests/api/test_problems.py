"""The API's error answers, with a real Redis and no worker (tasks just wait in the queue)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from synthmri.contract import QUEUE, JobState
from synthmri.jobstore import JobStore
from synthmri.outputs.layout import GRID, JOB_ARCHIVE, MANIFEST, sample_files
from synthmri.settings import Settings
from tests.api.conftest import write_model

KEY = "unit-key"
OTHER_KEY = "other-unit-key"


@pytest.fixture
def client(tmp_path: Path, redis_url: str, store: JobStore) -> Iterator[TestClient]:
    write_model(tmp_path / "models", "tiny", "t1ce+seg")
    settings = Settings(redis_url=redis_url, models_dir=tmp_path / "models", results_dir=tmp_path / "results",
                        api_keys=f"{KEY},{OTHER_KEY}", max_count=8, max_active_jobs_per_key=2)  # type: ignore[arg-type]  # fmt: skip
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def assert_problem(r: object, status: int, needle: str) -> None:
    assert r.status_code == status, r.text  # type: ignore[attr-defined]
    assert r.headers["content-type"] == "application/problem+json"  # type: ignore[attr-defined]
    body = r.json()  # type: ignore[attr-defined]
    assert set(body) >= {"type", "title", "status", "detail", "instance"} and body["status"] == status
    assert needle in body["detail"], body["detail"]


def test_submit_enqueues_one_task_per_range(client: TestClient, store: JobStore) -> None:
    r = client.post("/v1/jobs", json={"channels": "t1ce", "count": 5})
    assert r.status_code == 202
    job = r.json()
    assert job["channels"] == ["t1ce"] and job["model"] == "tiny" and 0 <= job["seed"] < 2**63
    assert store.r.llen(QUEUE) == 1  # 5 samples, task_batch_size 8 → one range
    spec = store.get(job["id"]).spec  # type: ignore[union-attr]
    assert spec.request == {"channels": "t1ce", "count": 5, "formats": ["nifti", "png"]}  # as sent
    assert (job["sampler"], job["steps"]) == ("dpm++", 20)  # no model card: the fast default


def test_error_answers(client: TestClient) -> None:
    assert_problem(client.post("/v1/jobs", json={"channels": "t1ce", "count": 9}), 422, "limit of 8")
    assert_problem(client.post("/v1/jobs", json={"channels": "t1ce", "count": 0}), 422, "count:")
    assert_problem(client.post("/v1/jobs", json={"channels": "t1+t1ce+t2+flair+seg", "count": 1}), 422,
                   "no available model generates")  # fmt: skip
    assert_problem(client.post("/v1/jobs", json={"model": "tiny", "count": 1, "steps": 2000}), 422, "1000")
    assert_problem(
        client.post("/v1/jobs", json={"channels": "t1ce", "count": 1, "x": 1}), 422, "x: unknown field"
    )
    assert_problem(
        client.post("/v1/jobs", content=b"[", headers={"content-type": "application/json"}), 422, "JSON"
    )
    assert_problem(client.post("/v1/jobs"), 422, "JSON body")
    assert_problem(client.get("/v1/jobs/0123456789abcdef"), 404, "no job")
    assert_problem(client.get("/nowhere"), 404, "/docs")
    assert_problem(client.patch("/v1/jobs"), 405, "PATCH")
    assert_problem(client.get("/v1/jobs", headers={"Authorization": ""}), 401, "Authorization: Bearer")
    assert_problem(client.get("/v1/jobs", headers={"Authorization": "Bearer nope"}), 401, "not recognised")


def test_active_limit_and_results_before_success(client: TestClient) -> None:
    ids = [client.post("/v1/jobs", json={"channels": "t1ce", "count": 1}).json()["id"] for _ in range(2)]
    r = client.post("/v1/jobs", json={"channels": "t1ce", "count": 1})
    assert_problem(r, 429, "limit 2")
    assert r.headers["retry-after"]
    assert_problem(client.get(f"/v1/jobs/{ids[0]}/archive.zip"), 409, "queued")
    cancelled = client.delete(f"/v1/jobs/{ids[0]}").json()
    assert cancelled["state"] == "cancelled"
    assert client.post("/v1/jobs", json={"channels": "t1ce", "count": 1}).status_code == 202


def test_readyz_names_what_is_missing(client: TestClient) -> None:
    assert_problem(client.get("/readyz"), 503, "no worker")
    assert client.get("/healthz").json() == {"status": "ok"}
    assert "synthmri_queue_depth" in client.get("/metrics").text


def test_index_page_or_a_clear_404(client: TestClient) -> None:
    r = client.get("/")
    if (Path(__file__).parents[2] / "api" / "static" / "index.html").exists():
        assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    else:
        assert_problem(r, 404, "web page")
    assert_problem(client.get("/static/does-not-exist.js"), 404, "")


def test_readyz_reports_an_unwritable_results_dir(tmp_path: Path, redis_url: str, store: JobStore) -> None:
    """Workers write job files there; the check writes a probe file, so it needs no permissions
    model (the tests may run as root): here the directory cannot exist, a file is in its way."""
    write_model(tmp_path / "models", "tiny", "t1ce+seg")
    (tmp_path / "blocked").write_text("a file where a directory should be")
    store.heartbeat("w@h", {"hostname": "w@h", "models": []}, ttl_seconds=30)
    for results, ready in ((tmp_path / "blocked" / "results", False), (tmp_path / "results", True)):
        settings = Settings(redis_url=redis_url, models_dir=tmp_path / "models", results_dir=results,
                            api_keys=KEY)  # type: ignore[arg-type]  # fmt: skip
        with TestClient(create_app(settings)) as c:
            r = c.get("/readyz")
        if ready:
            assert r.status_code == 200 and r.json()["checks"]["results_dir"] == "writable", r.text
            assert not any(p.name.startswith(".readyz-") for p in results.iterdir())  # the probe is removed
        else:
            assert_problem(r, 503, "the results directory is not writable (Not a directory)")
            assert str(tmp_path) not in r.text


JOB_ROUTES = ("", "/cancel", "/grid.png", "/manifest.json", "/archive.zip", "/samples/0/t1ce.nii.gz",
              "/samples/0/t1ce.png")  # fmt: skip


def test_job_routes_answer_only_the_owning_key(client: TestClient, store: JobStore) -> None:
    """Another key's job is 404 on every job route (as if it did not exist), and a caller
    without a key hears 401 before anything about the job."""
    job_id = client.post("/v1/jobs", json={"channels": "t1ce", "count": 1}).json()["id"]
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    for route in JOB_ROUTES:
        method = client.post if route == "/cancel" else client.get
        assert_problem(method(f"/v1/jobs/{job_id}{route}", headers=other), 404, "no job")
        assert_problem(method(f"/v1/jobs/{job_id}{route}", headers={"Authorization": ""}), 401, "Bearer")
    assert_problem(client.delete(f"/v1/jobs/{job_id}", headers=other), 404, "no job")
    assert store.get(job_id) is not None  # the other key's DELETE removed nothing
    assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"


def test_a_succeeded_job_serves_its_files_by_layout_names(
    client: TestClient, store: JobStore, tmp_path: Path
) -> None:
    job_id = client.post("/v1/jobs", json={"channels": "t1ce", "count": 2, "formats": ["png"]}).json()["id"]
    store.mark_running(job_id)
    store.finish(job_id, JobState.succeeded)
    directory = tmp_path / "results" / job_id
    directory.mkdir(parents=True)
    for name in (*sample_files(job_id, 1, ["t1ce"], ["png"]), GRID, MANIFEST, JOB_ARCHIVE):
        (directory / name).write_bytes(name.encode())
    r = client.get(f"/v1/jobs/{job_id}/samples/1/t1ce.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == f"{job_id}_0001_t1ce.png".encode()
    for route, media in (("grid.png", "image/png"), ("manifest.json", "application/json"),
                         ("archive.zip", "application/zip")):  # fmt: skip
        r = client.get(f"/v1/jobs/{job_id}/{route}")
        assert r.status_code == 200 and r.headers["content-type"] == media and r.content == route.encode()
    assert_problem(client.get(f"/v1/jobs/{job_id}/samples/1/t1ce.nii.gz"), 404, "did not request nifti")
    assert_problem(client.get(f"/v1/jobs/{job_id}/samples/2/t1ce.png"), 404, "no sample 2")
    (directory / GRID).unlink()
    assert_problem(client.get(f"/v1/jobs/{job_id}/grid.png"), 410, "no longer available")

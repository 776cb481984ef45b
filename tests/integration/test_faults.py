"""Service faults over the real stack: Redis stalled and restarted mid-job, broken models.

A stack of its own (Redis with its append-only file, one worker, the API), because these
tests stop and kill its Redis. Timeouts are short so the faults play out in seconds: the
API gives up on Redis after 0.5 s, the worker after 1 s, and every stall below lasts
several times longer than both.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest
import redis
from safetensors.numpy import save_file

from synthmri.jobstore import JobStore
from synthmri.localstack import LocalStack
from synthmri.settings import hash_api_key
from tests.integration.conftest import Api
from tests.integration.test_service import archive_arrays

pytestmark = pytest.mark.integration

KEY = "fault-key"
API_TIMEOUT, WORKER_TIMEOUT = 0.5, 1.0
STALL_SECONDS = 5.0
LONG: dict[str, Any] = {"channels": "t1ce+seg", "count": 2, "seed": 31, "sampler": "ddpm", "steps": 150}
JOB_TIMEOUT = 300.0  # generous: a 2-core CI box may be busy with other work


@pytest.fixture(scope="module")
def fault_stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint_readonly: Path
) -> Iterator[LocalStack]:
    root = tmp_path_factory.mktemp("faults")
    models = root / "models"
    shutil.copytree(tiny_checkpoint_readonly, models / "tiny")
    # Sorts first, so the old rule (first by name) would have sent every t1ce+seg request here.
    shutil.copytree(tiny_checkpoint_readonly, models / "aaa-truncated")
    weights = models / "aaa-truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    # Well-formed weights of another network: only loading them shows they are wrong.
    shutil.copytree(tiny_checkpoint_readonly, models / "zzz-unloadable")
    save_file({"w": np.zeros(8, dtype=np.float32)}, str(models / "zzz-unloadable" / "model.safetensors"))
    env = {
        "SYNTHMRI_API_KEYS": KEY,
        "SYNTHMRI_DEVICE": "cpu",
        "SYNTHMRI_TASK_BATCH_SIZE": "2",
        "SYNTHMRI_MAX_COUNT": "8",
        "SYNTHMRI_MAX_ACTIVE_JOBS_PER_KEY": "3",
        "SYNTHMRI_VISIBILITY_TIMEOUT_SECONDS": "8",
        "SYNTHMRI_UNACKED_RESTORE_INTERVAL_SECONDS": "1",
        "SYNTHMRI_PROGRESS_INTERVAL_SECONDS": "0.1",
        "SYNTHMRI_LONG_POLL_MAX_SECONDS": "5",
        "SYNTHMRI_REDIS_TIMEOUT_SECONDS": str(API_TIMEOUT),
        "SYNTHMRI_WORKER_REDIS_TIMEOUT_SECONDS": str(WORKER_TIMEOUT),
    }
    with LocalStack(models_dir=models, results_dir=root / "results", workdir=root, api_key=KEY, env=env,
                    start_timeout=600) as s:  # fmt: skip
        yield s


@pytest.fixture(scope="module")
def api(fault_stack: LocalStack) -> Api:
    return Api(fault_stack, KEY)


class Latencies:
    """Polls endpoints that must not depend on Redis, from a thread, and keeps every timing."""

    PATHS: ClassVar[dict[str, float]] = {"/healthz": 0.05, "/v1/models": 0.2, "/docs": 0.5}

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=30)
        self.samples: dict[str, list[tuple[float, int]]] = {p: [] for p in self.PATHS}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        due = dict.fromkeys(self.PATHS, 0.0)
        while not self.stop.is_set():
            for path, period in self.PATHS.items():
                if time.monotonic() >= due[path]:
                    start = time.perf_counter()
                    status = self.http.get(path).status_code
                    self.samples[path].append((time.perf_counter() - start, status))
                    due[path] = time.monotonic() + period
            time.sleep(0.005)

    def __enter__(self) -> Latencies:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        self.http.close()

    def worst(self, path: str) -> float:
        return max(t for t, _ in self.samples[path])


def timed(fn: Any, *args: Any, **kw: Any) -> tuple[float, httpx.Response]:
    start = time.perf_counter()
    r = fn(*args, **kw)
    return time.perf_counter() - start, r


def assert_unavailable(elapsed: float, r: httpx.Response, what: str) -> None:
    assert r.status_code == 503, (what, r.status_code, r.text)
    assert r.headers["content-type"] == "application/problem+json", what
    assert "Redis" in r.json()["detail"] and r.json()["status"] == 503, (what, r.text)
    assert elapsed < 2.0, f"{what} took {elapsed:.2f} s with Redis away"


def wait_running(api: Api, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        job = api.http.get(f"/v1/jobs/{job_id}").json()
        if job["state"] == "running" and job["progress"]["fraction"] > 0:
            return dict(job)
        assert job["state"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.1)


def test_broken_models_are_reported_and_never_chosen(api: Api) -> None:
    models = api.http.get("/v1/models").json()
    assert [m["name"] for m in models["models"]] == ["tiny", "zzz-unloadable"]
    down = {u["name"]: u for u in models["unavailable"]}
    assert list(down) == ["aaa-truncated"] and down["aaa-truncated"]["channel_set"] == "t1ce+seg"
    assert "model.safetensors is truncated" in down["aaa-truncated"]["reason"]
    ready = api.http.get("/readyz").json()
    assert ready["status"] == "ready"
    assert "truncated" in ready["checks"]["models_unavailable"]["aaa-truncated"]
    assert ready["checks"]["results_dir"] == "writable"

    for channels in ("t1ce+seg", "t1ce"):  # by channel set: the healthy model, every time
        submitted = api.submit(channels=channels, count=1, seed=2, sampler="ddim", steps=3)
        job = api.wait(submitted["id"], JOB_TIMEOUT)
        assert job["state"] == "succeeded" and job["model"] == "tiny", job
    r = api.http.post("/v1/jobs", json={"model": "aaa-truncated", "count": 1})
    assert r.status_code == 422 and "is unavailable: model.safetensors is truncated" in r.json()["detail"]

    # Named explicitly, the unloadable model fails its job with the reason (and no path);
    # from then on it is listed as unavailable and refused.
    job = api.wait(api.submit(model="zzz-unloadable", count=1, steps=3)["id"], JOB_TIMEOUT)
    assert job["state"] == "failed" and job["error"].startswith("model 'zzz-unloadable' could not be loaded")
    assert str(api.stack.models_dir) not in job["error"]
    deadline = time.monotonic() + 10
    while "zzz-unloadable" not in {u["name"] for u in api.http.get("/v1/models").json()["unavailable"]}:
        assert time.monotonic() < deadline, "the load failure never reached /v1/models"
        time.sleep(0.2)
    r = api.http.post("/v1/jobs", json={"model": "zzz-unloadable", "count": 1})
    assert r.status_code == 422 and "a worker could not load it" in r.json()["detail"]
    job = api.wait(api.submit(channels="t1ce+seg", count=1, seed=3, steps=3)["id"], JOB_TIMEOUT)
    assert job["state"] == "succeeded" and job["model"] == "tiny", job


def test_redis_stalled_then_killed_mid_job(api: Api, fault_stack: LocalStack) -> None:
    """Redis is stopped (SIGSTOP) for 5 s while a job runs, then killed and restarted from its
    append-only file. Throughout, /healthz, /v1/models and /docs answer in < 100 ms and every
    request that needs Redis is refused with 503 within 2 s. The job finishes with the samples
    of an undisturbed run; a job submitted behind it runs too; no job stays active."""
    reference = api.wait(api.submit(**LONG)["id"], timeout=JOB_TIMEOUT)
    job = api.submit(**LONG)
    behind = api.submit(channels="t1ce+seg", count=2, seed=5, sampler="ddim", steps=10)
    wait_running(api, job["id"])
    assert fault_stack.redis is not None
    measured: dict[str, float] = {}
    with Latencies(fault_stack.url) as latencies:
        time.sleep(0.3)
        os.kill(fault_stack.redis.proc.pid, signal.SIGSTOP)
        stalled_at = time.monotonic()
        try:
            measured["post_stalled"], r = timed(api.http.post, "/v1/jobs", json={**LONG, "seed": 99})
            assert_unavailable(measured["post_stalled"], r, "POST /v1/jobs (Redis stalled)")
            measured["get_stalled"], r = timed(api.http.get, f"/v1/jobs/{job['id']}")
            assert_unavailable(measured["get_stalled"], r, "GET /v1/jobs/{id} (Redis stalled)")
            measured["readyz_stalled"], r = timed(api.http.get, "/readyz")
            assert_unavailable(measured["readyz_stalled"], r, "GET /readyz (Redis stalled)")
            assert r.json()["checks"]["redis"].startswith("unreachable")
            time.sleep(max(0.0, STALL_SECONDS - (time.monotonic() - stalled_at)))
        finally:
            os.kill(fault_stack.redis.proc.pid, signal.SIGCONT)
        after_stall = api.http.get(f"/v1/jobs/{job['id']}").json()
        assert after_stall["state"] == "running", after_stall  # still mid-job for the restart

        fault_stack.redis.proc.kill()
        fault_stack.redis.proc.wait()
        measured["post_down"], r = timed(api.http.post, "/v1/jobs", json={**LONG, "seed": 98})
        assert_unavailable(measured["post_down"], r, "POST /v1/jobs (Redis down)")
        measured["cancel_down"], r = timed(api.http.post, f"/v1/jobs/{behind['id']}/cancel")
        assert_unavailable(measured["cancel_down"], r, "POST /v1/jobs/{id}/cancel (Redis down)")
        fault_stack.respawn("redis")
        fault_stack.wait_for_redis()
        back_at = time.monotonic()
        done = api.wait(job["id"], timeout=JOB_TIMEOUT)
        measured["job_done_after_redis_back"] = time.monotonic() - back_at
        assert api.wait(behind["id"], timeout=JOB_TIMEOUT)["state"] == "succeeded"
    for path in Latencies.PATHS:
        statuses = {s for _, s in latencies.samples[path]}
        assert statuses == {200}, (path, statuses)
        measured[f"worst {path}"] = latencies.worst(path)
        assert latencies.worst(path) < 0.1, f"{path} took {latencies.worst(path):.3f} s during the faults"
    assert len(latencies.samples["/healthz"]) > 50
    print("\nmeasured:", {k: round(v, 3) for k, v in measured.items()})

    assert done["state"] == "succeeded", done
    a, _ = archive_arrays(api, reference["id"])
    b, _ = archive_arrays(api, job["id"])
    for i in range(2):
        for channel in ("t1ce", "seg"):
            x = a[f"{reference['id']}_{i:04d}_{channel}.nii.gz"][0]
            y = b[f"{job['id']}_{i:04d}_{channel}.nii.gz"][0]
            assert np.array_equal(x, y), (i, channel)

    # The stalled POST reached Redis once it woke: its job was recorded but never confirmed
    # as queued. The workers' sweep fails it, so no job of this key stays active.
    store = JobStore(redis.Redis.from_url(fault_stack.redis_url, decode_responses=True))
    deadline = time.monotonic() + 60
    while (active := store.active_count(hash_api_key(KEY))) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert active == 0
    jobs = api.http.get("/v1/jobs").json()["jobs"]
    assert not [j for j in jobs if j["state"] in ("queued", "running")]
    for j in jobs:
        if j["state"] == "failed" and j["seed"] == 99:
            assert "could not queue this job" in j["error"]

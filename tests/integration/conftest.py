"""The real stack for integration tests: redis-server, a Celery worker process and uvicorn.

One stack per session (starting a worker imports torch: seconds on a busy CPU). The
models dir holds a random-init `tiny` (t1ce+seg, 32²) checkpoint; settings are tuned
for a quick run: two samples per task, an 8 s visibility timeout with a 1 s restore
sweep so the redelivery test finishes in well under a minute.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from synthmri.localstack import LocalStack
from tests.conftest import build_tiny_checkpoint

API_KEY = "integration-key-A"
OTHER_KEY = "integration-key-B"
CONTRACT_KEY = "integration-key-C"  # the schemathesis run's own key, so its jobs use no other key's slots
TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    root = tmp_path_factory.mktemp("stack")
    models = root / "models"
    build_tiny_checkpoint(models / "tiny")
    env = {
        "SYNTHMRI_API_KEYS": f"{API_KEY},{OTHER_KEY},{CONTRACT_KEY}",
        "SYNTHMRI_DEVICE": "cpu",
        "SYNTHMRI_TASK_BATCH_SIZE": "2",
        "SYNTHMRI_MAX_COUNT": "16",
        "SYNTHMRI_MAX_ACTIVE_JOBS_PER_KEY": "3",
        "SYNTHMRI_VISIBILITY_TIMEOUT_SECONDS": "8",
        "SYNTHMRI_UNACKED_RESTORE_INTERVAL_SECONDS": "1",
        "SYNTHMRI_PROGRESS_INTERVAL_SECONDS": "0.1",
        "SYNTHMRI_LONG_POLL_MAX_SECONDS": "5",
    }
    with LocalStack(
        models_dir=models, results_dir=root / "results", workdir=root, api_key=API_KEY, env=env
    ) as s:
        yield s


class Api:
    """A thin httpx wrapper that remembers the stack's URL and key."""

    def __init__(self, stack: LocalStack, key: str | None = API_KEY) -> None:
        self.stack = stack
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=stack.url, headers=headers, timeout=60)

    def submit(self, **body: Any) -> dict[str, Any]:
        r = self.http.post("/v1/jobs", json=body)
        assert r.status_code == 202, r.text
        return dict(r.json())

    def wait(self, job_id: str, timeout: float = 120, until: set[str] = TERMINAL) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            self.stack.check()
            job = self.http.get(f"/v1/jobs/{job_id}", params={"wait": 2}).json()
            if job["state"] in until:
                return dict(job)
            assert time.monotonic() < deadline, f"job still {job['state']} after {timeout} s: {job}"

    def run(self, **body: Any) -> dict[str, Any]:
        job = self.wait(self.submit(**body)["id"])
        assert job["state"] == "succeeded", job
        return job


@pytest.fixture(scope="session")
def api(stack: LocalStack) -> Api:
    return Api(stack)


@pytest.fixture(scope="session")
def other_api(stack: LocalStack) -> Api:
    return Api(stack, OTHER_KEY)


@pytest.fixture(scope="session")
def anon_api(stack: LocalStack) -> Api:
    return Api(stack, None)


@pytest.fixture(scope="session")
def results_dir(stack: LocalStack) -> Path:
    return stack.results_dir

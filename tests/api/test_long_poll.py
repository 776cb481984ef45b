"""Long-polls (`GET /v1/jobs/{id}?wait=S`) wake on the job store's state-change messages.

The periodic re-read is set to a minute here, so a long-poll that answers with the new state
well before its wait runs out can only have been woken by the message (at the end of the
wait it would find the new state by re-reading).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from api.state_changes import StateChanges
from synthmri.jobstore import JobStore
from synthmri.settings import Settings
from tests.api.conftest import write_model

KEY = "poll-key"


@pytest.fixture
def client(tmp_path: Path, redis_url: str, store: JobStore) -> Iterator[TestClient]:
    write_model(tmp_path / "models", "tiny", "t1ce+seg")
    settings = Settings(redis_url=redis_url, models_dir=tmp_path / "models", results_dir=tmp_path / "results",
                        api_keys=KEY)  # type: ignore[arg-type]
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {KEY}"}) as c:
        c.app.state.services.changes.poll_seconds = 60.0  # type: ignore[attr-defined]
        yield c


def later(seconds: float, action: object) -> threading.Timer:
    timer = threading.Timer(seconds, action)  # type: ignore[arg-type]
    timer.start()
    return timer


WAIT = 20.0


def long_poll(client: TestClient, job_id: str) -> tuple[dict[str, object], float]:
    """The job as a long-poll answers, and how much of its wait was left."""
    t0 = time.monotonic()
    job = client.get(f"/v1/jobs/{job_id}", params={"wait": WAIT}).json()
    return job, WAIT - (time.monotonic() - t0)


def submit(client: TestClient) -> str:
    r = client.post("/v1/jobs", json={"channels": "t1ce", "count": 1})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def test_a_long_poll_answers_when_the_job_starts_running(client: TestClient, store: JobStore) -> None:
    job_id = submit(client)
    later(0.3, lambda: store.mark_running(job_id))
    job, left = long_poll(client, job_id)
    assert job["state"] == "running" and left > WAIT / 2
    assert not client.app.state.services.changes.waiting  # type: ignore[attr-defined]  # nothing left behind


def test_a_long_poll_answers_when_the_job_finishes(client: TestClient, store: JobStore) -> None:
    from synthmri.contract import JobState

    job_id = submit(client)
    store.mark_running(job_id)
    later(0.3, lambda: store.finish(job_id, JobState.failed, error="disk full"))
    job, left = long_poll(client, job_id)
    assert (job["state"], job["error"]) == ("failed", "disk full") and left > WAIT / 2


def test_a_long_poll_on_a_deleted_job_answers_404(client: TestClient) -> None:
    job_id = submit(client)
    later(0.3, lambda: client.delete(f"/v1/jobs/{job_id}"))
    t0 = time.monotonic()
    r = client.get(f"/v1/jobs/{job_id}", params={"wait": WAIT})
    assert time.monotonic() - t0 < WAIT / 2
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"


def test_without_the_subscription_a_long_poll_falls_back_to_rereading(
    client: TestClient, store: JobStore
) -> None:
    services = client.app.state.services  # type: ignore[attr-defined]
    client.portal.call(services.changes.stop)  # type: ignore[union-attr]
    services.changes = StateChanges("redis://127.0.0.1:1", fallback_seconds=0.2)  # nothing listens there
    client.portal.call(services.changes.start)  # type: ignore[union-attr]
    job_id = submit(client)
    later(0.3, lambda: store.mark_running(job_id))
    job, left = long_poll(client, job_id)
    assert job["state"] == "running" and left > WAIT / 2 and services.changes.connected is False

"""The results sweeper: which job directories go, which stay, and that it never guesses."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import redis

from synthmri.contract import JobState
from synthmri.outputs.layout import write_expiry
from worker.celery_app import ORPHAN_GRACE_SECONDS, sweep_results


def job_dir(root: Path, job_id: str, *, expires: float | None = None, age: float = 0.0) -> Path:
    d = root / job_id
    (d / ".parts").mkdir(parents=True)
    (d / ".parts" / "0000.npz").write_bytes(b"partial sample")
    if expires is not None:
        write_expiry(d, expires)
    if age:
        then = time.time() - age
        os.utime(d, (then, then))
    return d


def test_sweep_removes_expired_failed_cancelled_and_old_orphans(tmp_path: Path) -> None:
    now = time.time()
    names = ["expired", "fresh", "failed", "cancelled", "running", "queued", "orphan_old", "orphan_new"]
    names.append("succeeded")
    ids = {name: f"{i:016x}" for i, name in enumerate(names)}
    job_dir(tmp_path, ids["expired"], expires=now - 1)
    job_dir(tmp_path, ids["fresh"], expires=now + 3600)
    for name in ("failed", "cancelled", "running", "queued", "orphan_new"):
        job_dir(tmp_path, ids[name])  # no marker: a full disk stops the job before one is written
    job_dir(tmp_path, ids["orphan_old"], age=ORPHAN_GRACE_SECONDS + 60)
    job_dir(tmp_path, ids["succeeded"])  # finalising, marker not yet written
    (tmp_path / "not-a-job").mkdir()
    (tmp_path / "notes.txt").write_text("kept")
    states = {ids["failed"]: JobState.failed, ids["cancelled"]: JobState.cancelled,
              ids["running"]: JobState.running, ids["queued"]: JobState.queued,
              ids["succeeded"]: JobState.succeeded}  # fmt: skip
    removed = sweep_results(tmp_path, states.get, now=now)
    assert sorted(removed) == sorted(ids[n] for n in ("expired", "failed", "cancelled", "orphan_old"))
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {ids[n] for n in ("fresh", "running", "queued", "orphan_new", "succeeded")} | {
        "not-a-job", "notes.txt"
    }


def test_sweep_removes_nothing_it_cannot_check(tmp_path: Path) -> None:
    """With Redis away, a directory without a marker may belong to a running job: keep it."""
    job_dir(tmp_path, "a" * 16, age=ORPHAN_GRACE_SECONDS + 60)
    job_dir(tmp_path, "b" * 16, expires=time.time() - 1)

    def unreachable(job_id: str) -> JobState | None:
        raise redis.TimeoutError("Timeout reading from socket")

    assert sweep_results(tmp_path, unreachable) == ["b" * 16]  # its marker needs no Redis
    assert (tmp_path / ("a" * 16)).is_dir()


@pytest.mark.parametrize("missing", [True, False])
def test_sweep_of_a_missing_or_empty_results_dir(tmp_path: Path, missing: bool) -> None:
    root = tmp_path / "results"
    if not missing:
        root.mkdir()
    assert sweep_results(root, lambda _: None) == []

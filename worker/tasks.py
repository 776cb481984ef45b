"""Celery tasks: `synthmri.sample_range(job_id, start, stop)` and `synthmri.finalize_job(job_id)`.

Task bodies only hold a lease and call the engine; ids travel through the broker,
arrays never do.
"""

from __future__ import annotations

import contextlib
import threading
import time
from functools import lru_cache
from types import TracebackType
from typing import Any

from celery import signals

from synthmri.contract import TASK_FINALIZE_JOB, TASK_SAMPLE_RANGE
from synthmri.jobstore import JobStore
from worker import engine
from worker.celery_app import app, settings

# kombu's Redis transport keeps unacked deliveries in a sorted set scored by delivery time;
# a sweep hands back entries older than the visibility timeout.
UNACKED_INDEX_KEY = "unacked_index"

_delivery_tags: dict[str, str] = {}


@signals.task_received.connect
def _remember_delivery_tag(request: Any = None, **_: Any) -> None:
    """The task body cannot see its broker delivery tag; the worker's request object can."""
    if request is not None and request.message is not None:
        _delivery_tags[request.id] = request.message.delivery_tag


@lru_cache(maxsize=1)
def store() -> JobStore:
    return JobStore.from_url(settings.redis_url)


class Lease:
    """Keeps a running task's delivery fresh in kombu's unacked index.

    A task may run longer than the visibility timeout; renewing the delivery's score
    every visibility/4 s stops a sweep from handing it to a second worker, while a
    killed worker stops renewing and its task returns after one visibility timeout.
    """

    def __init__(self, task_id: str | None) -> None:
        self.tag = _delivery_tags.pop(task_id, None) if task_id else None
        self.period = settings.visibility_timeout_seconds / 4
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="synthmri-lease", daemon=True)

    def _run(self) -> None:
        while not self.done.wait(self.period):
            with contextlib.suppress(Exception):
                store().r.zadd(UNACKED_INDEX_KEY, {str(self.tag): time.time()}, xx=True)

    def __enter__(self) -> Lease:
        if self.tag:
            self.thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.done.set()


@app.task(name=TASK_SAMPLE_RANGE, bind=True)
def sample_range(self: Any, job_id: str, start: int, stop: int) -> str:
    """Sample indices [start, stop) of a job; finalise the job if this was its last range."""
    with Lease(self.request.id):
        return engine.process_range(store(), settings, job_id, int(start), int(stop))


@app.task(name=TASK_FINALIZE_JOB, bind=True)
def finalize_job(self: Any, job_id: str) -> str:
    """Finalise a job whose ranges are all in (normally done by its last range task)."""
    rec = store().get(job_id)
    if rec is None:
        return "skipped: unknown or expired job"
    missing = [
        s
        for s, e in rec.spec.ranges()
        if engine.missing_indices(rec.spec, engine.job_dir(settings, job_id), s, e)
    ]
    if missing:
        return f"skipped: ranges starting at {missing} are not complete"
    with Lease(self.request.id):
        return engine.maybe_finalize(store(), settings, job_id)

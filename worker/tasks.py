"""Celery tasks: `synthmri.sample_range(job_id, start, stop)` and `synthmri.finalize_job(job_id)`.

Task bodies only hold a lease and call the engine through `run_task`; ids travel
through the broker, arrays never do.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from types import TracebackType
from typing import Any

from celery import signals
from celery.exceptions import Reject

from synthmri.contract import TASK_FINALIZE_JOB, TASK_SAMPLE_RANGE, JobState
from synthmri.jobstore import STORE_ERRORS, JobStore
from worker import engine
from worker.celery_app import app, settings
from worker.outage import RedisAway, run_through_outages, worker_stopping

log = logging.getLogger("synthmri.worker")
INTERNAL_ERROR = "internal error in the worker (its log has details); submit the job again"

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
    return JobStore.from_url(settings.redis_url, timeout=settings.worker_redis_timeout_seconds)


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


def run_task(job_id: str, what: str, work: Callable[[], str]) -> str:
    """Run a task's engine call so that no outcome leaves the job stuck.

    A Redis outage is waited out (worker.outage); if it lasts past the patience the
    delivery is requeued, or, when even that cannot reach Redis, left unacknowledged
    for kombu to hand back. A cold shutdown of the worker requeues it too. Any other
    escaping error marks the job failed before the task fails, because a failed task is
    acknowledged and would never run again.
    """
    try:
        return run_through_outages(work, store().r, settings.redis_outage_seconds, what)
    except RedisAway:
        reason = f"{what}: Redis unreachable for {settings.redis_outage_seconds:.0f} s"
        raise Reject(reason, requeue=True) from None
    except Exception as e:
        if worker_stopping(e):
            raise Reject(f"{what}: the worker is shutting down", requeue=True) from None
        log.exception("%s failed unexpectedly", what)
        with contextlib.suppress(*STORE_ERRORS):
            store().finish(job_id, JobState.failed, error=INTERNAL_ERROR)
        raise


@app.task(name=TASK_SAMPLE_RANGE, bind=True)
def sample_range(self: Any, job_id: str, start: int, stop: int) -> str:
    """Sample indices [start, stop) of a job; finalise the job if this was its last range."""
    holder = self.request.id

    def work() -> str:
        return engine.process_range(store(), settings, job_id, int(start), int(stop), holder)

    with Lease(holder):
        return run_task(job_id, f"job {job_id} range [{start}, {stop})", work)


@app.task(name=TASK_FINALIZE_JOB, bind=True)
def finalize_job(self: Any, job_id: str) -> str:
    """Finalise a job whose ranges are all in (normally done by its last range task)."""
    holder = self.request.id

    def work() -> str:
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
        return engine.maybe_finalize(store(), settings, job_id, holder)

    with Lease(holder):
        return run_task(job_id, f"finalising job {job_id}", work)

"""The Celery task `synthmri.sample_range(job_id, start, stop, batch_key=…)`; a job's last range
finalises it.

Task bodies only hold a lease and call the engine through `run_task`; ids travel
through the broker, arrays never do.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from functools import lru_cache
from types import TracebackType
from typing import Any

from celery.exceptions import Reject

from synthmri.contract import TASK_SAMPLE_RANGE, JobState
from synthmri.jobstore import STORE_ERRORS, JobStore
from worker import engine
from worker.celery_app import app, settings
from worker.outage import RedisAway, run_through_outages, worker_stopping

log = logging.getLogger("synthmri.worker")
INTERNAL_ERROR = "internal error in the worker (its log has details); submit the job again"


@lru_cache(maxsize=1)
def store() -> JobStore:
    return JobStore.from_url(settings.redis_url, timeout=settings.worker_redis_timeout_seconds)


def delivery_tag(request: Any) -> str | None:
    """The broker delivery tag of the running task (None when it was not delivered by a broker).

    kombu's virtual transports put it in the message properties, which Celery hands to the
    task as `request.properties`.
    """
    tag = (getattr(request, "properties", None) or {}).get("delivery_tag")
    return str(tag) if tag else None


class Lease:
    """Keeps a running task's delivery from being handed to a second worker.

    A task may run longer than the visibility timeout; renewing its delivery every
    `period` s (visibility/4) stops kombu's sweep from redelivering it, while a killed
    worker stops renewing and its task returns after one visibility timeout. A renewal
    that cannot reach Redis is retried at the next period: the task itself waits out the
    outage (worker.outage), and a redelivery in the meantime only repeats idempotent work.
    """

    def __init__(self, job_store: JobStore, tag: str | None, period: float) -> None:
        self.store, self.tag, self.period = job_store, tag, period
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="synthmri-lease", daemon=True)

    def _run(self) -> None:
        assert self.tag is not None
        while not self.done.wait(self.period):
            try:
                if not self.store.renew_delivery(self.tag):
                    log.warning("delivery %s is no longer pending in the broker; its lease ends", self.tag)
                    return
            except STORE_ERRORS:
                log.warning("could not renew the lease of delivery %s: Redis unreachable", self.tag)

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
def sample_range(self: Any, job_id: str, start: int, stop: int, batch_key: str | None = None) -> str:
    """Sample indices [start, stop) of a job, merged with other waiting ranges of its batch index
    `batch_key`; finalise every job whose last range this was."""
    holder = self.request.id

    def work() -> str:
        return engine.process_range(store(), settings, job_id, int(start), int(stop), holder, batch_key)

    with Lease(store(), delivery_tag(self.request), settings.visibility_timeout_seconds / 4):
        return run_task(job_id, f"job {job_id} range [{start}, {stop})", work)

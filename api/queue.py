"""Enqueue worker tasks by name: the API never imports worker code (nor torch)."""

from __future__ import annotations

from celery import Celery

from synthmri.contract import QUEUE, TASK_SAMPLE_RANGE, JobSpec
from synthmri.settings import Settings


class TaskQueue:
    """A producer-only Celery app on the same broker as the workers."""

    def __init__(self, settings: Settings) -> None:
        self.celery = Celery("synthmri-api", broker=settings.redis_url, set_as_current=False)
        self.celery.conf.update(
            task_serializer="json",
            accept_content=["json"],
            task_default_queue=QUEUE,
            broker_connection_retry_on_startup=True,
            broker_transport_options={"visibility_timeout": settings.visibility_timeout_seconds},
        )

    def enqueue_job(self, spec: JobSpec) -> None:
        """One task per contiguous index range, so every worker can take part of the job."""
        for start, stop in spec.ranges():
            self.celery.send_task(TASK_SAMPLE_RANGE, args=[spec.id, start, stop], queue=QUEUE)

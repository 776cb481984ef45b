"""Enqueue worker tasks by name: the API never imports worker code (nor torch)."""

from __future__ import annotations

from celery import Celery

from synthmri.contract import QUEUE, TASK_SAMPLE_RANGE, JobSpec
from synthmri.jobstore import spec_batch_key
from synthmri.settings import Settings


class Sent:
    """What `send_task` returns here: the task id only. Celery's AsyncResult would build a
    result backend for every API thread (scanning installed packages' entry points, tens of
    milliseconds), and the API never reads task results: job state lives in the job store."""

    def __init__(self, task_id: str) -> None:
        self.id = task_id


class TaskQueue:
    """A producer-only Celery app on the same broker as the workers.

    Publishing runs in a worker thread of the API (it is blocking kombu code), bounded
    by the same short Redis timeout as the job store plus one quick retry, so a stalled
    broker costs a request a few seconds at most instead of hanging it.
    """

    def __init__(self, settings: Settings) -> None:
        timeout = settings.redis_timeout_seconds
        self.celery = Celery("synthmri-api", broker=settings.redis_url, set_as_current=False)
        self.celery.conf.update(
            task_serializer="json",
            accept_content=["json"],
            task_default_queue=QUEUE,
            broker_connection_retry_on_startup=True,
            broker_connection_timeout=timeout,
            broker_transport_options={
                "visibility_timeout": settings.visibility_timeout_seconds,
                "socket_timeout": timeout,
                "socket_connect_timeout": timeout,
            },
            task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2},
        )

    def warm_up(self, connections: int = 4) -> None:
        """Open a few broker connections before the first submissions need them (a burst of
        requests right after start would otherwise each connect first). Best effort: a broker
        that is not reachable yet is connected to on demand, as always."""
        held = []
        try:
            for _ in range(connections):
                conn = self.celery.pool.acquire(block=False)
                held.append(conn)
                conn.ensure_connection(max_retries=0)
                conn.default_channel  # noqa: B018 (opens the channel the producer will use)
        except Exception:  # anything: the broker is simply not there yet
            pass
        finally:
            for conn in held:
                conn.release()

    def enqueue_job(self, spec: JobSpec) -> None:
        """One task per contiguous index range, so every worker can take part of the job. Each
        task names its batch index, where a worker that takes it looks for ranges to merge."""
        kwargs = {"batch_key": spec_batch_key(spec)}
        with self.celery.producer_or_acquire() as producer:
            for start, stop in spec.ranges():
                self.celery.send_task(TASK_SAMPLE_RANGE, args=[spec.id, start, stop], kwargs=kwargs,
                                      queue=QUEUE, producer=producer, ignore_result=True,
                                      result_cls=Sent)  # fmt: skip

"""The Celery app of the GPU workers: a Redis broker, no result backend, tuned for long tasks.

Run one process per GPU with the solo pool:
    celery -A worker.celery_app:app worker --pool solo -n gpu0@%h      (CUDA_VISIBLE_DEVICES=0)
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery, signals

from synthmri import __version__
from synthmri.contract import JOB_ID_PATTERN, QUEUE, TASK_SAMPLE_RANGE, JobState
from synthmri.jobstore import BROKER_UNACKED_INDEX, STORE_ERRORS, WORKER_HEARTBEAT_PREFIX, JobStore
from synthmri.outputs.layout import read_expiry
from synthmri.settings import Settings, get_settings

log = logging.getLogger("synthmri.worker")

HEARTBEAT_SECONDS = 5.0
HEARTBEAT_TTL = 20
# A job directory with no record behind it is removed only once untouched for this long.
ORPHAN_GRACE_SECONDS = 600.0
# A job the API recorded but never confirmed as queued is failed after this long (the
# API answers well within it, 503 included).
UNQUEUED_GRACE_SECONDS = 30.0


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for tasks that hold a GPU for seconds to minutes.

    No result backend: tasks report through the job store, and nothing reads task results.
    """
    return {
        "broker_url": settings.redis_url,
        "task_default_queue": QUEUE,
        "task_routes": {TASK_SAMPLE_RANGE: {"queue": QUEUE}},
        "task_serializer": "json",
        "accept_content": ["json"],
        # Ack after the task ran, and hand it back if the process died: a crash loses no work.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One task at a time per process: a prefetched task would wait behind a long one.
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "worker_pool": "solo",
        "broker_connection_retry_on_startup": True,
        # A worker waits for its broker however long Redis is away (under `synthmri up` or
        # compose it would only be restarted into the same wait).
        "broker_connection_max_retries": None,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_transport_options": {
            # A running task renews its lease (worker.tasks.Lease), so the visibility timeout
            # only needs to cover the gap between renewals, and a dead worker's task returns
            # after visibility + one sweep (kombu 5.7 default: 3600 s + 100 s).
            "visibility_timeout": settings.visibility_timeout_seconds,
            # Named here, not left to kombu's default, because the lease writes to it.
            "unacked_index_key": BROKER_UNACKED_INDEX,
            "unacked_restore_interval": settings.unacked_restore_interval_seconds,
            "unacked_restore_throttle": 2,
        },
    }


settings = get_settings()
app = Celery("synthmri", include=["worker.tasks"])
app.conf.update(celery_config(settings))


def sweep_results(
    results_dir: Path, state_of: Callable[[str], JobState | None], now: float | None = None
) -> list[str]:
    """Remove job directories nobody can download from; returns the removed job ids.

    Removed: a directory whose expiry marker has passed (finalised jobs), one whose job
    failed or was cancelled, and one whose job record is gone and that has not been
    touched for ORPHAN_GRACE_SECONDS. A failed job may have no marker at all: its disk
    filled up before one could be written. `state_of` reads the job store; when Redis
    does not answer, only expiry markers count for the rest of the sweep, since nothing
    may be removed on a guess.
    """
    now = time.time() if now is None else now
    removed: list[str] = []
    if not results_dir.is_dir():
        return removed
    job_id = re.compile(JOB_ID_PATTERN)
    store_answers = True
    for job_dir in sorted(results_dir.iterdir()):
        if not job_id.match(job_dir.name) or not job_dir.is_dir():
            continue
        expires = read_expiry(job_dir)
        if expires is not None:
            if expires <= now:
                shutil.rmtree(job_dir, ignore_errors=True)
                removed.append(job_dir.name)
            continue
        if not store_answers:
            continue
        try:
            state = state_of(job_dir.name)
        except STORE_ERRORS:
            log.warning("results sweep: Redis unreachable; only expired directories are removed this time")
            store_answers = False
            continue
        try:
            untouched = now - job_dir.stat().st_mtime
        except OSError:
            continue
        orphan = state is None and untouched > ORPHAN_GRACE_SECONDS
        if orphan or state in (JobState.failed, JobState.cancelled):
            shutil.rmtree(job_dir, ignore_errors=True)
            removed.append(job_dir.name)
    return removed


class _Background(threading.Thread):
    """Heartbeat for /readyz and the periodic TTL sweep, beside the solo pool's main thread."""

    def __init__(self, hostname: str) -> None:
        super().__init__(name="synthmri-heartbeat", daemon=True)
        self.hostname = hostname
        self.stop = threading.Event()
        self.store = JobStore.from_url(settings.redis_url, timeout=settings.worker_redis_timeout_seconds)

    def run(self) -> None:
        from worker.model_cache import loaded_models

        last_sweep = 0.0
        while not self.stop.is_set():
            try:
                info = {
                    "hostname": self.hostname,
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "version": __version__,
                    "device": settings.device,
                    "models": loaded_models(),
                    "time": time.time(),
                }
                self.store.heartbeat(self.hostname, info, HEARTBEAT_TTL)
                for job_id in self.store.fail_unqueued(UNQUEUED_GRACE_SECONDS):
                    log.warning("job %s was recorded but never queued; marked failed", job_id)
                if time.monotonic() - last_sweep >= settings.cleanup_interval_seconds:
                    last_sweep = time.monotonic()
                    for job_id in sweep_results(settings.results_dir, self.store.state):
                        log.info("removed the files of job %s (expired, failed or orphaned)", job_id)
            except Exception:
                log.exception("heartbeat failed")
            self.stop.wait(HEARTBEAT_SECONDS)


_background: _Background | None = None


def give_up_cpu_priority(niceness: int) -> None:
    """Lower this process's CPU priority by `niceness`.

    Under the kernel's autogroup scheduling (common on desktops and CI machines) nice values
    only rank processes of one session against each other, and a worker runs in a session of
    its own, so the session's group is lowered too (/proc/self/autogroup; raising it needs no
    privilege)."""
    if niceness <= 0:
        return
    os.nice(niceness)
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text(f"{niceness}\n")


@signals.worker_init.connect
def _lower_priority(**_: Any) -> None:
    give_up_cpu_priority(settings.worker_niceness)


@signals.worker_ready.connect
def _start_background(sender: Any = None, **_: Any) -> None:
    global _background
    _background = _Background(getattr(sender, "hostname", None) or socket.gethostname())
    _background.start()


@signals.worker_shutdown.connect
def _stop_background(**_: Any) -> None:
    if _background is not None:
        _background.stop.set()
        with contextlib.suppress(Exception):
            _background.store.r.delete(WORKER_HEARTBEAT_PREFIX + _background.hostname)

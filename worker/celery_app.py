"""The Celery app of the GPU workers: Redis broker and result backend, tuned for long tasks.

Run one process per GPU with the solo pool:
    celery -A worker.celery_app:app worker --pool solo -n gpu0@%h      (CUDA_VISIBLE_DEVICES=0)
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

from celery import Celery, signals

from synthmri import __version__
from synthmri.contract import QUEUE, TASK_FINALIZE_JOB, TASK_SAMPLE_RANGE
from synthmri.jobstore import WORKER_HEARTBEAT_PREFIX, JobStore
from synthmri.settings import Settings, get_settings

log = logging.getLogger("synthmri.worker")

HEARTBEAT_SECONDS = 5.0
HEARTBEAT_TTL = 20
EXPIRES_FILE = ".expires"  # unix time after which a job directory may be removed


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for tasks that hold a GPU for seconds to minutes."""
    return {
        "broker_url": settings.redis_url,
        "result_backend": settings.redis_url,
        "result_expires": settings.result_ttl_seconds,
        "task_default_queue": QUEUE,
        "task_routes": {TASK_SAMPLE_RANGE: {"queue": QUEUE}, TASK_FINALIZE_JOB: {"queue": QUEUE}},
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        # Ack after the task ran, and hand it back if the process died: a crash loses no work.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One task at a time per process: a prefetched task would wait behind a long one.
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "worker_pool": "solo",
        "broker_connection_retry_on_startup": True,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_transport_options": {
            # A running task renews its lease (worker.tasks.Lease), so the visibility timeout
            # only needs to cover the gap between renewals, and a dead worker's task returns
            # after visibility + one sweep (kombu 5.7 default: 3600 s + 100 s).
            "visibility_timeout": settings.visibility_timeout_seconds,
            "unacked_restore_interval": settings.unacked_restore_interval_seconds,
            "unacked_restore_throttle": 2,
        },
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout_seconds},
    }


settings = get_settings()
app = Celery("synthmri", include=["worker.tasks"])
app.conf.update(celery_config(settings))


def sweep_expired_results(results_dir: Path, now: float | None = None) -> list[str]:
    """Remove job directories whose TTL has passed; returns the removed job ids."""
    now = time.time() if now is None else now
    removed: list[str] = []
    if not results_dir.is_dir():
        return removed
    for job_dir in results_dir.iterdir():
        marker = job_dir / EXPIRES_FILE
        try:
            expires = float(marker.read_text())
        except (OSError, ValueError):
            continue
        if expires <= now:
            shutil.rmtree(job_dir, ignore_errors=True)
            removed.append(job_dir.name)
    return removed


class _Background(threading.Thread):
    """Heartbeat for /readyz and the periodic TTL sweep, beside the solo pool's main thread."""

    def __init__(self, hostname: str) -> None:
        super().__init__(name="synthmri-heartbeat", daemon=True)
        self.hostname = hostname
        self.stop = threading.Event()
        self.store = JobStore.from_url(settings.redis_url)

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
                if time.monotonic() - last_sweep >= settings.cleanup_interval_seconds:
                    last_sweep = time.monotonic()
                    for job_id in sweep_expired_results(settings.results_dir):
                        log.info("removed expired results of job %s", job_id)
            except Exception:
                log.exception("heartbeat failed")
            self.stop.wait(HEARTBEAT_SECONDS)


_background: _Background | None = None


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

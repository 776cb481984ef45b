"""How a task lives through Redis being stalled, restarted or briefly away.

Redis holds the job records and the broker's queues, so while it does not answer a
task can neither report nor finish. Losing Redis must never decide a job's fate:

- progress writes and cancel checks are best effort (`BestEffort`): sampling goes on,
  and they resume when Redis answers again;
- anything else that needs Redis (marking ranges done, finalising, recording a failure)
  propagates the error to `run_through_outages`, which waits for Redis and runs the
  whole (idempotent) range again: finished samples are skipped, state changes that
  already happened are recognised as done;
- a task that waited longer than its patience raises `RedisAway`; the task body turns
  that into a requeue, and if even the requeue cannot reach Redis the delivery stays
  unacknowledged and kombu hands it back after the visibility timeout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from synthmri.jobstore import STORE_ERRORS

log = logging.getLogger("synthmri.worker")
T = TypeVar("T")


class RedisAway(RuntimeError):
    """Redis stayed unreachable for longer than the task was willing to wait."""


def wait_for_redis(client: redis.Redis, deadline: float, poll: float = 0.5) -> None:
    """Return as soon as Redis answers PING; raise RedisAway at `deadline` (monotonic)."""
    while True:
        try:
            client.ping()
            return
        except STORE_ERRORS:
            if time.monotonic() >= deadline:
                raise RedisAway("Redis did not answer in time") from None
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


def run_through_outages(work: Callable[[], T], client: redis.Redis, patience: float, what: str) -> T:
    """Run `work` (idempotent) until it completes without a Redis error.

    The patience counts from the first error and is not reset by a short recovery, so a
    Redis that keeps flapping cannot hold a task for ever.
    """
    deadline: float | None = None
    while True:
        try:
            return work()
        except STORE_ERRORS as e:
            if deadline is None:
                deadline = time.monotonic() + patience
            log.warning("%s: Redis unreachable (%s); waiting for it, then running again", what,
                        type(e).__name__)  # fmt: skip
            wait_for_redis(client, deadline)
            log.info("%s: Redis answers again; running again", what)


class BestEffort:
    """Calls that may be skipped while Redis is away (progress writes, cancel checks).

    After a failure the calls are skipped for `backoff` seconds, so a stalled Redis costs
    sampling one timeout per backoff period rather than one per step.
    """

    def __init__(self, backoff: float = 2.0) -> None:
        self.backoff = backoff
        self.skip_until = 0.0
        self.failures = 0

    def call(self, fn: Callable[[], T], default: T) -> T:
        if time.monotonic() < self.skip_until:
            return default
        try:
            return fn()
        except STORE_ERRORS as e:
            self.failures += 1
            self.skip_until = time.monotonic() + self.backoff
            log.warning("Redis unreachable during sampling (%s); sampling goes on", type(e).__name__)
            return default


def worker_stopping(exc: BaseException) -> bool:
    """Whether `exc` is Celery's cold shutdown cancelling the running task rather than a failure
    of the job: with the solo pool the shutdown signal handler raises the pool's "cannot
    terminate a job" error inside the task. Such a task must be handed back, not failed."""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "terminate_job" and "celery" in code.co_filename:
            return True
        tb = tb.tb_next
    return False

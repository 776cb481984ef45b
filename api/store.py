"""The job store as the API uses it: asyncio Redis with short timeouts.

Routes are `async def` and await Redis, so a stalled Redis holds no event-loop time
and no worker thread: `/healthz`, `/v1/models` and `/docs` stay fast, and a request
that needs Redis fails after `redis_timeout_seconds` with a 503 (api.problems). Only
refused or reset connections are retried, once (e.g. the first call after a Redis
restart); a timeout is not, so the answer comes within about one timeout.

Keys, scripts and record parsing are synthmri.jobstore's, shared with the workers.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from synthmri import jobstore as js
from synthmri.contract import QUEUE, JobSpec, JobState
from synthmri.jobstore import JobRecord
from synthmri.settings import Settings


class AsyncJobStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self.r = client
        self._create = client.register_script(js.CREATE_SCRIPT)
        self._transition = client.register_script(js.TRANSITION_SCRIPT)
        self._delete = client.register_script(js.DELETE_SCRIPT)

    @classmethod
    def from_settings(cls, settings: Settings) -> AsyncJobStore:
        timeout = settings.redis_timeout_seconds
        client = aioredis.Redis.from_url(
            settings.redis_url,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        return cls(client)

    async def ping(self) -> None:
        await self.r.ping()

    async def create(self, spec: JobSpec, ttl_seconds: int, max_active: int) -> int | None:
        """See JobStore.create."""
        keys, args = js.create_args(spec, ttl_seconds, max_active)
        created, active = await self._create(keys=keys, args=args)
        return None if created else int(active)

    async def confirm_queued(self, spec: JobSpec) -> None:
        """See JobStore.confirm_queued."""
        async with self.r.pipeline(transaction=True) as pipe:
            js.confirm_commands(pipe, spec)
            await pipe.execute()

    async def fail(self, job_id: str, error: str) -> None:
        fields = {"finished_at": time.time(), "error": error}
        args = js.transition_args(JobState.failed, (JobState.queued,), fields)
        await self._transition(keys=[js.job_key(job_id), js.STATS_STATES, js.UNQUEUED], args=args)

    async def get(self, job_id: str) -> JobRecord | None:
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.hgetall(js.job_key(job_id))
            pipe.hgetall(js.job_key(job_id) + ":progress")
            raw, progress = await pipe.execute()
        return js.parse_record(raw, progress)

    async def list_for_owner(self, owner: str, limit: int) -> list[JobRecord]:
        """The owner's jobs, newest first; ids whose records expired are dropped from the index."""
        index = js.owner_key(owner)
        ids = cast(list[str], await self.r.zrevrange(index, 0, limit - 1))
        if not ids:
            return []
        async with self.r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(js.job_key(job_id))
                pipe.hgetall(js.job_key(job_id) + ":progress")
            raw = await pipe.execute()
        records, gone = [], []
        for i, job_id in enumerate(ids):
            rec = js.parse_record(raw[2 * i], raw[2 * i + 1])
            if rec is None:
                gone.append(job_id)
            else:
                records.append(rec)
        if gone:
            await self.r.zrem(index, *gone)
        return records

    async def request_cancel(self, job_id: str) -> None:
        """See JobStore.request_cancel."""
        await self.r.hset(js.job_key(job_id), "cancel", "1")
        args = js.transition_args(JobState.cancelled, (JobState.queued,), {"finished_at": time.time()})
        await self._transition(keys=[js.job_key(job_id), js.STATS_STATES, js.UNQUEUED], args=args)

    async def delete(self, job_id: str, owner: str) -> None:
        """Forget the job (an active one is cancelled: its tasks find no record and stop)."""
        keys = [js.job_key(job_id), js.STATS_STATES, js.owner_key(owner), js.UNQUEUED]
        await self._delete(keys=keys, args=[job_id])

    async def stats(self) -> dict[str, Any]:
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.hgetall(js.STATS_STATES)
            pipe.get(js.STATS_SAMPLES)
            pipe.hgetall(js.STATS_LATENCY)
            pipe.llen(QUEUE)
            states, samples, latency, depth = await pipe.execute()
        return {**js.parse_stats(states, samples, latency), "queue_depth": int(depth)}

    async def workers(self) -> list[dict[str, Any]]:
        keys = [k async for k in self.r.scan_iter(js.WORKER_HEARTBEAT_PREFIX + "*", count=100)]
        if not keys:
            return []
        return [json.loads(v) for v in await self.r.mget(keys) if v]

    async def model_faults(self) -> dict[str, str]:
        return cast(dict[str, str], await self.r.hgetall(js.MODEL_FAULTS))

    async def close(self) -> None:
        await self.r.aclose()


class FaultView:
    """The workers' model faults as last read, refreshed in the background.

    GET /v1/models must answer at once even while Redis is stalled, so it never waits
    for Redis longer than `first_wait` (only before the first read completes); a stale
    view starts a refresh and answers with what it has.
    """

    def __init__(self, store: AsyncJobStore, max_age: float = 2.0, first_wait: float = 0.1) -> None:
        self.store = store
        self.max_age = max_age
        self.first_wait = first_wait
        self.faults: dict[str, str] = {}
        self.read_at: float | None = None
        self._refreshing: asyncio.Task[None] | None = None

    async def current(self) -> dict[str, str]:
        stale = self.read_at is None or time.monotonic() - self.read_at > self.max_age
        if stale and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.create_task(self._refresh())
        if self.read_at is None and self._refreshing is not None:
            await asyncio.wait({self._refreshing}, timeout=self.first_wait)
        return self.faults

    async def _refresh(self) -> None:
        try:
            self.faults = await self.store.model_faults()
            self.read_at = time.monotonic()
        except js.STORE_ERRORS:
            pass

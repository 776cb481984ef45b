"""Wakes long-polls when a job changes state.

Every state change in the job store publishes the job id on `STATE_CHANNEL` (in the same Lua
script as the change). One subscriber per API process reads that channel and sets the events
of the requests waiting on those jobs, so `GET /v1/jobs/{id}?wait=S` answers within a few
milliseconds of the change instead of at the next poll. Pub/sub drops messages while a
connection is down, so a waiting request also re-reads the job every `poll_seconds`, and
every `fallback_seconds` while the subscriber is not connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator

import redis.asyncio as aioredis

from synthmri.jobstore import STATE_CHANNEL, STORE_ERRORS

log = logging.getLogger("synthmri.api")
CONNECTION_LOST: tuple[type[Exception], ...] = (*STORE_ERRORS, OSError)


class StateChanges:
    def __init__(
        self, redis_url: str, *, poll_seconds: float = 1.0, fallback_seconds: float = 0.2,
        connect_timeout: float = 1.0,
    ) -> None:  # fmt: skip
        # No socket timeout: the subscriber's reads are bounded by get_message's own timeout, and a
        # connection that went silent is found by the periodic health check.
        self.client = aioredis.Redis.from_url(
            redis_url, decode_responses=True, socket_connect_timeout=connect_timeout, health_check_interval=30
        )
        self.poll_seconds = poll_seconds
        self.fallback_seconds = fallback_seconds
        self.waiting: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self.connected = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    def recheck_seconds(self) -> float:
        """How long a waiting request sleeps at most before it re-reads the job itself."""
        return self.poll_seconds if self.connected else self.fallback_seconds

    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._listen(), name="synthmri-state-changes")

    async def stop(self) -> None:
        """Ends the subscriber: it checks for this between reads (half a second apart);
        a subscriber stuck elsewhere is cancelled after two."""
        self._stopping = True
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=2.0)
            if not done:
                self._task.cancel()
        self._wake_all()
        await self.client.aclose()

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set when `job_id` changes state (or the subscription broke) while inside."""
        event = asyncio.Event()
        self.waiting[job_id].add(event)
        try:
            yield event
        finally:
            events = self.waiting.get(job_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self.waiting[job_id]

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        """Until `event` is set or `timeout` (at most `recheck_seconds`) has passed; clears it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=max(0.0, min(timeout, self.recheck_seconds)))
        event.clear()

    async def _listen(self) -> None:
        delay = 0.1
        while not self._stopping:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(STATE_CHANNEL)
                self.connected, delay = True, 0.1
                while not self._stopping:
                    message = await pubsub.get_message(timeout=0.5)
                    if message is not None and message.get("type") == "message":
                        self._wake(str(message["data"]))
            except CONNECTION_LOST as e:
                if self.connected:
                    log.warning("state-change subscription lost (%s); long-polls re-read every %.1f s",
                                type(e).__name__, self.fallback_seconds)  # fmt: skip
            finally:
                self.connected = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            # Whatever changed while disconnected is caught by the waiters' own re-reads.
            self._wake_all()
            if not self._stopping:
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)

    def _wake(self, job_id: str) -> None:
        for event in self.waiting.get(job_id, ()):
            event.set()

    def _wake_all(self) -> None:
        for events in self.waiting.values():
            for event in events:
                event.set()

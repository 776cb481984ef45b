"""Job records in Redis, shared by the API (writes specs, reads state) and workers (progress, state).

Layout (all keys under `synthmri:`):
  job:{id}           hash  spec (JSON JobSpec), state, started_at, finished_at, error, cancel
  job:{id}:progress  hash  u:{start} → sampler-step units done, s:{start} → samples written
  job:{id}:ranges    set   starts of the index ranges whose samples are all written
  job:{id}:finalize  str   lease held by the one task that finalises the job
  owner:{sha}        zset  job ids of one API key by creation time
  stats:*            counters read by /metrics (shared by every API process)
State changes go through one Lua script, so a cancel and a finalisation cannot both win.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, cast

import redis

from synthmri.contract import TERMINAL_STATES, JobSpec, JobState

PREFIX = "synthmri:"
WORKER_HEARTBEAT_PREFIX = PREFIX + "worker:"
STATS_STATES = PREFIX + "stats:states"
STATS_SAMPLES = PREFIX + "stats:samples"
STATS_LATENCY = PREFIX + "stats:latency"
LATENCY_BUCKETS: tuple[float, ...] = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return false end
local n = tonumber(ARGV[2])
local ok = false
for i = 3, 2 + n do if ARGV[i] == cur then ok = true end end
if not ok then return false end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
for i = 3 + n, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HINCRBY', KEYS[2], cur, -1)
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
return cur
"""

# The owner's queued/running jobs (KEYS[1] = owner index, ARGV[1] = job key prefix): one
# definition of "active" for the limit check and for `active_count`.
_COUNT_ACTIVE = f"""
local active = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local st = redis.call('HGET', ARGV[1] .. id, 'state')
  if st == '{JobState.queued.value}' or st == '{JobState.running.value}' then active = active + 1 end
end
"""

# Count and create in the same script, so two simultaneous submissions cannot both pass a
# limit that has room for one. KEYS: owner index, job, stats; ARGV: prefix, spec, ttl,
# created_at, limit, id.
_CREATE_WITHIN_LIMIT = _COUNT_ACTIVE + f"""
local limit = tonumber(ARGV[5])
if limit >= 0 and active >= limit then return {{0, active}} end
redis.call('HSET', KEYS[2], 'spec', ARGV[2], 'state', '{JobState.queued.value}', 'ttl', ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[6])
redis.call('HINCRBY', KEYS[3], '{JobState.queued.value}', 1)
return {{1, active}}
"""

def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def _owner_key(owner: str) -> str:
    return f"{PREFIX}owner:{owner}"


@dataclass(frozen=True)
class JobRecord:
    """A snapshot of one job: its immutable spec and its mutable state."""

    spec: JobSpec
    state: JobState
    started_at: float | None
    finished_at: float | None
    error: str | None
    cancel_requested: bool
    step_units: float  # Σ over ranges of (samples × fraction of sampler steps done)
    samples_done: int

    @property
    def fraction(self) -> float:
        if self.state == JobState.succeeded:
            return 1.0
        return min(1.0, self.step_units / max(1, self.spec.count))


class JobStore:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._transition = client.register_script(_TRANSITION)
        self._create = client.register_script(_CREATE_WITHIN_LIMIT)
        self._count_active = client.register_script(_COUNT_ACTIVE + "return active")

    @classmethod
    def from_url(cls, url: str) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True, socket_timeout=10))

    # -- records ---------------------------------------------------------------
    def create(self, spec: JobSpec, ttl_seconds: int, max_active: int = -1) -> int | None:
        """Store a new queued job unless its owner already has `max_active` queued or running
        jobs (−1: no limit). Returns None when created, else that owner's active job count.
        The record expires `ttl_seconds` after the job ends."""
        created, active = self._create(
            keys=[_owner_key(spec.owner), job_key(spec.id), STATS_STATES],
            args=[job_key(""), spec.model_dump_json(), str(ttl_seconds), repr(spec.created_at), max_active,
                  spec.id],
        )  # fmt: skip
        return None if created else int(active)

    def get(self, job_id: str) -> JobRecord | None:
        pipe = self.r.pipeline()
        pipe.hgetall(job_key(job_id))
        pipe.hgetall(job_key(job_id) + ":progress")
        raw, progress = cast(list[dict[str, str]], pipe.execute())
        if not raw or "spec" not in raw:
            return None
        units = sum(float(v) for k, v in progress.items() if k.startswith("u:"))
        samples = sum(int(v) for k, v in progress.items() if k.startswith("s:"))
        return JobRecord(
            spec=JobSpec.model_validate_json(raw["spec"]),
            state=JobState(raw["state"]),
            started_at=_float(raw.get("started_at")),
            finished_at=_float(raw.get("finished_at")),
            error=raw.get("error") or None,
            cancel_requested=raw.get("cancel") == "1",
            step_units=units,
            samples_done=samples,
        )

    def state(self, job_id: str) -> JobState | None:
        value = self.r.hget(job_key(job_id), "state")
        return JobState(cast(str, value)) if value else None

    def list_for_owner(self, owner: str, limit: int = 100) -> list[JobRecord]:
        """The owner's jobs, newest first; ids whose records expired are dropped from the index."""
        index = _owner_key(owner)
        ids = cast(list[str], self.r.zrevrange(index, 0, limit - 1))
        records = []
        for job_id in ids:
            rec = self.get(job_id)
            if rec is None:
                self.r.zrem(index, job_id)
            else:
                records.append(rec)
        return records

    def active_count(self, owner: str) -> int:
        return int(self._count_active(keys=[_owner_key(owner)], args=[job_key("")]))

    # -- state machine ---------------------------------------------------------
    def transition(
        self, job_id: str, to: JobState, allowed_from: tuple[JobState, ...], **fields: Any
    ) -> JobState | None:
        """Move to `to` if the current state is one of `allowed_from`; returns the old state or None."""
        args: list[Any] = [to.value, len(allowed_from), *(s.value for s in allowed_from)]
        for k, v in fields.items():
            args += [k, str(v)]
        prev = self._transition(keys=[job_key(job_id), STATS_STATES], args=args)
        if not prev:
            return None
        if to in TERMINAL_STATES:
            self._expire(job_id)
        return JobState(prev)

    def mark_running(self, job_id: str) -> bool:
        prev = self.transition(job_id, JobState.running, (JobState.queued,), started_at=time.time())
        return prev is not None

    def finish(self, job_id: str, to: JobState, error: str | None = None) -> bool:
        fields: dict[str, Any] = {"finished_at": time.time()}
        if error:
            fields["error"] = error
        ok = self.transition(job_id, to, (JobState.queued, JobState.running), **fields) is not None
        if ok and to == JobState.succeeded:
            rec = self.get(job_id)
            if rec is not None and rec.finished_at is not None:
                self.observe_latency(rec.finished_at - rec.spec.created_at)
        return ok

    def request_cancel(self, job_id: str) -> None:
        """Queued → cancelled at once (its tasks will skip); running → a flag the sampler polls."""
        self.r.hset(job_key(job_id), "cancel", "1")
        self.transition(job_id, JobState.cancelled, (JobState.queued,), finished_at=time.time())

    def cancel_requested(self, job_id: str) -> bool:
        raw = cast(list[str | None], self.r.hmget(job_key(job_id), ["cancel", "state"]))
        return raw[0] == "1" or raw[1] in (None, JobState.cancelled.value)

    def _expire(self, job_id: str) -> None:
        rec = self.get(job_id)
        if rec is None:
            return
        ttl = int(self.r.hget(job_key(job_id), "ttl") or 0)
        if ttl > 0:
            pipe = self.r.pipeline()
            for suffix in ("", ":progress", ":ranges", ":finalize"):
                pipe.expire(job_key(job_id) + suffix, ttl)
            pipe.execute()

    # -- progress and finalisation --------------------------------------------
    def set_progress(self, job_id: str, start: int, step_units: float, samples: int) -> None:
        self.r.hset(job_key(job_id) + ":progress", mapping={f"u:{start}": step_units, f"s:{start}": samples})

    def mark_range_done(self, job_id: str, start: int) -> int:
        """Record a finished range; returns how many ranges of the job are finished."""
        pipe = self.r.pipeline()
        pipe.sadd(job_key(job_id) + ":ranges", start)
        pipe.scard(job_key(job_id) + ":ranges")
        return int(pipe.execute()[1])

    def unmark_range(self, job_id: str, start: int) -> None:
        self.r.srem(job_key(job_id) + ":ranges", start)

    def claim_finalize(self, job_id: str, lease_seconds: int) -> bool:
        """One task wins the right to finalise; the lease lets a redelivered task retry after a crash."""
        return bool(self.r.set(job_key(job_id) + ":finalize", "1", nx=True, ex=lease_seconds))

    def release_finalize(self, job_id: str) -> None:
        self.r.delete(job_key(job_id) + ":finalize")

    # -- stats -------------------------------------------------------------------
    def count_samples(self, n: int) -> None:
        self.r.incrby(STATS_SAMPLES, n)

    def observe_latency(self, seconds: float) -> None:
        pipe = self.r.pipeline()
        for le in LATENCY_BUCKETS:
            if seconds <= le:
                pipe.hincrby(STATS_LATENCY, str(le), 1)
        pipe.hincrby(STATS_LATENCY, "count", 1)
        pipe.hincrbyfloat(STATS_LATENCY, "sum", seconds)
        pipe.execute()

    def stats(self) -> dict[str, Any]:
        pipe = self.r.pipeline()
        pipe.hgetall(STATS_STATES)
        pipe.get(STATS_SAMPLES)
        pipe.hgetall(STATS_LATENCY)
        states, samples, latency = pipe.execute()
        return {
            "states": {s.value: max(0, int(states.get(s.value, 0))) for s in JobState},
            "samples": int(samples or 0),
            "latency": latency,
        }

    # -- workers -------------------------------------------------------------------
    def heartbeat(self, hostname: str, info: dict[str, Any], ttl_seconds: int) -> None:
        self.r.set(WORKER_HEARTBEAT_PREFIX + hostname, json.dumps(info), ex=ttl_seconds)

    def workers(self) -> list[dict[str, Any]]:
        keys = list(self.r.scan_iter(WORKER_HEARTBEAT_PREFIX + "*", count=100))
        if not keys:
            return []
        return [json.loads(v) for v in self.r.mget(keys) if v]


def _float(value: str | None) -> float | None:
    return float(value) if value else None

"""Job records in Redis, shared by the API (writes specs, reads state) and workers (progress, state).

Layout (all keys under `synthmri:`):
  job:{id}           hash  spec (JSON JobSpec), state, ttl, started_at, finished_at, error, cancel
  job:{id}:progress  hash  u:{start} → sampler-step units done, s:{start} → samples written,
                     t:{start} → seconds the range's sampling took
  job:{id}:ranges    set   starts of the index ranges whose samples are all written
  job:{id}:finalize  str   lease (a task id) held by the one task that finalises the job
  owner:{sha}        zset  job ids of one API key by creation time
  unqueued           zset  job ids recorded but not yet confirmed as queued, by creation time
  job:{id}:claim:{start}  str  the task sampling that range in its batch (expires unless renewed)
  batch:{sha}:{sampler}:{steps}[:{given}]  zset  waiting ranges ("{id}:{start}:{stop}") by job
                     creation time: work whose samples can share one sampling batch (cross-request
                     batching); `given` (known channels and guidance) only for jobs with known channels
  model-faults       hash  checkpoint sha256 → why a worker could not load it
  stats:*            counters read by /metrics (shared by every API process)

One key outside the prefix belongs to the broker: `BROKER_UNACKED_INDEX`, kombu's index of
unacknowledged deliveries, whose entries `renew_delivery` refreshes for running tasks.

Every write is safe to repeat. A call whose answer was lost (Redis stalled past the
client's timeout, then executed the command anyway) may be sent again by the worker's
outage handling, so state changes go through Lua scripts that treat "already there" as
success, and a cancel and a finalisation still cannot both win.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from synthmri.contract import TERMINAL_STATES, JobSpec, JobState

PREFIX = "synthmri:"
WORKER_HEARTBEAT_PREFIX = PREFIX + "worker:"
MODEL_FAULTS = PREFIX + "model-faults"
UNQUEUED = PREFIX + "unqueued"
STATS_STATES = PREFIX + "stats:states"
STATS_SAMPLES = PREFIX + "stats:samples"
STATS_LATENCY = PREFIX + "stats:latency"
# Pub/sub channel: every state change publishes the job id, so long-polls wake at once.
STATE_CHANNEL = PREFIX + "state-changes"
LATENCY_BUCKETS: tuple[float, ...] = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
JOB_KEY_SUFFIXES = ("", ":progress", ":ranges", ":finalize")

# kombu's Redis transport (ack emulation) keeps each unacknowledged delivery in a sorted set
# scored by delivery time, at the key its `unacked_index_key` transport option names (the
# worker sets it to this); its sweep hands back entries older than the visibility timeout.
BROKER_UNACKED_INDEX = "unacked_index"

# The errors that mean "Redis did not answer", as opposed to a bad command or bad data.
STORE_ERRORS: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)

# KEYS: job, stats, unqueued; ARGV: to, n, from_1..from_n, then field/value pairs.
# Returns {1, old} when it moved the job, {0, current} when it did not (current may
# already be `to`: a repeated call). A terminal state starts the record's expiry here,
# in the same step, so no finished record is left without one.
TRANSITION_SCRIPT = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {0, false} end
local n = tonumber(ARGV[2])
local ok = false
for i = 3, 2 + n do if ARGV[i] == cur then ok = true end end
if not ok then return {0, cur} end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
for i = 3 + n, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HINCRBY', KEYS[2], cur, -1)
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('PUBLISH', '{CHANNEL}', string.sub(KEYS[1], {ID_START}))
local terminal = {TERMINAL}
if terminal[ARGV[1]] then
  redis.call('ZREM', KEYS[3], string.sub(KEYS[1], {ID_START}))
  local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl') or '0')
  if ttl and ttl > 0 then
    for _, suffix in ipairs({SUFFIXES}) do redis.call('EXPIRE', KEYS[1] .. suffix, ttl) end
  end
end
return {1, cur}
""".replace(
    "{TERMINAL}", "{" + ", ".join(f"['{s.value}'] = true" for s in TERMINAL_STATES) + "}"
).replace(
    "{SUFFIXES}", "{" + ", ".join(f"'{s}'" for s in JOB_KEY_SUFFIXES) + "}"
).replace("{ID_START}", str(len(PREFIX + "job:") + 1)).replace("{CHANNEL}", STATE_CHANNEL)

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
# limit that has room for one. A repeat of the same creation answers "created" again.
# KEYS: owner index, job, stats, unqueued; ARGV: prefix, spec, ttl, created_at, limit, id.
CREATE_SCRIPT = """
if redis.call('EXISTS', KEYS[2]) == 1 then return {1, 0} end
""" + _COUNT_ACTIVE + f"""
local limit = tonumber(ARGV[5])
if limit >= 0 and active >= limit then return {{0, active}} end
redis.call('HSET', KEYS[2], 'spec', ARGV[2], 'state', '{JobState.queued.value}', 'ttl', ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[6])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[6])
redis.call('HINCRBY', KEYS[3], '{JobState.queued.value}', 1)
return {{1, active}}
"""

# A range counts (and its samples count once in the stats) the first time it is marked.
# Nothing is written for a deleted job (no key may outlive its record without expiry).
# KEYS: job, ranges set, samples counter; ARGV: start, samples.
_MARK_RANGE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then redis.call('INCRBY', KEYS[3], ARGV[2]) end
return redis.call('SCARD', KEYS[2])
"""

# KEYS: job, progress hash; ARGV: field/value pairs. Written only while the job exists.
_SET_PROGRESS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], unpack(ARGV))
return 1
"""

# Forget a job: an active one counts as cancelled (its tasks see no record and stop,
# removing their files). KEYS: job, stats, owner index, unqueued; ARGV: job id.
DELETE_SCRIPT = f"""
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return false end
if cur == '{JobState.queued.value}' or cur == '{JobState.running.value}' then
  redis.call('HINCRBY', KEYS[2], cur, -1)
  redis.call('HINCRBY', KEYS[2], '{JobState.cancelled.value}', 1)
end
for _, suffix in ipairs({{SUFFIXES}}) do redis.call('DEL', KEYS[1] .. suffix) end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('PUBLISH', '{STATE_CHANNEL}', ARGV[1])
return cur
""".replace("{SUFFIXES}", "{" + ", ".join(f"'{s}'" for s in JOB_KEY_SUFFIXES) + "}")

# The finalisation lease: taken when free, and taken again by the task that holds it
# (the same task after a lost answer, or its redelivery after a crash).
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('EXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""

# Jobs recorded longer ago than ARGV[1] and never confirmed as queued: the API answered
# 503 for them, so they must not hold their owner's slot. KEYS: unqueued, stats; ARGV:
# cutoff time, error text, finished_at, job key prefix.
_FAIL_UNQUEUED = f"""
local failed = {{}}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])) do
  local key = ARGV[4] .. id
  redis.call('ZREM', KEYS[1], id)
  if redis.call('HGET', key, 'state') == '{JobState.queued.value}' then
    redis.call('HSET', key, 'state', '{JobState.failed.value}', 'error', ARGV[2], 'finished_at', ARGV[3])
    redis.call('HINCRBY', KEYS[2], '{JobState.queued.value}', -1)
    redis.call('HINCRBY', KEYS[2], '{JobState.failed.value}', 1)
    local ttl = tonumber(redis.call('HGET', key, 'ttl') or '0')
    if ttl and ttl > 0 then redis.call('EXPIRE', key, ttl) end
    redis.call('PUBLISH', '{STATE_CHANNEL}', id)
    table.insert(failed, id)
  end
end
return failed
"""

# Cross-request batching. A worker that takes a range task claims its own range and other
# waiting ranges of the same batch index (same model, sampler, steps, known channels) up to `room`
# samples, and samples them in one batch. A claim is a key with the claimer's task id that expires unless the
# claimer renews it, so a dead claimer's ranges become claimable again. Ranges of jobs no longer
# queued/running (or cancelled) are dropped from the index. Its own range is claimed whatever the
# room (its message was delivered to it), unless another live task holds it: then that task's
# batch samples it and this delivery has nothing to do.
# KEYS: index; ARGV: holder, lease ms, room, newest score to take, job key prefix, own member or ''.
# Returns {own status ('ok', 'busy' or ''), claimed members}.
_CLAIM_RANGES = f"""
local holder, lease, room = ARGV[1], ARGV[2], tonumber(ARGV[3])
local claimed = {{}}
local function try(member, own)
  local job, start, stop = string.match(member, '^([%x]+):(%d+):(%d+)$')
  if not job then redis.call('ZREM', KEYS[1], member) return 'bad' end
  local jk = ARGV[5] .. job
  if not own then
    local st = redis.call('HGET', jk, 'state')
    if (st ~= '{JobState.queued.value}' and st ~= '{JobState.running.value}')
        or redis.call('HGET', jk, 'cancel') == '1' then
      redis.call('ZREM', KEYS[1], member)
      return 'gone'
    end
    if tonumber(stop) - tonumber(start) > room then return 'full' end
  end
  local ck = jk .. ':claim:' .. start
  local owner = redis.call('GET', ck)
  if owner and owner ~= holder then return 'busy' end
  redis.call('SET', ck, holder, 'PX', lease)
  room = room - (tonumber(stop) - tonumber(start))
  table.insert(claimed, member)
  return 'ok'
end
local own = ''
if ARGV[6] ~= '' then own = try(ARGV[6], true) end
if room > 0 then
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[4], 'LIMIT', 0, 256)) do
    if m ~= ARGV[6] then try(m, false) end
    if room <= 0 then break end
  end
end
return {{own, claimed}}
"""

# Ranges a task has dealt with (done, cancelled, failed) leave the index and lose their claim.
# KEYS: index; ARGV: holder, job key prefix, members...
_SETTLE_RANGES = """
for i = 3, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
  local job, start = string.match(ARGV[i], '^([%x]+):(%d+):')
  if job then
    local ck = ARGV[2] .. job .. ':claim:' .. start
    if redis.call('GET', ck) == ARGV[1] then redis.call('DEL', ck) end
  end
end
return 1
"""

# ARGV: holder, lease ms, job key prefix, members...; returns how many claims are still held.
_RENEW_CLAIMS = """
local held = 0
for i = 4, #ARGV do
  local job, start = string.match(ARGV[i], '^([%x]+):(%d+):')
  if job then
    local ck = ARGV[3] .. job .. ':claim:' .. start
    if redis.call('GET', ck) == ARGV[1] then redis.call('PEXPIRE', ck, ARGV[2]) held = held + 1 end
  end
end
return held
"""

# A batch index outlives any job that can still be waiting in it (entries of finished jobs are
# dropped by the next claim), and is refreshed with every job added.
BATCH_INDEX_TTL = 7 * 24 * 3600

UNQUEUED_ERROR = (
    "the service could not queue this job (Redis was unreachable while it was submitted, and the "
    "client was answered 503); submit it again"
)


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


BATCH_PREFIX = PREFIX + "batch:"


def batch_key(sha256: str, sampler: str, steps: int, given: str = "") -> str:
    """The index of waiting ranges that may share a sampling batch: everything that shapes a
    sample besides its (seed, index) noise and its own known values — the weights, the sampler
    and its steps, and which channels are known with what guidance (`Given.signature`)."""
    return f"{BATCH_PREFIX}{sha256}:{sampler}:{steps}" + (f":{given}" if given else "")


def spec_batch_key(spec: JobSpec) -> str:
    given = spec.given.signature() if spec.given is not None else ""
    return batch_key(spec.model_sha256, spec.sampler, spec.steps, given)


def batch_key_sha256(key: str) -> str:
    """The checkpoint sha256 a batch index is for."""
    return key.removeprefix(BATCH_PREFIX).split(":")[0]


def range_member(job_id: str, start: int, stop: int) -> str:
    return f"{job_id}:{start}:{stop}"


def parse_member(member: str) -> tuple[str, int, int]:
    job_id, start, stop = member.split(":")
    return job_id, int(start), int(stop)


def confirm_commands(pipe: Any, spec: JobSpec) -> None:
    """Confirm a queued job (see `JobStore.confirm_queued`), shared by the sync and async store."""
    pipe.zrem(UNQUEUED, spec.id)
    key = spec_batch_key(spec)
    pipe.zadd(key, {range_member(spec.id, a, b): spec.created_at for a, b in spec.ranges()})
    pipe.expire(key, BATCH_INDEX_TTL)


def owner_key(owner: str) -> str:
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
    sampling_seconds: float = 0.0  # Σ over finished ranges of the time their sampling took

    @property
    def fraction(self) -> float:
        if self.state == JobState.succeeded:
            return 1.0
        return min(1.0, self.step_units / max(1, self.spec.count))


def parse_record(raw: dict[str, str], progress: dict[str, str]) -> JobRecord | None:
    """A record from its two hashes (shared by the sync and the async store)."""
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
        sampling_seconds=sum(float(v) for k, v in progress.items() if k.startswith("t:")),
    )


def create_args(spec: JobSpec, ttl_seconds: int, max_active: int) -> tuple[list[str], list[Any]]:
    keys = [owner_key(spec.owner), job_key(spec.id), STATS_STATES, UNQUEUED]
    args = [job_key(""), spec.model_dump_json(), str(ttl_seconds), repr(spec.created_at), max_active, spec.id]
    return keys, args


def transition_args(to: JobState, allowed_from: tuple[JobState, ...], fields: dict[str, Any]) -> list[Any]:
    args: list[Any] = [to.value, len(allowed_from), *(s.value for s in allowed_from)]
    for k, v in fields.items():
        args += [k, str(v)]
    return args


def parse_stats(states: dict[str, str], samples: str | None, latency: dict[str, str]) -> dict[str, Any]:
    return {
        "states": {s.value: max(0, int(states.get(s.value, 0))) for s in JobState},
        "samples": int(samples or 0),
        "latency": latency,
    }


def latency_commands(pipe: Any, seconds: float) -> None:
    for le in LATENCY_BUCKETS:
        if seconds <= le:
            pipe.hincrby(STATS_LATENCY, str(le), 1)
    pipe.hincrby(STATS_LATENCY, "count", 1)
    pipe.hincrbyfloat(STATS_LATENCY, "sum", seconds)


def worker_client(url: str, timeout: float) -> redis.Redis:
    """A client for workers: calls fail after `timeout` seconds, so a stalled Redis surfaces
    as a TimeoutError the worker handles instead of a hang. Only refused or reset
    connections are retried here (e.g. once after a Redis restart); riding out longer
    outages is the caller's job (worker.outage)."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3, supported_errors=(redis.ConnectionError,)),
        health_check_interval=30,
    )


class JobStore:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._transition = client.register_script(TRANSITION_SCRIPT)
        self._create = client.register_script(CREATE_SCRIPT)
        self._count_active = client.register_script(_COUNT_ACTIVE + "return active")
        self._mark_range = client.register_script(_MARK_RANGE)
        self._set_progress = client.register_script(_SET_PROGRESS)
        self._claim = client.register_script(_CLAIM)
        self._fail_unqueued = client.register_script(_FAIL_UNQUEUED)
        self._claim_ranges = client.register_script(_CLAIM_RANGES)
        self._settle_ranges = client.register_script(_SETTLE_RANGES)
        self._renew_claims = client.register_script(_RENEW_CLAIMS)

    @classmethod
    def from_url(cls, url: str, timeout: float = 10.0) -> JobStore:
        return cls(worker_client(url, timeout))

    # -- broker leases ---------------------------------------------------------
    def renew_delivery(self, delivery_tag: str) -> bool:
        """Restart the visibility timeout of an unacknowledged broker delivery (a running task),
        so kombu's sweep does not hand it to a second worker. False when kombu holds no such
        delivery any more: acknowledged, or already handed back."""
        pipe = self.r.pipeline(transaction=True)
        pipe.zadd(BROKER_UNACKED_INDEX, {delivery_tag: time.time()}, xx=True)
        pipe.zscore(BROKER_UNACKED_INDEX, delivery_tag)
        return pipe.execute()[1] is not None

    # -- records ---------------------------------------------------------------
    def create(self, spec: JobSpec, ttl_seconds: int, max_active: int = -1) -> int | None:
        """Store a new queued job unless its owner already has `max_active` queued or running
        jobs (−1: no limit). Returns None when created, else that owner's active job count.
        The record expires `ttl_seconds` after the job ends. Until `confirm_queued`, the job
        counts as not yet queued (see `fail_unqueued`)."""
        keys, args = create_args(spec, ttl_seconds, max_active)
        created, active = self._create(keys=keys, args=args)
        return None if created else int(active)

    def confirm_queued(self, spec: JobSpec) -> None:
        """The job's tasks are in the queue: it is no longer "unqueued", and its ranges wait in
        its batch index for a worker to merge them into a sampling batch."""
        pipe = self.r.pipeline(transaction=True)
        confirm_commands(pipe, spec)
        pipe.execute()

    def fail_unqueued(self, older_than_seconds: float) -> list[str]:
        """Fail jobs that were recorded but never confirmed as queued; returns their ids."""
        now = time.time()
        cutoff = repr(now - older_than_seconds)
        args: list[str | float] = [cutoff, UNQUEUED_ERROR, now, job_key("")]
        failed = self._fail_unqueued(keys=[UNQUEUED, STATS_STATES], args=args)
        return [str(x) for x in failed]

    def get(self, job_id: str) -> JobRecord | None:
        pipe = self.r.pipeline()
        pipe.hgetall(job_key(job_id))
        pipe.hgetall(job_key(job_id) + ":progress")
        raw, progress = cast(list[dict[str, str]], pipe.execute())
        return parse_record(raw, progress)

    def state(self, job_id: str) -> JobState | None:
        value = self.r.hget(job_key(job_id), "state")
        return JobState(cast(str, value)) if value else None

    def list_for_owner(self, owner: str, limit: int = 100) -> list[JobRecord]:
        """The owner's jobs, newest first; ids whose records expired are dropped from the index."""
        index = owner_key(owner)
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
        return int(self._count_active(keys=[owner_key(owner)], args=[job_key("")]))

    # -- state machine ---------------------------------------------------------
    def transition(
        self, job_id: str, to: JobState, allowed_from: tuple[JobState, ...], **fields: Any
    ) -> JobState | None:
        """Move to `to` if the current state is one of `allowed_from`; returns the old state or None."""
        moved, prev = self._transition(
            keys=[job_key(job_id), STATS_STATES, UNQUEUED], args=transition_args(to, allowed_from, fields)
        )
        return JobState(prev) if moved else None

    def _reach(self, job_id: str, to: JobState, allowed_from: tuple[JobState, ...], **fields: Any) -> bool:
        """Like `transition`, but also true when the job is already in `to` (a repeated call)."""
        moved, cur = self._transition(
            keys=[job_key(job_id), STATS_STATES, UNQUEUED], args=transition_args(to, allowed_from, fields)
        )
        if moved and to == JobState.succeeded:
            created = self.r.hget(job_key(job_id), "spec")
            if created:
                pipe = self.r.pipeline()
                latency_commands(pipe, time.time() - JobSpec.model_validate_json(created).created_at)
                pipe.execute()
        return bool(moved) or cur == to.value

    def mark_running(self, job_id: str) -> bool:
        return self._reach(job_id, JobState.running, (JobState.queued,), started_at=time.time())

    def finish(self, job_id: str, to: JobState, error: str | None = None) -> bool:
        """Queued/running → `to`; true if the job is now in `to` (also when it already was)."""
        fields: dict[str, Any] = {"finished_at": time.time()}
        if error:
            fields["error"] = error
        return self._reach(job_id, to, (JobState.queued, JobState.running), **fields)

    def request_cancel(self, job_id: str) -> None:
        """Queued → cancelled at once (its tasks will skip); running → a flag the sampler polls."""
        self.r.hset(job_key(job_id), "cancel", "1")
        self.transition(job_id, JobState.cancelled, (JobState.queued,), finished_at=time.time())

    def cancel_requested(self, job_id: str) -> bool:
        raw = cast(list[str | None], self.r.hmget(job_key(job_id), ["cancel", "state"]))
        return raw[0] == "1" or raw[1] in (None, JobState.cancelled.value)

    # -- progress and finalisation --------------------------------------------
    def set_progress(
        self, job_id: str, start: int, step_units: float, samples: int, sampling_seconds: float | None = None
    ) -> None:
        """A range's progress; `sampling_seconds` once it is sampled (replaced, not added, so a
        repeated call counts once)."""
        keys = [job_key(job_id), job_key(job_id) + ":progress"]
        args: list[Any] = [f"u:{start}", step_units, f"s:{start}", samples]
        if sampling_seconds is not None:
            args += [f"t:{start}", repr(sampling_seconds)]
        self._set_progress(keys=keys, args=args)

    def mark_range_done(self, job_id: str, start: int, samples: int = 0) -> int:
        """Record a finished range (its `samples` count once in the stats); returns how many
        ranges of the job are finished."""
        keys = [job_key(job_id), job_key(job_id) + ":ranges", STATS_SAMPLES]
        return int(self._mark_range(keys=keys, args=[start, samples]))

    def unmark_range(self, job_id: str, start: int) -> None:
        self.r.srem(job_key(job_id) + ":ranges", start)

    def claim_finalize(self, job_id: str, lease_seconds: int, holder: str) -> bool:
        """One task wins the right to finalise; the lease lets a redelivered task retry after a crash."""
        return bool(self._claim(keys=[job_key(job_id) + ":finalize"], args=[holder, lease_seconds]))

    def release_finalize(self, job_id: str) -> None:
        self.r.delete(job_key(job_id) + ":finalize")

    # -- cross-request batching ---------------------------------------------------
    def claim_ranges(
        self, key: str, holder: str, lease_seconds: float, room: int, newest: float, own: str | None = None
    ) -> tuple[str, list[str]]:
        """Claim `own` (a range member; 'busy' when another live task holds it) and waiting ranges
        of index `key` created no later than `newest`, oldest first, up to `room` samples in all.
        Returns (own's status, the claimed members)."""
        ms = int(lease_seconds * 1000)
        args: list[str | int] = [holder, ms, room, repr(newest), job_key(""), own or ""]
        status, claimed = self._claim_ranges(keys=[key], args=args)
        return str(status or ""), [str(m) for m in claimed]

    def settle_ranges(self, key: str, holder: str, members: list[str]) -> None:
        """Ranges dealt with: out of the index, claims released."""
        if members:
            self._settle_ranges(keys=[key], args=[holder, job_key(""), *members])

    def renew_claims(self, holder: str, lease_seconds: float, members: list[str]) -> int:
        """Extend this holder's claims; returns how many it still holds."""
        if not members:
            return 0
        return int(self._renew_claims(args=[holder, int(lease_seconds * 1000), job_key(""), *members]))

    def claim_holder(self, job_id: str, start: int) -> str | None:
        return cast(str | None, self.r.get(f"{job_key(job_id)}:claim:{start}"))

    # -- stats -------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        pipe = self.r.pipeline()
        pipe.hgetall(STATS_STATES)
        pipe.get(STATS_SAMPLES)
        pipe.hgetall(STATS_LATENCY)
        return parse_stats(*pipe.execute())

    # -- workers and models ------------------------------------------------------
    def heartbeat(self, hostname: str, info: dict[str, Any], ttl_seconds: int) -> None:
        self.r.set(WORKER_HEARTBEAT_PREFIX + hostname, json.dumps(info), ex=ttl_seconds)

    def workers(self) -> list[dict[str, Any]]:
        keys = list(self.r.scan_iter(WORKER_HEARTBEAT_PREFIX + "*", count=100))
        if not keys:
            return []
        return [json.loads(v) for v in self.r.mget(keys) if v]

    def record_model_fault(self, sha256: str, reason: str) -> None:
        """A checkpoint a worker could not load: the API stops choosing it (keyed by sha256, so
        replacing the weights clears it)."""
        self.r.hset(MODEL_FAULTS, sha256, reason)

    def model_faults(self) -> dict[str, str]:
        """checkpoint sha256 → the reason a worker could not load it."""
        return cast(dict[str, str], self.r.hgetall(MODEL_FAULTS))


def _float(value: str | None) -> float | None:
    return float(value) if value else None


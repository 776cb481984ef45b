from __future__ import annotations

import time

from synthmri.contract import JobSpec, JobState
from synthmri.jobstore import JobStore, job_key


def make_spec(job_id: str = "a" * 16, owner: str = "owner", count: int = 5) -> JobSpec:
    return JobSpec(
        id=job_id,
        owner=owner,
        model="m",
        model_sha256="s",
        channel_set="t1ce",
        channels=["t1ce"],
        image_size=32,
        count=count,
        seed=1,
        sampler="ddim",
        steps=3,
        formats=["nifti"],
        batch_size=2,
        created_at=time.time(),
        request={"channels": "t1ce", "count": count},
    )


def test_state_machine_is_guarded(store: JobStore) -> None:
    spec = make_spec()
    store.create(spec, ttl_seconds=100)
    rec = store.get(spec.id)
    assert rec is not None and rec.state == JobState.queued and rec.spec == spec
    assert store.transition(spec.id, JobState.running, (JobState.queued,)) == JobState.queued
    assert store.transition(spec.id, JobState.running, (JobState.queued,)) is None
    assert store.mark_running(spec.id)  # already running: a repeated call is not a failure
    store.set_progress(spec.id, 0, 2.0, 2)
    store.mark_range_done(spec.id, 0, 2)
    assert store.finish(spec.id, JobState.succeeded)
    # A repeated finish (its first answer lost to a Redis stall) succeeds and counts once.
    assert store.finish(spec.id, JobState.succeeded)
    assert not store.finish(spec.id, JobState.cancelled)  # terminal states are final
    assert store.state(spec.id) == JobState.succeeded
    for suffix in ("", ":progress", ":ranges"):  # finished records expire, all their keys
        assert 0 < store.r.ttl(job_key(spec.id) + suffix) <= 100, suffix
    stats = store.stats()
    assert (stats["states"]["succeeded"], stats["states"]["queued"], stats["states"]["running"]) == (1, 0, 0)
    assert int(stats["latency"]["count"]) == 1


def test_repeated_writes_are_harmless(store: JobStore) -> None:
    """Each write may be sent twice (a lost answer, then a retry): the outcome is the same."""
    spec = make_spec(count=4)
    assert store.create(spec, 100, max_active=1) is None
    assert store.create(spec, 100, max_active=1) is None  # the same job again: created, not 429
    assert store.stats()["states"]["queued"] == 1 and store.active_count(spec.owner) == 1
    assert store.mark_range_done(spec.id, 0, 2) == 1
    assert store.mark_range_done(spec.id, 0, 2) == 1
    assert store.stats()["samples"] == 2
    assert store.claim_finalize(spec.id, 60, "task-1") and store.claim_finalize(spec.id, 60, "task-1")
    assert not store.claim_finalize(spec.id, 60, "task-2")


def test_unconfirmed_jobs_are_failed_and_free_their_slot(store: JobStore) -> None:
    """A job recorded by a POST that then answered 503 never stays queued."""
    lost, kept = make_spec("1" * 16, "A"), make_spec("2" * 16, "A")
    store.create(lost, 100, max_active=2)
    store.create(kept, 100, max_active=2)
    store.confirm_queued(kept)
    assert store.fail_unqueued(older_than_seconds=60) == []  # too recent: its POST may still answer
    assert store.fail_unqueued(older_than_seconds=0) == [lost.id]
    rec = store.get(lost.id)
    assert rec is not None and rec.state == JobState.failed and "submit it again" in (rec.error or "")
    assert store.state(kept.id) == JobState.queued and store.active_count("A") == 1
    assert 0 < store.r.ttl(job_key(lost.id)) <= 100
    assert store.fail_unqueued(older_than_seconds=0) == []


def test_cancel_queued_is_immediate_running_is_a_flag(store: JobStore) -> None:
    q, r = make_spec("1" * 16), make_spec("2" * 16)
    store.create(q, 100)
    store.create(r, 100)
    store.mark_running(r.id)
    store.request_cancel(q.id)
    store.request_cancel(r.id)
    assert store.state(q.id) == JobState.cancelled
    assert store.state(r.id) == JobState.running and store.cancel_requested(r.id)
    assert store.get(r.id).cancel_requested  # type: ignore[union-attr]
    assert store.cancel_requested("f" * 16)  # a vanished job counts as cancelled


def test_progress_ranges_and_finalize_claim(store: JobStore) -> None:
    spec = make_spec(count=5)
    store.create(spec, 100)
    store.set_progress(spec.id, 0, 1.0, 0)
    store.set_progress(spec.id, 2, 2.0, 2)
    rec = store.get(spec.id)
    assert rec is not None and rec.fraction == 3.0 / 5 and rec.samples_done == 2
    assert [store.mark_range_done(spec.id, s) for s, _ in spec.ranges()] == [1, 2, 3]
    assert store.mark_range_done(spec.id, 0) == 3  # a redelivered range counts once
    assert store.claim_finalize(spec.id, 60, "a") and not store.claim_finalize(spec.id, 60, "b")
    store.release_finalize(spec.id)
    assert store.claim_finalize(spec.id, 60, "b")


def test_owner_listing_and_active_count(store: JobStore) -> None:
    a1, a2, b1 = make_spec("1" * 16, "A"), make_spec("2" * 16, "A"), make_spec("3" * 16, "B")
    for s in (a1, a2, b1):
        store.create(s, 100)
    store.finish(a1.id, JobState.failed, error="boom")
    assert [r.spec.id for r in store.list_for_owner("A")] == [a2.id, a1.id]
    assert store.active_count("A") == 1 and store.active_count("B") == 1 and store.active_count("C") == 0
    store.r.delete(job_key(a2.id))  # expired record: dropped from the index
    assert [r.spec.id for r in store.list_for_owner("A")] == [a1.id]
    assert store.get(a1.id).error == "boom"  # type: ignore[union-attr]


def test_worker_heartbeats(store: JobStore) -> None:
    store.heartbeat("w1@h", {"hostname": "w1@h", "models": ["abc"]}, ttl_seconds=5)
    assert store.workers() == [{"hostname": "w1@h", "models": ["abc"]}]


def test_active_job_limit_holds_under_simultaneous_submissions(store: JobStore) -> None:
    """20 threads submit at once against a limit of 3: exactly 3 jobs exist afterwards (a
    count-then-create check lets several through when the submissions interleave)."""
    from concurrent.futures import ThreadPoolExecutor

    specs = [make_spec(f"{i:016x}", "racer") for i in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda s: store.create(s, 100, max_active=3), specs))
    assert sum(r is None for r in results) == 3
    assert all(r == 3 for r in results if r is not None)
    assert store.active_count("racer") == 3
    store.finish(next(s.id for s, r in zip(specs, results, strict=True) if r is None), JobState.succeeded)
    assert store.create(make_spec("f" * 16, "racer"), 100, max_active=3) is None  # room again

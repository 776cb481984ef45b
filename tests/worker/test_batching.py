"""Batch sizing and cross-request batching in worker.engine, against a real Redis and the tiny
checkpoint (no Celery process): samples are compared by opening the NIfTI files."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from synthmri.contract import JobSpec, JobState
from synthmri.jobstore import JobStore, range_member, spec_batch_key
from synthmri.registry import read_model
from synthmri.settings import Settings
from tests.model.test_generate import raise_oom_above
from worker import engine, model_cache

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def submit(store: JobStore, settings: Settings, *, seed: int, count: int, batch_size: int = 4,
           sampler: str = "dpm++sde", steps: int = 4, index: bool = True, job_id: str | None = None,
           given: Any = None) -> JobSpec:  # fmt: skip
    """Record a job and (with `index`) index its ranges as waiting, as the API does (the Celery
    messages are the test's calls to engine.process_range); without, every range runs alone.
    `given`: the job's known-channel record, its files already under the job's `inputs/`."""
    sha = read_model(Path(settings.models_dir) / "tiny").sha256
    spec = JobSpec.model_validate(dict(
        id=job_id or os.urandom(8).hex(), owner="o", model="tiny", model_sha256=sha, channel_set="t1ce+seg",
        channels=["t1ce", "seg"], image_size=32, count=count, seed=seed, sampler=sampler, steps=steps,
        formats=["nifti"], batch_size=batch_size, created_at=time.time(), request={}, given=given,
    ))  # fmt: skip
    assert store.create(spec, 600) is None
    if index:
        store.confirm_queued(spec)
    return spec


def run_job(store: JobStore, settings: Settings, spec: JobSpec) -> None:
    for start, stop in spec.ranges():
        engine.process_range(store, settings, spec.id, start, stop)
    assert store.state(spec.id) == JobState.succeeded


def pixels(settings: Settings, spec: JobSpec) -> dict[str, np.ndarray]:
    d = engine.job_dir(settings, spec.id)
    return {f"{i}/{c}": np.asarray(nib.load(d / f"{spec.id}_{i:04d}_{c}.nii.gz").dataobj)
            for i in range(spec.count) for c in spec.channels}  # fmt: skip


def assert_same_samples(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def test_out_of_memory_splits_the_batch_and_the_job_completes_bit_identical(
    setup: tuple[JobStore, Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, settings = setup
    undisturbed = submit(store, settings, seed=9, count=8, batch_size=8)
    run_job(store, settings, undisturbed)
    model_cache.clear()  # a fresh worker process: no cap learned yet

    calls = raise_oom_above(monkeypatch, 2)
    job = submit(store, settings, seed=9, count=8, batch_size=8)
    run_job(store, settings, job)
    assert calls[0] == 8  # the first try ran out of memory
    assert_same_samples(pixels(settings, job), pixels(settings, undisturbed))
    assert model_cache.batch_limit(undisturbed.model_sha256, "cpu").cap == 2


def count_rows(monkeypatch: pytest.MonkeyPatch, hook: Callable[[int], None] | None = None) -> list[int]:
    """Record the row count of every network call (and call `hook(call number)` first)."""
    import torch

    from model.inference import InferenceModel

    calls: list[int] = []
    real = InferenceModel.__call__

    def call(self: InferenceModel, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        if hook is not None:
            hook(len(calls))
        return real(self, x, t)

    monkeypatch.setattr(InferenceModel, "__call__", call)
    return calls


def alone(store: JobStore, settings: Settings, specs: list[JobSpec]) -> list[dict[str, np.ndarray]]:
    """The same jobs (seeds, counts, sampler, steps) each sampled on its own, range by range."""
    out = []
    for spec in specs:
        twin = submit(store, settings, seed=spec.seed, count=spec.count, batch_size=spec.batch_size,
                      steps=spec.steps, index=False)  # fmt: skip
        run_job(store, settings, twin)
        out.append(pixels(settings, twin))
    return out


@pytest.mark.parametrize("precision", ["auto", "fp32"])  # fp32: what CPUs without native bf16 run
def test_waiting_ranges_of_several_jobs_are_sampled_in_one_batch_bit_identical(
    setup: tuple[JobStore, Settings], monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    store, settings = setup
    settings = settings.model_copy(update={"precision": precision})
    jobs = [submit(store, settings, seed=s, count=c, batch_size=2) for s, c in ((1, 3), (2, 2), (3, 1))]
    calls = count_rows(monkeypatch)
    # The first job's first task takes every waiting range (6 samples, room for 8) into one batch.
    # (Its jobs finish side by side: whichever of job 0's two ranges lands last finalises it.)
    outcome = engine.process_range(store, settings, jobs[0].id, 0, 2, "task-1")
    assert outcome in ("sampled 2 of [0, 2)", "succeeded")
    assert set(calls) == {6}
    assert [store.state(j.id) for j in jobs] == [JobState.succeeded] * 3
    # The other ranges' own messages, delivered later, find nothing left to do.
    assert engine.process_range(store, settings, jobs[1].id, 0, 2, "task-2") == "skipped: job is succeeded"
    merged = [pixels(settings, j) for j in jobs]
    monkeypatch.undo()
    for got, want in zip(merged, alone(store, settings, jobs), strict=True):
        assert_same_samples(got, want)


def test_the_batch_is_capped_and_the_rest_is_taken_in_later_batches(
    setup: tuple[JobStore, Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, settings = setup
    settings = settings.model_copy(update={"max_batch_size": 4})
    jobs = [submit(store, settings, seed=s, count=2, batch_size=2) for s in (1, 2, 3)]
    calls = count_rows(monkeypatch)
    engine.process_range(store, settings, jobs[0].id, 0, 2, "task-1")
    assert max(calls) == 4 and calls[-1] == 2  # a batch of 4, then the last range
    assert [store.state(j.id) for j in jobs] == [JobState.succeeded] * 3


def test_cancelling_one_job_drops_its_rows_and_keeps_the_others_intact(
    setup: tuple[JobStore, Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, settings = setup
    a, b, c = (submit(store, settings, seed=s, count=2, batch_size=2, steps=12) for s in (1, 2, 3))

    def cancel_b(call: int) -> None:
        if call == 3:
            store.request_cancel(b.id)
            time.sleep(0.15)  # past the worker's cancel-poll interval

    calls = count_rows(monkeypatch, cancel_b)
    engine.process_range(store, settings, a.id, 0, 2, "task-1")
    assert calls[0] == 6 and calls[-1] == 4  # b's two rows left the batch
    assert store.state(b.id) == JobState.cancelled and not engine.job_dir(settings, b.id).exists()
    assert store.state(a.id) == store.state(c.id) == JobState.succeeded
    merged = [pixels(settings, a), pixels(settings, c)]
    monkeypatch.undo()
    for got, want in zip(merged, alone(store, settings, [a, c]), strict=True):
        assert_same_samples(got, want)


def test_a_job_whose_finalisation_fails_fails_alone(
    setup: tuple[JobStore, Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, settings = setup
    a, b, c = (submit(store, settings, seed=s, count=1, batch_size=1) for s in (1, 2, 3))
    real = engine.finalize

    def finalize(spec: JobSpec, *args: Any, **kw: Any) -> Any:
        if spec.id == b.id:
            raise OSError(28, "No space left on device")
        return real(spec, *args, **kw)

    monkeypatch.setattr(engine, "finalize", finalize)
    engine.process_range(store, settings, a.id, 0, 1, "task-1")
    rec = store.get(b.id)
    assert rec is not None and rec.state == JobState.failed and "No space left" in (rec.error or "")
    assert not engine.job_dir(settings, b.id).exists()
    for job in (a, c):
        assert store.state(job.id) == JobState.succeeded
        assert (engine.job_dir(settings, job.id) / "manifest.json").exists()


def test_a_job_whose_sample_files_fail_fails_alone(
    setup: tuple[JobStore, Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The jobs of a merged batch share one writer pool and one sync: one job's failed write
    fails that job (no part file is left to look finished), and the others' samples are theirs."""
    from synthmri.outputs import writers

    store, settings = setup
    a, b, c = (submit(store, settings, seed=s, count=2, batch_size=2) for s in (1, 2, 3))
    real = writers.write_sample

    def write_sample(directory: Path, job_id: str, *args: Any, **kw: Any) -> Any:
        if job_id == b.id:
            raise OSError(28, "No space left on device")
        return real(directory, job_id, *args, **kw)

    monkeypatch.setattr(writers, "write_sample", write_sample)
    batches: list[int] = []
    real_batch = engine.write_batch

    def write_batch(batch: list[engine.Rows], *args: Any) -> Any:
        batches.append(len(batch))
        return real_batch(batch, *args)

    monkeypatch.setattr(engine, "write_batch", write_batch)
    engine.process_range(store, settings, a.id, 0, 2, "task-1")
    assert batches == [3]  # one merged batch
    rec = store.get(b.id)
    assert rec is not None and rec.state == JobState.failed and "No space left" in (rec.error or "")
    assert not engine.job_dir(settings, b.id).exists()
    assert store.state(a.id) == store.state(c.id) == JobState.succeeded
    merged = [pixels(settings, a), pixels(settings, c)]
    monkeypatch.undo()
    for got, want in zip(merged, alone(store, settings, [a, c]), strict=True):
        assert_same_samples(got, want)


def test_ranges_claimed_by_a_task_that_died_are_sampled_when_its_message_returns(
    setup: tuple[JobStore, Settings],
) -> None:
    store, settings = setup
    a, b = (submit(store, settings, seed=s, count=2, batch_size=2) for s in (1, 2))
    key = spec_batch_key(a)
    # Task "dead" took a's message, claimed a's and b's ranges, then its process died.
    status, claimed = store.claim_ranges(key, "dead", 0.5, 8, time.time(), range_member(a.id, 0, 2))
    assert status == "ok" and len(claimed) == 2
    # b's own message arrives while the claim is live: another task's batch holds it, nothing to do.
    outcome = engine.process_range(store, settings, b.id, 0, 2, "task-b")
    assert outcome == "skipped: sampled in another task's batch"
    assert store.state(b.id) == JobState.queued
    # The broker hands a's unacknowledged message back (same task id): it samples both ranges.
    assert engine.process_range(store, settings, a.id, 0, 2, "dead") == "succeeded"
    assert store.state(b.id) == JobState.succeeded
    assert store.claim_holder(a.id, 0) is None and store.claim_holder(b.id, 0) is None


def test_a_lapsed_claim_is_taken_by_any_task(setup: tuple[JobStore, Settings]) -> None:
    store, settings = setup
    a, b = (submit(store, settings, seed=s, count=2, batch_size=2) for s in (1, 2))
    store.claim_ranges(spec_batch_key(a), "dead", 0.2, 8, time.time())
    time.sleep(0.3)
    assert engine.process_range(store, settings, b.id, 0, 2, "task-b") == "succeeded"
    assert store.state(a.id) == JobState.succeeded


def test_a_worker_gathers_jobs_that_arrive_while_its_batch_has_room(
    setup: tuple[JobStore, Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs submitted together reach the worker milliseconds apart: the first task waits for
    them (each arrival during a quiet period extends the wait) up to the batch's room."""
    store, settings = setup
    first = submit(store, settings, seed=1, count=2, batch_size=2)
    key = spec_batch_key(first)
    arrivals: list[Callable[[], JobSpec]] = [
        lambda: submit(store, settings, seed=2, count=2, batch_size=2),
        lambda: submit(store, settings, seed=3, count=2, batch_size=2),
        lambda: submit(store, settings, seed=4, count=2, batch_size=2),
    ]
    arrived: list[JobSpec] = []
    quiet_periods = 0

    def sleep(seconds: float) -> None:  # one job arrives in each of the first three quiet periods
        nonlocal quiet_periods
        assert seconds == engine.GATHER_QUIET_SECONDS
        quiet_periods += 1
        if arrivals:
            arrived.append(arrivals.pop(0)())

    monkeypatch.setattr(engine.time, "sleep", sleep)
    own = range_member(first.id, 0, 2)
    _, members = store.claim_ranges(key, "task-a", 5.0, 6, time.time(), own)
    held = engine.gather(store, key, "task-a", 5.0, 6, members, seconds=10.0)
    # Room for 6 samples: the first job and the next two, and then no more waiting.
    assert held == [own] + [range_member(s.id, 0, 2) for s in arrived] and quiet_periods == 2
    assert len(arrivals) == 1

    # A lone job waits one quiet period, then samples.
    lone = submit(store, settings, seed=5, count=1, batch_size=1, steps=5)
    quiet_periods = 0
    own = range_member(lone.id, 0, 1)
    _, members = store.claim_ranges(spec_batch_key(lone), "task-b", 5.0, 6, time.time(), own)
    assert engine.gather(store, spec_batch_key(lone), "task-b", 5.0, 6, members, seconds=10.0) == [own]
    assert quiet_periods == 1
    # No gathering when the setting is 0.
    assert engine.gather(store, spec_batch_key(lone), "task-b", 5.0, 6, members, seconds=0.0) == [own]
    assert quiet_periods == 1


def test_the_grid_drawn_while_writing_a_whole_job_is_the_one_finalisation_draws(
    setup: tuple[JobStore, Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch holding a whole job draws its grid beside the sample files; finalisation keeps it
    and would have drawn the same bytes."""
    from synthmri.outputs.layout import GRID

    store, settings = setup
    spec = submit(store, settings, seed=4, count=3, batch_size=4)  # one range: the whole job
    calls: list[int] = []
    original = engine.write_samples

    def spy(spec_: JobSpec, directory: Path, *args: Any) -> None:
        original(spec_, directory, *args)
        calls.append(int((directory / GRID).is_file()))  # written with the samples, before finalising

    monkeypatch.setattr(engine, "write_samples", spy)
    run_job(store, settings, spec)
    assert calls == [1]
    directory = engine.job_dir(settings, spec.id)
    drawn = (directory / GRID).read_bytes()
    (directory / GRID).unlink()
    engine.finalize(spec, directory, settings=settings, started_at=None)
    assert (directory / GRID).read_bytes() == drawn

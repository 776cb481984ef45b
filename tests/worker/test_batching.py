"""Batch sizing and cross-request batching in worker.engine, against a real Redis and the tiny
checkpoint (no Celery process): samples are compared by opening the NIfTI files."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import redis

from synthmri.contract import JobSpec, JobState
from synthmri.jobstore import JobStore
from synthmri.localstack import RedisServer
from synthmri.registry import read_model
from synthmri.settings import Settings
from tests.model.test_generate import raise_oom_above
from worker import engine, model_cache

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture
def setup(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[tuple[JobStore, Settings]]:
    models = tmp_path / "models"
    models.mkdir()
    tiny_checkpoint.rename(models / "tiny")
    model_cache.clear()
    with RedisServer(tmp_path / "redis") as server:
        settings = Settings(redis_url=server.url, models_dir=models, results_dir=tmp_path / "results",
                            device="cpu", progress_interval_seconds=0.05, max_batch_size=8)  # fmt: skip
        yield JobStore(redis.Redis.from_url(server.url, decode_responses=True)), settings
    model_cache.clear()


def submit(store: JobStore, settings: Settings, *, seed: int, count: int, batch_size: int = 4,
           sampler: str = "dpm++sde", steps: int = 4) -> JobSpec:  # fmt: skip
    """Record a job and index its ranges as waiting, as the API does (the Celery messages are
    the test's calls to engine.process_range)."""
    sha = read_model(Path(settings.models_dir) / "tiny").sha256
    spec = JobSpec.model_validate(dict(
        id=os.urandom(8).hex(), owner="o", model="tiny", model_sha256=sha, channel_set="t1ce+seg",
        channels=["t1ce", "seg"], image_size=32, count=count, seed=seed, sampler=sampler, steps=steps,
        formats=["nifti"], batch_size=batch_size, created_at=time.time(), request={},
    ))  # fmt: skip
    assert store.create(spec, 600) is None
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

"""worker.engine's task logic against a real Redis and the tiny checkpoint (no Celery process)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from synthmri.contract import JobSpec, JobState
from synthmri.jobstore import JobStore
from synthmri.localstack import RedisServer
from synthmri.registry import read_model
from synthmri.settings import Settings
from worker import engine


@pytest.fixture
def setup(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[tuple[JobStore, Settings, JobSpec]]:
    models = tmp_path / "models"
    models.mkdir()
    tiny_checkpoint.rename(models / "tiny")
    with RedisServer(tmp_path / "redis") as server:
        settings = Settings(redis_url=server.url, models_dir=models, results_dir=tmp_path / "results",
                            device="cpu", progress_interval_seconds=0.05)  # fmt: skip
        store = JobStore(redis.Redis.from_url(server.url, decode_responses=True))
        spec = JobSpec(id="ab" * 8, owner="o", model="tiny", model_sha256=read_model(models / "tiny").sha256,
                       channel_set="t1ce+seg", channels=["t1ce", "seg"], image_size=32, count=3, seed=4,
                       sampler="dpm++", steps=3, formats=["nifti"], batch_size=2, created_at=time.time(),
                       request={})  # fmt: skip
        store.create(spec, 600)
        yield store, settings, spec


def test_ranges_finalise_once_and_redelivery_is_harmless(setup: tuple[JobStore, Settings, JobSpec]) -> None:
    store, settings, spec = setup
    d = engine.job_dir(settings, spec.id)
    assert engine.process_range(store, settings, spec.id, 0, 2) == "sampled 2 of [0, 2)"
    first = (d / f"{spec.id}_0001_t1ce.nii.gz").read_bytes()
    assert engine.process_range(store, settings, spec.id, 2, 3) == "succeeded"
    assert store.state(spec.id) == JobState.succeeded
    assert (d / "archive.zip").exists() and (d / "grid.png").exists()
    # A duplicate delivery neither rewrites samples nor finalises again.
    assert engine.process_range(store, settings, spec.id, 0, 2) == "skipped: job is succeeded"
    assert (d / f"{spec.id}_0001_t1ce.nii.gz").read_bytes() == first
    assert store.stats()["samples"] == 3


def test_cancel_mid_sampling_removes_every_file(setup: tuple[JobStore, Settings, JobSpec]) -> None:
    store, settings, spec = setup
    d = engine.job_dir(settings, spec.id)
    engine.process_range(store, settings, spec.id, 0, 2)
    assert any(d.iterdir())
    store.request_cancel(spec.id)
    assert engine.process_range(store, settings, spec.id, 2, 3) == "cancelled"
    assert store.state(spec.id) == JobState.cancelled and not d.exists()


def test_replaced_model_fails_the_job_with_a_reason(setup: tuple[JobStore, Settings, JobSpec]) -> None:
    store, settings, spec = setup
    cfg = Path(settings.models_dir) / "tiny" / "config.json"
    cfg.write_text(cfg.read_text() + "\n")
    assert engine.process_range(store, settings, spec.id, 0, 2) == "failed"
    rec = store.get(spec.id)
    assert rec is not None and rec.state == JobState.failed and "was replaced" in (rec.error or "")

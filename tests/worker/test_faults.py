"""worker.engine under faults: Redis stalling mid-range, a full disk, weights that do not load.

Real Redis (a redis-server we SIGSTOP) and the tiny checkpoint; no Celery process: the
task body's outage handling (worker.outage) is called as the task calls it.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from safetensors.numpy import save_file

from synthmri.contract import JobSpec, JobState
from synthmri.jobstore import JobStore
from synthmri.localstack import RedisServer
from synthmri.registry import read_model, scan_registry
from synthmri.settings import Settings
from worker import engine
from worker.outage import run_through_outages

TIMEOUT = 0.3  # the worker's Redis timeout in these tests; every stall below is much longer


@pytest.fixture
def setup(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[tuple[RedisServer, JobStore, Settings]]:
    models = tmp_path / "models"
    models.mkdir()
    tiny_checkpoint.rename(models / "tiny")
    with RedisServer(tmp_path / "redis") as server:
        settings = Settings(redis_url=server.url, models_dir=models, results_dir=tmp_path / "results",
                            device="cpu", progress_interval_seconds=0.05,
                            worker_redis_timeout_seconds=TIMEOUT)  # fmt: skip
        yield server, JobStore.from_url(server.url, timeout=TIMEOUT), settings


def make_spec(settings: Settings, steps: int, sampler: str = "ddim", count: int = 2) -> JobSpec:
    sha = read_model(Path(settings.models_dir) / "tiny").sha256
    return JobSpec.model_validate(dict(
        id=os.urandom(8).hex(), owner="o", model="tiny", model_sha256=sha, channel_set="t1ce+seg",
        channels=["t1ce", "seg"], image_size=32, count=count, seed=4, sampler=sampler, steps=steps,
        formats=["nifti"], batch_size=2, created_at=time.time(), request={},
    ))  # fmt: skip


def run_range(store: JobStore, settings: Settings, spec: JobSpec, out: dict[str, Any]) -> threading.Thread:
    """The sample_range task body, in a thread."""

    def body() -> None:
        out["result"] = run_through_outages(
            lambda: engine.process_range(store, settings, spec.id, 0, spec.count, "task-1"),
            store.r, patience=60, what="test range",
        )  # fmt: skip
        out["done_at"] = time.monotonic()

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def wait_for_progress(server: RedisServer, job_id: str) -> None:
    probe = redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=2)
    deadline = time.monotonic() + 60
    while not probe.hgetall(f"synthmri:job:{job_id}:progress"):
        assert time.monotonic() < deadline, "sampling never reported progress"
        time.sleep(0.02)
    probe.close()


def test_a_range_rides_out_a_redis_stall_and_finishes_bit_identical(
    setup: tuple[RedisServer, JobStore, Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stops answering mid-sampling and stays stopped until sampling has ended and the
    range's next state change has timed out. Sampling goes on without progress writes; the
    state changes wait for Redis; the job succeeds with the same samples as an undisturbed run."""
    server, store, settings = setup
    spec = make_spec(settings, steps=20)
    store.create(spec, 600)
    out: dict[str, Any] = {}
    caplog.set_level(logging.INFO, logger="synthmri.worker")
    thread = run_range(store, settings, spec, out)
    wait_for_progress(server, spec.id)
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        last_part = engine.part_path(engine.job_dir(settings, spec.id), spec.count - 1)
        deadline = time.monotonic() + 60
        while not last_part.exists():  # sampling goes on while Redis is stopped
            assert time.monotonic() < deadline and thread.is_alive(), out
            time.sleep(0.05)
        time.sleep(5 * TIMEOUT)
        assert thread.is_alive() and "result" not in out  # waiting for Redis, not failed
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    resumed = time.monotonic()
    thread.join(timeout=60)
    assert out.get("result") == "succeeded", out
    assert out["done_at"] - resumed < 15
    rec = store.get(spec.id)
    assert rec is not None and rec.state == JobState.succeeded and rec.error is None
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "Redis unreachable during sampling" in messages  # progress/cancel polls were skipped
    assert "waiting for it, then running again" in messages  # a state change waited for Redis

    calm = make_spec(settings, steps=20)
    store.create(calm, 600)
    assert engine.process_range(store, settings, calm.id, 0, 2) == "succeeded"
    for i in range(2):
        a = np.load(engine.part_path(engine.job_dir(settings, spec.id), i))
        b = np.load(engine.part_path(engine.job_dir(settings, calm.id), i))
        assert sorted(a.files) == sorted(b.files) == sorted(spec.channels)
        for channel in spec.channels:
            assert np.array_equal(a[channel], b[channel]), channel
    assert store.stats()["samples"] == 4  # each range counted once, the re-run included


Setup = tuple[RedisServer, JobStore, Settings]


def test_cancel_during_a_stall_applies_when_redis_returns(setup: Setup) -> None:
    server, store, settings = setup
    spec = make_spec(settings, steps=1000, sampler="ddpm")
    store.create(spec, 600)
    out: dict[str, Any] = {}
    thread = run_range(store, settings, spec, out)
    wait_for_progress(server, spec.id)
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    time.sleep(5 * TIMEOUT)
    os.kill(server.proc.pid, signal.SIGCONT)
    store.request_cancel(spec.id)  # accepted once Redis answers
    thread.join(timeout=30)
    assert out.get("result") == "cancelled"
    assert store.state(spec.id) == JobState.cancelled
    assert not engine.job_dir(settings, spec.id).exists()


def test_full_disk_fails_the_job_without_paths_and_removes_its_files(
    setup: tuple[RedisServer, JobStore, Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, store, settings = setup
    spec = make_spec(settings, steps=3)
    store.create(spec, 600)
    from synthmri.outputs import writers

    real = writers.write_nifti
    written: list[Path] = []

    def fill_up(path: Path, *args: Any, **kw: Any) -> None:
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, *args, **kw)
        written.append(path)

    monkeypatch.setattr(writers, "write_nifti", fill_up)
    assert engine.process_range(store, settings, spec.id, 0, 2) == "failed"
    rec = store.get(spec.id)
    assert rec is not None and rec.state == JobState.failed
    assert rec.error == "sampling failed: No space left on device (ENOSPC)"
    assert written and not engine.job_dir(settings, spec.id).exists()


def test_weights_that_do_not_load_mark_the_model_unavailable(setup: Setup) -> None:
    """Well-formed safetensors of the wrong network pass the registry's checks; the worker's
    load fails, the job fails naming the model (not a path), and the model is reported."""
    _, store, settings = setup
    weights = Path(settings.models_dir) / "tiny" / "model.safetensors"
    save_file({"not.a.unet": np.zeros(4, dtype=np.float32)}, str(weights))
    spec = make_spec(settings, steps=3)
    store.create(spec, 600)
    assert engine.process_range(store, settings, spec.id, 0, 2) == "failed"
    rec = store.get(spec.id)
    assert rec is not None and rec.error is not None
    assert rec.error.startswith("model 'tiny' could not be loaded (") and "GET /v1/models" in rec.error
    assert "weights do not match" in rec.error and "/" not in rec.error.split("GET")[0]
    faults = store.model_faults()
    assert list(faults) == [spec.model_sha256]
    registry = scan_registry(settings.models_dir).without_faults(faults)
    assert registry.models == {} and "could not load" in registry.unavailable["tiny"].reason


def test_a_task_never_leaves_its_job_stuck(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected error fails the job before the task fails (a failed task is not run again);
    Redis away for longer than the task's patience hands the delivery back, job untouched."""
    from celery.exceptions import Reject

    from worker import tasks

    server, store, settings = setup
    monkeypatch.setattr(tasks, "store", lambda: store)
    monkeypatch.setattr(tasks, "settings", settings.model_copy(update={"redis_outage_seconds": 1.0}))
    broken, waiting = make_spec(settings, steps=3), make_spec(settings, steps=3)
    for spec in (broken, waiting):
        store.create(spec, 600)

    def crash() -> str:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        tasks.run_task(broken.id, "test", crash)
    rec = store.get(broken.id)
    assert rec is not None and rec.state == JobState.failed and rec.error == tasks.INTERNAL_ERROR

    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        work = lambda: engine.process_range(store, settings, waiting.id, 0, 1)  # noqa: E731
        with pytest.raises(Reject) as e:
            tasks.run_task(waiting.id, "test", work)
        assert e.value.requeue and time.monotonic() - started < 10
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert store.state(waiting.id) == JobState.queued


def test_celery_cold_shutdown_is_not_a_job_failure() -> None:
    """Celery's cold shutdown raises the solo pool's terminate_job error inside the running task;
    that (and only that) is recognised, so the task is requeued instead of failing its job."""
    from worker.outage import worker_stopping

    pool: dict[str, Any] = {}
    exec(compile("def terminate_job():\n    raise NotImplementedError('solo does not implement kill_job')\n",
                 "/site-packages/celery/concurrency/base.py", "exec"), pool)  # fmt: skip
    for fn, stopping in ((pool["terminate_job"], True), (lambda: [][0], False)):
        try:
            try:
                fn()
            except Exception as inner:
                raise RuntimeError("raised inside sampling") from inner
        except Exception as e:
            assert worker_stopping(e.__cause__ or e) is stopping
    try:
        raise NotImplementedError("aten::op has no kernel for this backend")  # a real failure
    except NotImplementedError as e:
        assert not worker_stopping(e)

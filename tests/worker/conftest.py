"""The engine tests' Redis and models directory (a real redis-server, the tiny checkpoint)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from synthmri.jobstore import JobStore
from synthmri.localstack import RedisServer
from synthmri.settings import Settings
from worker import model_cache


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

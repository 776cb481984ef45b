"""A real redis-server for the API unit tests (no worker: tasks just wait in the queue)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from synthmri.jobstore import JobStore
from synthmri.localstack import RedisServer


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def store(redis_url: str) -> Iterator[JobStore]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield JobStore(client)
    client.close()


def write_model(models_dir: Path, name: str, channel_set: str, image_size: int = 32) -> Path:
    """A checkpoint directory the registry can read: real config.json, placeholder weights (a
    well-formed safetensors file of one small tensor that differs per name)."""
    import numpy as np
    from safetensors.numpy import save_file

    from model.config import CheckpointConfig, get_preset

    preset = get_preset("tiny", channel_set)
    cfg = CheckpointConfig(name=name, channel_set=channel_set, model=preset.model, diffusion=preset.diffusion,
                           provenance={"steps": 0})  # fmt: skip
    d = models_dir / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(cfg.to_json())
    placeholder = np.frombuffer(name.encode().ljust(16, b"_"), dtype=np.uint8).astype(np.float32)
    save_file({"placeholder": placeholder}, str(d / "model.safetensors"))
    return d

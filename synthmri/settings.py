"""Service settings: one pydantic-settings class read from `SYNTHMRI_*` environment variables.

Both the API and the worker build a `Settings()`; every field's description is the
documentation (the README's settings table is generated from `Settings.model_fields`).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

HASHED_PREFIX = "sha256:"


def hash_api_key(key: str) -> str:
    """The form in which an API key is kept in memory and recorded as a job's owner."""
    return hashlib.sha256(key.encode()).hexdigest()


class Settings(BaseSettings):
    """Configuration shared by the API, the worker and `synthmri up`."""

    model_config = SettingsConfigDict(env_prefix="SYNTHMRI_", extra="ignore", frozen=True)

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis URL: Celery broker and job records.",
    )
    models_dir: Path = Field(
        default=Path("var/models"),
        description="Directory of checkpoints, one sub-directory per model (model.safetensors + "
        "config.json); the sub-directory name is the model name in /v1/models.",
    )
    results_dir: Path = Field(
        default=Path("var/results"),
        description="Directory where workers write job outputs ({results_dir}/{job_id}/); the API "
        "serves downloads from it, so API and workers must share it (a volume in compose).",
    )
    api_keys: Annotated[frozenset[str], NoDecode] = Field(
        default=frozenset(),
        description="Comma-separated API keys accepted as `Authorization: Bearer KEY`. Entries "
        "written `sha256:HEX` are already hashed. Only sha256 hashes are kept in memory; with no "
        "keys every request is refused with 401.",
    )
    max_count: int = Field(default=64, ge=1, description="Largest `count` (samples) one job may request.")
    max_active_jobs_per_key: int = Field(
        default=4, ge=1, description="Queued + running jobs one API key may have at once; more → 429."
    )
    task_batch_size: int = Field(
        default=8,
        ge=1,
        description="Samples per Celery task (a contiguous index range). Smaller spreads a job over "
        "more workers and shortens each task; a worker merges ranges into batches of up to "
        "max_batch_size.",
    )
    max_batch_size: int = Field(
        default=32,
        ge=1,
        description="Most samples a worker samples in one batch. Waiting ranges of several jobs for "
        "the same model, sampler and steps are merged into one batch up to this size; on a CUDA "
        "out-of-memory the batch is halved and the size that fit is kept as this model's cap.",
    )
    batch_gather_seconds: float = Field(
        default=0.25,
        ge=0,
        le=5,
        description="How long a worker whose batch has room waits for more jobs of the same model, "
        "sampler and steps before it starts sampling; it stops at the first 50 ms without a new one, "
        "so a lone job waits 50 ms. 0 starts at once.",
    )
    worker_niceness: int = Field(
        default=0,
        ge=0,
        le=19,
        description="CPU priority a worker gives up at start (Unix nice, 0..19). Where the API shares "
        "the machine's cores with CPU sampling, a positive value keeps submissions and polls "
        "answered promptly while a batch samples; `synthmri up` uses 10.",
    )
    result_ttl_seconds: int = Field(
        default=86400,
        ge=60,
        description="How long a finished job's record and files are kept before removal.",
    )
    cleanup_interval_seconds: int = Field(
        default=300, ge=5, description="How often each worker sweeps expired job directories."
    )
    visibility_timeout_seconds: int = Field(
        default=45,
        ge=5,
        description="Redis transport visibility timeout: an unacknowledged task whose lease was not "
        "renewed for this long is handed to another worker. Running tasks renew their lease every "
        "visibility/4 s, so this bounds redelivery after a worker dies, not the task length.",
    )
    unacked_restore_interval_seconds: int = Field(
        default=5,
        ge=1,
        description="Seconds between the worker's sweeps for abandoned tasks (kombu "
        "unacked_restore_interval; the throttle is fixed at 2, so a sweep runs every 2× this).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="Worker device: `auto` takes CUDA when available. Run one worker process per "
        "GPU (solo pool), e.g. CUDA_VISIBLE_DEVICES=i for the i-th process.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        default="auto",
        description="Worker arithmetic of the network body: `auto` takes bf16 on GPUs and on CPUs "
        "with native bf16 (≈2× faster, batch-invariant), else fp32; fp16 only on CUDA (a CPU "
        "worker uses `auto` instead); `int8` (opt-in, CPUs with VNNI; a CUDA worker uses `auto`) "
        "runs convolutions and attention/skip projections in int8 with fused quantising: ≈1.6× over "
        "bf16 for the 121 M-parameter nets at a small quality cost (benchmarks/RESULTS.md); the "
        "first job per process compiles the fused kernels. Samples are reproducible for a fixed "
        "device and precision.",
    )
    progress_interval_seconds: float = Field(
        default=0.5, ge=0.05, description="Minimum time between progress writes to a job record."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log level of the API and the worker."
    )
    public_base_url: str = Field(
        default="",
        description="Base URL put in result links (e.g. https://synthmri.example.org); empty → "
        "links are relative to the request's host.",
    )
    long_poll_max_seconds: float = Field(
        default=60.0, ge=0, description="Upper bound for `GET /v1/jobs/{id}?wait=S`."
    )
    max_request_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        description="Largest request body the API reads, uploads of known channels included (the "
        "default takes 16 samples' four 256² float32 NIfTI slices uncompressed, with room to spare); a "
        "larger one is answered 413 without being read to the end.",
    )
    redis_timeout_seconds: float = Field(
        default=1.0,
        gt=0,
        description="Connect and reply timeout of the API's Redis calls: when Redis is stalled or "
        "down, a request that needs it is answered 503 after about this long.",
    )
    worker_redis_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        description="Connect and reply timeout of a worker's Redis calls. A timeout never fails a "
        "job: sampling goes on without progress writes, and state changes wait for Redis.",
    )
    redis_outage_seconds: float = Field(
        default=600.0,
        ge=0,
        description="How long a worker waits for an unreachable Redis in the middle of a task; "
        "after that it hands the task back, and the task runs again once Redis answers.",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _hash_keys(cls, value: Any) -> frozenset[str]:
        """Split the comma-separated list and keep only sha256 hashes."""
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",")]
        else:
            items = [str(v).strip() for v in (value or ())]
        hashed = set()
        for item in items:
            if not item:
                continue
            if item.startswith(HASHED_PREFIX):
                digest = item[len(HASHED_PREFIX) :].lower()
                if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                    raise ValueError(f"{item[:20]}… is not `sha256:` followed by 64 hex digits")
                hashed.add(digest)
            else:
                hashed.add(hash_api_key(item))
        return frozenset(hashed)

    def key_is_valid(self, key: str) -> bool:
        return hash_api_key(key) in self.api_keys

    def as_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process (keys stay hashed)."""
        env: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name == "api_keys":
                value = ",".join(HASHED_PREFIX + h for h in sorted(value))
            env[f"SYNTHMRI_{name.upper()}"] = str(value)
        return env


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once from the environment)."""
    return Settings()

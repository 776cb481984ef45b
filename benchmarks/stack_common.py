"""Shared by the service benchmarks: the real stack (Redis + one Celery worker + uvicorn, via
synthmri.localstack.LocalStack) on a models directory, and a small HTTP client for it."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from synthmri.localstack import REPO_ROOT, LocalStack

DEMO_MODEL = REPO_ROOT / "models" / "demo"
TERMINAL = {"succeeded", "failed", "cancelled"}


def models_dir(root: Path, model: str) -> Path:
    """A models directory holding one model named `model`: "demo" (models/demo, 64², five
    channels) or "tiny" (the test suite's random-init 32² t1ce+seg checkpoint)."""
    models = root / "models"
    if model == "demo":
        shutil.copytree(DEMO_MODEL, models / "demo")
    elif model == "tiny":
        from tests.conftest import build_tiny_checkpoint

        build_tiny_checkpoint(models / "tiny")
    else:
        raise SystemExit(f"unknown model {model!r}: demo or tiny")
    return models


@contextlib.contextmanager
def running_stack(model: str, env: dict[str, str]) -> Iterator[tuple[LocalStack, str]]:
    """The stack with `model` as its only model; yields (stack, API key)."""
    with tempfile.TemporaryDirectory(prefix="synthmri-bench-") as tmp:
        root = Path(tmp)
        key = "bench-key"
        full_env = {"SYNTHMRI_API_KEYS": key, "SYNTHMRI_DEVICE": "cpu", "SYNTHMRI_LOG_LEVEL": "warning",
                    **env}  # fmt: skip
        with LocalStack(models_dir=models_dir(root, model), results_dir=root / "results", workdir=root,
                        api_key=key, env=full_env) as stack:  # fmt: skip
            yield stack, key


class Client:
    def __init__(self, stack: LocalStack, key: str) -> None:
        self.http = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)

    def submit(self, **body: Any) -> str:
        r = self.http.post("/v1/jobs", json=body)
        r.raise_for_status()
        return str(r.json()["id"])

    def wait(self, job_id: str, timeout: float = 1800) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.http.get(f"/v1/jobs/{job_id}", params={"wait": 5}).json()
            if job["state"] in TERMINAL:
                if job["state"] != "succeeded":
                    raise SystemExit(f"job {job_id} ended {job['state']}: {job.get('error')}")
                return dict(job)
        raise SystemExit(f"job {job_id} did not finish in {timeout} s")

"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from starlette.concurrency import run_in_threadpool

from api.deps import ServicesDep
from api.problems import answers, problem_response
from synthmri.jobstore import LATENCY_BUCKETS, STORE_ERRORS

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the API process answers")
async def healthz() -> dict[str, str]:
    """Touches nothing but the event loop, so it answers while Redis or the disk are stuck."""
    return {"status": "ok"}


def results_dir_writable(results_dir: Path) -> str:
    """"writable", or why a worker could not write job files there (no server path)."""
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".readyz-", dir=results_dir)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        return f"not writable ({e.strerror or type(e).__name__})"
    return "writable"


@router.get(
    "/readyz",
    summary="Readiness: Redis reachable, a worker alive, a model available, results writable",
    responses={503: {**answers(503)[503], "description": "Not ready: `detail` and `checks` say what fails"}},
)
async def readyz(request: Request, services: ServicesDep) -> Any:
    settings = services.settings
    checks: dict[str, Any] = {}
    workers: list[dict[str, Any]] = []
    faults: dict[str, str] = {}
    try:
        await services.store.ping()
        workers = await services.store.workers()
        faults = await services.store.model_faults()
        checks["redis"] = "ok"
    except STORE_ERRORS as e:
        checks["redis"] = f"unreachable ({type(e).__name__})"
    checks["workers"] = len(workers)
    registry = (await services.models.scan()).without_faults(faults)
    checks["models"] = sorted(registry.models)
    checks["models_unavailable"] = {u.name: u.reason for u in registry.unavailable.values()}
    loaded = {sha for w in workers for sha in w.get("models", [])}
    checks["models_loaded"] = sorted(m.name for m in registry.models.values() if m.sha256 in loaded)
    checks["results_dir"] = await run_in_threadpool(results_dir_writable, Path(settings.results_dir))
    problems = []
    if checks["redis"] != "ok":
        problems.append("Redis is unreachable")
    if checks["redis"] == "ok" and not workers:
        problems.append("no worker has sent a heartbeat in the last 20 s")
    if not registry.models:
        why = "; ".join(f"{n}: {r}" for n, r in checks["models_unavailable"].items())
        problems.append(f"no model is available ({why})" if why else "the models directory holds no model")
    if checks["results_dir"] != "writable":
        problems.append(f"the results directory is {checks['results_dir']}")
    if problems:
        return problem_response(request, 503, "not ready: " + "; ".join(problems), checks=checks,
                                headers={"Retry-After": "5"})  # fmt: skip
    return JSONResponse({"status": "ready", "checks": checks})


class ServiceCollector:
    """Turns the shared counters read from Redis at scrape time into metrics, so every API
    replica reports the same."""

    def __init__(self, stats: dict[str, Any], workers: int) -> None:
        self.stats = stats
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        jobs = GaugeMetricFamily(
            "synthmri_jobs", "Jobs by state (terminal states: since Redis started)", labels=["state"]
        )
        for state, n in stats["states"].items():
            jobs.add_metric([state], n)
        yield jobs
        yield GaugeMetricFamily(
            "synthmri_queue_depth", "Celery tasks waiting in the queue", value=stats["queue_depth"]
        )
        yield GaugeMetricFamily("synthmri_workers", "Workers with a live heartbeat", value=self.workers)
        yield CounterMetricFamily(
            "synthmri_samples_generated", "Samples written by workers", value=stats["samples"]
        )
        lat = stats["latency"]
        buckets = [(str(float(le)), float(lat.get(str(le), 0))) for le in LATENCY_BUCKETS]
        count = float(lat.get("count", 0))
        yield HistogramMetricFamily(
            "synthmri_job_latency_seconds",
            "Submit-to-success time of finished jobs",
            buckets=[*buckets, ("+Inf", count)],
            sum_value=float(lat.get("sum", 0.0)),
        )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}, **answers(503)},
)
async def metrics(services: ServicesDep) -> Response:
    stats = await services.store.stats()
    workers = len(await services.store.workers())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(stats, workers))
    start = time.perf_counter()
    body = generate_latest(registry)
    body += f"# scrape took {time.perf_counter() - start:.4f} s\n".encode()
    return Response(body, media_type=CONTENT_TYPE_LATEST)

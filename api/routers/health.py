"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from api.deps import ServicesDep
from api.problems import problem_response
from synthmri.contract import QUEUE
from synthmri.jobstore import LATENCY_BUCKETS, JobStore
from synthmri.registry import scan_models

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the API process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: Redis reachable, a worker alive, a model available",
    responses={503: {"description": "not ready (problem+json with the failing checks)"}},
)
def readyz(request: Request, services: ServicesDep) -> Any:
    checks: dict[str, Any] = {}
    try:
        services.store.r.ping()
        checks["redis"] = "ok"
        workers = services.store.workers()
    except Exception as e:
        checks["redis"] = f"unreachable ({type(e).__name__})"
        workers = []
    checks["workers"] = len(workers)
    models = scan_models(services.settings.models_dir)
    checks["models"] = sorted(models)
    loaded = {sha for w in workers for sha in w.get("models", [])}
    checks["models_loaded"] = sorted(m.name for m in models.values() if m.sha256 in loaded)
    problems = []
    if checks["redis"] != "ok":
        problems.append("Redis is unreachable")
    if not workers:
        problems.append("no worker has sent a heartbeat in the last 20 s")
    if not models:
        problems.append(f"no model in {services.settings.models_dir}")
    if problems:
        return problem_response(request, 503, "not ready: " + "; ".join(problems), checks=checks)
    return JSONResponse({"status": "ready", "checks": checks})


class ServiceCollector:
    """Reads the shared counters from Redis at scrape time, so every API replica reports the same."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        stats = self.store.stats()
        jobs = GaugeMetricFamily(
            "synthmri_jobs", "Jobs by state (terminal states: since Redis started)", labels=["state"]
        )
        for state, n in stats["states"].items():
            jobs.add_metric([state], n)
        yield jobs
        yield GaugeMetricFamily(
            "synthmri_queue_depth", "Celery tasks waiting in the queue", value=self.store.r.llen(QUEUE)
        )
        yield GaugeMetricFamily(
            "synthmri_workers", "Workers with a live heartbeat", value=len(self.store.workers())
        )
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


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(services: ServicesDep) -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(services.store))
    start = time.perf_counter()
    body = generate_latest(registry)
    body += f"# scrape took {time.perf_counter() - start:.4f} s\n".encode()
    return Response(body, media_type=CONTENT_TYPE_LATEST)

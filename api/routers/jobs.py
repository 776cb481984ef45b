"""/v1/jobs: submit, watch, cancel and download generation jobs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from pydantic import BaseModel

from api.deps import OwnerDep, ServicesDep
from api.problems import Problem
from synthmri.contract import (
    ACTIVE_STATES,
    JobRequest,
    JobSpec,
    JobState,
    JobView,
    Progress,
    Timings,
    new_job_id,
    new_seed,
)
from synthmri.jobstore import JobRecord
from synthmri.registry import RegistryError, resolve_model, scan_models

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobId = Annotated[str, PathParam(description="The job id returned by POST /v1/jobs", max_length=64)]

# File names inside a job directory (written by worker.engine; the API never imports it).
GRID, MANIFEST, ARCHIVE = "grid.png", "manifest.json", "archive.zip"
EXTENSIONS = {"nii.gz": ("nifti", "application/gzip"), "png": ("png", "image/png")}


class JobList(BaseModel):
    jobs: list[JobView]


def _links(request: Request, services: ServicesDep, job_id: str, state: JobState) -> dict[str, str]:
    base = services.settings.public_base_url.rstrip("/")
    path = f"/v1/jobs/{job_id}"
    links = {"self": base + path}
    if state == JobState.succeeded:
        links.update(
            grid=f"{base}{path}/{GRID}",
            manifest=f"{base}{path}/{MANIFEST}",
            archive=f"{base}{path}/{ARCHIVE}",
            samples=f"{base}{path}/samples/{{index}}/{{channel}}.{{ext}}",
        )
    return links


def view(request: Request, services: ServicesDep, rec: JobRecord) -> JobView:
    spec = rec.spec
    t = Timings(created_at=spec.created_at, started_at=rec.started_at, finished_at=rec.finished_at)
    if rec.started_at is not None:
        t.queued_seconds = round(rec.started_at - spec.created_at, 3)
        t.run_seconds = round((rec.finished_at or time.time()) - rec.started_at, 3)
    done = spec.count if rec.state == JobState.succeeded else min(rec.samples_done, spec.count)
    return JobView(
        id=spec.id,
        state=rec.state,
        model=spec.model,
        model_sha256=spec.model_sha256,
        channels=spec.channels,
        count=spec.count,
        seed=spec.seed,
        sampler=spec.sampler,
        steps=spec.steps,
        formats=spec.formats,
        image_size=spec.image_size,
        progress=Progress(samples_done=done, samples_total=spec.count, fraction=round(rec.fraction, 4)),
        timings=t,
        cancel_requested=rec.cancel_requested and not rec.state.terminal,
        error=rec.error,
        links=_links(request, services, spec.id, rec.state),
    )


def own_job(services: ServicesDep, owner: str, job_id: str) -> JobRecord:
    """The caller's job, or 404 — also for another key's job, so ids reveal nothing."""
    rec = services.store.get(job_id) if job_id.isalnum() else None
    if rec is None or rec.spec.owner != owner:
        raise Problem(404, f"no job {job_id!r} for this API key (it may have expired)")
    return rec


@router.post(
    "",
    status_code=202,
    response_model=JobView,
    summary="Submit a generation job",
    responses={202: {"headers": {"Location": {"description": "URL of the new job"}}}},
)
def submit_job(
    body: JobRequest, request: Request, response: Response, services: ServicesDep, owner: OwnerDep
) -> JobView:
    settings = services.settings
    if body.count > settings.max_count:
        raise Problem(
            422, f"count {body.count} exceeds this server's limit of {settings.max_count} samples per job; "
            "split it into several jobs (use different seeds or consecutive requests)",
        )  # fmt: skip
    try:
        info = resolve_model(scan_models(settings.models_dir), body.model, body.channels)
    except RegistryError as e:
        raise Problem(422, str(e)) from None
    sampler, steps = info.sampling(body.sampler, body.steps)
    if steps > info.diffusion_steps:
        raise Problem(422, f"steps {steps} exceeds the model's {info.diffusion_steps} diffusion steps")
    wanted = set(info.channels if body.channels is None else body.channels.split("+"))
    spec = JobSpec(
        id=new_job_id(),
        owner=owner,
        model=info.name,
        model_sha256=info.sha256,
        channel_set=info.channel_set,
        channels=[c for c in info.channels if c in wanted],
        image_size=info.image_size,
        count=body.count,
        seed=body.seed if body.seed is not None else new_seed(),
        sampler=sampler,
        steps=steps,
        formats=body.formats,
        batch_size=settings.task_batch_size,
        created_at=time.time(),
        request=body.model_dump(mode="json", exclude_none=True),
    )
    active = services.store.create(spec, settings.result_ttl_seconds, settings.max_active_jobs_per_key)
    if active is not None:
        raise Problem(
            429, f"this API key already has {active} queued or running jobs (limit "
            f"{settings.max_active_jobs_per_key}); wait for one to finish or cancel one",
            headers={"Retry-After": "10"},
        )  # fmt: skip
    try:
        services.queue.enqueue_job(spec)
    except Exception as e:
        services.store.finish(spec.id, JobState.failed, error="could not enqueue the job")
        raise Problem(503, f"the task queue is unreachable ({type(e).__name__}); try again shortly") from None
    response.headers["Location"] = f"/v1/jobs/{spec.id}"
    rec = services.store.get(spec.id)
    assert rec is not None
    return view(request, services, rec)


@router.get("", response_model=JobList, summary="List your jobs, newest first")
def list_jobs(
    request: Request,
    services: ServicesDep,
    owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JobList:
    return JobList(jobs=[view(request, services, r) for r in services.store.list_for_owner(owner, limit)])


@router.get("/{job_id}", response_model=JobView, summary="A job's state, progress, timings and links")
async def get_job(
    job_id: JobId,
    request: Request,
    services: ServicesDep,
    owner: OwnerDep,
    wait: Annotated[
        float, Query(ge=0, description="Long-poll: wait up to this many seconds for a state change")
    ] = 0,
) -> JobView:
    rec = own_job(services, owner, job_id)
    deadline = time.monotonic() + min(wait, services.settings.long_poll_max_seconds)
    first = rec.state
    while not rec.state.terminal and rec.state == first and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        rec = own_job(services, owner, job_id)
    return view(request, services, rec)


@router.delete("/{job_id}", response_model=JobView, status_code=202, summary="Cancel a job")
def cancel_job(job_id: JobId, request: Request, services: ServicesDep, owner: OwnerDep) -> JobView:
    """Queued: it never runs. Running: it stops at the next sampler step and its files are removed."""
    rec = own_job(services, owner, job_id)
    if rec.state in (JobState.succeeded, JobState.failed):
        raise Problem(409, f"job {job_id} already {rec.state.value}; there is nothing to cancel")
    if rec.state in ACTIVE_STATES:
        services.store.request_cancel(job_id)
        rec = own_job(services, owner, job_id)
    return view(request, services, rec)


def _result_file(services: ServicesDep, rec: JobRecord, name: str) -> Path:
    if rec.state != JobState.succeeded:
        raise Problem(409, f"job {rec.spec.id} is {rec.state.value}; results exist once it has succeeded")
    path = Path(services.settings.results_dir) / rec.spec.id / name
    if not path.is_file():
        raise Problem(410, f"the files of job {rec.spec.id} are no longer available (expired or removed)")
    return path


@router.get(
    "/{job_id}/grid.png", response_class=FileResponse, summary="Grid PNG: rows = samples, columns = channels"
)
def get_grid(job_id: JobId, services: ServicesDep, owner: OwnerDep) -> FileResponse:
    path = _result_file(services, own_job(services, owner, job_id), GRID)
    return FileResponse(path, media_type="image/png")


@router.get("/{job_id}/manifest.json", response_class=FileResponse, summary="The job's manifest")
def get_manifest(job_id: JobId, services: ServicesDep, owner: OwnerDep) -> FileResponse:
    path = _result_file(services, own_job(services, owner, job_id), MANIFEST)
    return FileResponse(path, media_type="application/json")


@router.get("/{job_id}/archive.zip", response_class=FileResponse, summary="Everything as one zip")
def get_archive(job_id: JobId, services: ServicesDep, owner: OwnerDep) -> FileResponse:
    path = _result_file(services, own_job(services, owner, job_id), ARCHIVE)
    return FileResponse(path, media_type="application/zip", filename=f"synthmri_{job_id}.zip")


def _sample(
    services: ServicesDep, owner: str, job_id: str, index: int, channel: str, ext: str
) -> FileResponse:
    rec = own_job(services, owner, job_id)
    spec = rec.spec
    if not 0 <= index < spec.count:
        raise Problem(404, f"job {job_id} has samples 0..{spec.count - 1}; there is no sample {index}")
    if channel not in spec.channels:
        raise Problem(404, f"job {job_id} has channels {', '.join(spec.channels)}; not {channel!r}")
    fmt, media = EXTENSIONS[ext]
    if fmt not in spec.formats:
        raise Problem(404, f"job {job_id} did not request {fmt} output (formats: {', '.join(spec.formats)})")
    # Every piece of the name was checked against the job's own spec above.
    path = _result_file(services, rec, f"{spec.id}_{index:04d}_{channel}.{ext}")
    return FileResponse(path, media_type=media, filename=path.name)


SampleIndex = Annotated[int, PathParam(ge=0, description="Sample index, 0..count-1")]


@router.get("/{job_id}/samples/{index}/{channel}.nii.gz", response_class=FileResponse,
            summary="One sample's channel as NIfTI")  # fmt: skip
def get_sample_nifti(
    job_id: JobId, index: SampleIndex, channel: str, services: ServicesDep, owner: OwnerDep
) -> FileResponse:
    return _sample(services, owner, job_id, index, channel, "nii.gz")


@router.get("/{job_id}/samples/{index}/{channel}.png", response_class=FileResponse,
            summary="One sample's channel as PNG")  # fmt: skip
def get_sample_png(
    job_id: JobId, index: SampleIndex, channel: str, services: ServicesDep, owner: OwnerDep
) -> FileResponse:
    return _sample(services, owner, job_id, index, channel, "png")

"""/v1/jobs: submit, watch, cancel and download generation jobs.

Every route is `async def` and awaits the job store, so no request ever blocks the
event loop or a thread on Redis; blocking work (the model scan, publishing to the
broker, file checks) runs in worker threads.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from api.deps import OwnerDep, ServicesDep
from api.problems import Problem, answers, clip, invalid
from api.uploads import REQUEST_BODY, read_submission
from synthmri.contract import (
    ACTIVE_STATES,
    NNUNET,
    JobSpec,
    JobState,
    JobView,
    Progress,
    Timings,
    new_job_id,
    new_seed,
    nnunet_unfit,
)
from synthmri.given import GivenChannels, GivenError, channel_set_with, prepare_known
from synthmri.jobstore import STORE_ERRORS, JobRecord
from synthmri.outputs.layout import (
    EXTENSION_FORMATS,
    GRID,
    JOB_ARCHIVE,
    MANIFEST,
    MEDIA_TYPES,
    NNUNET_ARCHIVE,
    sample_filename,
)
from synthmri.registry import RegistryError, resolve_model

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
log = logging.getLogger("synthmri.api")

JobId = Annotated[str, PathParam(description="The job id returned by POST /v1/jobs", max_length=64)]



class JobList(BaseModel):
    jobs: list[JobView]


def _links(services: ServicesDep, spec: JobSpec, state: JobState) -> dict[str, str]:
    base = services.settings.public_base_url.rstrip("/")
    path = f"/v1/jobs/{spec.id}"
    links = {"self": base + path}
    if state == JobState.succeeded:
        links.update(
            grid=f"{base}{path}/{GRID}",
            manifest=f"{base}{path}/{MANIFEST}",
            archive=f"{base}{path}/{JOB_ARCHIVE}",
            samples=f"{base}{path}/samples/{{index}}/{{channel}}.{{ext}}",
        )
        if NNUNET in spec.formats:
            links[NNUNET] = f"{base}{path}/{NNUNET_ARCHIVE}"
    return links


def view(services: ServicesDep, rec: JobRecord) -> JobView:
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
        given=spec.given.channels if spec.given is not None else [],
        guidance=spec.given.guidance if spec.given is not None else None,
        progress=Progress(samples_done=done, samples_total=spec.count, fraction=round(rec.fraction, 4)),
        timings=t,
        cancel_requested=rec.cancel_requested and not rec.state.terminal,
        error=rec.error,
        links=_links(services, spec, rec.state),
    )


def no_such_job(job_id: str) -> Problem:
    return Problem(404, f"no job {clip(job_id)} for this API key (it may have expired)")


async def owned_job(job_id: JobId, services: ServicesDep, owner: OwnerDep) -> JobRecord:
    """The caller's job, or 404 — also for another key's job, so ids reveal nothing."""
    rec = await services.store.get(job_id) if job_id.isascii() and job_id.isalnum() else None
    if rec is None or rec.spec.owner != owner:
        raise no_such_job(job_id)
    return rec


OwnedJob = Annotated[JobRecord, Depends(owned_job)]


async def reread(services: ServicesDep, rec: JobRecord) -> JobRecord:
    """The job's record as it is now (404 once it was deleted or has expired meanwhile)."""
    now = await services.store.get(rec.spec.id)
    if now is None:
        raise no_such_job(rec.spec.id)
    return now


def _file(media_type: str, what: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI answers of a download route."""
    return {200: {"content": {media_type: {}}, "description": what}, **answers(401, 404, 409, 410, 422, 503)}


@router.post(
    "",
    status_code=202,
    response_model=JobView,
    summary="Submit a generation job",
    description="A JSON `JobRequest`; or, to give known channels (a mask, a T1CE slice) that the samples "
    "keep while the model generates the rest, multipart/form-data with the JobRequest JSON in the field "
    "`request` and files in fields named after channels.",
    responses={
        202: {"headers": {"Location": {"description": "URL of the new job", "schema": {"type": "string"}}}},
        **answers(401, 413, 415, 422, 429, 503),
    },
    openapi_extra={"requestBody": REQUEST_BODY},
)
async def submit_job(
    request: Request,
    response: Response,
    services: ServicesDep,
    owner: OwnerDep,
) -> JobView:
    settings = services.settings
    submission = await read_submission(request, settings.max_count)
    body, uploads = submission.request, submission.uploads
    if body.count > settings.max_count:
        raise invalid(
            "count", f"count {body.count} exceeds this server's limit of {settings.max_count} samples per "
            "job; split it into several jobs (use different seeds or consecutive requests)",
        )  # fmt: skip
    registry = (await services.models.recent()).without_faults(await services.store.model_faults())
    # A request by channel set with known channels outside it needs a model that has both.
    channels = body.channels
    if body.model is None:
        channels = channel_set_with(body.channels, [u.channel for u in uploads])
    try:
        info = resolve_model(registry.models, body.model, channels, registry.unavailable)
    except RegistryError as e:
        raise invalid("model" if body.model is not None else "channels", str(e)) from None
    sampler, steps = info.sampling(body.sampler, body.steps)
    if steps > info.diffusion_steps:
        raise invalid("steps", f"steps {steps} exceeds the model's {info.diffusion_steps} diffusion steps")
    wanted = set(info.channels if body.channels is None else body.channels.split("+"))
    outputs = [c for c in info.channels if c in wanted]
    unfit = nnunet_unfit(outputs) if NNUNET in body.formats else None
    if unfit is not None:  # JobRequest checks named channels; a model named alone is checked here
        raise invalid("formats", f"the nnunet format cannot be made from model {info.name!r}: {unfit}")
    # Decoding uploads is real work for a thread; a request without files is only checked (a
    # thread hop per submission is what costs the most under load).
    check = partial(prepare_known, uploads, info.model_slices(), count=body.count, outputs=outputs,
                    guidance=body.guidance)  # fmt: skip
    try:
        known = await run_in_threadpool(check) if uploads else check()
    except GivenError as e:
        raise invalid(e.field, e.detail) from None
    spec = JobSpec(
        id=new_job_id(),
        owner=owner,
        model=info.name,
        model_sha256=info.sha256,
        channel_set=info.channel_set,
        channels=outputs,
        image_size=info.image_size,
        count=body.count,
        seed=body.seed if body.seed is not None else new_seed(),
        sampler=sampler,
        steps=steps,
        formats=body.formats,
        batch_size=settings.task_batch_size,
        created_at=time.time(),
        request=body.model_dump(mode="json", exclude_none=True),
        given=known.record() if known is not None else None,
    )
    directory = Path(settings.results_dir) / spec.id
    await _store_known(known, directory)
    try:
        await _create_and_enqueue(services, spec)
    except BaseException:
        if known is not None:  # nothing of a refused request is kept
            await run_in_threadpool(shutil.rmtree, directory, True)
        raise
    # Only a confirmed job counts as accepted; one left unconfirmed (this call failing) is
    # failed by the workers' sweep, so a 503 here never leaves a job queued for ever.
    await services.store.confirm_queued(spec)
    response.headers["Location"] = f"/v1/jobs/{spec.id}"
    rec = await services.store.get(spec.id)
    if rec is None:
        raise Problem(503, "the job store lost the new job (Redis restarted?); submit it again")
    return view(services, rec)


async def _create_and_enqueue(services: ServicesDep, spec: JobSpec) -> None:
    """Record the job (429 past the key's active-job limit) and publish its tasks (503 if the
    queue is unreachable)."""
    settings = services.settings
    active = await services.store.create(spec, settings.result_ttl_seconds, settings.max_active_jobs_per_key)
    if active is not None:
        raise Problem(
            429, f"this API key already has {active} queued or running jobs (limit "
            f"{settings.max_active_jobs_per_key}); wait for one to finish or cancel one",
            headers={"Retry-After": "10"},
        )  # fmt: skip
    try:
        await run_in_threadpool(services.queue.enqueue_job, spec)
    except Exception as e:
        log.warning("job %s: enqueueing failed: %s", spec.id, type(e).__name__)
        # If Redis cannot take this either, the workers' sweep fails the unconfirmed job.
        with contextlib.suppress(*STORE_ERRORS):
            await services.store.fail(spec.id, "the task queue was unreachable; submit the job again")
        raise Problem(
            503, f"the task queue is unreachable ({type(e).__name__}); try again shortly",
            headers={"Retry-After": "5"},
        ) from None  # fmt: skip


async def _store_known(known: GivenChannels | None, directory: Path) -> None:
    """Write the uploads where the worker reads them, before the job exists (so a worker never
    sees a job without its inputs); nothing stays behind when that fails."""
    if known is None:
        return
    try:
        await run_in_threadpool(known.write, directory)
    except OSError as e:
        await run_in_threadpool(shutil.rmtree, directory, True)
        log.warning("cannot store the known channels of a new job: %s", type(e).__name__)
        raise Problem(503, f"the results directory cannot take the uploaded files ({type(e).__name__}); "
                      "try again shortly", headers={"Retry-After": "5"}) from None  # fmt: skip


@router.get(
    "", response_model=JobList, summary="List your jobs, newest first", responses=answers(401, 422, 503)
)
async def list_jobs(
    services: ServicesDep,
    owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JobList:
    records = await services.store.list_for_owner(owner, limit)
    return JobList(jobs=[view(services, r) for r in records])


@router.get(
    "/{job_id}",
    response_model=JobView,
    summary="A job's state, progress, timings and links",
    responses=answers(401, 404, 422, 503),
)
async def get_job(
    rec: OwnedJob,
    services: ServicesDep,
    wait: Annotated[
        float, Query(ge=0, description="Long-poll: wait up to this many seconds for a state change")
    ] = 0,
) -> JobView:
    deadline = time.monotonic() + min(wait, services.settings.long_poll_max_seconds)
    first = rec.state
    if rec.state.terminal or wait <= 0:
        return view(services, rec)
    with services.changes.watch(rec.spec.id) as changed:
        rec = await reread(services, rec)  # a change before the watch began has no event
        while not rec.state.terminal and rec.state == first and (left := deadline - time.monotonic()) > 0:
            await services.changes.wait(changed, left)
            rec = await reread(services, rec)
    return view(services, rec)


@router.post(
    "/{job_id}/cancel",
    response_model=JobView,
    status_code=202,
    summary="Cancel a job, keeping its record",
    responses=answers(401, 404, 409, 422, 503),
)
async def cancel_job(rec: OwnedJob, services: ServicesDep) -> JobView:
    """Queued: it never runs. Running: it stops at the next sampler step and its files are
    removed. The job stays listed, as `cancelled`, until its record expires."""
    if rec.state in (JobState.succeeded, JobState.failed):
        raise Problem(409, f"job {rec.spec.id} already {rec.state.value}; there is nothing to cancel")
    if rec.state in ACTIVE_STATES:
        await services.store.request_cancel(rec.spec.id)
        rec = await reread(services, rec)
    return view(services, rec)


@router.delete(
    "/{job_id}",
    response_model=JobView,
    status_code=202,
    summary="Delete a job: cancel it if it is active, then remove its record and files",
    responses=answers(401, 404, 422, 503),
)
async def delete_job(rec: OwnedJob, services: ServicesDep) -> JobView:
    """Answers with the job as it ends: `cancelled` if it was queued or running (a running
    job stops at its next sampler step), else its final state. Afterwards the job answers
    404 and its files are gone."""
    await services.store.delete(rec.spec.id, rec.spec.owner)
    directory = Path(services.settings.results_dir) / rec.spec.id
    await run_in_threadpool(shutil.rmtree, directory, True)
    if rec.state in ACTIVE_STATES:
        rec = replace(rec, state=JobState.cancelled, finished_at=time.time())
    return view(services, rec)


async def _result_file(services: ServicesDep, rec: JobRecord, name: str) -> Path:
    if rec.state != JobState.succeeded:
        raise Problem(409, f"job {rec.spec.id} is {rec.state.value}; results exist once it has succeeded")
    path = Path(services.settings.results_dir) / rec.spec.id / name
    if not await anyio.Path(path).is_file():
        raise Problem(410, f"the files of job {rec.spec.id} are no longer available (expired or removed)")
    return path


@router.get(f"/{{job_id}}/{GRID}", response_class=FileResponse,
            summary="Grid PNG: rows = samples, columns = channels",
            responses=_file(MEDIA_TYPES["png"], "The grid"))  # fmt: skip
async def get_grid(rec: OwnedJob, services: ServicesDep) -> FileResponse:
    return FileResponse(await _result_file(services, rec, GRID), media_type=MEDIA_TYPES["png"])


@router.get(f"/{{job_id}}/{MANIFEST}", response_class=FileResponse, summary="The job's manifest",
            responses=_file(MEDIA_TYPES["json"], "manifest.json (see README, Output format)"))  # fmt: skip
async def get_manifest(rec: OwnedJob, services: ServicesDep) -> FileResponse:
    return FileResponse(await _result_file(services, rec, MANIFEST), media_type=MEDIA_TYPES["json"])


@router.get(f"/{{job_id}}/{JOB_ARCHIVE}", response_class=FileResponse, summary="Everything as one zip",
            responses=_file(MEDIA_TYPES["zip"], "Every file of the job"))  # fmt: skip
async def get_archive(rec: OwnedJob, services: ServicesDep) -> FileResponse:
    path = await _result_file(services, rec, JOB_ARCHIVE)
    return FileResponse(path, media_type=MEDIA_TYPES["zip"], filename=f"synthmri_{rec.spec.id}.zip")


async def _sample(services: ServicesDep, rec: JobRecord, index: int, channel: str, ext: str) -> FileResponse:
    spec = rec.spec
    if not 0 <= index < spec.count:
        raise Problem(404, f"job {spec.id} has samples 0..{spec.count - 1}; there is no sample {index}")
    if channel not in spec.channels:
        raise Problem(404, f"job {spec.id} has channels {', '.join(spec.channels)}; not {clip(channel)}")
    fmt = EXTENSION_FORMATS[ext]
    if fmt not in spec.formats:
        raise Problem(404, f"job {spec.id} did not request {fmt} output (formats: {', '.join(spec.formats)})")
    # Every piece of the name was checked against the job's own spec above.
    path = await _result_file(services, rec, sample_filename(spec.id, index, channel, ext))
    return FileResponse(path, media_type=MEDIA_TYPES[ext], filename=path.name)


SampleIndex = Annotated[int, PathParam(ge=0, description="Sample index, 0..count-1")]


@router.get("/{job_id}/samples/{index}/{channel}.nii.gz", response_class=FileResponse,
            summary="One sample's channel as NIfTI",
            responses=_file(MEDIA_TYPES["nii.gz"], "A gzipped NIfTI-1 file"))  # fmt: skip
async def get_sample_nifti(
    rec: OwnedJob, index: SampleIndex, channel: str, services: ServicesDep
) -> FileResponse:
    return await _sample(services, rec, index, channel, "nii.gz")


@router.get("/{job_id}/samples/{index}/{channel}.png", response_class=FileResponse,
            summary="One sample's channel as PNG",
            responses=_file(MEDIA_TYPES["png"], "An 8-bit PNG"))  # fmt: skip
async def get_sample_png(
    rec: OwnedJob, index: SampleIndex, channel: str, services: ServicesDep
) -> FileResponse:
    return await _sample(services, rec, index, channel, "png")


NNUNET_ANSWER = ("One folder Dataset501_SynthMRI/: dataset.json, imagesTr/, labelsTr/ (labels in nnU-Net's "
                 "BraTS region scheme; see docs/outputs.md)")


@router.get(f"/{{job_id}}/{NNUNET_ARCHIVE}", response_class=FileResponse,
            summary='The job as an nnU-Net v2 raw dataset (a job with "nnunet" in formats)',
            responses=_file(MEDIA_TYPES["zip"], NNUNET_ANSWER))  # fmt: skip
async def get_nnunet_dataset(rec: OwnedJob, services: ServicesDep) -> FileResponse:
    spec = rec.spec
    unfit = nnunet_unfit(spec.channels)
    if unfit is not None:
        raise Problem(409, f"job {spec.id} cannot be an nnU-Net dataset: {unfit}")
    if NNUNET not in spec.formats:  # a 409 like the above: the job exists, and will never have one
        raise Problem(
            409, f"job {spec.id} did not request the nnunet format (formats: {', '.join(spec.formats)}); "
            'submit the same request with "nnunet" in formats (the same seed gives the same samples), or '
            "convert its archive.zip with synthmri export-nnunet",
        )  # fmt: skip
    path = await _result_file(services, rec, NNUNET_ARCHIVE)
    return FileResponse(path, media_type=MEDIA_TYPES["zip"], filename=f"synthmri_{spec.id}_nnunet.zip")

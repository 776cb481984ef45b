"""The work behind the Celery tasks: sample an index range into files, then finalise the job.

Files of a job live in `{results_dir}/{job_id}/` (names: synthmri.outputs.layout). A sample
counts as complete when its part file (kept channels decoded; raw too when npz is asked for)
exists; it is written last, after the NIfTI/PNG files, and every file is renamed into place,
so a redelivered task skips finished samples and never sees half a file.
"""

from __future__ import annotations

import io
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from synthmri import __version__
from synthmri.atomic import atomic_write, flush_to_disk
from synthmri.contract import NNUNET, JobSpec, JobState, Manifest
from synthmri.jobstore import (
    STORE_ERRORS,
    JobStore,
    batch_key_sha256,
    parse_member,
    range_member,
    spec_batch_key,
)
from synthmri.outputs.layout import (
    GRID,
    NNUNET_ARCHIVE,
    PARTS_DIR,
    RunNames,
    part_path,
    sample_files,
    write_expiry,
)
from synthmri.public_errors import describe_error
from synthmri.settings import Settings
from worker.outage import BestEffort, worker_stopping

if TYPE_CHECKING:
    from model.checkpoint import LoadedCheckpoint

log = logging.getLogger("synthmri.worker")

# JobSpec fields that go into the manifest under the same key.
MANIFEST_SPEC_FIELDS = {"model", "channel_set", "channels", "image_size", "seed", "sampler", "steps",
                        "request", "formats", "given"}  # fmt: skip


class JobError(RuntimeError):
    """A job that cannot run (the message is shown to the client)."""


class ModelLoadError(JobError):
    """The job's checkpoint cannot be loaded: the model itself is at fault, not the job."""


def public_roots(settings: Settings) -> dict[str | Path, str]:
    """Server directories as clients see them in error messages."""
    roots: dict[str | Path, str] = {}
    for directory, label in ((settings.results_dir, "<results>"), (settings.models_dir, "<models>")):
        roots[Path(directory).resolve()] = roots[str(directory)] = label
    return roots


def resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise JobError("SYNTHMRI_DEVICE=cuda but this worker sees no CUDA device")
    return setting


def sampling_precision(setting: str, device: str) -> str:
    """The precision name this worker samples in (fp16 has no CPU kernels and int8 no CUDA ones:
    those fall back to auto)."""
    from model.inference import resolved_precision_name

    if (device == "cpu" and setting == "fp16") or (device != "cpu" and setting == "int8"):
        setting = "auto"
    return resolved_precision_name(device, setting)  # raises with the reason if int8 is unsupported here


def job_precision(spec: JobSpec, settings: Settings, device: str) -> str:
    """The precision a job samples in: this worker's, in a float type when the job's known channels
    are guided (guidance differentiates the network, which int8 cannot)."""
    from model.inference import differentiable_precision

    precision = sampling_precision(settings.precision, device)
    if spec.given is not None and spec.given.guidance > 0:
        return differentiable_precision(device, precision)
    return precision


def known_arguments(
    spec: JobSpec, directory: Path, indices: list[int], channels: tuple[str, ...]
) -> dict[str, Any]:
    """generate()'s known-channel arguments for these samples of the job (none without known channels)."""
    from synthmri.given import load_known

    if spec.given is None:
        return {}
    return {"known": load_known(directory, spec.given, channels, indices), "given": spec.given.channels,
            "guidance": spec.given.guidance}  # fmt: skip


def job_dir(settings: Settings, job_id: str) -> Path:
    return Path(settings.results_dir) / job_id


def job_sample_files(spec: JobSpec, index: int) -> list[str]:
    """The per-sample output names of sample `index` (relative to the job directory)."""
    return sample_files(spec.id, index, spec.channels, spec.formats)


def missing_indices(spec: JobSpec, directory: Path, start: int, stop: int) -> list[int]:
    return [i for i in range(start, stop) if not part_path(directory, i).exists()]


def sample_range(
    spec: JobSpec,
    directory: Path,
    start: int,
    stop: int,
    *,
    settings: Settings,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[int, float]:
    """Generate and write samples [start, stop) that are not yet complete; returns how many, and
    the seconds the sampling itself took (the network, not loading or writing)."""
    from model.generate import generate
    from worker.model_cache import batch_limit

    todo = missing_indices(spec, directory, start, stop)
    if not todo:
        return 0, 0.0
    device = resolve_device(settings.device)
    ckpt = load_job_model(spec, settings, device)
    limit = batch_limit(ckpt.sha256, device)
    t0 = time.perf_counter()
    x = generate(
        ckpt,
        seed=spec.seed,
        indices=todo,
        sampler=spec.sampler,
        steps=spec.steps,
        batch_size=limit.clamp(settings.max_batch_size),
        device=device,
        progress=progress,
        should_stop=should_stop,
        precision=job_precision(spec, settings, device),
        limit=limit,
        **known_arguments(spec, directory, todo, ckpt.config.channels),
    )
    sampling = time.perf_counter() - t0
    write_samples(spec, directory, ckpt, todo, x)
    return len(todo), sampling


# Threads writing one batch's samples: gzip, PNG encoding and file system calls release the GIL,
# so the files of a batch are written in parallel on the cores the sampler has just freed.
WRITER_THREADS = max(1, min(4, os.cpu_count() or 1))


@dataclass
class Rows:
    """Samples of one job to write: row k of `x` is sample `indices[k]`."""

    spec: JobSpec
    directory: Path
    indices: list[int]
    x: np.ndarray


def write_samples(spec: JobSpec, directory: Path, ckpt: LoadedCheckpoint, indices: list[int],
                  x: np.ndarray) -> None:  # fmt: skip
    """Write one job's samples `indices` (rows of `x`); see `write_batch`."""
    error = write_batch([Rows(spec, directory, indices, x)], ckpt)[0]
    if error is not None:
        raise error


def write_batch(batch: list[Rows], ckpt: LoadedCheckpoint) -> list[Exception | None]:
    """Write the samples of a sampling batch, each job's into its own directory: their NIfTI/PNG
    files, then their part files. Returns, per job, the error that stopped its writing, or None.

    All files of the batch are made durable together, with one filesystem sync before the part
    files (the completion markers) and one after, so a part file never outlives its sample's
    files in a power cut; a merged batch of sixteen one-sample jobs syncs twice, not 32 times. A
    job whose sample files fail gets no part files (and no grid): its error is its own. When a
    batch holds a whole job, the job's grid is drawn alongside and written with the part files,
    and finalisation keeps it: the grid is the largest single cost of finishing a job.
    """
    from model.generate import decode_sample
    from synthmri.outputs import writers

    errors: list[Exception | None] = [None] * len(batch)
    kept: list[list[dict[str, np.ndarray]]] = []
    for j, rows in enumerate(batch):
        kept.append([{c: d[c] for c in rows.spec.channels}
                     for d in (decode_sample(row, ckpt.config) for row in rows.x)])  # fmt: skip
        try:
            (rows.directory / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        except Exception as e:
            errors[j] = e

    def write(j: int, k: int) -> None:
        rows = batch[j]
        writers.write_sample(rows.directory, rows.spec.id, rows.indices[k], kept[j][k], rows.spec.formats,
                             durable=False)  # fmt: skip

    def mark(j: int, k: int) -> None:
        rows = batch[j]
        buf = io.BytesIO()
        raw = {}
        if "npz" in rows.spec.formats:  # the raw model-range sample only feeds the research npz
            raw["raw"] = rows.x[k][[ckpt.config.channels.index(c) for c in rows.spec.channels]]
        np.savez(buf, **raw, **kept[j][k])  # type: ignore[arg-type]
        atomic_write(part_path(rows.directory, rows.indices[k]), buf.getvalue(), durable=False)

    def grid(j: int) -> bytes:
        rows = batch[j]
        order = sorted(range(len(rows.indices)), key=rows.indices.__getitem__)
        labels = writers.grid_labels(sorted(rows.indices))
        return writers.grid_png([kept[j][k] for k in order], rows.spec.channels, labels)[0]

    def settle(futures: dict[int, list[Future[Any]]]) -> None:
        """Wait for every job's files; the first error of a job is kept as its outcome."""
        for j, fs in futures.items():
            for f in fs:
                error = f.exception()
                if error is not None and not isinstance(error, Exception):
                    raise error
                if error is not None and errors[j] is None:
                    errors[j] = error

    def ok() -> list[int]:
        return [j for j in range(len(batch)) if errors[j] is None]

    with ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="synthmri-write") as pool:
        grids = {j: pool.submit(grid, j) for j in ok() if holds_whole_job(batch[j])}
        settle({j: [pool.submit(write, j, k) for k in range(len(batch[j].indices))] for j in ok()})
        flush_all(batch[j].directory for j in ok())
        settle({j: [pool.submit(mark, j, k) for k in range(len(batch[j].indices))] for j in ok()})
        for j, drawn in grids.items():
            if errors[j] is None:
                try:
                    atomic_write(batch[j].directory / GRID, drawn.result(), durable=False)
                except Exception as e:  # drawing or writing the grid
                    errors[j] = e
    flush_all(rows.directory for rows in batch)
    return errors


def holds_whole_job(rows: Rows) -> bool:
    return len(rows.indices) > 1 and sorted(rows.indices) == list(range(rows.spec.count))


def flush_all(directories: Iterable[Path]) -> None:
    """Make the files written in `directories` durable: one sync per filesystem (the job
    directories of a results directory share one). A directory removed meanwhile, by a
    cancel, has nothing left to keep."""
    by_device: dict[int, list[Path]] = {}
    for d in directories:
        try:
            by_device.setdefault(d.stat().st_dev, []).append(d)
        except FileNotFoundError:
            continue
    for candidates in by_device.values():
        for d in candidates:
            try:
                flush_to_disk(d)
                break
            except FileNotFoundError:
                continue


def load_job_model(spec: JobSpec, settings: Settings, device: str) -> LoadedCheckpoint:
    """The job's checkpoint, checked to be the one the job was submitted for."""
    ckpt = load_model(spec, settings, device)
    if ckpt.sha256 != spec.model_sha256:
        raise JobError(
            f"model {spec.model!r} was replaced after the job was submitted "
            f"(sha256 {spec.model_sha256[:12]}… → {ckpt.sha256[:12]}…); submit the job again"
        )
    return ckpt


def load_model(spec: JobSpec, settings: Settings, device: str) -> LoadedCheckpoint:
    """The job's checkpoint; ModelLoadError when its files are unusable (not when unreadable:
    a permission or I/O error says nothing about the weights)."""
    from model.checkpoint import CheckpointError
    from synthmri.registry import ModelUnusable
    from worker.model_cache import get_checkpoint

    try:
        return get_checkpoint(Path(settings.models_dir) / spec.model, device)
    except (CheckpointError, ModelUnusable) as e:
        reason = describe_error(e, public_roots(settings)).removeprefix(f"{type(e).__name__}: ")
        raise ModelLoadError(reason) from e


def finalize(spec: JobSpec, directory: Path, *, settings: Settings, started_at: float | None,
             sampling_seconds: float | None = None) -> Manifest:  # fmt: skip
    """Grid, npz, manifest and zip from the complete samples, then the nnU-Net dataset zip when
    requested (idempotent: same inputs, same bytes)."""
    from synthmri.outputs.nnunet import write_job_zip
    from synthmri.outputs.writers import make_manifest, write_manifest_and_archive, write_run_summary

    t0 = time.time()
    device = resolve_device(settings.device)
    names = RunNames.job(spec.id)
    grid_written = (directory / GRID).is_file()
    want_raw = "npz" in spec.formats
    samples, raw = [], []
    if want_raw or not grid_written:  # else the part files hold nothing finalising needs
        for i in range(spec.count):
            with np.load(part_path(directory, i)) as part:
                samples.append({c: part[c] for c in spec.channels})
                if want_raw:
                    raw.append(part["raw"])
    indices = list(range(spec.count))
    files = [name for i in indices for name in job_sample_files(spec, i)]
    if spec.given is not None:
        files += [g.file for g in spec.given.inputs]  # the uploads travel with the samples they shaped
    npz = np.stack(raw) if want_raw else None
    files += write_run_summary(directory, names, samples, indices, spec.channels, raw=npz,
                               grid_written=grid_written)  # fmt: skip
    timings = {"created_at": spec.created_at, "finalized_at": t0}
    if started_at is not None:
        timings.update(started_at=started_at, queued_seconds=started_at - spec.created_at,
                       run_seconds=t0 - started_at)  # fmt: skip
    if sampling_seconds:
        timings["sampling_seconds"] = sampling_seconds  # the network's share of run_seconds
    # The manifest repeats what the spec fixed about the samples, plus what only the worker knows.
    from_spec = spec.model_dump(mode="json", include=MANIFEST_SPEC_FIELDS, exclude_none=True)
    manifest = Manifest.model_validate(
        make_manifest(
            **from_spec, sha256=spec.model_sha256, job_id=spec.id, indices=indices, files=files,
            timings=timings, version=__version__, device=device,
            precision=job_precision(spec, settings, device),
        )
    )  # fmt: skip
    write_manifest_and_archive(directory, names, files, manifest.model_dump(mode="json", exclude_none=True))
    if NNUNET in spec.formats:
        # Read back from the finished folder, as `synthmri export-nnunet` reads it; the record
        # names the job by id, not by its server path.
        write_job_zip(directory, directory / NNUNET_ARCHIVE, label=spec.id)
    write_expiry(directory, time.time() + settings.result_ttl_seconds)
    return manifest


class Throttle:
    """Calls through at most once per `interval` seconds (progress writes, cancel polls)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last = -float("inf")

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            return True
        return False


def process_range(
    store: JobStore,
    settings: Settings,
    job_id: str,
    start: int,
    stop: int,
    holder: str | None = None,
    batch_key: str | None = None,
) -> str:
    """One Celery task's work; returns what happened to its own range (for the task result and logs).

    The task samples its range together with other waiting ranges of its batch index (same
    model, sampler and steps; see synthmri.jobstore) in one batch, then keeps taking waiting
    ranges that were created before it started until none is left: a task whose range another
    task's batch holds does nothing, so the holder's own task must leave no claimed range
    behind, also when it is redelivered after a crash (same task id, so the same `holder`).

    Safe to run again at any point (after a crash, a redelivery or a Redis error, see
    worker.outage): written samples are skipped and state changes are idempotent. Redis
    errors propagate so the caller can wait for Redis; no other error escapes without the
    job being marked failed. `holder` names the task for claims and the finalisation lease.
    """
    from worker.model_cache import batch_limit

    holder = holder or secrets.token_hex(8)
    newest = time.time()
    rec = store.get(job_id)
    own: str | None = range_member(job_id, start, stop)
    outcome = ""
    if rec is None:
        own, outcome = None, "skipped: unknown or expired job"
    elif rec.state.terminal:
        own, outcome = None, f"skipped: job is {rec.state.value}"
    elif store.cancel_requested(job_id):
        own, outcome = None, cancel(store, rec.spec, job_dir(settings, job_id))
    key = batch_key or (spec_batch_key(rec.spec) if rec is not None else None)
    if key is None:
        return outcome
    device = resolve_device(settings.device)
    sha = batch_key_sha256(key)
    lease = max(1.0, settings.visibility_timeout_seconds / 2)
    while True:
        room = batch_limit(sha, device).clamp(settings.max_batch_size)
        status, members = store.claim_ranges(key, holder, lease, room, newest, own)
        if own is not None and status == "busy":
            outcome = "skipped: sampled in another task's batch"
        if not members:
            return outcome
        members = gather(store, key, holder, lease, room, members, settings.batch_gather_seconds)
        with ClaimLease(store, holder, lease, members):
            results = process_batch(store, settings, members, holder)
        store.settle_ranges(key, holder, members)
        if own is not None and own in results:
            outcome = results[own]
        own = None
        merged = [f"{m}: {r}" for m, r in results.items() if m != range_member(job_id, start, stop)]
        if merged:
            log.info("task %s sampled with its batch: %s", holder, "; ".join(merged))


# A gathering worker stops waiting after this long without a new range of its batch index.
GATHER_QUIET_SECONDS = 0.05


def samples_in(members: list[str]) -> int:
    return sum(stop - start for _, start, stop in map(parse_member, members))


def gather(store: JobStore, key: str, holder: str, lease: float, room: int, members: list[str],
           seconds: float) -> list[str]:  # fmt: skip
    """`members` plus ranges of the same batch index that arrive while the batch has room.

    Jobs that clients submit together reach the worker a few milliseconds apart, and the first
    one's task would otherwise start sampling alone. Waiting ends at the first quiet period
    without a new range (so a lone job waits GATHER_QUIET_SECONDS), at a full batch, or after
    `seconds`. Claims renewed by each call stay this task's.
    """
    held = list(members)
    deadline = time.monotonic() + seconds
    while samples_in(held) < room and time.monotonic() + GATHER_QUIET_SECONDS <= deadline:
        time.sleep(GATHER_QUIET_SECONDS)
        _, now = store.claim_ranges(key, holder, lease, room, time.time(), None)
        new = [m for m in now if m not in held]
        if not new:
            break
        held += new
    return held


class ClaimLease(threading.Thread):
    """Renews a task's claims while it samples them (the claims lapse if its process dies)."""

    def __init__(self, store: JobStore, holder: str, lease: float, members: list[str]) -> None:
        super().__init__(name="synthmri-claims", daemon=True)
        self.store, self.holder, self.lease, self.members = store, holder, lease, members
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.lease / 4):
            try:
                self.store.renew_claims(self.holder, self.lease, self.members)
            except STORE_ERRORS:
                log.warning("could not renew the claims of task %s: Redis unreachable", self.holder)

    def __enter__(self) -> ClaimLease:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()


@dataclass
class Part:
    """A claimed range of one job in a sampling batch."""

    member: str
    spec: JobSpec
    start: int
    stop: int
    directory: Path
    todo: list[int]
    sampling_seconds: float = 0.0  # this part's share of its batch's sampling time


def process_batch(store: JobStore, settings: Settings, members: list[str], holder: str) -> dict[str, str]:
    """Sample claimed ranges (of one batch index) together; returns each range's outcome.

    Each job keeps its own progress, cancel and failure: a cancelled job's rows leave the batch
    (the network skips them), and a job that fails to write or finalise fails alone. If the
    shared batch itself fails, each range is sampled again on its own, so that an error is
    charged to the job that causes it.
    """
    results: dict[str, str] = {}
    parts: list[Part] = []
    for m in members:
        job_id, start, stop = parse_member(m)
        rec = store.get(job_id)
        if rec is None:
            results[m] = "skipped: unknown or expired job"
        elif rec.state.terminal:
            results[m] = f"skipped: job is {rec.state.value}"
        elif store.cancel_requested(job_id):
            results[m] = cancel(store, rec.spec, job_dir(settings, job_id))
        else:
            d = job_dir(settings, job_id)
            parts.append(Part(m, rec.spec, start, stop, d, missing_indices(rec.spec, d, start, stop)))
    if len(parts) <= 1 or sum(len(p.todo) for p in parts) == 0:
        for p in parts:
            results[p.member] = process_alone(store, settings, p.spec.id, p.start, p.stop, holder)
        return results
    for p in parts:
        store.mark_running(p.spec.id)
    try:
        ckpt, x, cancelled = sample_parts(store, settings, parts)
    except STORE_ERRORS:
        raise
    except Exception as e:
        if worker_stopping(e):
            raise
        log.warning("a merged batch of %d ranges failed (%s); sampling each range on its own",
                    len(parts), describe_error(e, public_roots(settings)))  # fmt: skip
        for p in parts:
            results[p.member] = process_alone(store, settings, p.spec.id, p.start, p.stop, holder)
        return results

    # A job cancelled while its rows were sampled gets no files written.
    cancelled.update(p.spec.id for p in parts if store.cancel_requested(p.spec.id))
    writing = [p for p in parts if p.spec.id not in cancelled]
    written = write_batch([Rows(p.spec, p.directory, p.todo, x[p.member]) for p in writing], ckpt)
    errors = {p.member: error for p, error in zip(writing, written, strict=True)}

    def complete(p: Part) -> str:
        return complete_part(store, settings, p, errors.get(p.member), p.spec.id in cancelled, holder)

    # Each job's manifest and zip are its own: finishing them side by side lets the batch's
    # clients have their results together instead of one job after another.
    with ThreadPoolExecutor(min(WRITER_THREADS, len(parts)), thread_name_prefix="synthmri-finish") as pool:
        outcomes = list(pool.map(complete, parts))
    results.update((p.member, outcome) for p, outcome in zip(parts, outcomes, strict=True))
    return results


def sample_parts(
    store: JobStore, settings: Settings, parts: list[Part]
) -> tuple[LoadedCheckpoint, dict[str, np.ndarray], set[str]]:
    """One batch over every part's missing samples; returns the checkpoint, each part's rows and
    the ids of jobs cancelled meanwhile (their rows were dropped)."""
    from model.generate import generate_rows
    from worker.model_cache import batch_limit

    spec0 = parts[0].spec
    device = resolve_device(settings.device)
    ckpt = load_job_model(spec0, settings, device)
    for p in parts[1:]:
        if p.spec.model_sha256 != ckpt.sha256:
            raise JobError(f"job {p.spec.id} is for another checkpoint than its batch")
        if spec_batch_key(p.spec) != spec_batch_key(spec0):
            raise JobError(f"job {p.spec.id} has other known channels or guidance than its batch")
    rows = [(p.spec.seed, i) for p in parts for i in p.todo]
    known: dict[str, Any] = {}
    if spec0.given is not None:
        # Each job's rows carry its own known values; the batch shares which channels and the guidance.
        each = [known_arguments(p.spec, p.directory, p.todo, ckpt.config.channels) for p in parts]
        known = {**each[0], "known": np.concatenate([k["known"] for k in each])}
    job_of_row = [p.spec.id for p in parts for _ in p.todo]
    jobs = list(dict.fromkeys(job_of_row))
    cancelled: set[str] = set()
    dropped: set[int] = set()
    write_throttle, stop_throttle = Throttle(settings.progress_interval_seconds), Throttle(0.1)
    polls = BestEffort()

    def write_progress(fraction: float) -> None:
        for p in parts:
            if p.spec.id not in cancelled:
                store.set_progress(p.spec.id, p.start, (p.stop - p.start) * fraction, 0)

    def progress(done: int, total: int) -> None:
        if write_throttle.ready():
            polls.call(lambda: write_progress(done / max(1, total)), None)

    def cancelled_jobs() -> list[str]:
        return [j for j in jobs if j not in cancelled and store.cancel_requested(j)]

    def poll_cancels() -> set[int]:
        if stop_throttle.ready():
            newly: list[str] = polls.call(cancelled_jobs, [])
            for job_id in newly:
                cancelled.add(job_id)
                dropped.update(k for k, j in enumerate(job_of_row) if j == job_id)
        return dropped

    limit = batch_limit(ckpt.sha256, device)
    t0 = time.perf_counter()
    x = generate_rows(
        ckpt, rows, sampler=spec0.sampler, steps=spec0.steps, batch_size=limit.clamp(settings.max_batch_size),
        device=device, progress=progress, precision=job_precision(spec0, settings, device),
        limit=limit, dropped=poll_cancels, **known,
    )  # fmt: skip
    sampling = time.perf_counter() - t0
    out: dict[str, np.ndarray] = {}
    k = 0
    for p in parts:
        out[p.member] = x[k : k + len(p.todo)]
        k += len(p.todo)
        p.sampling_seconds = sampling * len(p.todo) / max(1, len(rows))
    return ckpt, out, cancelled


def complete_part(
    store: JobStore, settings: Settings, part: Part, error: Exception | None, cancelled: bool, holder: str
) -> str:
    """A part of a merged batch whose samples were written (or failed to be, with `error`): mark
    its range and maybe finalise its job, or fail or cancel the job."""
    spec, directory = part.spec, part.directory
    if cancelled or store.cancel_requested(spec.id):
        return cancel(store, spec, directory)
    if error is not None:
        if worker_stopping(error):
            raise error
        log.error("job %s range [%d, %d) failed", spec.id, part.start, part.stop, exc_info=error)
        reason = describe_error(error, public_roots(settings))
        return fail(store, spec, directory, f"sampling failed: {reason}")
    return finish_range(store, settings, spec, part.start, part.stop, len(part.todo), holder,
                        part.sampling_seconds)  # fmt: skip


def finish_range(
    store: JobStore, settings: Settings, spec: JobSpec, start: int, stop: int, generated: int,
    holder: str | None, sampling_seconds: float = 0.0,
) -> str:
    """A range's samples are all written: record it (with the seconds its sampling took, when it
    sampled any), and finalise the job if it was the last."""
    if store.cancel_requested(spec.id):
        return cancel(store, spec, job_dir(settings, spec.id))
    n = stop - start
    store.set_progress(spec.id, start, n, n, sampling_seconds if generated else None)
    if store.mark_range_done(spec.id, start, n) == len(spec.ranges()):
        return maybe_finalize(store, settings, spec.id, holder)
    return f"sampled {generated} of [{start}, {stop})"


def process_alone(
    store: JobStore, settings: Settings, job_id: str, start: int, stop: int, holder: str | None = None
) -> str:
    """Sample one range on its own (see process_range for the guarantees)."""
    from model.samplers import SamplingCancelled

    rec = store.get(job_id)
    if rec is None:
        return "skipped: unknown or expired job"
    if rec.state.terminal:
        return f"skipped: job is {rec.state.value}"
    spec, directory = rec.spec, job_dir(settings, job_id)
    if store.cancel_requested(job_id):
        return cancel(store, spec, directory)
    store.mark_running(job_id)
    n = stop - start

    write_throttle, stop_throttle = Throttle(settings.progress_interval_seconds), Throttle(0.1)
    polls = BestEffort()
    cancelled = False

    def progress(done: int, total: int) -> None:
        if write_throttle.ready():
            polls.call(lambda: store.set_progress(job_id, start, n * done / max(1, total), 0), None)

    def should_stop() -> bool:
        nonlocal cancelled
        if not cancelled and stop_throttle.ready():
            cancelled = polls.call(lambda: store.cancel_requested(job_id), False)
        return cancelled

    try:
        generated, sampling = sample_range(spec, directory, start, stop, settings=settings,
                                 progress=progress, should_stop=should_stop)  # fmt: skip
    except SamplingCancelled:
        return cancel(store, spec, directory)
    except STORE_ERRORS:
        raise
    except ModelLoadError as e:
        if store.cancel_requested(job_id):
            return cancel(store, spec, directory)
        log.error("job %s: model %s cannot be loaded: %s", job_id, spec.model, e)
        store.record_model_fault(spec.model_sha256, str(e))
        return fail(store, spec, directory, f"model {spec.model!r} could not be loaded ({e}); it is now "
                    "listed as unavailable in GET /v1/models. Submit the job again: a request by channel "
                    "set will use another model")  # fmt: skip
    except Exception as e:
        if worker_stopping(e):
            raise
        if store.cancel_requested(job_id):  # e.g. the directory vanished under a cancel
            return cancel(store, spec, directory)
        log.exception("job %s range [%d, %d) failed", job_id, start, stop)
        return fail(store, spec, directory, f"sampling failed: {describe_error(e, public_roots(settings))}")
    return finish_range(store, settings, spec, start, stop, generated, holder, sampling)


def maybe_finalize(store: JobStore, settings: Settings, job_id: str, holder: str | None = None) -> str:
    """Finalise if every range is in and no other task holds the finalisation lease."""
    rec = store.get(job_id)
    if rec is None or rec.state != JobState.running:
        return "skipped finalisation: job not running"
    lease = max(60, settings.visibility_timeout_seconds)
    if not store.claim_finalize(job_id, lease, holder or secrets.token_hex(8)):
        return "skipped finalisation: another task holds it"
    directory = job_dir(settings, job_id)
    try:
        missing = [i for i in range(rec.spec.count) if not part_path(directory, i).exists()]
        if missing:
            # A range was marked done but its files are gone (e.g. the results directory was wiped).
            # Its task is acknowledged and will not run again, so the job fails with the reason.
            raise JobError(f"samples {missing[:5]} are missing from the results directory")
        finalize(rec.spec, directory, settings=settings, started_at=rec.started_at,
                 sampling_seconds=rec.sampling_seconds)  # fmt: skip
    except STORE_ERRORS:
        raise
    except Exception as e:
        if worker_stopping(e):
            raise
        store.release_finalize(job_id)
        if store.cancel_requested(job_id):
            return cancel(store, rec.spec, directory)
        log.exception("finalising job %s failed", job_id)
        reason = describe_error(e, public_roots(settings))
        return fail(store, rec.spec, directory, f"finalising failed: {reason}")
    if not store.finish(job_id, JobState.succeeded):
        # Cancelled while finalising: the cancel wins, and nothing of the job is kept.
        return cancel(store, rec.spec, directory)
    return "succeeded"


def fail(store: JobStore, spec: JobSpec, directory: Path, error: str) -> str:
    """Mark the job failed and remove its files at once (a failed job has nothing to download,
    and on a full disk its partial files are what fills it). The sweeper catches whatever
    another task of the job writes afterwards."""
    store.finish(spec.id, JobState.failed, error=error)
    shutil.rmtree(directory, ignore_errors=True)
    return "failed"


def cancel(store: JobStore, spec: JobSpec, directory: Path) -> str:
    """Remove everything the job wrote and mark it cancelled (any task of the job may do this)."""
    shutil.rmtree(directory, ignore_errors=True)
    store.finish(spec.id, JobState.cancelled)
    return "cancelled"

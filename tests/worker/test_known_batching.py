"""Jobs with known channels in worker.engine: their masks come back exactly, they merge only with jobs
that know the same channels with the same guidance, and a merged batch equals each job alone.
Real Redis and the tiny checkpoint (t1ce+seg), no Celery process; pixels are read from the NIfTIs."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from synthmri.contract import JobSpec, JobState
from synthmri.given import ModelSlices, Upload, prepare_known
from synthmri.jobstore import JobStore, spec_batch_key
from synthmri.registry import read_model
from synthmri.settings import Settings
from tests.given_files import nifti, tumour
from tests.worker.test_batching import count_rows, run_job
from tests.worker.test_batching import submit as record_job
from worker import engine

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def submit(store: JobStore, settings: Settings, *, seed: int, count: int, masks: list[bytes] | None = None,
           guidance: float | None = None, index: bool = True) -> JobSpec:  # fmt: skip
    """Record a job as the API does: its uploads under inputs/ first, then the record and (with
    `index`) its waiting ranges; the Celery messages are the test's calls to engine.process_range."""
    info = read_model(Path(settings.models_dir) / "tiny")
    job_id = os.urandom(8).hex()
    uploads = [Upload("seg", f"m{k}.nii.gz", m) for k, m in enumerate(masks or [])]
    known = prepare_known(uploads, info.slices or ModelSlices("tiny", info.channels, info.image_size),
                          count=count, outputs=list(info.channels), guidance=guidance)  # fmt: skip
    if known is not None:
        known.write(engine.job_dir(settings, job_id))
    return record_job(store, settings, seed=seed, count=count, batch_size=2, index=index, job_id=job_id,
                      given=known.record() if known is not None else None)  # fmt: skip


def pixels(settings: Settings, spec: JobSpec, channel: str) -> np.ndarray:
    d = engine.job_dir(settings, spec.id)
    return np.stack([np.asarray(nib.load(d / f"{spec.id}_{i:04d}_{channel}.nii.gz").dataobj)[:, :, 0]
                     for i in range(spec.count)])  # fmt: skip


def test_a_given_mask_comes_back_exactly_and_the_manifest_records_it(
    setup: tuple[JobStore, Settings],
) -> None:
    store, settings = setup
    masks = [nifti(tumour(shift=k)) for k in range(3)]
    job = submit(store, settings, seed=4, count=3, masks=masks)
    run_job(store, settings, job)
    segs = pixels(settings, job, "seg")
    assert segs.dtype == np.uint8
    np.testing.assert_array_equal(segs, np.stack([tumour(shift=k) for k in range(3)]))
    d = engine.job_dir(settings, job.id)
    manifest = json.loads((d / "manifest.json").read_text())
    given = manifest["given"]
    assert (given["channels"], given["guidance"]) == (["seg"], 16.0)
    assert [(g["file"], g["samples"], g["sha256"]) for g in given["inputs"]] == [
        (f"inputs/seg_{k:04d}.nii.gz", [k], hashlib.sha256(masks[k]).hexdigest()) for k in range(3)
    ]
    assert all("BraTS labels" in g["normalisation"] for g in given["inputs"])
    assert manifest["precision"] in ("bf16", "fp32")
    with zipfile.ZipFile(d / "archive.zip") as zf:
        assert zf.read("inputs/seg_0001.nii.gz") == masks[1]
    # The same seed without the masks: the images differ, so the masks shaped them.
    free = submit(store, settings, seed=4, count=3, index=False)
    run_job(store, settings, free)
    assert np.abs(pixels(settings, free, "t1ce") - pixels(settings, job, "t1ce")).max() > 1e-3


def test_conditioned_jobs_merge_and_equal_each_alone(
    setup: tuple[JobStore, Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, settings = setup
    a = submit(store, settings, seed=1, count=2, masks=[nifti(tumour(shift=0))])
    b = submit(store, settings, seed=2, count=3, masks=[nifti(tumour(shift=k)) for k in range(3)])
    assert spec_batch_key(a) == spec_batch_key(b)
    calls = count_rows(monkeypatch)
    engine.process_range(store, settings, a.id, 0, 2, "task-1")
    assert set(calls) == {5}  # both jobs' rows in one batch
    assert store.state(a.id) == store.state(b.id) == JobState.succeeded
    merged = {s.id: (pixels(settings, s, "t1ce"), pixels(settings, s, "seg")) for s in (a, b)}
    monkeypatch.undo()
    for spec, masks in ((a, [nifti(tumour(shift=0))]), (b, [nifti(tumour(shift=k)) for k in range(3)])):
        twin = submit(store, settings, seed=spec.seed, count=spec.count, masks=masks, index=False)
        run_job(store, settings, twin)
        t1ce, seg = merged[spec.id]
        np.testing.assert_array_equal(seg, pixels(settings, twin, "seg"))
        np.testing.assert_allclose(t1ce, pixels(settings, twin, "t1ce"), atol=1e-4)


def test_jobs_with_other_known_channels_or_guidance_never_share_a_batch(
    setup: tuple[JobStore, Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, settings = setup
    plain = submit(store, settings, seed=1, count=2)
    guided = submit(store, settings, seed=2, count=2, masks=[nifti(tumour())])
    replaced = submit(store, settings, seed=3, count=2, masks=[nifti(tumour())], guidance=0.0)
    assert len({spec_batch_key(s) for s in (plain, guided, replaced)}) == 3
    calls = count_rows(monkeypatch)
    engine.process_range(store, settings, plain.id, 0, 2, "task-1")
    assert set(calls) == {2}
    assert store.state(plain.id) == JobState.succeeded
    assert store.state(guided.id) == store.state(replaced.id) == JobState.queued
    calls.clear()
    engine.process_range(store, settings, guided.id, 0, 2, "task-2")
    assert set(calls) == {2} and store.state(replaced.id) == JobState.queued
    engine.process_range(store, settings, replaced.id, 0, 2, "task-3")
    assert store.state(guided.id) == store.state(replaced.id) == JobState.succeeded

"""Known channels uploaded with POST /v1/jobs (multipart): what is stored, what is refused and why.

Real Redis, no worker. Every refusal is checked for its status, its problem+json detail and for
leaving nothing behind: no job record, no queued task, no directory under the results dir.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from synthmri.channels import encode_labels
from synthmri.contract import QUEUE
from synthmri.intensity import normalise_percentile
from synthmri.jobstore import JobStore
from synthmri.settings import Settings
from tests.api.conftest import write_model
from tests.api.test_problems import assert_problem
from tests.given_files import brain, nifti, png, tumour

KEY = "unit-key"
FIVE = "t1+t1ce+t2+flair+seg"
LIMIT = 256 * 1024


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Settings:
    write_model(tmp_path / "models", "tiny", "t1ce+seg")
    write_model(tmp_path / "models", "five", FIVE)
    write_model(tmp_path / "models", "t1ce-only", "t1ce")
    return Settings(
        redis_url=redis_url,
        models_dir=tmp_path / "models",
        results_dir=tmp_path / "results",
        api_keys=KEY,
        max_count=8,
        max_active_jobs_per_key=2,
        max_request_bytes=LIMIT,
    )  # type: ignore[arg-type]


@pytest.fixture
def client(settings: Settings, store: JobStore) -> Iterator[TestClient]:
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


Files = list[tuple[str, tuple[str, bytes]]]


def submit(client: TestClient, request: dict[str, Any], files: Files) -> Any:
    return client.post("/v1/jobs", data={"request": json.dumps(request)}, files=files)


def nothing_left(store: JobStore, settings: Settings) -> None:
    assert store.r.keys("synthmri:job:*") == []
    assert store.r.llen(QUEUE) == 0
    results = Path(settings.results_dir)
    assert not results.exists() or list(results.iterdir()) == []


def stored(settings: Settings, job_id: str) -> tuple[Path, dict[str, np.ndarray]]:
    d = Path(settings.results_dir) / job_id
    with np.load(d / "inputs" / "known.npz") as known:
        return d, {k: known[k] for k in known.files}


def test_a_mask_for_every_sample_is_stored_with_the_job(
    client: TestClient, store: JobStore, settings: Settings
) -> None:
    mask = nifti(tumour())
    r = submit(client, {"channels": FIVE, "count": 3, "seed": 1}, [("seg", ("mask.nii.gz", mask))])
    assert r.status_code == 202, r.text
    job = r.json()
    assert (job["model"], job["given"], job["guidance"]) == ("five", ["seg"], 16.0)
    d, known = stored(settings, job["id"])
    assert (d / "inputs" / "seg_all.nii.gz").read_bytes() == mask
    np.testing.assert_array_equal(known["seg"], encode_labels(tumour())[None])
    spec = store.get(job["id"]).spec  # type: ignore[union-attr]
    assert spec.given is not None and spec.given.guidance == 16.0
    (entry,) = spec.given.inputs
    assert entry.sha256 == hashlib.sha256(mask).hexdigest()
    assert (entry.channel, entry.file, entry.applies, entry.samples) == (
        "seg",
        "inputs/seg_all.nii.gz",
        "all",
        [0, 1, 2],
    )
    assert entry.orientation.startswith("LPS")
    # Only jobs with the same known channels and guidance may share a sampling batch.
    (key,) = store.r.keys("synthmri:batch:*")
    assert key.endswith(":seg@16.0")


def test_files_per_sample_and_a_volume_give_each_sample_its_own_slice(
    client: TestClient, store: JobStore, settings: Settings
) -> None:
    images = [(brain(seed=k) * 255).round() for k in range(3)]
    masks = np.stack([tumour(shift=k) for k in range(3)], axis=2)
    files: Files = [("t1ce", (f"slice{k}.png", png(images[k]))) for k in range(3)]
    files.append(("seg", ("masks.nii.gz", nifti(masks))))
    r = submit(client, {"model": "five", "count": 3, "guidance": 0}, files)
    assert r.status_code == 202, r.text
    assert (r.json()["given"], r.json()["guidance"]) == (["t1ce", "seg"], 0.0)
    d, known = stored(settings, r.json()["id"])
    np.testing.assert_allclose(known["t1ce"], np.stack(images) / 255 * 2 - 1, atol=1e-6)
    np.testing.assert_array_equal(known["seg"], encode_labels(np.moveaxis(masks, 2, 0)))
    spec = store.get(r.json()["id"]).spec  # type: ignore[union-attr]
    assert spec.given is not None
    entries = {e.file: e for e in spec.given.inputs}
    assert sorted(entries) == [
        "inputs/seg_0000-0002.nii.gz",
        "inputs/t1ce_0000.png",
        "inputs/t1ce_0001.png",
        "inputs/t1ce_0002.png",
    ]
    assert (
        entries["inputs/t1ce_0001.png"].samples == [1] and entries["inputs/t1ce_0001.png"].applies == "each"
    )
    assert entries["inputs/seg_0000-0002.nii.gz"].applies == "slices"
    for name, (_, data) in zip(
        [
            "inputs/t1ce_0000.png",
            "inputs/t1ce_0001.png",
            "inputs/t1ce_0002.png",
            "inputs/seg_0000-0002.nii.gz",
        ],
        [f[1] for f in files],
        strict=True,
    ):
        assert (d / name).read_bytes() == data
        assert entries[name].sha256 == hashlib.sha256(data).hexdigest()


def test_other_orientations_are_brought_to_the_outputs_losslessly(
    client: TestClient, settings: Settings
) -> None:
    seg = tumour()
    ras = np.diag([1.0, 1.0, 1.0, 1.0])  # both in-plane axes flipped against the outputs (LPS)
    swapped = np.array([[0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])  # axes 0 and 1 exchanged
    for affine, want in ((ras, seg[::-1, ::-1]), (swapped, seg.T)):
        r = submit(client, {"model": "tiny", "count": 1}, [("seg", ("m.nii", nifti(seg, affine, gz=False)))])
        assert r.status_code == 202, r.text
        _, known = stored(settings, r.json()["id"])
        np.testing.assert_array_equal(known["seg"][0], encode_labels(want))
        client.delete(f"/v1/jobs/{r.json()['id']}")


def test_intensities_in_unit_range_are_kept_and_others_get_the_training_rule(
    client: TestClient, settings: Settings
) -> None:
    unit, raw = brain(seed=1), brain(seed=2, scale=800.0)
    files: Files = [("t1ce", ("a.nii.gz", nifti(unit, dtype="float32"))), ("t1ce", ("b.nii.gz", nifti(raw)))]
    r = submit(client, {"model": "five", "count": 2, "seed": 3}, files)
    assert r.status_code == 202, r.text
    _, known = stored(settings, r.json()["id"])
    np.testing.assert_allclose(known["t1ce"][0], unit.astype(np.float32) * 2 - 1, atol=1e-6)
    np.testing.assert_allclose(known["t1ce"][1], normalise_percentile(raw, raw != 0), atol=1e-6)


def test_a_known_channel_outside_the_requested_set_picks_a_model_that_has_it(client: TestClient) -> None:
    r = submit(client, {"channels": "t1ce", "count": 1}, [("seg", ("m.nii.gz", nifti(tumour())))])
    assert r.status_code == 202, r.text
    assert (r.json()["model"], r.json()["channels"], r.json()["given"]) == ("tiny", ["t1ce"], ["seg"])


def test_files_are_recognised_by_their_bytes_not_their_names(client: TestClient, settings: Settings) -> None:
    files: Files = [("seg", ("mask.nii.gz", png(tumour()))), ("t1ce", ("t1ce.png", nifti(brain(), gz=False)))]
    r = submit(client, {"model": "five", "count": 1}, files)
    assert r.status_code == 202, r.text
    d, known = stored(settings, r.json()["id"])
    assert sorted(p.name for p in (d / "inputs").iterdir()) == ["known.npz", "seg_all.png", "t1ce_all.nii"]
    np.testing.assert_array_equal(known["seg"][0], encode_labels(tumour()))


def _big(n: int) -> np.ndarray:
    return np.zeros((n, n), dtype=np.uint8)


REFUSED = [
    ("unknown channel", {"model": "tiny"}, [("t2", ("t2.nii.gz", nifti(brain())))], "has no channel 't2'"),
    ("unknown field", {"model": "tiny"}, [("mask", ("m.nii.gz", nifti(tumour())))], "unknown form field"),
    (
        "all given",
        {"model": "tiny"},
        [("seg", ("m.nii.gz", nifti(tumour()))), ("t1ce", ("a.png", png(brain())))],
        "nothing left to generate",
    ),
    (
        "file count",
        {"model": "tiny", "count": 3},
        [("seg", (f"{k}.nii.gz", nifti(tumour()))) for k in range(2)],
        "2 seg files for a job of 3 samples",
    ),
    (
        "size",
        {"model": "tiny"},
        [("seg", ("m.nii.gz", nifti(_big(64))))],
        "64×64 slices but the model works on 32×32",
    ),
    (
        "dimensions",
        {"model": "tiny"},
        [("seg", ("m.nii.gz", nifti(np.zeros((32, 32, 2, 2)))))],
        "has shape 32×32×2×2",
    ),
    (
        "slices",
        {"model": "tiny", "count": 3},
        [("seg", ("m.nii.gz", nifti(np.zeros((32, 32, 2)))))],
        "has 2 slices along its last axis",
    ),
    (
        "oblique",
        {"model": "tiny"},
        [
            (
                "seg",
                (
                    "m.nii.gz",
                    nifti(
                        tumour(),
                        np.array([[-0.9, -0.1, 0, 0], [0.1, -0.9, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]),
                    ),
                ),
            )
        ],
        "oblique",
    ),
    (
        "sagittal",
        {"model": "tiny"},
        [
            (
                "seg",
                (
                    "m.nii.gz",
                    nifti(tumour(), np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1.0]])),
                ),
            )
        ],
        "not the axial one",
    ),
    (
        "fractional seg",
        {"model": "tiny"},
        [("seg", ("m.nii.gz", nifti(tumour() * 0.5)))],
        "not integer-valued",
    ),
    (
        "label 3",
        {"model": "tiny"},
        [("seg", ("m.nii.gz", nifti(np.where(tumour() == 4, 3, tumour()))))],
        "map 3 → 4",
    ),
    (
        "NaN",
        {"model": "tiny"},
        [("t1ce", ("a.nii.gz", nifti(np.where(brain() > 0.5, np.nan, brain()))))],
        "NaN or infinite",
    ),
    ("RGB PNG", {"model": "tiny"}, [("seg", ("m.png", png(tumour(), mode="RGB")))], "RGB PNG"),
    ("not an image", {"model": "tiny"}, [("seg", ("m.nii.gz", b"not an image at all"))], "neither a NIfTI"),
    (
        "a name is not a type",
        {"model": "tiny"},
        [("seg", ("m.png", nifti(tumour(), gz=False)[:200]))],
        "neither a NIfTI",
    ),
    (
        "guidance too big",
        {"model": "tiny", "guidance": 1e6},
        [("seg", ("m.nii.gz", nifti(tumour())))],
        "guidance",
    ),
    (
        "guidance as text",
        {"model": "tiny", "guidance": "16"},
        [("seg", ("m.nii.gz", nifti(tumour())))],
        "a number",
    ),
]


@pytest.mark.parametrize(
    ("request_", "files", "needle"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED]
)
def test_bad_uploads_are_422_saying_what_to_change_and_leave_nothing(
    client: TestClient,
    store: JobStore,
    settings: Settings,
    request_: dict[str, Any],
    files: Files,
    needle: str,
) -> None:
    r = submit(client, {"count": 1, **request_}, files)
    assert_problem(r, 422, needle)
    assert r.json()["errors"][0]["loc"][0] == "body"
    nothing_left(store, settings)


def test_malformed_multipart_bodies_are_422(client: TestClient, store: JobStore, settings: Settings) -> None:
    seg = ("m.nii.gz", nifti(tumour()))
    assert_problem(
        client.post("/v1/jobs", files=[("seg", seg)]), 422, "needs the job JSON in a `request` field"
    )
    assert_problem(
        client.post("/v1/jobs", data={"request": "{not json"}, files=[("seg", seg)]), 422, "not valid JSON"
    )
    r = client.post(
        "/v1/jobs",
        data={"request": json.dumps({"model": "tiny", "count": 1}), "seg": "mask.nii.gz"},
        files=[("t1ce", ("a.png", png(brain())))],
    )
    assert_problem(r, 422, "must be a file part")
    r = client.post("/v1/jobs", content=b"--x\r\n", headers={"content-type": "multipart/form-data"})
    assert_problem(r, 422, "multipart body cannot be read")
    assert_problem(
        client.post("/v1/jobs", json={"model": "tiny", "count": 1, "guidance": 4}),
        422,
        "guidance applies to known channels",
    )
    nothing_left(store, settings)


def test_a_multipart_request_without_files_is_a_plain_job(client: TestClient) -> None:
    r = client.post(
        "/v1/jobs",
        data={"request": json.dumps({"model": "tiny", "count": 1})},
        files=[("request", ("request.json", b'{"model": "tiny", "count": 2}'))],
    )
    assert_problem(r, 422, "send one `request` field")
    r = client.post("/v1/jobs", files=[("request", ("request.json", b'{"model": "tiny", "count": 2}'))])
    assert r.status_code == 202 and (r.json()["count"], r.json()["given"], r.json()["guidance"]) == (
        2,
        [],
        None,
    )


def test_an_oversize_upload_is_413_saying_how_to_fit(
    client: TestClient, store: JobStore, settings: Settings
) -> None:
    noise = np.random.default_rng(0).uniform(0, 1, (32, 32, 8))  # incompressible: 8 slices ≈ 64 KiB each copy
    files: Files = [("t1ce", (f"{k}.nii.gz", nifti(noise))) for k in range(5)]
    r = submit(client, {"model": "tiny", "count": 1}, files)
    assert_problem(r, 413, f"({LIMIT} bytes); send fewer files per job")
    assert "gzip" in r.json()["detail"]
    nothing_left(store, settings)


def test_a_streamed_oversize_upload_is_413_too(
    client: TestClient, store: JobStore, settings: Settings
) -> None:
    """Without a Content-Length the body is counted as it is read, and reading stops at the limit."""
    boundary = "b0undary"
    part = f"--{boundary}\r\nContent-Disposition: form-data; name="

    def body() -> Iterator[bytes]:
        yield f'{part}"request"\r\n\r\n{{"model": "tiny", "count": 1}}\r\n'.encode()
        yield f'{part}"t1ce"; filename="a.nii"\r\n\r\n'.encode()
        for _ in range(LIMIT // 4096 + 2):
            yield b"x" * 4096

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    r = client.post("/v1/jobs", content=body(), headers=headers)
    assert_problem(r, 413, "gzip the NIfTI files")
    nothing_left(store, settings)


def test_a_refused_job_leaves_no_inputs_behind(
    client: TestClient, store: JobStore, settings: Settings
) -> None:
    """Past the active-job limit (429) the uploads written for the job are removed again."""
    seg = [("seg", ("m.nii.gz", nifti(tumour())))]
    first = [submit(client, {"model": "tiny", "count": 1}, seg).json()["id"] for _ in range(2)]
    assert_problem(submit(client, {"model": "tiny", "count": 1}, seg), 429, "limit 2")
    assert sorted(p.name for p in Path(settings.results_dir).iterdir()) == sorted(first)

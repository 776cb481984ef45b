"""A small HTTP client for the SynthMRI service (httpx; imports neither the API nor torch)."""

from __future__ import annotations

import json
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class ServiceError(RuntimeError):
    """An error answer of the service (its problem+json detail) or an unreachable service."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Client:
    def __init__(self, url: str, api_key: str | None, *, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise ServiceError(f"cannot reach {self.url} ({type(e).__name__}: {e})") from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail") or r.reason_phrase
            except ValueError:
                detail = r.reason_phrase
            raise ServiceError(f"{r.status_code} {detail}", r.status_code)
        return r

    def models(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/models").json()["models"])

    def submit(self, *, given: Mapping[str, Any] | None = None, **request: Any) -> dict[str, Any]:
        """POST /v1/jobs with the given request fields (None values are left out).

        `given` maps channels to known values the samples keep (the rest is generated to match):
        a file path (NIfTI or grayscale PNG) or its bytes, an (H, W) array given to every sample,
        an (H, W, count) array with one slice per sample, or a list with one of those per sample.
        It is sent as multipart/form-data; `guidance=W` sets the reconstruction-guidance weight.
        A value that cannot be sent raises `synthmri.given.GivenError`.
        """
        body = {k: v for k, v in request.items() if v is not None}
        if not given:
            return dict(self._request("POST", "/v1/jobs", json=body).json())
        from synthmri.given import uploads_from

        files = [(u.channel, (u.name, u.data, "application/octet-stream")) for u in uploads_from(given)]
        form = {"request": json.dumps(body)}
        return dict(self._request("POST", "/v1/jobs", data=form, files=files).json())

    def job(self, job_id: str, wait: float = 0) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/jobs/{job_id}", params={"wait": wait}).json())

    def jobs(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/jobs").json()["jobs"])

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Stop a queued or running job; it stays listed as `cancelled`."""
        return dict(self._request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def delete(self, job_id: str) -> dict[str, Any]:
        """Cancel the job if it is active, then remove its record and files."""
        return dict(self._request("DELETE", f"/v1/jobs/{job_id}").json())

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
        poll: float = 5.0,
    ) -> dict[str, Any]:
        """Long-poll until the job ends; `progress(job)` is called after every answer."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id, wait=poll)
            if progress is not None:
                progress(job)
            if job["state"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise ServiceError(f"job {job_id} is still {job['state']} after {timeout:.0f} s")
            time.sleep(0.2)

    def download(self, job_id: str, name: str, dest: str | Path) -> Path:
        """Stream one result file (e.g. archive.zip, grid.png, samples/0/t1ce.nii.gz) to `dest`."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/{name}") as r:
                if r.status_code >= 400:
                    r.read()
                    try:
                        detail = r.json().get("detail")
                    except ValueError:
                        detail = r.reason_phrase
                    raise ServiceError(f"{r.status_code} {detail}", r.status_code)
                with open(tmp, "wb") as f:
                    for chunk in r.iter_bytes(1 << 20):
                        f.write(chunk)
        except httpx.HTTPError as e:
            raise ServiceError(f"download of {name} failed ({type(e).__name__}: {e})") from None
        tmp.replace(dest)
        return dest

    def download_all(self, job_id: str, out_dir: str | Path) -> list[Path]:
        """Download archive.zip and unpack it into `out_dir`; returns the files."""
        out_dir = Path(out_dir)
        archive = self.download(job_id, "archive.zip", out_dir / f"{job_id}.zip")
        return [out_dir / n for n in _unpack(archive, out_dir)]

    def download_nnunet(self, job_id: str, raw_dir: str | Path) -> Path:
        """Download nnunet.zip of a job submitted with "nnunet" in its formats and unpack it into
        `raw_dir` (e.g. $nnUNet_raw); returns the dataset folder, `Dataset501_SynthMRI` unless it
        is renamed (the zip holds one folder)."""
        raw_dir = Path(raw_dir)
        archive = self.download(job_id, "nnunet.zip", raw_dir / f"{job_id}_nnunet.zip")
        names = _unpack(archive, raw_dir)
        if not names:
            raise ServiceError(f"the nnunet.zip of job {job_id} is empty")
        return raw_dir / Path(names[0]).parts[0]


def _unpack(archive: Path, out_dir: Path) -> list[str]:
    """Unpack a downloaded zip into `out_dir` and delete it; returns its member names."""
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        for name in names:
            # Refuse members that would land outside out_dir.
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ServiceError(f"archive member {name!r} escapes the output directory")
        zf.extractall(out_dir)
    archive.unlink()
    return names

"""`synthmri up` as a user runs it: a real subprocess with real Redis, worker and API.

Each test starts `synthmri up --port 0` on a tiny random-init model, reads the URL
and key it prints, and checks that every child process is gone afterwards: after
Ctrl-C and after `up` itself is SIGKILLed; and that a child killed with SIGKILL is
started again without losing a job.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from synthmri.stack import SYNTHMRI_CMD, resolve_api_key

pytestmark = pytest.mark.integration
START_TIMEOUT = 240.0


@dataclass
class Up:
    proc: subprocess.Popen[str]
    state_dir: Path
    lines: list[str] = field(default_factory=list)
    url: str = ""
    key: str = ""

    def output(self) -> str:
        return "".join(self.lines)

    def children(self) -> dict[int, str]:
        """pid → command line of this process's direct children (from /proc)."""
        found = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == self.proc.pid:
                    cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                    found[int(stat.parent.name)] = cmdline
            except (OSError, IndexError, ValueError):
                continue
        return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


@pytest.fixture
def up(tmp_path: Path, tiny_checkpoint_readonly: Path) -> Iterator[Up]:
    models = tmp_path / "models"
    shutil.copytree(tiny_checkpoint_readonly, models / "tiny")
    # A short visibility timeout: a killed worker's task comes back in seconds, not 45 s.
    env = {**os.environ, "SYNTHMRI_DEVICE": "cpu", "PYTHONUNBUFFERED": "1",
           "SYNTHMRI_VISIBILITY_TIMEOUT_SECONDS": "8", "SYNTHMRI_UNACKED_RESTORE_INTERVAL_SECONDS": "1"}
    env.pop("SYNTHMRI_API_KEYS", None)
    argv = [
        *SYNTHMRI_CMD, "up", "--port", "0",
        "--models", str(models), "--results", str(tmp_path / "results"), "--state-dir", str(tmp_path / "up"),
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path
    )
    handle = Up(proc, tmp_path / "up")
    assert proc.stdout is not None
    stdout: io.TextIOBase = proc.stdout  # type: ignore[assignment]
    threading.Thread(target=lambda: handle.lines.extend(iter(stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT
    while not handle.url:
        text = handle.output()
        m = re.search(r"SynthMRI is up at (http://\S+?)/?\n", text)
        k = re.search(r"API key\s+(\S+)", text)
        if m and k:
            handle.url, handle.key = m.group(1), k.group(1)
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"synthmri up did not come up (exit {proc.poll()}):\n{text}")
        time.sleep(0.2)
    try:
        yield handle
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_up_serves_a_real_request_and_ctrl_c_stops_every_child(up: Up) -> None:
    children = up.children()
    kinds = sorted(next((k for k in ("redis", "celery", "uvicorn") if k in c), c) for c in children.values())
    assert kinds == ["celery", "redis", "uvicorn"], children
    assert f"Authorization: Bearer {up.key}" in up.output() and "curl" in up.output()

    headers = {"Authorization": f"Bearer {up.key}"}
    with httpx.Client(base_url=up.url, headers=headers, timeout=90) as client:
        assert client.get("/").status_code == 200
        request = {"channels": "t1ce+seg", "count": 2, "seed": 3, "sampler": "ddim", "steps": 3}
        wrong_key = {"Authorization": "Bearer wrong"}
        assert client.post("/v1/jobs", json=request, headers=wrong_key).status_code == 401
        r = client.post("/v1/jobs", json=request)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 120
        while (job := client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json())["state"] not in (
            "succeeded", "failed", "cancelled"
        ):
            assert time.monotonic() < deadline, job
        assert job["state"] == "succeeded", job
        grid = client.get(f"/v1/jobs/{job_id}/grid.png")
        assert grid.status_code == 200 and grid.content[:8] == b"\x89PNG\r\n\x1a\n"
        from PIL import Image

        pixels = np.asarray(Image.open(io.BytesIO(grid.content)).convert("L"), dtype=np.float32)
        assert pixels.std() > 1.0, "the grid is blank"

    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(timeout=60) == 0, up.output()
    assert "stopped Redis, worker and API" in up.output()
    assert _wait_gone(list(children)) == [], f"children left running: {children}"
    # What the next `up` with this state directory loads: Redis's append-only file holds the job.
    aof = [p for p in (up.state_dir / "redis").rglob("*.aof*") if p.is_file()]
    assert any(job_id.encode() in p.read_bytes() for p in aof), aof


def _wait_for(what: str, condition: Callable[[], object], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_up_restarts_a_killed_worker_and_redis_and_loses_no_job(up: Up) -> None:
    """SIGKILL the worker mid-job, then Redis while the job runs again: `up` starts each again,
    the job ends with the samples of an undisturbed run, and the job queued behind it runs."""
    import gzip
    import zipfile

    import nibabel as nib

    headers = {"Authorization": f"Bearer {up.key}"}
    # 400 network calls (about 8 s here): the worker is killed, and Redis later, mid-job.
    request = {"channels": "t1ce+seg", "count": 2, "seed": 7, "sampler": "ddim", "steps": 400}
    with httpx.Client(base_url=up.url, headers=headers, timeout=30) as client:

        def job(job_id: str, wait: float = 5) -> dict[str, Any]:
            return dict(client.get(f"/v1/jobs/{job_id}", params={"wait": wait}).json())

        def arrays(job_id: str) -> dict[str, np.ndarray]:
            """Sample arrays of the job's NIfTIs by `{index}_{channel}`."""
            archive = zipfile.ZipFile(io.BytesIO(client.get(f"/v1/jobs/{job_id}/archive.zip").content))
            return {
                name.split("_", 1)[1]: np.asarray(
                    nib.Nifti1Image.from_bytes(gzip.decompress(archive.read(name))).dataobj
                )
                for name in archive.namelist()
                if name.endswith(".nii.gz")
            }

        reference = client.post("/v1/jobs", json=request).json()["id"]
        _wait_for("the reference job", lambda: job(reference)["state"] == "succeeded")
        disturbed = client.post("/v1/jobs", json=request).json()["id"]
        behind = client.post("/v1/jobs", json={**request, "seed": 8, "steps": 5}).json()["id"]
        # Progress is no state change: a long poll would sleep through it, so these polls return at once.
        _wait_for("the job to run", lambda: job(disturbed, wait=0)["progress"]["fraction"] > 0.05)

        worker = next(pid for pid, cmd in up.children().items() if "celery" in cmd)
        os.kill(worker, signal.SIGKILL)
        _wait_for("a new worker", lambda: "worker-0 started again" in up.output(), 30)
        assert "worker-0 exited with code -9; starting it again in 1 s" in up.output()
        new_worker = next(pid for pid, cmd in up.children().items() if "celery" in cmd)
        assert new_worker != worker
        # The killed task comes back after the visibility timeout and starts over: progress drops.
        _wait_for("the job to run again", lambda: job(disturbed, wait=0)["progress"]["fraction"] < 0.05)
        _wait_for("the job to progress again", lambda: job(disturbed, wait=0)["progress"]["fraction"] > 0.05)

        assert job(disturbed, wait=0)["progress"]["fraction"] < 0.5  # Redis dies mid-job
        redis_pid = next(pid for pid, cmd in up.children().items() if "redis" in cmd)
        os.kill(redis_pid, signal.SIGKILL)
        _wait_for("a new Redis", lambda: "redis started again" in up.output(), 30)
        assert "redis exited with code -9; starting it again in 1 s" in up.output()

        _wait_for("the disturbed job", lambda: job(disturbed)["state"] in ("succeeded", "failed"))
        assert job(disturbed)["state"] == "succeeded", job(disturbed)
        _wait_for("the job behind it", lambda: job(behind)["state"] == "succeeded")
        listed = {j["id"]: j["state"] for j in client.get("/v1/jobs").json()["jobs"]}
        assert listed == dict.fromkeys((reference, disturbed, behind), "succeeded")
        a, b = arrays(reference), arrays(disturbed)
        assert sorted(a) == sorted(b) and len(a) == 4
        for name in a:
            assert np.array_equal(a[name], b[name]), name
    commands = up.children().values()
    assert sorted(next((k for k in ("redis", "celery", "uvicorn") if k in c), c) for c in commands) == [
        "celery", "redis", "uvicorn"
    ]
    assert up.proc.poll() is None, "up stopped although every child came back"


def test_children_die_with_up_even_when_it_is_sigkilled(up: Up) -> None:
    children = up.children()
    assert len(children) == 3
    up.proc.kill()
    up.proc.wait(timeout=30)
    assert _wait_gone(list(children)) == [], "Redis/worker/API outlived a SIGKILLed synthmri up"


def test_up_refuses_a_busy_port_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [*SYNTHMRI_CMD, "up", "--port", str(port), "--state-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"synthmri up: error: port {port} on 127.0.0.1 is in use; choose another with --port P (or --port 0)"
    )


def test_generated_api_key_is_private_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SYNTHMRI_API_KEYS", raising=False)
    key, source = resolve_api_key(None, tmp_path)
    assert key and len(key) >= 20 and "generated" in source
    assert (tmp_path / "api-key").stat().st_mode & 0o777 == 0o600
    again, source = resolve_api_key(None, tmp_path)
    assert again == key and "saved" in source
    assert resolve_api_key("mine", tmp_path) == ("mine", "from --api-key")
    monkeypatch.setenv("SYNTHMRI_API_KEYS", "sha256:" + "0" * 64)
    assert resolve_api_key(None, tmp_path)[0] is None

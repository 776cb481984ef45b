"""The OpenAPI document as a contract, checked by schemathesis against the live stack.

Every check is on (undocumented status codes, response schemas and media types,
acceptance of valid and rejection of invalid data, authentication, methods and Allow,
use after delete...), with a bounded number of examples per operation and a fixed seed,
so the run is repeatable and takes about a minute. The download operations get the id
of a job that has succeeded, so their 200 answers are checked too, not only 404s.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from synthmri.localstack import LocalStack
from tests.integration.conftest import CONTRACT_KEY, Api

pytestmark = pytest.mark.integration

SEED = 20240611
MAX_EXAMPLES = 25


def _schemathesis(stack: LocalStack, cwd: Path, phases: str, config: str) -> tuple[int, str]:
    """One schemathesis run over every operation: (cases generated, report); fails the test on any finding."""
    toml = cwd / "schemathesis.toml"
    toml.write_text(config)
    argv = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(toml), "--no-color",
        "run", f"{stack.url}/openapi.json", "--checks", "all", "--phases", phases,
        "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1",
        "--header", f"Authorization: Bearer {CONTRACT_KEY}", "--request-timeout", "30",
        "--suppress-health-check", "too_slow",
    ]  # fmt: skip
    run = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=cwd)
    report = run.stdout[-8000:] + run.stderr[-2000:]
    assert run.returncode == 0, report  # schemathesis exits non-zero on any failure or error
    m = re.search(r"(\d+) generated", run.stdout)
    assert m, report
    return int(m.group(1)), report


def test_the_live_api_keeps_its_openapi_contract(stack: LocalStack, tmp_path: Path) -> None:
    api = Api(stack, CONTRACT_KEY)
    done = api.run(channels="t1ce+seg", count=1, seed=1, sampler="ddim", steps=3,
                   formats=["nifti", "png", "nnunet"])  # fmt: skip
    # The single-request phases download from a job that has succeeded, so 200 answers are
    # checked too. The stateful phase follows links instead: it may delete any job it has
    # seen (that one included), and then a download of it is rightly a 404.
    downloads = (
        "[[operations]]\n"
        'include-path-regex = "/(grid[.]png|manifest[.]json|archive[.]zip|nnunet[.]zip|samples/.+)$"\n'
        f'parameters = {{ job_id = "{done["id"]}", index = 0, channel = "t1ce" }}\n'
    )
    try:
        single, _ = _schemathesis(stack, tmp_path, "examples,coverage,fuzzing", downloads)
        stateful, _ = _schemathesis(stack, tmp_path, "stateful", "")
    finally:
        for job in api.http.get("/v1/jobs", params={"limit": 1000}).json()["jobs"]:
            if job["state"] in ("queued", "running"):
                api.http.delete(f"/v1/jobs/{job['id']}")  # the run's jobs must not hold the worker
    assert single >= 300 and stateful >= 50, (single, stateful)  # every operation was exercised, not skipped
    print(f"\nschemathesis: {single} single-request and {stateful} stateful cases, seed {SEED}, no failures")

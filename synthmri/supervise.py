"""Keep the children of `synthmri up` running, as a process manager would.

A child that exits (a crash, `kill -9`, an out-of-memory kill) is started again after a
back-off: 1 s, then doubling up to 30 s while it keeps failing soon after starting.
A child that ran for `stable_after` seconds before exiting starts a fresh count. After
`max_restarts` quick failures in a row the supervisor gives up loudly: it raises
StackError naming the child, its exit code and the tail of its log, and `up` stops.

Restarting is safe for every child: Redis reloads its append-only file, a worker's
unfinished task is handed back by kombu after the visibility timeout and re-runs
idempotently, and the API holds no state of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from synthmri.localstack import LocalStack, StackError, tail


@dataclass
class RestartPolicy:
    first_delay: float = 1.0
    max_delay: float = 30.0
    max_restarts: int = 5
    stable_after: float = 60.0
    quick_failures: dict[str, int] = field(default_factory=dict)

    def on_exit(self, name: str, ran_for: float) -> float | None:
        """Seconds to wait before restarting `name`, or None to give up."""
        failures = self.quick_failures.get(name, 0) + 1 if ran_for < self.stable_after else 1
        self.quick_failures[name] = failures
        if failures > self.max_restarts:
            return None
        return min(self.max_delay, self.first_delay * 2 ** (failures - 1))


def supervise(
    stack: LocalStack,
    say: Callable[[str], None],
    policy: RestartPolicy | None = None,
    poll: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Watch the stack's children until one keeps failing (then raise StackError); never returns."""
    policy = policy or RestartPolicy()
    due: dict[str, float] = {}  # child name → when to start it again
    while True:
        now = clock()
        for child in stack.children():
            if child.name in due or child.alive():
                continue
            code = child.proc.returncode
            delay = policy.on_exit(child.name, now - child.started_at)
            if delay is None:
                raise StackError(
                    f"{child.name} exited {policy.max_restarts + 1} times in a row within "
                    f"{policy.stable_after:.0f} s of starting (last exit code {code}); giving up. "
                    f"Log {child.log}:\n{tail(child.log)}"
                )
            say(f"{child.name} exited with code {code}; starting it again in {delay:g} s (log {child.log})")
            due[child.name] = now + delay
        for name, when in list(due.items()):
            if now >= when:
                child = stack.respawn(name)
                del due[name]
                say(f"{name} started again (pid {child.proc.pid})")
        sleep(poll)

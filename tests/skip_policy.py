"""A skip is a decision: a run with any skip whose reason is not listed here fails.

Expected skips are hardware a machine may lack and opt-in checks that need time or
network; anything else that skips (a broken first-party import, a test "not written
yet") would hide a failure, so the run's exit status says it failed. Every run ends
with the number of skips and their reasons, expected or not.
"""

from __future__ import annotations

from collections import Counter

import pytest

NO_VNNI = "this CPU has no VNNI int8 kernels"
NO_BF16 = "this CPU has no bf16 convolution kernels"
HAS_CUDA = "this machine has CUDA"
NO_CHROMIUM = (
    "no headless browser: install Debian's Chromium and its driver to run this test "
    "(sudo apt-get install chromium chromium-driver; .ci/run does it)"
)
FRESH_CLONE_OPT_IN = "takes minutes and a package index: set SYNTHMRI_TEST_FRESH_CLONE=1 to run it"
NO_QUICKSTART_VENV = "the .venv is not installed by ./quickstart yet; running it here would reinstall"

EXPECTED_SKIPS: dict[str, str] = {
    NO_VNNI: "hardware",
    NO_BF16: "hardware",
    HAS_CUDA: "hardware",
    NO_CHROMIUM: "hardware",
    FRESH_CLONE_OPT_IN: "opt-in",
    # Only outside `./quickstart test`, which installs the .venv before it runs pytest.
    NO_QUICKSTART_VENV: "environment",
}


def skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    """The reason a skipped test or module gave, without pytest's "Skipped: " prefix."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


class SkipPolicy:
    """Records every skip of the run; fails the run on an unexpected one and reports them all."""

    def __init__(self, expected: dict[str, str]) -> None:
        self.expected = expected
        self.reasons: list[str] = []

    def _record(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            self.reasons.append(skip_reason(report))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._record(report)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._record(report)

    def unexpected(self) -> list[str]:
        return [r for r in self.reasons if r not in self.expected]

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        passing = (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)
        if self.unexpected() and session.exitstatus in passing:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.reasons:
            return
        terminalreporter.section("skips")
        for reason, n in Counter(self.reasons).most_common():
            kind = self.expected.get(reason, "UNEXPECTED")
            terminalreporter.write_line(f"{n:4d} × [{kind}] {reason}")
        unexpected = self.unexpected()
        terminalreporter.write_line(f"{len(self.reasons)} skipped, {len(unexpected)} unexpected")
        if unexpected:
            terminalreporter.write_line(
                "unexpected skips fail the run: make the test pass or fail, or list the reason in "
                "tests/skip_policy.py if the skip is a decision",
                red=True,
            )


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SkipPolicy(EXPECTED_SKIPS), "synthmri-skip-policy")

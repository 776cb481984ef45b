"""The skip policy in a real pytest run: expected skips pass and are counted, any other skip fails."""

from __future__ import annotations

import pytest

from tests.skip_policy import NO_VNNI

TESTS = f"""
import pytest

def test_passes():
    pass

@pytest.mark.skipif(True, reason={NO_VNNI!r})
def test_needs_vnni():
    pass

def test_maybe_later():
    pytest.skip(REASON)
"""


def run(pytester: pytest.Pytester, reason: str) -> pytest.RunResult:
    pytester.makepyfile(test_sample=f"REASON = {reason!r}\n" + TESTS)
    return pytester.runpytest("-p", "tests.skip_policy", "-p", "no:cacheprovider")


def test_expected_skips_pass_and_are_counted(pytester: pytest.Pytester) -> None:
    result = run(pytester, NO_VNNI)
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines([f"*2 × [[]hardware[]] {NO_VNNI}", "2 skipped, 0 unexpected"])


def test_an_unexpected_skip_fails_the_run_and_names_its_reason(pytester: pytest.Pytester) -> None:
    result = run(pytester, "not written yet")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(
        ["*1 × [[]UNEXPECTED[]] not written yet", "2 skipped, 1 unexpected", "*fail the run*"]
    )


def test_a_first_party_import_skipped_at_module_level_fails_the_run(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_sample="import pytest\npytest.importorskip('model.no_such_module')\n")
    result = pytester.runpytest("-p", "tests.skip_policy", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*[[]UNEXPECTED[]]*model.no_such_module*"])


"""conftest's CI rule: with CI=true a skipped test fails -- a skip inside a test, a module skipped at import
(``pytest.importorskip``) -- unless it is marked ``gpu`` (hardware the CI machine lacks). Without CI a skip
stays a skip. Checked by running pytest (in-process, pytester) on a small suite under this repository's conftest.py
and pytest.ini markers.
"""
from __future__ import annotations

import re

import pytest

from conftest import ROOT

pytest_plugins = ["pytester"]

SUITE = {
    "test_kinds.py": '''
import pytest

def test_passes():
    pass

def test_skips_inside():
    pytest.skip("chromium is missing")

@pytest.mark.skipif(True, reason="decorated skip")
def test_skipif():
    pass

@pytest.mark.gpu
def test_needs_a_gpu():
    pytest.skip("no CUDA device")

@pytest.mark.xfail(reason="known bug", strict=True)
def test_known_bug():
    assert False
''',
    "test_module_skip.py": '''
import pytest
pytest.importorskip("a_module_that_is_not_installed")

def test_never_collected():
    pass
''',
}


def outcomes(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str | None) -> dict[str, int]:
    """Run SUITE in-process under this repository's conftest.py and markers; the outcome counts."""
    pytester.makepyfile(**{name[:-3]: text for name, text in SUITE.items()})
    (pytester.path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    markers = (ROOT / "pytest.ini").read_text().split("markers =", 1)[1]
    pytester.makeini("[pytest]\nmarkers =" + markers)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    # importlib mode: this conftest.py must not be confused with the already imported tests/conftest.py.
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rfEs", "--import-mode=importlib",
                                          "--continue-on-collection-errors")
    counts = {key: value for key, value in result.parseoutcomes().items()}
    counts = {("error" if key == "errors" else key): value for key, value in counts.items()}
    counts["output"] = result.stdout.str()
    return counts


def test_in_ci_a_skip_is_a_failure_unless_it_needs_a_gpu(pytester, monkeypatch):
    got = outcomes(pytester, monkeypatch, "true")
    out = got.pop("output")
    # A skip in the test body fails the test; a skipif (decided at setup) and a module skipped at import
    # are errors: red either way.
    assert got == {"passed": 1, "failed": 1, "skipped": 1, "xfailed": 1, "error": 2}, out
    assert "FAILED test_kinds.py::test_skips_inside" in out and "ERROR test_kinds.py::test_skipif" in out
    assert "skipped in CI (CI=true), which must run it: chromium is missing" in out
    assert "test_module_skip.py skipped in CI (CI=true)" in out and "a_module_that_is_not_installed" in out
    assert re.search(r"SKIPPED .*no CUDA device", out)


@pytest.mark.parametrize("ci", [None, "false"])
def test_outside_ci_a_skip_stays_a_skip(pytester, monkeypatch, ci):
    got = outcomes(pytester, monkeypatch, ci)
    out = got.pop("output")
    assert got == {"passed": 1, "skipped": 4, "xfailed": 1}, out

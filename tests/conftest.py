"""Shared pytest fixtures. The helpers the tests share (synthetic images, datasets, checkpoints, DICOM files,
real servers and the browser) live in ``mediscan.devtools`` so that the benchmarks can use them too.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mediscan.devtools.synthetic import make_dataset

#: The repository root: the top-level entry points (app.py, test_single_image.py, ...) live there.
ROOT = Path(__file__).resolve().parents[1]

#: Markers of tests that need hardware the CI machine lacks: only these may skip under CI=true.
HARDWARE_MARKERS = ("gpu",)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (CI=true) a skipped test fails, unless it is marked as needing hardware CI lacks (``gpu``):
    every other dependency is installed by .ci/run, so a skip there would hide a broken install."""
    outcome = yield
    report = outcome.get_result()
    if _in_ci() and report.skipped and not hasattr(report, "wasxfail") and \
            not any(item.get_closest_marker(name) for name in HARDWARE_MARKERS):
        report.outcome, report.longrepr = "failed", f"skipped in CI (CI=true), which must run it: {_reason(report)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same rule for a whole module skipped at import (``pytest.importorskip`` at module level)."""
    outcome = yield
    report = outcome.get_result()
    if _in_ci() and report.skipped:
        report.outcome, report.longrepr = "failed", f"{collector.nodeid} skipped in CI (CI=true): {_reason(report)}"


def _reason(report) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op torch thread for the whole session (restored at the end).

    The test models are tiny (64-96 px inputs), and they run fastest on one thread; torch's default
    2-thread OpenMP team on the shared 2-core test machine is 10-30x slower whenever the other core is
    busy (its threads spin-wait for each other). Tests that run torch in a subprocess (the real servers,
    the training CLI) are unaffected: a new process starts with torch's default.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "dataset")


@pytest.fixture(scope="session")
def dicom_predictor(tmp_path_factory):
    """ONE tiny Predictor (random-init DenseNet121 at 64 px, with an out-of-scope detector) for the DICOM node
    tests of every module: building it costs seconds, and the Predictor keeps no per-call state."""
    from mediscan.devtools.synthetic import write_tiny_checkpoint
    from mediscan.inference.predictor import Predictor

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("dicom-model") / "m.safetensors", with_ood=True)
    return Predictor(path, device="cpu", backend="torch")

"""Shared pytest fixtures. The helpers the tests share (synthetic images, datasets, checkpoints, DICOM files,
real servers and the browser) live in ``mediscan.devtools`` so that the benchmarks can use them too.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mediscan.devtools.synthetic import make_dataset

#: The repository root: the top-level entry points (app.py, test_single_image.py, ...) live there.
ROOT = Path(__file__).resolve().parents[1]


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

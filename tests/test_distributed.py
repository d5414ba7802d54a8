"""torchrun with 2 CPU processes (gloo): only rank 0 writes, and the result matches a single-process run."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from mediscan.core.checkpoint import load_checkpoint
from mediscan.core.dataset import load_split, scan_dataset
from mediscan.devtools.synthetic import make_dataset

COMMON = ["--weights", "none", "--input-size", "32", "--batch-size", "8", "--no-augment", "--no-progress",
          "--no-gallery", "--workers", "1", "--device", "cpu"]


def _run(args: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]
    proc = subprocess.run(launcher + [str(ROOT / "densenet121_xray_classifier.py")] + args,
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 32 training images: divisible by the global batch and the process count, so no shard is padded.
    return make_dataset(tmp_path_factory.mktemp("ddp") / "dataset", per_class=8, seed=2)


def _test_logits(checkpoint, data) -> torch.Tensor:
    loaded = load_checkpoint(checkpoint)
    test, _ = load_split(scan_dataset(data).test, loaded.preprocessing.input_size)
    with torch.no_grad():
        return loaded.model(test.images)


def test_two_processes_train_the_same_head_as_one(dataset, tmp_path):
    """Stage 1 (frozen backbone) under DDP computes exactly the single-process gradients on the same
    global batches, so both checkpoints must predict the same logits."""
    args = ["--data", str(dataset), "--head-epochs", "2", "--finetune-epochs", "0"] + COMMON
    _run(args + ["--out", str(tmp_path / "single")])
    proc = _run(args + ["--out", str(tmp_path / "ddp")], processes=2)
    assert proc.stdout.count("epoch   2/2") == 1            # only rank 0 logs
    single = _test_logits(tmp_path / "single" / "best.safetensors", dataset)
    ddp = _test_logits(tmp_path / "ddp" / "best.safetensors", dataset)
    assert torch.allclose(single, ddp, atol=1e-3, rtol=1e-3), (single - ddp).abs().max()
    meta = load_checkpoint(tmp_path / "ddp" / "best.safetensors").meta
    assert meta["train_args"]["world_size"] == 2


def test_two_processes_fine_tune_and_write_one_loadable_checkpoint(dataset, tmp_path):
    out = tmp_path / "ddp2"
    _run(["--data", str(dataset), "--head-epochs", "1", "--finetune-epochs", "1", "--out", str(out)] + COMMON,
         processes=2)
    loaded = load_checkpoint(out / "best.safetensors")
    assert loaded.meta["train_args"]["world_size"] == 2
    assert (out / "report.md").is_file() and (out / "last.safetensors").is_file()
    assert not list(out.glob(".*.tmp"))                      # no half-written file from a second writer
    logits = _test_logits(out / "best.safetensors", dataset)
    assert torch.isfinite(logits).all()

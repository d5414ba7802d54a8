"""``--resume`` after a real interruption equals the run that was never interrupted, tensor by tensor.

A tiny 2 + 2-epoch run (random weights, augmentation on) is interrupted right after epoch 1 (inside stage 1)
and, separately, right after epoch 3 (inside stage 2): the log line of that epoch raises, as Ctrl-C would
there, so the epoch's checkpoints are on disk and nothing after them runs. Each is resumed, and its
``last.safetensors`` (weights, BatchNorm statistics, Adam's step counts and moments), ``best.safetensors`` and
history are compared with the uninterrupted run of the same seed.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mediscan.core.checkpoint import read_metadata
from mediscan.devtools.synthetic import make_dataset
from mediscan.training.fit import TrainConfig, fit

TINY = dict(weights="none", input_size=32, head_epochs=2, finetune_epochs=2, batch_size=8, progress=False,
            workers=1, gallery=False, augment=True, seed=3)


class Interrupted(BaseException):
    """What Ctrl-C raises (a BaseException, so no ``except Exception`` on the way can swallow it)."""


def interrupting_log(after_epoch: int, lines: list[str]):
    def log(line: str) -> None:
        lines.append(line)
        if line.startswith(f"epoch {after_epoch:>3}/"):
            raise Interrupted(line)
    return log


def volatile(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "seconds"}          # wall-clock time differs, nothing else


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("resume") / "dataset", per_class=3, seed=2)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = fit(TrainConfig(data=str(data), out=str(out), **TINY), log=lambda _: None)
    return out, result


def assert_same_tensors(a: Path, b: Path) -> None:
    first, second = load_file(str(a)), load_file(str(b))
    assert sorted(first) == sorted(second)
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), f"{a.name}: {name} differs"


@pytest.mark.parametrize("after_epoch", [1, 3], ids=["inside-stage-1", "inside-stage-2"])
def test_resume_after_an_interruption_equals_the_uninterrupted_run(data, uninterrupted, tmp_path, after_epoch):
    reference_out, reference = uninterrupted
    out = tmp_path / "models"
    lines: list[str] = []
    with pytest.raises(Interrupted):
        fit(TrainConfig(data=str(data), out=str(out), **TINY), log=interrupting_log(after_epoch, lines))
    assert read_metadata(out / "last.safetensors")["epoch"] == after_epoch
    assert not (out / "report.md").exists()                            # it really stopped mid-run
    stopped_last = out / "last.safetensors"
    interrupted_copy = tmp_path / "at_interruption.safetensors"
    shutil.copy(stopped_last, interrupted_copy)

    lines = []
    resumed = fit(TrainConfig(data=str(data), out=str(out), resume=True, **TINY), log=lines.append)
    assert f"resuming after epoch {after_epoch} from {stopped_last}" in lines
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert [volatile(h) for h in resumed.history] == [volatile(h) for h in reference.history]
    ran = [line.split()[1] for line in lines if line.startswith("epoch ")]
    assert ran == [f"{epoch}/4" for epoch in range(after_epoch + 1, 5)]   # no epoch trained twice

    # The state written at the end: every model tensor and every Adam tensor, bit for bit.
    assert_same_tensors(out / "last.safetensors", reference_out / "last.safetensors")
    names = load_file(str(out / "last.safetensors"))
    assert any(n.endswith(".exp_avg_sq") for n in names) and any(n.endswith(".step") for n in names)
    last_meta, reference_meta = read_metadata(out / "last.safetensors"), read_metadata(reference_out / "last.safetensors")
    assert last_meta["training_state"]["optimizer_groups"] == reference_meta["training_state"]["optimizer_groups"]
    assert last_meta["best"] == reference_meta["best"]
    # The best checkpoint (weights; its temperature and detector come from them) matches too.
    best, reference_best = load_file(str(out / "best.safetensors")), load_file(str(reference_out / "best.safetensors"))
    for name, tensor in reference_best.items():
        assert torch.allclose(tensor, best[name], rtol=1e-5, atol=1e-6), name
    assert read_metadata(out / "best.safetensors")["temperature"] == pytest.approx(
        read_metadata(reference_out / "best.safetensors")["temperature"], rel=1e-5)
    # And the interrupted state really was part-way: resuming changed the weights.
    before = load_file(str(interrupted_copy))
    assert not torch.equal(before["model.head.fc.weight"], names["model.head.fc.weight"])

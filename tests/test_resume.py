"""``--resume`` after a real interruption equals the run that was never interrupted, tensor by tensor.

A tiny 2 + 2-epoch run (random weights, augmentation on) is interrupted right after epoch 1 (inside stage 1)
and, separately, right after epoch 3 (inside stage 2): the log line of that epoch raises, as Ctrl-C would
there, so the epoch's checkpoints are on disk and nothing after them runs. Each is resumed, and its
``last.safetensors`` (weights, BatchNorm statistics, Adam's step counts and moments), ``best.safetensors`` and
history are compared with the uninterrupted run of the same seed.
"""
from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mediscan.core.checkpoint import CheckpointError, read_metadata
from mediscan.core.dataset import scan_dataset
from mediscan.devtools.synthetic import make_dataset
from mediscan.training.fit import TrainConfig, fit
from mediscan.core.checkpoint import BackgroundCheckpointWriter, new_metadata
from mediscan.core.model import build_model
from mediscan.core.preprocessing import PreprocessConfig
from mediscan.training.epochs import make_optimizer
from mediscan.training.resume import _checked_metadata, optimizer_tensors, restore_optimizer, resume, save_epoch

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


# -------------------------------------------------------------------------------------------- fast unit checks

def adam_after_steps(steps: int, seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.8, 0.95))
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    return net, optimizer, (x, y)


def test_optimizer_state_round_trip_continues_like_the_original():
    """Adam's state through optimizer_tensors / restore_optimizer (what last.safetensors carries), compared
    with torch's own state_dict, and one more step on each copy gives the same weights."""
    net, optimizer, (x, y) = adam_after_steps(3)
    tensors, groups = optimizer_tensors(optimizer)
    tensors = {name: value.clone() for name, value in tensors.items()}   # as read back from the file
    reference = optimizer.state_dict()
    assert set(tensors) == {f"optim.{pid}.{key}" for pid, entry in reference["state"].items() for key in entry}
    assert len(tensors) == 3 * 4                           # 4 parameters x (step, exp_avg, exp_avg_sq)
    copy = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    copy.load_state_dict(net.state_dict())
    fresh = torch.optim.Adam(copy.parameters(), lr=0.5)     # wrong lr and betas: the groups must restore them
    restore_optimizer(fresh, {**tensors, "model.head.fc.weight": torch.zeros(1)}, groups)   # non-optim ignored
    restored = fresh.state_dict()
    assert restored["param_groups"] == reference["param_groups"]
    for pid, entry in reference["state"].items():
        for key, value in entry.items():
            assert torch.equal(restored["state"][pid][key], value), (pid, key)
    for model, opt in ((net, optimizer), (copy, fresh)):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for a, b in zip(net.parameters(), copy.parameters()):
        assert torch.equal(a, b)


def test_resume_refuses_a_checkpoint_of_other_classes_or_other_files(data, saved_after, tmp_path):
    splits, config, _, _ = saved_after(1)
    assert _checked_metadata(config.last_path, splits, config)["epoch"] == 1
    renamed = dataclasses.replace(splits, classes=["a", "b", "c", "d"])
    with pytest.raises(CheckpointError, match=r"was trained on classes \['bone', 'brain', 'heart', 'lungs'\], "
                                              r"the dataset now has \['a', 'b', 'c', 'd'\]"):
        _checked_metadata(config.last_path, renamed, config)
    changed = dataclasses.replace(splits, fingerprint={**splits.fingerprint, "sha256": "0" * 64})
    with pytest.raises(CheckpointError, match="changed since .* was written; start a new run"):
        _checked_metadata(config.last_path, changed, config)
    # Through resume() itself, before any weight is touched (the model is never reached).
    with pytest.raises(CheckpointError, match=f"the files under {re.escape(str(data))} changed since"):
        resume(None, changed, config, torch.device("cpu"), lambda _: None, False)
    missing = dataclasses.replace(config, out=str(tmp_path / "nothing"))
    with pytest.raises(CheckpointError, match="--resume: no .*last.safetensors to resume from"):
        _checked_metadata(missing.last_path, splits, missing)


@pytest.fixture(scope="module")
def saved_after(data, tmp_path_factory):
    """``saved_after(epoch)``: :func:`_saved_after` once per epoch for the module -- resume only reads the files,
    and each save is a DenseNet121 with Adam's state (~120 MB written and fsynced)."""
    cache = {}

    def get(epoch: int):
        if epoch not in cache:
            cache[epoch] = _saved_after(epoch, data, tmp_path_factory.mktemp(f"saved_after_{epoch}"))
        return cache[epoch]
    return get


def _saved_after(epoch: int, data: Path, out: Path):
    """A model and optimizer of ``epoch``'s stage after two Adam steps, saved by save_epoch as training does."""
    splits = scan_dataset(data)
    config = TrainConfig(data=str(data), out=str(out), resume=True, **TINY)
    torch.manual_seed(epoch)
    model, _ = build_model(4, "none")
    stage = config.stage_of(epoch)
    optimizer = make_optimizer(model, stage, config)
    for _ in range(2):
        optimizer.zero_grad()
        model.head.fc(torch.randn(5, model.head.fc.in_features)).square().mean().backward()
        optimizer.step()
    meta = new_metadata(splits.classes, PreprocessConfig(32), "none", dataset_fingerprint=splits.fingerprint)
    history = [{"epoch": e} for e in range(1, epoch + 1)]
    writer = BackgroundCheckpointWriter()
    save_epoch(writer, model, optimizer, meta, {"epoch": epoch, "stage": stage}, {"epoch": 1}, history, True, config)
    writer.close()
    return splits, config, model, optimizer


@pytest.mark.parametrize("epoch", [1, 2, 4], ids=["inside-stage-1", "end-of-stage-1", "finished"])
def test_resume_restores_weights_and_the_optimizer_of_the_stage_it_continues(saved_after, epoch):
    """Epoch 1 of 2 + 2: stage 1 goes on with its Adam state. Epoch 2 ends stage 1: stage 2 starts with a
    fresh Adam over every parameter. Epoch 4 (a finished run, extended by --finetune-epochs): stage 2 goes on."""
    splits, config, model, optimizer = saved_after(epoch)
    stage_of_epoch = 1 if epoch == 1 or epoch == 2 else 2
    best_meta, last_meta = read_metadata(config.best_path), read_metadata(config.last_path)
    assert (best_meta["epoch"], best_meta["stage"], best_meta["best"]) == (epoch, stage_of_epoch, {"epoch": 1})
    assert (last_meta["epoch"], last_meta["stage"], last_meta["best"]) == (epoch, stage_of_epoch, {"epoch": 1})
    torch.manual_seed(99)
    fresh, _ = build_model(4, "none")
    lines: list[str] = []
    first, history, best, restored = resume(fresh, splits, config, torch.device("cpu"), lines.append, False)
    assert (first, history, best) == (epoch + 1, [{"epoch": e} for e in range(1, epoch + 1)], {"epoch": 1})
    assert lines == [f"resuming after epoch {epoch} from {config.last_path}"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, fresh.state_dict()[name]), name
    continues = epoch != 2
    stage = 1 if epoch == 1 else 2
    assert all(p.requires_grad == (stage == 2) for p in fresh.features.parameters())
    group = restored.param_groups[0]
    assert len(group["params"]) == (2 if stage == 1 else len(list(fresh.parameters())))
    assert group["lr"] == (config.head_lr if stage == 1 else config.finetune_lr)
    state, reference = restored.state_dict()["state"], optimizer.state_dict()["state"]
    if not continues:
        assert state == {}
        return
    assert sorted(state) == sorted(reference) and state
    for pid, entry in reference.items():
        for key, value in entry.items():
            assert torch.equal(state[pid][key], value), (pid, key)


@pytest.mark.parametrize("capturable", [True, False])
def test_a_fresh_stage_2_optimizer_is_capturable_only_when_asked(saved_after, capturable):
    """After the last head epoch, resume makes the stage-2 Adam; CUDA-graph training asks for a capturable one
    (``capturable=True``), every other run for a plain one. (Inside a stage the saved groups are restored.)"""
    splits, config, _, _ = saved_after(2)
    fresh, _ = build_model(4, "none")
    _, _, _, optimizer = resume(fresh, splits, config, torch.device("cpu"), lambda _: None, capturable)
    assert optimizer.param_groups[0]["capturable"] is capturable

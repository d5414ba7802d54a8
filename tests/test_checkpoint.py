"""Checkpoints: round trip, atomic saves, and clear errors for files that do not fit."""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch

from mediscan.core import checkpoint as ckpt
from mediscan.core.checkpoint import CheckpointError, load_checkpoint, new_metadata, read_metadata, save_checkpoint
from mediscan.core.model import build_model
from mediscan.core.preprocessing import PreprocessConfig

CLASSES = ["bone", "brain", "heart", "lungs"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net, _ = build_model(len(CLASSES), weights="none")
    return net.eval()


def _meta(**extra):
    return new_metadata(CLASSES, PreprocessConfig(32), "none (random initialisation)", **extra)


def test_round_trip_gives_identical_predictions_and_metadata(tmp_path, model):
    path = save_checkpoint(tmp_path / "m.safetensors", model, _meta(temperature=1.7),
                           extra={"ood.mean": torch.ones(4, 3)})
    loaded = load_checkpoint(path)
    x = torch.randn(2, 1, 32, 32) * 500
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    assert loaded.classes == CLASSES and loaded.temperature == 1.7
    assert loaded.preprocessing.input_size == 32
    assert torch.equal(loaded.extra["ood.mean"], torch.ones(4, 3))
    assert not loaded.model.training
    assert loaded.path == path
    assert read_metadata(path)["versions"]["torch"] == torch.__version__


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, model, monkeypatch):
    path = save_checkpoint(tmp_path / "best.safetensors", model, _meta(epoch=1))
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("No space left on device")
    monkeypatch.setattr(ckpt.os, "fsync", crash)        # dies after part of the file is written
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, model, _meta(epoch=2))
    assert path.read_bytes() == before
    assert read_metadata(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["best.safetensors"]     # no temp file left behind


def test_killed_process_mid_save_leaves_previous_checkpoint_valid(tmp_path, model):
    """A real SIGKILL while the new file is being written: the old one still loads."""
    import subprocess
    import sys
    path = save_checkpoint(tmp_path / "best.safetensors", model, _meta(epoch=1))
    script = f"""
import os, signal, sys, torch
from mediscan.core import checkpoint as ckpt
from mediscan.core.model import build_model
from mediscan.core.preprocessing import PreprocessConfig
real_fsync = ckpt.os.fsync
def die(fd):
    os.kill(os.getpid(), signal.SIGKILL)      # the file is half on disk now
ckpt.os.fsync = die
net, _ = build_model(4, weights="none")
ckpt.save_checkpoint({str(path)!r}, net, ckpt.new_metadata({CLASSES!r}, PreprocessConfig(32), "x", epoch=2))
"""
    repo = Path(ckpt.__file__).parents[2]            # "python -c" imports from its working directory
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120, cwd=repo)
    assert result.returncode == -9
    loaded = load_checkpoint(path)
    assert loaded.meta["epoch"] == 1


def test_missing_empty_and_corrupt_files(tmp_path, model):
    with pytest.raises(CheckpointError, match="No checkpoint at"):
        load_checkpoint(tmp_path / "absent.safetensors")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(empty)
    good = save_checkpoint(tmp_path / "good.safetensors", model, _meta())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt|readable"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError):
        load_checkpoint(garbage)


def test_preprocessing_this_version_cannot_reproduce_is_refused_by_name(tmp_path, model):
    """A checkpoint trained with another crop or input range would be fed wrongly scaled images: refused at
    load, naming the file and the preprocessing, instead of predicting nonsense."""
    for key, value in (("crop", "stretch"), ("input_range", [0, 1])):
        meta = _meta()
        meta["preprocessing"][key] = value
        path = save_checkpoint(tmp_path / f"{key}.safetensors", model, meta)
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        assert str(path) in str(err.value) and "unsupported preprocessing" in str(err.value)


def test_pickle_checkpoints_are_not_loaded(tmp_path, model):
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def _rewrite_meta(path, out, mutate):
    """Copy a checkpoint with its JSON metadata changed (safetensors header edited in place)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = json.loads(header["__metadata__"]["meta"])
    mutate(meta, header)
    header["__metadata__"]["meta"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    out.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return out


def test_class_count_mismatch_and_other_architecture(tmp_path, model):
    good = save_checkpoint(tmp_path / "good.safetensors", model, _meta())
    three = _rewrite_meta(good, tmp_path / "three.safetensors",
                          lambda m, h: m.__setitem__("classes", ["a", "b", "c"]))
    with pytest.raises(CheckpointError, match="3 classes .* 4 outputs"):
        load_checkpoint(three)
    resnet = _rewrite_meta(good, tmp_path / "resnet.safetensors",
                           lambda m, h: m.__setitem__("architecture", "resnet50"))
    with pytest.raises(CheckpointError, match="resnet50"):
        load_checkpoint(resnet)


def test_missing_weights_are_reported(tmp_path, model):
    good = save_checkpoint(tmp_path / "good.safetensors", model, _meta())
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(good))
    del tensors["model.features.norm5.weight"]
    header = {"format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION, "meta": json.dumps(_meta())}
    save_file(tensors, str(tmp_path / "partial.safetensors"), metadata=header)
    with pytest.raises(CheckpointError, match="1 missing"):
        load_checkpoint(tmp_path / "partial.safetensors")


def _resaved_without(good: Path, out: Path, drop=(), add=None) -> Path:
    """``good``'s tensors minus ``drop`` plus ``add``, under the same metadata record."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(good))
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    header = {"format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION, "meta": json.dumps(_meta())}
    save_file(tensors, str(out), metadata=header)
    return out


def test_unexpected_head_less_and_several_missing_weights_are_named(tmp_path, model):
    good = save_checkpoint(tmp_path / "good.safetensors", model, _meta())
    extra = _resaved_without(good, tmp_path / "extra.safetensors", add={"model.head.extra": torch.ones(2)})
    with pytest.raises(CheckpointError, match=r"0 missing, 1 unexpected, 0 wrongly shaped .*head\.extra"):
        load_checkpoint(extra)
    headless = _resaved_without(good, tmp_path / "headless.safetensors", drop=("model.head.fc.weight",))
    with pytest.raises(CheckpointError, match=r"no classifier head weights \(head\.fc\.weight\)"):
        load_checkpoint(headless)
    norms = [f"model.features.norm5.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
    partial = _resaved_without(good, tmp_path / "partial4.safetensors", drop=norms)
    with pytest.raises(CheckpointError, match="4 missing") as err:
        load_checkpoint(partial)
    first = str(err.value).split("(first: ")[1]
    assert first.count("norm5.") == 3                     # the first three named, not all of them


def test_the_loaded_head_keeps_the_trained_dropout(tmp_path, model):
    """Dropout is inactive in eval mode, but a loaded model that is trained further must keep its rate;
    a record without one (older checkpoints) means none."""
    path = save_checkpoint(tmp_path / "d.safetensors", model, _meta(dropout=0.3))
    assert load_checkpoint(path).model.head.dropout.p == pytest.approx(0.3)
    bare = _rewrite_meta(path, tmp_path / "bare.safetensors", lambda m, h: m.pop("dropout"))
    assert load_checkpoint(bare).model.head.dropout.p == 0.0


def test_every_refusal_names_the_file_and_what_is_wrong(tmp_path, model):
    from safetensors.torch import save_file
    folder = tmp_path / "models"
    folder.mkdir()
    cases = {folder: "is a folder; point to the .safetensors file inside it"}
    cases[tmp_path / "one.safetensors"] = "not a readable checkpoint"
    (tmp_path / "one.safetensors").write_bytes(b"\x00")          # one byte: not empty, not a checkpoint
    tensors = {"x": torch.zeros(1)}
    for name, header, expected in (
            ("plain", {}, "not a MediScan checkpoint (no 'mediscan-checkpoint' header)"),
            ("v9", {"format": ckpt.FORMAT, "format_version": "9"}, "uses checkpoint format 9, this MediScan reads format 1"),
            ("badjson", {"format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION, "meta": "{oops"},
             "has corrupt metadata")):
        target = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(target), metadata=header or None)
        cases[target] = expected
    for path, expected in cases.items():
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        assert str(path) in str(err.value) and expected in str(err.value), str(err.value)


def test_save_refuses_metadata_that_does_not_match_the_head(tmp_path, model):
    with pytest.raises(CheckpointError, match="metadata lists 2 classes"):
        save_checkpoint(tmp_path / "x.safetensors", model, new_metadata(["a", "b"], PreprocessConfig(32), "x"))
    with pytest.raises(ValueError, match=r"^extra tensor name 'model\.x' clashes with the model's prefix$"):
        save_checkpoint(tmp_path / "x.safetensors", model, _meta(), {"ood.mean": torch.zeros(1), "model.x": torch.zeros(1)})
    assert not (tmp_path / "x.safetensors").exists()


def test_a_record_without_preprocessing_is_refused_at_load_not_guessed(tmp_path, model):
    """Without its preprocessing the input size and scaling are unknown: a CheckpointError naming the file
    at load, never a default size or a KeyError at the first prediction."""
    meta = _meta()
    del meta["preprocessing"]
    path = save_checkpoint(tmp_path / "bare.safetensors", model, meta)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))} has no 'preprocessing' record in its metadata"):
        load_checkpoint(path)


def test_background_writer_snapshots_at_submission_and_reports_failures(tmp_path, model, monkeypatch):
    writer = ckpt.BackgroundCheckpointWriter()
    history = [{"epoch": 1}]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    writer.submit(tmp_path / "last.safetensors", model, _meta(training_state={"history": history}))
    history.append({"epoch": 2})                       # the caller goes on mutating its own objects...
    with torch.no_grad():
        model.head.fc.bias.add_(1.0)                   # ...and its weights
    try:
        writer.wait()
        loaded = load_checkpoint(tmp_path / "last.safetensors")
        assert loaded.meta["training_state"]["history"] == [{"epoch": 1}]
        assert torch.equal(loaded.model.head.fc.bias, before["head.fc.bias"])

        def full_disk(*args, **kwargs):
            raise OSError("No space left on device")
        monkeypatch.setattr(ckpt.os, "fsync", full_disk)
        writer.submit(tmp_path / "last.safetensors", model, _meta())
        with pytest.raises(OSError, match="No space"):
            writer.wait()
        assert load_checkpoint(tmp_path / "last.safetensors").meta["training_state"]["history"] == [{"epoch": 1}]
    finally:
        with torch.no_grad():
            model.head.fc.bias.sub_(1.0)
        writer.close()

"""Decoded splits as uint8 (issue 15): same numbers as the float preprocessing, an on-disk cache that is reused,
rebuilt when the data or the input size change, never trusted after a killed build, shared by concurrent
processes, and a bad --cache-dir refused with a clear message before training starts."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mediscan.core.dataset as dataset_module
from conftest import ROOT
from mediscan.apps.exit_codes import EXIT_BAD_INPUT
from mediscan.core.dataset import TensorSplit, load_split, scan_dataset, split_key
from mediscan.core.imaging import read_image
from mediscan.core.pixel_cache import CacheDirError, PixelFile, check_writable, gather, open_entry
from mediscan.core.preprocessing import INPUT_RANGE, preprocess
from mediscan.core.runtime import predict_split
from mediscan.devtools.synthetic import make_dataset, pattern_image, tiny_model
from mediscan.training.config import TrainConfig
from mediscan.training.epochs import train_full_epoch, validate

#: Half a grey level in model units: 2048 / 255 / 2.
HALF_LEVEL = INPUT_RANGE / 255.0


def _float_reference(samples, size: int) -> torch.Tensor:
    """Independent reference: the float preprocessing the Predictor applies, file by file."""
    return torch.stack([preprocess(read_image(s.path).pixels, size)[0] for s in samples])


@pytest.fixture
def decodes(monkeypatch):
    """Counts calls of the real decoder made by load_split."""
    calls = []

    def counting(path, *args, **kwargs):
        calls.append(path)
        return read_image(path, *args, **kwargs)
    monkeypatch.setattr(dataset_module, "read_image", counting)
    return calls


def test_8bit_images_at_the_input_size_give_exactly_the_float_preprocessing(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=3, size=32, splits=("train", "test"))
    samples = scan_dataset(data).train
    split, _ = load_split(samples, 32)
    assert split.pixels.dtype == torch.uint8 and split.pixels.shape == (len(samples), 1, 32, 32)
    assert torch.equal(split.images, _float_reference(samples, 32))                 # bit for bit
    assert torch.equal(split.batch(torch.tensor([3, 0]), "cpu"), split.images[[3, 0]])


@pytest.mark.parametrize("size", [32, 56])          # 40 px sources shrunk (area) and enlarged (linear)
def test_resized_images_differ_from_the_float_path_by_at_most_half_a_grey_level(tmp_path, size):
    data = make_dataset(tmp_path / "d", per_class=3, size=40, splits=("train", "test"))
    samples = scan_dataset(data).train
    split, _ = load_split(samples, size)
    difference = (split.images - _float_reference(samples, size)).abs().max().item()
    assert 0 < difference <= HALF_LEVEL + 1e-3, difference


def test_one_epoch_and_its_validation_match_the_float_path(tmp_path):
    """Same seed, same files: training on uint8 pixels (converted per batch) gives the weights, logits and
    validation accuracy of training on the float tensors the float preprocessing makes."""
    data = make_dataset(tmp_path / "d", per_class=3, size=32, splits=("train", "val"))
    splits = scan_dataset(data, require_test=False)
    uint8 = {name: load_split(splits.split(name), 32)[0] for name in ("train", "val")}
    floats = {name: TensorSplit(_float_reference(splits.split(name), 32), split.labels, split.paths)
              for name, split in uint8.items()}
    config = TrainConfig(batch_size=8, progress=False, augment=True, amp=False, head_epochs=0, finetune_epochs=1)
    results = []
    for data_set in (uint8, floats):
        model = tiny_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        criterion = torch.nn.CrossEntropyLoss()
        generator = torch.Generator().manual_seed(5)
        indices = torch.randperm(len(data_set["train"]), generator=torch.Generator().manual_seed(1))
        train_full_epoch(model, model, data_set["train"], indices, optimizer, criterion, config, 8, 1,
                         torch.device("cpu"), generator)
        logits, _ = predict_split(model, data_set["val"].pixels, 16, torch.device("cpu"))
        results.append((model.state_dict(), logits, validate(model, data_set["val"], criterion, config,
                                                             torch.device("cpu"))))
    (weights_a, logits_a, val_a), (weights_b, logits_b, val_b) = results
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert torch.equal(logits_a, logits_b) and val_a == val_b


def test_disk_cache_is_reused_without_decoding_and_equals_ram_bit_for_bit(tmp_path, decodes):
    data = make_dataset(tmp_path / "d", per_class=3, size=40, splits=("train", "test"))
    samples = scan_dataset(data).train
    ram, _ = load_split(samples, 32)
    assert len(decodes) == len(samples)
    built, _ = load_split(samples, 32, cache_dir=tmp_path / "cache")
    assert len(decodes) == 2 * len(samples) and built.cache.startswith("built ")
    reused, _ = load_split(samples, 32, cache_dir=tmp_path / "cache")
    assert len(decodes) == 2 * len(samples) and reused.cache.startswith("reused ")     # decoded nothing
    for split in (built, reused):
        assert torch.equal(split.pixels[:], ram.pixels) and torch.equal(split.labels, ram.labels)
        assert split.paths == ram.paths
    assert torch.equal(reused.pixels[torch.tensor([5, 1, 2])], ram.pixels[[5, 1, 2]])


def test_pixel_file_indexes_like_the_tensor_it_stands_in_for(tmp_path):
    reference = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (7, 1, 4, 4), dtype=np.uint8))
    reference.numpy().tofile(tmp_path / "pixels.u8")
    stored = PixelFile(tmp_path / "pixels.u8", 7, 4)
    keys = (2, -1, slice(1, 5), slice(None, None, 3), torch.tensor([6, 0, 1, 2, 2]), torch.tensor([], dtype=torch.long))
    for key in keys:
        assert torch.equal(stored[key], reference[key]), key
        if not isinstance(key, int):
            assert torch.equal(gather(stored, key, "cpu"), reference[key])
    with pytest.raises(IndexError):
        stored[torch.tensor([7])]


def test_cache_is_rebuilt_when_a_file_or_the_input_size_changes(tmp_path, decodes):
    data = make_dataset(tmp_path / "d", per_class=3, size=40, splits=("train", "test"))
    cache = tmp_path / "cache"
    first, _ = load_split(scan_dataset(data).train, 32, cache_dir=cache)
    changed = scan_dataset(data).train[0].path
    Image.fromarray(255 - pattern_image(0, 40, np.random.default_rng(9))).save(changed)
    samples = scan_dataset(data).train
    decodes.clear()
    rebuilt, _ = load_split(samples, 32, cache_dir=cache)
    assert len(decodes) == len(samples) and rebuilt.cache.startswith("built ")
    assert torch.equal(rebuilt.pixels[:], load_split(samples, 32)[0].pixels)
    assert not torch.equal(rebuilt.pixels[:1], first.pixels[:1])
    decodes.clear()
    other_size, _ = load_split(samples, 24, cache_dir=cache)
    assert len(decodes) == len(samples) and other_size.pixels.shape[-1] == 24


def test_unreadable_files_are_remembered_by_the_cache(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=3, size=32, splits=("train", "test"))
    (data / "train" / "bone" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    samples = scan_dataset(data).train
    for _ in range(2):                                   # built, then reused: the same answer
        with pytest.raises(Exception, match="broken.png"):
            load_split(samples, 32, cache_dir=tmp_path / "cache")
        split, bad = load_split(samples, 32, cache_dir=tmp_path / "cache", skip_bad=True)
        assert len(bad) == 1 and "broken.png" in bad[0] and len(split) == len(samples) - 1
        assert torch.equal(split.pixels[:], load_split(samples, 32, skip_bad=True)[0].pixels)


def test_a_damaged_committed_cache_is_not_trusted(tmp_path, decodes):
    data = make_dataset(tmp_path / "d", per_class=2, size=32, splits=("train", "test"))
    samples = scan_dataset(data).train
    load_split(samples, 32, cache_dir=tmp_path / "cache")
    entry = tmp_path / "cache" / split_key(samples, 32)
    with open(entry / "pixels.u8", "r+b") as handle:     # a truncated file (a disk that filled up later)
        handle.truncate(100)
    decodes.clear()
    split, _ = load_split(samples, 32, cache_dir=tmp_path / "cache")
    assert len(decodes) == len(samples) and split.cache.startswith("built ")
    assert torch.equal(split.pixels[:], load_split(samples, 32)[0].pixels)


_BUILDER = textwrap.dedent("""
    import hashlib, sys, time
    import mediscan.core.dataset as ds
    real = ds.read_image
    decoded = []
    def slow(path, *a, **k):              # slow decoding, so the parent can act mid-build
        time.sleep(float(sys.argv[3]))
        decoded.append(path)
        return real(path, *a, **k)
    ds.read_image = slow
    split, _ = ds.load_split(ds.scan_dataset(sys.argv[1]).train, 32, workers=1, cache_dir=sys.argv[2])
    print(len(decoded), split.cache.split()[0], hashlib.sha256(split.pixels[:].numpy().tobytes()).hexdigest())
""")


def _builder(data: Path, cache: Path, delay: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _BUILDER, str(data), str(cache), str(delay)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_sigkill_mid_build_leaves_no_trusted_cache(tmp_path, decodes):
    data = make_dataset(tmp_path / "d", per_class=10, size=32, splits=("train", "test"))
    cache = tmp_path / "cache"
    proc = _builder(data, cache, 0.05)
    deadline = time.monotonic() + 120
    while not list(cache.glob(".building-*/pixels.u8")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)                                      # a few rows written
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    samples = scan_dataset(data).train
    assert list(cache.glob(".building-*")) and open_entry(cache, split_key(samples, 32)) is None
    split, _ = load_split(samples, 32, cache_dir=cache)            # rebuilt from scratch, not resumed
    assert len(decodes) == len(samples) and split.cache.startswith("built ")
    assert torch.equal(split.pixels[:], load_split(samples, 32)[0].pixels)
    assert not list(cache.glob(".building-*"))                     # the dead builder's leftovers are gone


def test_concurrent_processes_build_once_and_read_the_same_cache(tmp_path):
    """Two processes (like two torchrun ranks on one machine) start together: one decodes, the other waits
    for it and reads its cache."""
    data = make_dataset(tmp_path / "d", per_class=3, size=32, splits=("train", "test"))
    procs = [_builder(data, tmp_path / "cache", 0.03) for _ in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    rows = sorted(out.split() for out, _ in outputs)
    n = len(scan_dataset(data).train)
    assert [(r[0], r[1]) for r in rows] == [("0", "reused"), (str(n), "built")]
    assert rows[0][2] == rows[1][2]


def test_check_writable_refuses_a_disk_without_room_and_a_file(tmp_path):
    free = __import__("shutil").disk_usage(tmp_path).free
    with pytest.raises(CacheDirError, match=r"--cache-dir .*: the disk is too full: .* MB are free"):
        check_writable(tmp_path / "cache", free + 2**30)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheDirError, match="a file, not a folder"):
        check_writable(tmp_path / "file", 1)
    check_writable(tmp_path / "cache", 1)


def _train_args(data: Path, out: Path, cache: Path) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--cache-dir", str(cache), "--weights", "none",
            "--input-size", "32", "--head-epochs", "1", "--finetune-epochs", "0", "--batch-size", "8",
            "--no-progress", "--no-gallery", "--workers", "1", "--device", "cpu"]


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this process cannot write into: mode 0555, or (as root, who ignores modes) immutable."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.fail("running as root and `chattr +i` failed: no way to make a read-only folder here")
    yield folder
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


def test_cli_refuses_a_read_only_cache_dir_before_training(tmp_path, read_only_dir, capsys):
    from mediscan.apps.train_cli import main
    data = make_dataset(tmp_path / "d", per_class=2, size=32)
    code = main(_train_args(data, tmp_path / "out", read_only_dir))     # an existing, read-only folder
    err = capsys.readouterr()
    assert code == EXIT_BAD_INPUT, err
    assert f"--cache-dir {read_only_dir}: cannot write there" in err.err
    assert "read-only" in err.err and "leave --cache-dir out" in err.err and "Traceback" not in err.err
    assert "decoded" not in err.out and "epoch" not in err.out and not (tmp_path / "out" / "best.safetensors").exists()


def test_cli_reports_a_cache_dir_that_fills_up_without_traceback(tmp_path):
    """A file-size limit (RLIMIT_FSIZE, enforced by the kernel) stands in for a disk that fills up: the
    space check passes, then reserving the cache file (16 KB per split) fails."""
    data = make_dataset(tmp_path / "d", per_class=4, size=32)

    def limit():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 1024, 8 * 1024))
    proc = subprocess.run([sys.executable, str(ROOT / "densenet121_xray_classifier.py")]
                          + _train_args(data, tmp_path / "out", tmp_path / "cache"), cwd=ROOT, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    assert f"--cache-dir {tmp_path / 'cache'}: writing the cache failed (File too large)" in proc.stderr
    assert "Traceback" not in proc.stderr and "epoch" not in proc.stdout
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]   # nothing left


def test_cli_training_with_a_cache_dir_matches_ram_and_reuses_it(tmp_path, capsys):
    """Same seed and data: a run on the disk cache, a second run that reuses it, and a RAM run have the
    same history (losses and accuracies exactly) and the same weights."""
    from mediscan.apps.train_cli import main
    from mediscan.core.checkpoint import load_checkpoint, read_metadata
    data = make_dataset(tmp_path / "d", per_class=2, size=40)
    cached = _train_args(data, tmp_path / "cached", tmp_path / "cache")
    assert main(cached) == 0 and "pixel cache: built" in capsys.readouterr().out
    assert main(cached[:3] + [str(tmp_path / "again")] + cached[4:]) == 0
    assert "pixel cache: reused" in capsys.readouterr().out
    ram = cached[:3] + [str(tmp_path / "ram")] + cached[6:]          # without --cache-dir
    assert main(ram) == 0 and "pixel cache" not in capsys.readouterr().out
    runs = ("cached", "again", "ram")
    histories = [[{k: v for k, v in h.items() if k != "seconds"}
                  for h in read_metadata(tmp_path / run / "last.safetensors")["training_state"]["history"]]
                 for run in runs]
    assert histories[0] == histories[1] == histories[2]
    weights = [load_checkpoint(tmp_path / run / "best.safetensors").model.state_dict() for run in runs]
    assert all(torch.equal(weights[0][k], other[k]) for other in weights[1:] for k in weights[0])

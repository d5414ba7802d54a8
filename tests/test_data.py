"""Dataset checks: every problem is found before training, with the files named."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from mediscan.core.dataset import DatasetError, load_split, scan_dataset, stratified_split
from mediscan.devtools.synthetic import make_dataset
from mediscan.training.augment import augment_batch


def test_valid_dataset_scans_with_sorted_classes_and_fingerprint(tiny_dataset):
    splits = scan_dataset(tiny_dataset)
    assert splits.classes == ["bone", "brain", "heart", "lungs"]
    assert len(splits.train) == len(splits.val) == len(splits.test) == 24
    assert splits.fingerprint["files"] == 72 and len(splits.fingerprint["sha256"]) == 64
    assert splits.duplicates == [] and not splits.val_from_train


def test_class_names_come_from_folders_not_code(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("zebra", "apple", "mango"), per_class=3)
    assert scan_dataset(root).classes == ["apple", "mango", "zebra"]


def test_missing_folder_and_missing_split(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")
    root = make_dataset(tmp_path / "d", splits=("train", "val"))
    with pytest.raises(DatasetError, match=r"missing split: .*test"):
        scan_dataset(root)


def test_classes_that_differ_between_splits(tiny_dataset):
    shutil.rmtree(tiny_dataset / "test" / "heart")
    (tiny_dataset / "val" / "spleen").mkdir()
    with pytest.raises(DatasetError) as err:
        scan_dataset(tiny_dataset)
    message = str(err.value)
    assert "test" in message and "missing ['heart']" in message
    assert "val" in message and "extra ['spleen']" in message


def test_empty_class_is_named(tiny_dataset):
    for f in (tiny_dataset / "train" / "brain").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=r"empty class: .*train/brain"):
        scan_dataset(tiny_dataset)


def test_non_image_files_are_named_and_skip_bad_lists_them(tiny_dataset):
    notes = tiny_dataset / "train" / "lungs" / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(DatasetError, match=r"notes\.txt: not an image file") as err:
        scan_dataset(tiny_dataset)
    assert "--skip-bad" in str(err.value)
    splits = scan_dataset(tiny_dataset, skip_bad=True)
    assert any("notes.txt" in s for s in splits.skipped)
    assert all(s.path != notes for s in splits.train)


def test_unreadable_images_are_all_named(tiny_dataset):
    bad1 = tiny_dataset / "train" / "bone" / "broken.png"
    bad1.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    bad2 = tiny_dataset / "train" / "heart" / "empty.jpg"
    bad2.write_bytes(b"")
    splits = scan_dataset(tiny_dataset)
    with pytest.raises(DatasetError) as err:
        load_split(splits.train, 32)
    assert "broken.png" in str(err.value) and "empty.jpg" in str(err.value)
    tensors, bad = load_split(splits.train, 32, skip_bad=True)
    assert len(bad) == 2 and len(tensors) == len(splits.train) - 2


def test_duplicates_across_splits_are_reported(tiny_dataset):
    leaked = tiny_dataset / "test" / "bone" / "leaked.png"
    shutil.copy(tiny_dataset / "train" / "bone" / "bone_train_0.png", leaked)
    splits = scan_dataset(tiny_dataset)
    assert len(splits.duplicates) == 1
    assert str(leaked) in splits.duplicates[0][1]


def test_no_val_folder_gives_stratified_seeded_split(tmp_path):
    root = make_dataset(tmp_path / "d", splits=("train", "test"), per_class=10)
    a = scan_dataset(root, val_fraction=0.2, seed=3)
    b = scan_dataset(root, val_fraction=0.2, seed=3)
    assert a.val_from_train
    assert [s.path for s in a.val] == [s.path for s in b.val]
    assert a.class_counts("val") == {c: 2 for c in a.classes}
    assert not {s.path for s in a.val} & {s.path for s in a.train}


def test_stratified_split_rejects_bad_fraction():
    with pytest.raises(DatasetError, match="val-fraction"):
        stratified_split([], 1.5, 0)


def test_loaded_tensors_are_in_model_range(tiny_dataset):
    splits = scan_dataset(tiny_dataset)
    tensors, bad = load_split(splits.test, 32)
    assert bad == [] and tensors.images.shape == (24, 1, 32, 32)
    assert tensors.pixels.dtype == torch.uint8 and tensors.pixels.shape == (24, 1, 32, 32)   # 1 byte per pixel
    assert tensors.images.min() >= -1024 and tensors.images.max() <= 1024
    assert tensors.images.max() - tensors.images.min() > 1000    # really spread over the range


def test_augmentation_is_small_seeded_and_stays_in_range():
    images = torch.from_numpy(np.linspace(-1024, 1024, 4 * 32 * 32, dtype=np.float32)).view(4, 1, 32, 32)
    a = augment_batch(images, torch.Generator().manual_seed(1))
    b = augment_batch(images, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.shape == images.shape and a.min() >= -1024 and a.max() <= 1024
    assert not torch.equal(a, images)
    # small: the augmented image still correlates strongly with the original
    corr = np.corrcoef(a.flatten().numpy(), images.flatten().numpy())[0, 1]
    assert corr > 0.8

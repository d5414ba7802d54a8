"""Training speed: MediScan's fast path against a straightforward loop, same data, same process.

The default schedule (5 head epochs + 10 fine-tuning epochs, batch 16, --weights none) on the real
images in ../shared/data/organs, with train/ repeated so the dataset totals --size images (default 3,836):

    python bench/train_speed.py                       # on the GPU machine: one command, a few minutes
    python bench/train_speed.py --quick               # CPU smoke test of the script itself (tiny settings)

Prints wall time (data loading included) of each path, the speed-up, validation and test accuracy of
both, and peak memory. The straightforward loop decodes every JPEG with PIL each epoch through a
DataLoader, runs fp32 eager, and otherwise follows the same schedule, augmentation and model selection.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from mediscan.core.dataset import scan_dataset
from mediscan.core.imaging import read_image
from mediscan.core.model import build_model
from mediscan.core.preprocessing import preprocess
from mediscan.core.runtime import select_device
from mediscan.training.augment import augment_batch
from mediscan.training.epochs import calibrate_batchnorm
from mediscan.training.fit import TrainConfig, fit, peak_memory_summary

ROOT = Path(__file__).resolve().parents[1]


def build_benchmark_dataset(source: Path, target: Path, total: int) -> None:
    """Symlink val/ and test/ as they are and repeat train/ (in a fixed shuffled order) up to ``total`` images."""
    splits = scan_dataset(source)
    fixed = len(splits.val) + len(splits.test)
    want_train = max(total - fixed, len(splits.classes))
    for name in ("val", "test"):
        for sample in splits.split(name):
            link = target / name / splits.classes[sample.label] / sample.path.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(sample.path.resolve())
    train = sorted(splits.train, key=lambda s: str(s.path))
    random.Random(0).shuffle(train)           # so any prefix keeps the class mix
    for k in range(want_train):
        sample = train[k % len(train)]
        link = target / "train" / splits.classes[sample.label] / f"r{k // len(train)}_{sample.path.name}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(sample.path.resolve())


class DecodeEachEpoch(torch.utils.data.Dataset):
    """The straightforward input pipeline: open, decode and preprocess the file on every access."""

    def __init__(self, samples, input_size: int):
        self.samples, self.input_size = samples, input_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        sample = self.samples[i]
        tensor, _ = preprocess(read_image(sample.path).pixels, self.input_size)
        return tensor, sample.label


def plain_loop(data_dir: Path, config: TrainConfig, workers: int) -> dict:
    """fp32, eager, DataLoader + PIL decode per epoch; frozen backbone (BN in eval) then full fine-tuning."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    device = select_device(config.device)
    splits = scan_dataset(data_dir)
    loaders = {name: torch.utils.data.DataLoader(DecodeEachEpoch(splits.split(name), config.input_size),
                                                 batch_size=config.batch_size, shuffle=(name == "train"),
                                                 num_workers=workers, persistent_workers=workers > 0)
               for name in ("train", "val", "test")}
    model, _ = build_model(len(splits.classes), "none")
    model.to(device)
    # Same BatchNorm re-estimation the fast path does for random weights (a fair, working baseline).
    first = torch.cat([x for x, _ in [next(iter(loaders["train"])) for _ in range(4)]])
    calibrate_batchnorm(model.features, first, config.batch_size, device)
    criterion = nn.CrossEntropyLoss()
    best = (-1.0, None)
    for epoch in range(1, config.total_epochs + 1):
        stage = config.stage_of(epoch)
        if epoch in (1, config.head_epochs + 1):
            model.features.requires_grad_(stage == 2)
            params = model.head.parameters() if stage == 1 else model.parameters()
            optimizer = torch.optim.Adam(params, lr=config.head_lr if stage == 1 else config.finetune_lr)
        model.train()
        if stage == 1:
            model.features.eval()
        for images, labels in loaders["train"]:
            images, labels = images.to(device), labels.to(device)
            if config.augment:
                images = augment_batch(images)
            loss = criterion(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        val_acc = accuracy(model, loaders["val"], device)
        if val_acc > best[0]:
            best = (val_acc, {k: v.detach().clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[1])
    return {"seconds": time.perf_counter() - started, "val_acc": best[0],
            "test_acc": accuracy(model, loaders["test"], device)}


@torch.no_grad()
def accuracy(model, loader, device) -> float:
    model.eval()
    correct = seen = 0
    for images, labels in loader:
        correct += (model(images.to(device)).argmax(1).cpu() == labels).sum().item()
        seen += len(labels)
    return correct / max(seen, 1)


def fast_path(data_dir: Path, out: Path, config: TrainConfig) -> dict:
    started = time.perf_counter()
    result = fit(config.__class__(**{**config.__dict__, "data": str(data_dir), "out": str(out)}), log=print)
    return {"seconds": time.perf_counter() - started,
            "val_acc": max(h["val_acc"] for h in result.history),
            "test_acc": result.test_metrics["accuracy"] if result.test_metrics else float("nan")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "organs"))
    p.add_argument("--size", type=int, default=3836, help="total images (train/ repeated to reach it)")
    p.add_argument("--head-epochs", type=int, default=5)
    p.add_argument("--finetune-epochs", type=int, default=10)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decode workers, both paths")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny CPU run to check the script: 1+1 epochs, 64 px, 420 images")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.head_epochs, args.finetune_epochs, args.input_size = 420, 1, 1, 64

    config = TrainConfig(weights="none", head_epochs=args.head_epochs, finetune_epochs=args.finetune_epochs,
                         input_size=args.input_size, workers=args.workers, progress=False, gallery=False)
    device = select_device("auto")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else device}; torch {torch.__version__}; "
          f"schedule {config.head_epochs}+{config.finetune_epochs} epochs, batch {config.batch_size}, "
          f"{config.input_size}px, --weights none")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "dataset"
        build_benchmark_dataset(Path(args.data), data_dir, args.size)
        counts = {s: sum(1 for _ in (data_dir / s).rglob("*.*")) for s in ("train", "val", "test")}
        print(f"dataset: {sum(counts.values())} images {counts}")
        fast = fast_path(data_dir, Path(tmp) / "fast", config)
        fast_memory = peak_memory_summary(device)   # before the baseline can raise the process peak
        print(f"\nfast path:      {fast['seconds']:7.1f} s   val acc {fast['val_acc']:.4f}   test acc {fast['test_acc']:.4f}")
        if not args.skip_baseline:
            plain = plain_loop(data_dir, config, args.workers)
            print(f"plain loop:     {plain['seconds']:7.1f} s   val acc {plain['val_acc']:.4f}   test acc {plain['test_acc']:.4f}")
            print(f"speed-up:       {plain['seconds'] / fast['seconds']:.2f}x  (target >= 4x)")
            print(f"val acc delta:  {100 * (fast['val_acc'] - plain['val_acc']):+.2f} points (target within 1)")
        print(f"fast wall time: {fast['seconds']:.1f} s (target <= 45 s on one H100)")
        print(f"test accuracy:  {fast['test_acc']:.4f} (target >= 0.98 with the default schedule)")
    print(f"peak memory:    fast path: {fast_memory}; whole benchmark: {peak_memory_summary(device)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

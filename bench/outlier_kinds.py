"""Synthetic outliers of every kind, and the in-scope test images: what the out-of-scope detector flags.

    python bench/outlier_kinds.py --checkpoint models/best.safetensors --data dataset

Outlier exposure (``--outlier-exposure``) trains on synthetic outliers made from training images
(``mediscan.training.outliers``). This script makes the same kinds from the *test* images (two seeds, so two
outliers per test image and kind) and prints, per kind, how many the detector flags: as shipped (its
``combination``) and with its parts combined by their max instead, each thresholded on validation only. It
also prints how many in-scope test images are flagged (false alarms on images the model never saw).

Read the kinds a checkpoint trained on (``train_args.oe_kinds``, marked ``*``) as optimistic: the network saw
outliers made exactly this way, only from other images. A kind it was not trained on measures how far the
training generalises. Measures only: nothing here is fitted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ood_benchmark import _val_threshold, percent, score_parts, validation_files

from mediscan.core.checkpoint import read_metadata
from mediscan.core.imaging import looks_like_image_file, read_image
from mediscan.core.preprocessing import preprocess
from mediscan.inference.predictor import Predictor
from mediscan.training.outliers import (
    DEFAULT_OUTLIER_KINDS,
    OUTLIER_KINDS,
    make_outliers,
    parse_outlier_kinds,
)

SEEDS = (11, 12)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="checkpoint (default: $MEDISCAN_MODEL or models/best)")
    parser.add_argument("--data", type=Path, required=True, help="dataset folder with val/ and test/")
    parser.add_argument("--max-test", type=int, default=None, help="use at most this many test images")
    parser.add_argument("--device", default=None)
    return parser


def tensor_scores(predictor: Predictor, images: torch.Tensor, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``(shipped score, max of the relative parts)`` per model-range image ``(N, 1, S, S)``."""
    shipped, largest = [], []
    for start in range(0, len(images), batch):
        with torch.no_grad():
            feature_map, pooled = predictor.net.tapped_features(images[start:start + batch].to(predictor.device),
                                                                predictor.ood.layer_names)
            logits = predictor.net.head(feature_map).float().cpu()
        shipped.append(predictor.ood.score(pooled, logits).numpy())
        parts = torch.stack(list(predictor.ood.layer_scores(pooled, logits).values()))
        largest.append(parts.max(dim=0).values.numpy())
    return np.concatenate(shipped), np.concatenate(largest)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    predictor = Predictor(args.checkpoint, args.device)
    if predictor.ood is None:
        print("this checkpoint has no out-of-scope statistics; nothing to measure")
        return 1
    trained_on = read_metadata(predictor.checkpoint_path).get("train_args") or {}
    # Checkpoints from before --oe-kinds trained on the five default kinds.
    kinds = trained_on.get("oe_kinds") or ",".join(DEFAULT_OUTLIER_KINDS)
    seen = set(parse_outlier_kinds(kinds)) if trained_on.get("outlier_exposure") else set()
    if not (args.data / "val").is_dir():
        print(f"no {args.data}/val folder: the max rule's threshold needs validation images")
        return 1
    val = [read_image(f) for f in validation_files(args.data, None)]
    _, val_parts = score_parts(predictor, val)
    largest_threshold = _val_threshold(np.max(np.stack(list(val_parts.values())), axis=0))
    test_dir = args.data / "test"
    files = sorted(p for p in test_dir.rglob("*") if p.is_file() and looks_like_image_file(p)) if test_dir.is_dir() else []
    if args.max_test is not None and len(files) > args.max_test:   # an even spread keeps every class
        files = [files[i] for i in np.linspace(0, len(files) - 1, args.max_test).round().astype(int)]
    if not files:
        print(f"no images under {args.data}/test")
        return 1
    test = torch.stack([preprocess(read_image(f).pixels, predictor.input_size)[0] for f in files])
    # Class folders, so that blends overlay two classes as in training.
    labels = torch.tensor([sorted({f.parent.name for f in files}).index(f.parent.name) for f in files])
    print(f"checkpoint {predictor.checkpoint_path} | detector: {predictor.ood.combination} of "
          f"{', '.join(predictor.ood.part_names)}, threshold {predictor.ood.threshold:.3f} | "
          f"{len(val)} validation, {len(test)} test images")
    shipped, largest = tensor_scores(predictor, test)
    print(f"\n  {'in-scope test images':24s} {'shipped':>16s} {'max of parts':>16s}")
    print(f"  {'flagged (false alarms)':24s} {percent(int((shipped > predictor.ood.threshold).sum()), len(test)):>16s} "
          f"{percent(int((largest > largest_threshold).sum()), len(test)):>16s}")
    print(f"\n  {'synthetic kind':24s} {'shipped':>16s} {'max of parts':>16s}   (* = trained on)")
    for kind in OUTLIER_KINDS:
        outliers = torch.cat([make_outliers(test, torch.Generator().manual_seed(seed), kinds=(kind,), labels=labels)[0]
                              for seed in SEEDS])
        shipped, largest = tensor_scores(predictor, outliers)
        mark = "*" if kind in seen else " "
        print(f"  {kind + ' ' + mark:24s} {percent(int((shipped > predictor.ood.threshold).sum()), len(outliers)):>16s} "
              f"{percent(int((largest > largest_threshold).sum()), len(outliers)):>16s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

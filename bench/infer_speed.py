"""Inference speed through the Predictor: single-image latency and folder-mode throughput.

    python bench/infer_speed.py                                   # random-init 224 px model, ~2 min on 2 CPU cores
    python bench/infer_speed.py --checkpoint models/best.safetensors --images 64 --batch-size 16

Figures:
* single image (PNG file -> result), p50 / p95 over --repeats runs: ``predict`` (prediction + OOD score),
  ``explain`` without faithfulness (adds the heatmap mapped onto the original image: same forward pass),
  ``explain`` with faithfulness (one more, 3x batched, forward pass);
* folder mode, --images files: one-at-a-time ``predict()`` (the baseline) vs batched ``predict_many``,
  images/s each and the speed-up ratio, run back to back in this process on the same files; the two
  must give the same probabilities (checked).

Without --checkpoint a random-initialised model at the default 224 px input (4 classes, OOD statistics
fitted on random features so that the OOD scoring is timed too) is written to a temporary folder.
Timings depend on the machine and its load: compare ratios within one run, not across machines.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mediscan.predictor import Predictor  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="checkpoint (default: a random-init 224 px model)")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=8,
                        help="single-image runs per measurement (half as many with faithfulness)")
    parser.add_argument("--images", type=int, default=32, help="files in the folder-mode comparison")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=512, help="side of the test images (as uploaded)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser


def random_checkpoint(folder: Path) -> Path:
    """A 224 px random-init model with OOD statistics, written like training would."""
    from mediscan.checkpoint import new_metadata, save_checkpoint
    from mediscan.model import build_model
    from mediscan.ood import fit_ood
    from mediscan.preprocessing import PreprocessConfig

    torch.manual_seed(0)
    model, source = build_model(4, weights="none")
    gen = torch.Generator().manual_seed(0)
    detector = fit_ood(torch.rand(256, 1024, generator=gen), torch.arange(256) % 4,
                       torch.rand(64, 1024, generator=gen))
    meta = new_metadata(["bone", "brain", "heart", "lungs"], PreprocessConfig(224), source, ood=detector.to_meta())
    return save_checkpoint(folder / "random224.safetensors", model, meta, detector.to_tensors())


def write_images(folder: Path, count: int, size: int) -> list[Path]:
    """Smooth 8-bit grayscale PNGs, a little different each (decode + resize are part of the timing)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    paths = []
    for k in range(count):
        cy, cx = rng.uniform(0.3, 0.7, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.05)
        pixels = np.clip((0.1 + 0.8 * blob + rng.normal(0, 0.03, blob.shape)) * 255, 0, 255).astype(np.uint8)
        path = folder / f"image_{k:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def latency(fn, repeats: int) -> tuple[float, float]:
    """(p50, p95) milliseconds of ``fn()`` over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mediscan-speed-") as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint or random_checkpoint(tmp)
        started = time.perf_counter()
        predictor = Predictor(checkpoint, args.device)
        load_s = time.perf_counter() - started
        paths = write_images(tmp, max(args.images, 1), args.image_size)

        load = f" | load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
        print(f"device {predictor.device} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
              f"{os.cpu_count()} CPUs | {platform.processor() or platform.machine()}{load}")
        print(f"model {predictor.checkpoint_path.name}: {predictor.input_size}px input, classes "
              f"{', '.join(predictor.classes)}, OOD {'yes' if predictor.ood else 'no'}; loaded in {load_s:.1f}s")
        print(f"images: {args.image_size}x{args.image_size} 8-bit PNG files")

        # Warm-up: the first calls pay for allocator and kernel set-up, for single and batched shapes.
        predictor.explain(paths[0])
        predictor.predict_many(paths[:min(args.batch_size, len(paths))], batch_size=args.batch_size)

        print("\n== single image latency (file -> result)")
        few = max(3, args.repeats // 2)      # the faithfulness pass is 3x the work: fewer runs
        rows = [("predict (prediction + OOD)", lambda: predictor.predict(paths[0]), args.repeats),
                ("explain (+ heatmap, same pass)", lambda: predictor.explain(paths[0], faithfulness=False),
                 args.repeats),
                ("explain + faithfulness", lambda: predictor.explain(paths[0], faithfulness=True), few)]
        print(f"  {'':32s} {'p50':>8s}     {'p95':>8s}     runs")
        for label, fn, repeats in rows:
            p50, p95 = latency(fn, repeats)
            print(f"  {label:32s} {p50:8.1f} ms  {p95:8.1f} ms  {repeats:3d}")

        print(f"\n== folder mode, {len(paths)} files")
        started = time.perf_counter()
        serial = [predictor.predict(path) for path in paths]
        serial_s = time.perf_counter() - started
        started = time.perf_counter()
        batched = predictor.predict_many(paths, batch_size=args.batch_size)
        batched_s = time.perf_counter() - started
        worst = max(abs(a.probabilities[c] - b.probabilities[c]) for a, b in zip(serial, batched)
                    for c in predictor.classes)
        serial_rate, batched_rate = len(paths) / serial_s, len(paths) / batched_s
        batched_label = f"batched predict_many(batch_size={args.batch_size})"
        print(f"  {'one at a time, predict()':38s} {serial_rate:8.2f} images/s  ({serial_s:.1f}s)")
        print(f"  {batched_label:38s} {batched_rate:8.2f} images/s  ({batched_s:.1f}s)")
        print(f"  {'speed-up, batched / one at a time':38s} {batched_rate / serial_rate:8.2f}x")
        print(f"  largest probability difference between the two: {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

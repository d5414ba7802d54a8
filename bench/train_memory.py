"""Training-data memory: peak RSS growth while a split is decoded and read once, per image, for three paths.

    python bench/train_memory.py                               # 1k / 4k / 16k images (float path: 1k / 2k)
    python bench/train_memory.py --sizes 1000,4000,8000        # a smaller run on a busy machine
    python bench/train_memory.py --quick                       # smoke test of the script itself

The synthetic 8-bit PNGs (``--image-size`` px, default 256) are written once into a temp folder. Every
(mode, size) runs in a fresh subprocess that builds the DenseNet121 first ("the model"), resets the
kernel's peak-RSS mark (``/proc/self/clear_refs``), then decodes ``size`` images at ``--input-size`` and
reads every image once in shuffled batches of 64, as an epoch does; it reports the peak RSS above the
model. Modes:

* ``float``: the float32 path main had before the uint8 cache (decode, preprocess, ``torch.stack``): the
  baseline, measured in the same run (at the smaller sizes only: it grows ~0.8 MB per image);
* ``ram``: ``load_split`` as training now runs it: uint8 in RAM, converted per batch;
* ``disk``: ``load_split(..., cache_dir=...)`` building the on-disk cache, and ``disk-reuse``: a second
  process reading the cache the first one built (what the next run, or another torchrun rank, does).

Prints a table and the slope (KB per image, least squares over the sizes) of each mode, with its ratio to
the float path's slope. Goal (issue 15): <= 60 KB per image in RAM mode; disk mode roughly flat
(< 150 MB above the model).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import torch
from mediscan.core.dataset import Sample, load_split
from mediscan.core.imaging import read_image
from mediscan.core.model import build_model
from mediscan.core.preprocessing import preprocess

mode, folder, count, size, workers, cache = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
    int(sys.argv[5]), sys.argv[6]
model, _ = build_model(4, "none")

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
Path("/proc/self/clear_refs").write_text("5")          # the peak mark (VmHWM) restarts here
before = status("VmRSS")
samples = [Sample(folder / f"img_{k:05d}.png", k % 4) for k in range(count)]
started = time.perf_counter()
if mode == "float":                                     # main before issue 15 (core/dataset.py load_split)
    def decode(sample):
        return preprocess(read_image(sample.path).pixels, size)[0]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        tensors = list(pool.map(decode, samples))
    images = torch.stack(tensors)
    del tensors
    batch = lambda index: images[index]
else:
    split, _ = load_split(samples, size, workers=workers, cache_dir=cache if mode.startswith("disk") else None)
    batch = lambda index: split.batch(index, "cpu")
decoded = time.perf_counter() - started
total = 0.0
for index in torch.randperm(count, generator=torch.Generator().manual_seed(0)).split(64):
    total += float(batch(index).mean())                 # every image read once, as an epoch does
print(json.dumps({"before": before, "peak": status("VmHWM"), "seconds": decoded,
                  "epoch_seconds": time.perf_counter() - started - decoded}))
"""


def write_images(folder: Path, count: int, size: int) -> None:
    """``count`` smooth 8-bit grayscale PNGs with a little noise, each a little different."""
    from PIL import Image
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        cy, cx = rng.uniform(0.3, 0.7, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.05)
        pixels = np.clip((0.1 + 0.8 * blob + rng.normal(0, 0.02, blob.shape)) * 255, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{k:05d}.png")


def measure(mode: str, folder: Path, count: int, args, cache: Path) -> dict:
    """One (mode, size) in a fresh process: peak RSS above the model, in bytes, and the decode time."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode, str(folder), str(count), str(args.input_size),
                           str(args.workers), str(cache)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(f"{mode} {count}: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "growth": result["peak"] - result["before"]}


def slope(points: list[tuple[int, int]]) -> float:
    """Least-squares bytes per image over (count, growth) points."""
    counts, growth = np.array(points, dtype=np.float64).T
    return float(np.polyfit(counts, growth, 1)[0]) if len(points) > 1 else growth[0] / counts[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,4000,16000", help="image counts for ram and disk modes")
    parser.add_argument("--float-sizes", default="1000,2000", help="image counts for the float baseline")
    parser.add_argument("--image-size", type=int, default=256, help="side of the synthetic PNGs")
    parser.add_argument("--input-size", type=int, default=224, help="model input side")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads")
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the script runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.float_sizes, args.image_size, args.input_size = "50,100", "50,100", 64, 32
    sizes = [int(s) for s in args.sizes.split(",")]
    float_sizes = [int(s) for s in args.float_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="train_memory_") as tmp:
        folder = Path(tmp) / "images"
        started = time.perf_counter()
        write_images(folder, max(sizes + float_sizes), args.image_size)
        print(f"{max(sizes + float_sizes)} PNGs of {args.image_size} px written in "
              f"{time.perf_counter() - started:.0f}s; input {args.input_size} px, {args.workers} decoding threads, "
              f"{os.cpu_count()} CPUs")
        print(f"{'mode':<11}{'images':>8}{'RSS above model':>17}{'per image':>12}{'decode s':>10}{'epoch s':>9}")
        points: dict[str, list[tuple[int, int]]] = {}
        for mode, counts in (("float", float_sizes), ("ram", sizes), ("disk", sizes), ("disk-reuse", sizes)):
            for count in counts:
                cache = Path(tmp) / f"cache-{count}"           # disk-reuse reads what disk built
                result = measure(mode, folder, count, args, cache)
                points.setdefault(mode, []).append((count, result["growth"]))
                print(f"{mode:<11}{count:>8}{result['growth'] / 2**20:>13.0f} MiB"
                      f"{result['growth'] / count / 1024:>9.1f} KB{result['seconds']:>10.1f}"
                      f"{result['epoch_seconds']:>9.1f}", flush=True)
    base = slope(points["float"])
    print(f"\nslope (least squares): float {base / 1024:.1f} KB/image (baseline)")
    for mode in ("ram", "disk", "disk-reuse"):
        value = slope(points[mode])
        ratio = f"{base / value:6.1f}x less than float" if value > 1024 else "  flat (within noise)"
        print(f"  {mode:<11}{value / 1024:8.1f} KB/image  {ratio}; "
              f"largest growth {max(g for _, g in points[mode]) / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

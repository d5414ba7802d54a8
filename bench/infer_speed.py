"""Inference speed through the Predictor: single-image latency and folder-mode throughput, PyTorch vs ONNX Runtime.

    python bench/infer_speed.py                                   # random-init 224 px model, ~2 min on 2 CPU cores
    python bench/infer_speed.py --checkpoint models/best.safetensors --images 64 --batch-size 16
    python bench/infer_speed.py --threads 1 --compare-only        # only the PyTorch vs ONNX Runtime section

Figures:
* single image (PNG file -> result), p50 / p95 over --repeats runs: ``predict`` (prediction + OOD score),
  ``explain`` without faithfulness (adds the heatmap mapped onto the original image: same forward pass),
  ``explain`` with faithfulness (one more, 3x batched, forward pass);
* folder mode, --images files: one-at-a-time ``predict()`` (the baseline) vs batched ``predict_many``,
  images/s each and the speed-up ratio, run back to back in this process on the same files; the two
  must give the same probabilities (checked);
* PyTorch vs ONNX Runtime on the CPU (skipped with --no-onnx, without onnxruntime, or on CUDA): the checkpoint is
  exported to a temporary .onnx, then batch-1 latency (predict, explain, explain + faithfulness) and batched
  predict_many throughput are measured for both backends in this process, their calls interleaved so that a
  change in machine load hits both alike; parity = the largest probability / heatmap / OOD-score difference
  over every image run. This is the measurement behind ``mediscan.inference.onnx_backend.AUTO_PREFERS_ONNX_ON_CPU``.

Without --checkpoint a random-initialised model at the default 224 px input (4 classes, OOD statistics
fitted on random features so that the OOD scoring is timed too, head scaled so that its probabilities are
not saturated at 0/1 -- otherwise any two backends would trivially agree) is written to a temporary folder.
Timings depend on the machine and its load: compare ratios within one run, not across machines.
"""
from __future__ import annotations

import argparse
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

from mediscan.inference.predictor import Predictor  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="checkpoint (default: a random-init 224 px model)")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=8,
                        help="single-image runs per measurement (half as many with faithfulness)")
    parser.add_argument("--images", type=int, default=32, help="files in the folder-mode comparison")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="folder-mode batch (default: the Predictor's, 8 on the CPU and 16 on a GPU)")
    parser.add_argument("--image-size", type=int, default=512, help="side of the test images (as uploaded)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads, also used by ONNX Runtime (default: torch's)")
    parser.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto",
                        help="the Predictor backend for the first two sections")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false",
                        help="skip the PyTorch vs ONNX Runtime comparison")
    parser.add_argument("--archive-only", action="store_true",
                        help="only the archive runner sections (folder mode vs model-only, and memory)")
    parser.add_argument("--rss-files", type=int, default=10_000,
                        help="files of the synthetic archive whose memory is measured (0: skip)")
    parser.add_argument("--compare-only", action="store_true",
                        help="only the PyTorch vs ONNX Runtime comparison")
    return parser


def random_checkpoint(folder: Path) -> Path:
    """A 224 px random-init model with OOD statistics, written like training would."""
    from mediscan.core.checkpoint import new_metadata, save_checkpoint
    from mediscan.core.model import build_model
    from mediscan.core.ood import DEFAULT_LAYERS, fit_ood
    from mediscan.core.preprocessing import PreprocessConfig

    torch.manual_seed(0)
    model, source = build_model(4, weights="none")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():   # logits with a spread of about 2 (random init gives hundreds: probabilities 0 or 1)
        logits = model.eval()((torch.rand(4, 1, 224, 224, generator=gen) * 2 - 1) * 1024)
        model.head.fc.weight.mul_(2.0 / float(logits.std()))
        model.head.fc.bias.zero_()
    # Statistics for the layers training fits, so that the timing includes reading and scoring all of them.
    channels = {"denseblock1": 256, "norm5": 1024}
    assert tuple(channels) == DEFAULT_LAYERS
    detector = fit_ood({name: torch.rand(256, dim, generator=gen) for name, dim in channels.items()},
                       torch.arange(256) % 4, {name: torch.rand(64, dim, generator=gen) for name, dim in channels.items()})
    meta = new_metadata(["bone", "brain", "heart", "lungs"], PreprocessConfig(224), source, ood=detector.to_meta())
    return save_checkpoint(folder / "random224.safetensors", model, meta, detector.to_tensors())


def write_images(folder: Path, count: int, size: int) -> list[Path]:
    """Smooth 8-bit grayscale PNGs, a little different each (decode + resize are part of the timing)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    folder.mkdir(parents=True, exist_ok=True)
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
        predictor = Predictor(checkpoint, args.device, backend=args.backend)
        load_s = time.perf_counter() - started
        paths = write_images(tmp / "images", max(args.images, 1), args.image_size)
        if args.batch_size is None:
            args.batch_size = predictor.batch_size

        print(f"device {predictor.device} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
              f"{os.cpu_count()} CPUs | {platform.processor() or platform.machine()}{load_average()}")
        print(f"model {predictor.checkpoint_path.name}: {predictor.input_size}px input, classes "
              f"{', '.join(predictor.classes)}, OOD {'yes' if predictor.ood else 'no'}; backend "
              f"{predictor.backend}; loaded in {load_s:.1f}s")
        print(f"images: {args.image_size}x{args.image_size} 8-bit PNG files")
        if args.archive_only:
            archive_sections(Path(checkpoint), paths, tmp, args)
            return 0
        if not args.compare_only:
            baseline_sections(predictor, paths, args)
        if args.onnx:
            compare_backends(Path(checkpoint), paths, tmp, args)
        if not args.compare_only:
            archive_sections(Path(checkpoint), paths, tmp, args)
    return 0


def load_average() -> str:
    return f" | load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""


def baseline_sections(predictor: Predictor, paths: list[Path], args) -> None:
    """Single-image latency and folder mode (one at a time vs batched) for one predictor."""
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


# --------------------------------------------------------------------------------------------------
# PyTorch vs ONNX Runtime
# --------------------------------------------------------------------------------------------------

#: ONNX Runtime counts as "clearly faster" from this speed-up on (batch-1 explain p50 and batched throughput).
CLEARLY_FASTER = 1.2
PARITY_TOLERANCE = 1e-4


def interleaved_latency(fns: dict, repeats: int) -> tuple[dict, dict]:
    """{name: (p50, p95) ms} for each ``fn()``, calls alternating between the backends (order flipped every
    round) so that load changes on a shared machine affect all alike; also {name: last result}."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    last = {}
    names = list(fns)
    for index in range(repeats):
        for name in (names if index % 2 == 0 else names[::-1]):
            started = time.perf_counter()
            last[name] = fns[name]()
            times[name].append((time.perf_counter() - started) * 1000)
    return {name: (float(np.percentile(t, 50)), float(np.percentile(t, 95))) for name, t in times.items()}, last


def compare_backends(checkpoint: Path, paths: list[Path], tmp: Path, args) -> None:
    print("\n== PyTorch vs ONNX Runtime (CPU, same process, calls interleaved)")
    try:
        import onnxruntime

        from mediscan.inference.onnx_backend import AUTO_PREFERS_ONNX_ON_CPU
        from mediscan.inference.onnx_export import export_onnx
    except ImportError as exc:
        print(f"  skipped: {exc} (pip install onnx onnxruntime)")
        return
    if args.device not in (None, "cpu") or (args.device is None and torch.cuda.is_available()):
        print("  skipped: ONNX Runtime is a CPU backend; run with --device cpu")
        return
    started = time.perf_counter()
    exported = export_onnx(checkpoint, tmp / "bench.onnx")
    export_s = time.perf_counter() - started
    backends = {"torch": Predictor(checkpoint, "cpu", backend="torch"),
                "onnx": Predictor(checkpoint, "cpu", backend="onnx", onnx_path=exported.path)}
    print(f"  onnxruntime {onnxruntime.__version__}, {torch.get_num_threads()} intra-op threads each; export "
          f"{export_s:.1f}s (its own parity check: {exported.max_probability_difference:.1e}){load_average()}")
    for predictor in backends.values():   # warm-up, batch 1 and batched shapes
        predictor.explain(paths[0])
        predictor.predict_many(paths[:min(args.batch_size, len(paths))], batch_size=args.batch_size)

    few = max(3, args.repeats // 2)
    rows = [("predict (prediction + OOD)", lambda p: p.predict(paths[0]), args.repeats),
            ("explain (+ heatmap, same pass)", lambda p: p.explain(paths[0], faithfulness=False), args.repeats),
            ("explain + faithfulness", lambda p: p.explain(paths[0], faithfulness=True), few)]
    print(f"  {'batch 1, file -> result':32s} {'torch p50':>10s} {'p95':>8s}   {'onnx p50':>9s} {'p95':>8s}"
          f"   {'speed-up p50':>12s} {'p95':>6s}")
    explained, speedups = {}, {}
    for label, fn, repeats in rows:
        stats, last = interleaved_latency({name: (lambda p=p: fn(p)) for name, p in backends.items()}, repeats)
        (t50, t95), (o50, o95) = stats["torch"], stats["onnx"]
        speedups[label] = t50 / o50
        print(f"  {label:32s} {t50:8.1f}ms {t95:6.1f}ms   {o50:7.1f}ms {o95:6.1f}ms   {t50 / o50:11.2f}x "
              f"{t95 / o95:5.2f}x")
        if label.startswith("explain"):
            explained[label] = last

    seconds = {name: 0.0 for name in backends}
    results = {}
    for index in range(2):            # two rounds, order flipped: torch onnx onnx torch
        for name in (list(backends) if index == 0 else list(backends)[::-1]):
            started = time.perf_counter()
            results[name] = backends[name].predict_many(paths, batch_size=args.batch_size)
            seconds[name] += time.perf_counter() - started
    rates = {name: 2 * len(paths) / seconds[name] for name in backends}
    batched_speedup = rates["onnx"] / rates["torch"]
    label = f"batched predict_many({args.batch_size}), {len(paths)} files"
    print(f"  {label:44s} torch {rates['torch']:6.2f} images/s   onnx {rates['onnx']:6.2f} images/s   "
          f"{batched_speedup:5.2f}x")

    pairs = list(zip(results["torch"], results["onnx"]))
    pairs += [(e["torch"].prediction, e["onnx"].prediction) for e in explained.values()]
    prob_diff = max(abs(a.probabilities[c] - b.probabilities[c]) for a, b in pairs for c in a.classes)
    ood_diff = max((abs(a.ood_score - b.ood_score) / max(abs(a.ood_score), 1e-12) for a, b in pairs
                    if a.ood_score is not None), default=0.0)
    map_diff = max(float(np.abs(e["torch"].heatmap - e["onnx"].heatmap).max()) for e in explained.values())
    top = sum(a.top_class == b.top_class and a.verdict == b.verdict for a, b in pairs)
    print(f"  parity over {len(pairs)} results: max |probability difference| {prob_diff:.1e} "
          f"(tolerance {PARITY_TOLERANCE:.0e}), max |heatmap difference| {map_diff:.1e}, max relative OOD-score "
          f"difference {ood_diff:.1e}, same class and verdict {top}/{len(pairs)}")
    faster = min(speedups["explain (+ heatmap, same pass)"], batched_speedup) >= CLEARLY_FASTER
    holds = prob_diff < PARITY_TOLERANCE
    verdict = ("ONNX Runtime is clearly faster and parity holds: 'auto' may prefer it" if faster and holds else
               "parity does NOT hold: 'auto' must stay on PyTorch" if not holds else
               f"ONNX Runtime is not clearly faster (< {CLEARLY_FASTER}x): 'auto' should stay on PyTorch")
    print(f"  decision: {verdict} (mediscan.inference.onnx_backend.AUTO_PREFERS_ONNX_ON_CPU = {AUTO_PREFERS_ONNX_ON_CPU})"
          f"{load_average()}")


# --------------------------------------------------------------------------------------------------
# The archive runner (folder mode): against the model alone, and its memory over a large archive
# --------------------------------------------------------------------------------------------------

def archive_sections(checkpoint: Path, paths: list[Path], tmp: Path, args) -> None:
    """Folder-mode throughput vs the model-only rate for each backend, then memory over --rss-files files."""
    from mediscan.inference.archive import ArchiveJob, run_archive

    backends = {"torch": Predictor(checkpoint, args.device, backend="torch")}
    if args.onnx and backends["torch"].device.type == "cpu":
        try:
            from mediscan.inference.onnx_export import export_onnx
            exported = export_onnx(checkpoint, tmp / "archive.onnx")
            backends["onnx"] = Predictor(checkpoint, "cpu", backend="onnx", onnx_path=exported.path)
        except Exception as exc:  # noqa: BLE001 -- the PyTorch figures are still worth printing
            print(f"  (ONNX Runtime skipped: {exc})")
    batch = args.batch_size
    print(f"\n== folder mode (archive runner) vs the model alone, {len(paths)} files, batch {batch}{load_average()}")
    prepared = {name: [p.prepare(path) for path in paths] for name, p in backends.items()}

    def model_only(p, name):          # forward passes on already decoded, preprocessed full batches
        for start in range(0, len(paths), batch):
            p.run_prepared(prepared[name][start:start + batch])

    def folder(p, name):
        run_archive(p, ArchiveJob(paths[0].parent, tmp / f"archive-{name}.csv", batch))

    measures = {"model only (decoded batches)": model_only, "one at a time, predict()": lambda p, _: [
        p.predict(path) for path in paths], f"batched predict_many({batch})": lambda p, _: p.predict_many(
        paths, batch_size=batch), "folder mode (run_archive)": folder}
    for p in backends.values():       # warm-up: both shapes
        p.predict(paths[0])
        p.predict_many(paths[:batch], batch_size=batch)
    rates = {}
    for index, (label, fn) in enumerate(measures.items()):
        for name in (list(backends) if index % 2 == 0 else list(backends)[::-1]):   # flip the order
            started = time.perf_counter()
            fn(backends[name], name)
            rates[label, name] = len(paths) / (time.perf_counter() - started)
    print(f"  {'':32s}" + "".join(f"{name:>16s}" for name in backends))
    for label in measures:
        print(f"  {label:32s}" + "".join(f"{rates[label, name]:9.2f} img/s" for name in backends))
    model_label, one_label, batched_label, folder_label = measures
    for name in backends:
        print(f"  {name}: folder mode / model only {rates[folder_label, name] / rates[model_label, name]:5.2f}x "
              f"(goal >= 0.9), batched / one at a time {rates[batched_label, name] / rates[one_label, name]:5.2f}x "
              f"(goal >= 1){load_average()}")
    if "onnx" in backends:
        session_batch_check(backends["onnx"], paths, batch)
    if args.rss_files:
        archive_memory(tmp / "rss", args.rss_files)


def session_batch_check(predictor: Predictor, paths: list[Path], batch: int, rounds: int = 2) -> None:
    """ONNX ``predict_many(batch)`` with the batch fed to ONNX Runtime row by row (``run_batch`` 1, the
    default) against one ``session.run`` per whole batch (how it ran before), calls interleaved."""
    net = predictor.net
    default, seconds = net.run_batch, {1: 0.0, batch: 0.0}
    try:
        for index in range(rounds):
            for run_batch in ((1, batch) if index % 2 == 0 else (batch, 1)):
                net.run_batch = run_batch
                started = time.perf_counter()
                predictor.predict_many(paths, batch_size=batch)
                seconds[run_batch] += time.perf_counter() - started
    finally:
        net.run_batch = default
    rows, whole = (rounds * len(paths) / seconds[size] for size in (1, batch))
    print(f"  onnx predict_many({batch}): rows fed one by one {rows:.2f} img/s, whole batch per session.run "
          f"{whole:.2f} img/s: {rows / whole:.2f}x{load_average()}")


def current_rss_mb() -> float:
    """This process's resident memory now (not the peak), MB."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def archive_memory(folder: Path, count: int) -> None:
    """RSS after 1,000 and after ``count`` files of a synthetic archive (tiny 64 px model, 64 px PNGs in
    folders of 500): what the runner keeps per file shows up as growth between the two."""
    from mediscan.devtools.synthetic import pattern_image, write_tiny_checkpoint
    from mediscan.inference.archive import ArchiveJob, run_archive

    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for k in range(count):
        target = folder / "archive" / f"{k // 500:04d}" / f"{k:07d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pattern_image(k % 4, 64, rng)).save(target)
    checkpoint = write_tiny_checkpoint(folder / "tiny.safetensors", with_ood=True)
    predictor = Predictor(checkpoint, "cpu", backend="torch")
    print(f"\n== memory over a synthetic archive of {count} files (64 px PNGs, 64 px model; written in "
          f"{time.perf_counter() - started:.0f}s){load_average()}")
    samples, done = {}, [0]
    marks = sorted({min(1000, count), count})

    def progress(rows: int) -> None:
        done[0] += rows
        for mark in marks:
            if done[0] >= mark and mark not in samples:
                samples[mark] = current_rss_mb()

    before = current_rss_mb()
    started = time.perf_counter()
    run_archive(predictor, ArchiveJob(folder / "archive", folder / "archive.csv", 16), progress=progress)
    seconds = time.perf_counter() - started
    print(f"  RSS after the model load {before:7.1f} MB")
    for mark in marks:
        print(f"  RSS after {mark:6d} files {samples[mark]:7.1f} MB")
    print(f"  growth from {marks[0]} to {marks[-1]} files: {samples[marks[-1]] - samples[marks[0]]:+.1f} MB "
          f"(goal < 50 MB); {count / seconds:.1f} files/s")


if __name__ == "__main__":
    sys.exit(main())

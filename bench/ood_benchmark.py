"""Out-of-scope benchmark: are non-X-ray images flagged, and are real validation images left alone?

    python bench/ood_benchmark.py --checkpoint models/best.safetensors --data dataset
    python bench/ood_benchmark.py --checkpoint models/best.safetensors --data dataset --list   # per image

Out-of-scope set (made here, nothing downloaded): scikit-image's bundled sample photos (astronaut, cat,
coffee, rocket, coins, moon, text page, retina fundus, histology, ...), the same photos inverted to
grayscale (inverted photos look more like radiographs), and synthetic images: uniform/Gaussian/colour
noise, blank black/white/grey, gradients, checkerboards, stripes, shapes and rendered text.

In-scope set: every image under ``DATA/val`` (or under DATA itself when it has no ``val`` folder).

Figures, with goals: % of the out-of-scope set flagged (goal >= 95 %), % of validation images flagged
(goal <= 5 %), and AUROC of the OOD score (val vs out-of-scope). Baseline in the same run: max-softmax
confidence ("flag when calibrated confidence < t"), with t set so that it flags as many validation
images as the detector does (or ``uncertain_below`` without --data), to show what the detector adds.
Works with any checkpoint; one without OOD statistics reports the baseline only.

near_ood (``--near-ood``, default ``../shared/data/near_ood`` when present): real medical images of other body
parts and modalities, one sub-folder per kind; flagged % per kind, grayscale kinds separately and overall
(goals: >= 95 % overall, >= 90 % every grayscale kind), beside the max-softmax baseline and each detector part
alone (Mahalanobis layers; the classifier's energy), each thresholded on validation only.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]

from mediscan.core.imaging import ImageReadError, looks_like_image_file, read_image  # noqa: E402
from mediscan.inference.predictor import Predictor  # noqa: E402

NEAR_OOD = ROOT.parent / "shared" / "data" / "near_ood"
SKIMAGE_SAMPLES = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "moon", "page", "text",
                   "horse", "clock", "hubble_deep_field", "immunohistochemistry", "retina", "brick", "grass",
                   "gravel", "logo", "colorwheel", "checkerboard", "microaneurysms", "cell", "binary_blobs")


@dataclass
class Sample:
    name: str
    group: str
    data: bytes


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="checkpoint (default: $MEDISCAN_MODEL or models/best)")
    parser.add_argument("--data", type=Path, default=None, help="dataset folder; its val/ images are in scope")
    parser.add_argument("--max-val", type=int, default=None, help="use at most this many validation images")
    parser.add_argument("--size", type=int, default=256, help="side of the synthetic images")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None)
    parser.add_argument("--list", action="store_true", help="print every out-of-scope image's result")
    parser.add_argument("--near-ood", type=Path, default=NEAR_OOD if NEAR_OOD.is_dir() else None,
                        help="folder of near out-of-distribution kinds (one sub-folder each); 'none' to skip")
    return parser


# --------------------------------------------------------------------------------------------------
# the out-of-scope images
# --------------------------------------------------------------------------------------------------

def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    return array if array.dtype == np.uint8 else np.clip(array, 0, 255).astype(np.uint8)


def skimage_photos() -> tuple[list[Sample], list[Sample]]:
    """scikit-image's bundled samples as PNG, and their inverted grayscale versions."""
    try:
        import skimage.data
    except ImportError:
        print("scikit-image is not installed: photo samples skipped (pip install scikit-image)")
        return [], []
    photos, inverted = [], []
    for name in SKIMAGE_SAMPLES:
        try:
            array = to_uint8(np.asarray(getattr(skimage.data, name)()))
        except Exception as exc:  # noqa: BLE001 -- some samples need a download (offline) or are missing
            print(f"  (skipping skimage.data.{name}: {type(exc).__name__})")
            continue
        photos.append(Sample(name, "photo", png(array)))
        gray = np.asarray(Image.fromarray(array).convert("L"))
        inverted.append(Sample(f"{name} (inverted)", "inverted photo", png(255 - gray)))
    return photos, inverted


def rendered_text(size: int, seed: int) -> np.ndarray:
    """A page of black text on white (a scanned report, a screenshot)."""
    rng = np.random.default_rng(seed)
    page = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default()
    words = "patient report findings normal impression lorem ipsum dolor sit amet radiology".split()
    for row in range(2, size - 12, 14):
        draw.text((6, row), " ".join(rng.choice(words, 6)), fill=0, font=font)
    return np.asarray(page)


def synthetic_images(size: int) -> list[Sample]:
    """Noise, blanks, gradients, patterns, shapes and text: things no organ X-ray looks like."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    shapes = Image.new("L", (size, size), 30)
    draw = ImageDraw.Draw(shapes)
    for _ in range(12):
        x0, y0 = rng.integers(0, size - 40, 2)
        box = [int(x0), int(y0), int(x0 + rng.integers(15, 40)), int(y0 + rng.integers(15, 40))]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=int(rng.integers(80, 256)))
    images = {
        "uniform noise": rng.integers(0, 256, (size, size), dtype=np.uint8),
        "gaussian noise": to_uint8(rng.normal(128, 40, (size, size))),
        "colour noise": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "blank black": np.zeros((size, size), np.uint8),
        "blank white": np.full((size, size), 255, np.uint8),
        "blank grey": np.full((size, size), 128, np.uint8),
        "horizontal gradient": to_uint8(np.tile(ramp, (size, 1))),
        "radial gradient": to_uint8(255 * np.hypot(yy - size / 2, xx - size / 2) / (size * 0.71)),
        "checkerboard": to_uint8(((yy // 16 + xx // 16) % 2) * 255),
        "stripes": to_uint8(127.5 + 127.5 * np.sin(xx / 3.0)),
        "shapes": np.asarray(shapes),
        "rendered text": rendered_text(size, 1),
        "rendered text (inverted)": 255 - rendered_text(size, 2),
    }
    return [Sample(name, "synthetic", png(array)) for name, array in images.items()]


def validation_files(data: Path, limit: int | None) -> list[Path]:
    folder = data / "val" if (data / "val").is_dir() else data
    files = sorted(p for p in folder.rglob("*") if p.is_file() and looks_like_image_file(p))
    if limit is not None and len(files) > limit:
        # An even spread over the sorted list keeps every class represented.
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    return files


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------

def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float | None:
    """P(score of a random out-of-scope image > score of a random in-scope one), ties count half."""
    if len(in_scores) == 0 or len(out_scores) == 0:
        return None
    greater = (out_scores[:, None] > in_scores[None, :]).mean()
    ties = (out_scores[:, None] == in_scores[None, :]).mean()
    return float(greater + 0.5 * ties)


def percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:5.1f}% ({part}/{whole})" if whole else "  n/a"


def goal(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def score_parts(predictor: Predictor, images: list) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The raw logits ``(N, C)`` of the decoded ``images`` and, with a detector, each of its parts' relative
    score (``{layer or "energy": (N,)}``, which the detector combines by its ``combination``). One extra
    forward pass over them."""
    import torch

    from mediscan.core.preprocessing import preprocess
    logits, parts = [], {}
    layers = predictor.ood.layer_names if predictor.ood is not None else ()
    for start in range(0, len(images), 16):
        batch = torch.stack([preprocess(image.pixels, predictor.input_size)[0] for image in images[start:start + 16]])
        with torch.no_grad():
            feature_map, pooled = predictor.net.tapped_features(batch.to(predictor.device), layers)
            out = predictor.net.head(feature_map).float().cpu()
        logits.append(out.numpy())
        if predictor.ood is not None:
            for name, scores in predictor.ood.layer_scores(pooled, out).items():
                parts.setdefault(name, []).append(scores.numpy())
    return (np.concatenate(logits) if logits else np.zeros((0, len(predictor.classes))),
            {name: np.concatenate(chunks) for name, chunks in parts.items()})


def layer_flags(predictor: Predictor, images: list) -> dict[str, np.ndarray]:
    """Per detector part: which of the decoded ``images`` that part alone puts above the threshold (the max
    rule), or above its own validation percentile (relative score > 1; Fisher's rule has no per-part
    threshold, and one part's p-value alone rarely passes it)."""
    _, parts = score_parts(predictor, images)
    limit = predictor.ood.threshold if predictor.ood.combination == "max" else 1.0
    return {name: scores > limit for name, scores in parts.items()}


def run_predictions(predictor: Predictor, items: list, names: list[str], batch_size: int):
    started = time.perf_counter()
    results = predictor.predict_many(items, batch_size=batch_size, names=names)
    return results, time.perf_counter() - started


def report(predictor: Predictor, ood_samples: list[Sample], ood_results, val_results, args) -> None:
    val_ok = [r for r in val_results if not isinstance(r, ImageReadError)]
    val_errors = len(val_results) - len(val_ok)
    has_ood = predictor.ood is not None

    if args.list:
        print(f"\n{'image':34s} {'group':15s} {'verdict':13s} {'class':8s} {'conf':>6s} {'ood score':>10s}")
        for sample, r in zip(ood_samples, ood_results):
            score = "-" if r.ood_score is None else f"{r.ood_score:10.2f}"
            print(f"{sample.name:34s} {sample.group:15s} {r.verdict:13s} {r.top_class:8s} "
                  f"{r.confidence:6.1%} {score:>10s}")

    print("\n== out-of-scope images " + "=" * 60)
    confidences = np.array([r.confidence for r in ood_results])
    print(f"mean calibrated confidence the classifier gives them: {confidences.mean():.1%} "
          f"(median {np.median(confidences):.1%}) -- the problem the detector solves")
    for group in sorted({s.group for s in ood_samples}):
        rows = [r for s, r in zip(ood_samples, ood_results) if s.group == group]
        flagged = sum(r.verdict == "out_of_scope" for r in rows)
        print(f"  {group:16s} flagged out_of_scope: {percent(flagged, len(rows))}")
    flagged_ood = sum(r.verdict == "out_of_scope" for r in ood_results)
    photo_rows = [r for s, r in zip(ood_samples, ood_results) if s.group == "photo"]
    flagged_photos = sum(r.verdict == "out_of_scope" for r in photo_rows)
    print(f"  {'photos':16s} goal >= 95%: {goal(has_ood and flagged_photos >= 0.95 * len(photo_rows))}")
    print(f"  {'all':16s} flagged out_of_scope: {percent(flagged_ood, len(ood_results))}   "
          f"goal >= 95%: {goal(has_ood and flagged_ood >= 0.95 * len(ood_results))}")
    # Which of the two checks carries the figure: the colour check alone, and the feature detector alone.
    decoded = [read_image(s.data) for s in ood_samples]      # once, for both breakdowns below
    colour = [image.is_colour for image in decoded]
    if has_ood:
        by_features = [r.ood_score > predictor.ood.threshold for r in ood_results]
        print(f"  {'colour check':16s} flags {percent(sum(colour), len(colour))}; the detector alone "
              f"flags {percent(sum(by_features), len(by_features))}")
        alone = ("above the threshold on its own" if predictor.ood.combination == "max"
                 else f"beyond its own {predictor.ood.percentile:g}th validation percentile")
        for layer, flags in layer_flags(predictor, decoded).items():
            print(f"  {'  layer ' + layer:16s} {alone}: {percent(int(flags.sum()), len(flags))}")
    else:
        print(f"  {'colour check':16s} flags {percent(sum(colour), len(colour))} (the only check here)")

    if val_results:
        print("\n== validation images (in scope) " + "=" * 51)
        flagged_val = sum(r.verdict == "out_of_scope" for r in val_ok)
        print(f"  flagged out_of_scope: {percent(flagged_val, len(val_ok))}   "
              f"goal <= 5%: {goal(flagged_val <= 0.05 * len(val_ok))}"
              + (f"   ({val_errors} unreadable files skipped)" if val_errors else ""))
        verdicts = {v: sum(r.verdict == v for r in val_ok) for v in ("confident", "uncertain", "out_of_scope")}
        print("  verdicts: " + ", ".join(f"{k} {v}" for k, v in verdicts.items()))

    print("\n== detector vs max-softmax baseline " + "=" * 47)
    ood_conf = confidences
    val_conf = np.array([r.confidence for r in val_ok])
    if val_ok:
        # Same budget of false alarms on validation as the detector (at least 1 image's worth, at most 5 %).
        budget = max(sum(r.verdict == "out_of_scope" for r in val_ok), 1) if has_ood else int(0.05 * len(val_ok))
        threshold = float(np.sort(val_conf)[min(budget, len(val_conf) - 1)])
        rule = f"confidence < {threshold:.6f} (flags {percent(int((val_conf < threshold).sum()), len(val_conf))} of val)"
    else:
        threshold = predictor.uncertain_below
        rule = f"confidence < uncertain_below = {threshold:.2f}"
    msp_flagged = int((ood_conf < threshold).sum())
    print(f"  baseline {rule}")
    args.msp_threshold = threshold           # the near_ood section applies the same baseline rule
    print(f"  baseline flags {percent(msp_flagged, len(ood_conf))} of out-of-scope images; "
          f"MediScan (colour check + detector) flags "
          f"{percent(flagged_ood, len(ood_results)) if has_ood else 'n/a (no OOD statistics)'}")
    if val_ok:
        msp_auc = auroc(-val_conf, -ood_conf)
        line = f"  AUROC val vs out-of-scope: max-softmax {msp_auc:.3f}"  # detector: as stored (with energy if any)
        if has_ood:
            ood_auc = auroc(np.array([r.ood_score for r in val_ok]), np.array([r.ood_score for r in ood_results]))
            line += f", detector {ood_auc:.3f}"
        print(line)
    if not has_ood:
        print("  NOTE: this checkpoint has no out-of-scope statistics; retrain to add them.")


# --------------------------------------------------------------------------------------------------
# near out-of-distribution: real medical images of other body parts and modalities
# --------------------------------------------------------------------------------------------------

def near_ood_kinds(folder: Path) -> dict[str, list[Path]]:
    """``{kind: its image files}`` for every sub-folder of ``folder``."""
    kinds = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in sub.rglob("*") if p.is_file() and looks_like_image_file(p))
        if files:
            kinds[sub.name] = files
    return kinds


def energies(logits: np.ndarray) -> np.ndarray:
    """Free energy ``-logsumexp(logits)`` per row (Liu et al. 2020)."""
    top = logits.max(1, keepdims=True)
    return -(top[:, 0] + np.log(np.exp(logits - top).sum(1)))


def _val_threshold(val_scores: np.ndarray) -> float:
    """Halfway between the 95th percentile of the validation scores (rounded up to one) and the next one:
    at most 5 % of validation above it, as the detector's own rule."""
    ordered = np.sort(val_scores)
    kept = float(np.quantile(ordered, 0.95, method="higher"))
    above = ordered[ordered > kept]
    return kept if len(above) == 0 else (kept + float(above.min())) / 2


def _part_scores(predictor: Predictor, images: list) -> dict[str, np.ndarray]:
    """Per image: energy alone, the Mahalanobis layers alone (their max, without any energy part), and the max of
    all the detector's relative parts (the combination rule before Fisher's)."""
    logits, parts = score_parts(predictor, images)
    scores = {"energy": energies(logits)}
    layers = [v for k, v in parts.items() if k != "energy"]
    if layers:
        scores["mahalanobis"] = np.max(np.stack(layers), axis=0)
        scores["max of parts"] = np.max(np.stack(list(parts.values())), axis=0)
    return scores


def near_ood_report(predictor: Predictor, folder: Path, val_files: list[Path], val_results, args) -> None:
    """Flagged % per near_ood kind (grayscale kinds separately, overall): MediScan as shipped, the max-softmax
    baseline at the same validation budget, the detector's parts combined by their max instead (with the
    colour check, as MediScan), and each part alone -- Mahalanobis layers, energy -- each with its own
    threshold from validation only (at most 5 % of validation above it)."""
    kinds = near_ood_kinds(folder)
    msp = getattr(args, "msp_threshold", predictor.uncertain_below)
    val_images = [read_image(f) for f, r in zip(val_files, val_results) if not isinstance(r, ImageReadError)]
    val_parts = _part_scores(predictor, val_images) if val_images else {}
    thresholds = {name: _val_threshold(v) for name, v in val_parts.items()}
    print(f"\n== near_ood ({folder}) " + "=" * 50)
    for name, v in val_parts.items():
        print(f"  {name}{'' if name == 'max of parts' else ' alone'}: threshold {thresholds[name]:.3f} flags {100 * (v > thresholds[name]).mean():.1f}% of val")
    print(f"  {'kind':20s} {'MediScan':>16s} {'max-softmax':>16s} {'max of parts':>16s} {'Mahalanobis':>16s} "
          f"{'energy':>16s}")
    totals = {"all": np.zeros(6, int), "grayscale": np.zeros(6, int)}
    grayscale_ok = True
    for kind, files in kinds.items():
        results = predictor.predict_many(files, batch_size=args.batch_size)
        pairs = [(f, r) for f, r in zip(files, results) if not isinstance(r, ImageReadError)]
        decoded = [read_image(f) for f, _ in pairs]
        gray = not any(image.is_colour for image in decoded)
        parts = _part_scores(predictor, decoded) if thresholds else {}
        colour = np.array([image.is_colour for image in decoded], dtype=bool)
        by_max = int(((parts["max of parts"] > thresholds["max of parts"]) | colour).sum()) if "max of parts" in parts else -1
        alone = [by_max] + [int((parts[n] > thresholds[n]).sum()) if n in parts else -1 for n in ("mahalanobis", "energy")]
        row = np.array([len(pairs), sum(r.verdict == "out_of_scope" for _, r in pairs),
                        sum(r.confidence is not None and r.confidence < msp for _, r in pairs), *alone])
        totals["all"] += row
        if gray:
            totals["grayscale"] += row
            grayscale_ok &= bool(row[1] >= 0.90 * row[0])
        _near_row(kind + (" (gray)" if gray else ""), row)
    for name, row in totals.items():
        _near_row(name, row)
    every = totals["all"]
    print(f"  goals: overall >= 95%: {goal(every[1] >= 0.95 * every[0])}; every grayscale kind >= 90%: "
          f"{goal(grayscale_ok)}")


def _near_row(name: str, row: np.ndarray) -> None:
    n = int(row[0])
    cells = [percent(int(v), n) if v >= 0 else "n/a" for v in row[1:]]
    print(f"  {name:20s} " + " ".join(f"{c:>16s}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    predictor = Predictor(args.checkpoint, args.device)
    card = predictor.model_card()
    print(f"checkpoint {predictor.checkpoint_path} | classes {', '.join(predictor.classes)} | input "
          f"{predictor.input_size}px | temperature {predictor.temperature:.3f} | weights {card['weight_source']}")
    if predictor.ood is not None:
        layers = ", ".join(f"{name} (shrinkage {layer.shrinkage:.3f})" for name, layer in predictor.ood.layers.items())
        energy = " + classifier energy" if predictor.ood.energy_scale is not None else ""
        print(f"detector: Mahalanobis on {layers}{energy}, combined by {predictor.ood.combination}; "
              f"threshold {predictor.ood.threshold:.3f} "
              f"({predictor.ood.percentile:g}th percentile, from {predictor.ood.threshold_from}), "
              f"{predictor.ood.n_train} training images")
    else:
        print("detector: none in this checkpoint")

    photos, inverted = skimage_photos()
    ood_samples = photos + inverted + synthetic_images(args.size)
    ood_results, ood_seconds = run_predictions(predictor, [s.data for s in ood_samples],
                                               [s.name for s in ood_samples], args.batch_size)
    failed = [(s.name, r) for s, r in zip(ood_samples, ood_results) if isinstance(r, ImageReadError)]
    for name, error in failed:
        print(f"  (could not decode {name}: {error})")
    keep = [i for i, r in enumerate(ood_results) if not isinstance(r, ImageReadError)]
    ood_samples, ood_results = [ood_samples[i] for i in keep], [ood_results[i] for i in keep]
    print(f"{len(ood_samples)} out-of-scope images in {ood_seconds:.1f}s")

    val_results = []
    if args.data is not None:
        files = validation_files(args.data, args.max_val)
        if not files:
            print(f"no images under {args.data}/val (or {args.data})")
        else:
            val_results, val_seconds = run_predictions(predictor, files, None, args.batch_size)
            print(f"{len(files)} validation images in {val_seconds:.1f}s")
    report(predictor, ood_samples, ood_results, val_results, args)
    if args.near_ood is not None and str(args.near_ood).lower() != "none":
        near_ood_report(predictor, args.near_ood, files if val_results else [], val_results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The command line of ``test_single_image.py`` (also installed as ``mediscan-predict``).

Usage and examples are in that file's docstring and in ``--help``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mediscan.apps.exit_codes import EXIT_BAD_INPUT, EXIT_NO_MODEL, EXIT_OK

CSV_NAME = "predictions.csv"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="MediScan: classify an X-ray image (or a folder) with a Grad-CAM explanation.",
        epilog="Example: python test_single_image.py chest.png --output chest_gradcam.png")
    parser.add_argument("input", type=Path, help="an image file (PNG, JPEG, TIFF, BMP, DICOM) or a folder")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint file (default: $MEDISCAN_MODEL, else models/best.safetensors)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto",
                        help="run the network in PyTorch or in ONNX Runtime on the CPU (needs the export made by "
                             "densenet121_xray_classifier.py --export-onnx); auto (default) = ONNX when that "
                             "export is up to date and ONNX Runtime is faster here")
    parser.add_argument("--output", type=Path, default=None,
                        help="figure path (default: <image name>_gradcam.png in the current folder)")
    parser.add_argument("--no-figure", action="store_true", help="do not save the figure")
    parser.add_argument("--explain-class", default=None, help="class to explain (default: the predicted one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--alpha", type=float, default=0.4, help="heatmap opacity in the overlay (default: 0.4)")
    parser.add_argument("--uncertain-below", type=float, default=0.6,
                        help="calibrated confidence below which the verdict is 'uncertain' (default: 0.6)")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="refuse larger images (default: the library's decompression-bomb limit)")
    folder = parser.add_argument_group("folder mode (when INPUT is a folder)")
    folder.add_argument("--csv", type=Path, default=None, help=f"results CSV (default: ./{CSV_NAME})")
    folder.add_argument("--overlays", type=Path, default=None, help="also write one overlay PNG per image here")
    folder.add_argument("--batch-size", type=int, default=None,
                        help="images per forward pass (default: 8 on the CPU, 16 on a GPU)")
    folder.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    folder.add_argument("--resume", action="store_true",
                        help="keep the rows already in --csv (and in the part files of an interrupted torchrun "
                             "job) and do only the files not there yet")
    folder.add_argument("--per-series", action="store_true",
                        help="also summarise DICOM files per series (mean probabilities) into <csv>.series.csv")
    folder.add_argument("--workers", type=int, default=None,
                        help="threads decoding files ahead of the model (default: up to 4)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    # Imported here so that --help is instant and a broken install still prints usage.
    from mediscan.core.checkpoint import CheckpointError
    from mediscan.core.imaging import ImageReadError
    from mediscan.inference.predictor import UnknownClassError

    try:
        if args.input.is_dir():
            return run_folder(args)
        image = decode(args)        # a bad image is reported before the (slow) model load
        return run_single(load_predictor(args), image, args)
    except CheckpointError as exc:                  # ModelNotFoundError included
        return fail(args, exc, EXIT_NO_MODEL)
    except (ImageReadError, UnknownClassError) as exc:
        return fail(args, exc, EXIT_BAD_INPUT)


def fail(args, exc: Exception, code: int) -> int:
    """Report a user error as one message (and one JSON object with --json), no traceback."""
    print(f"error: {exc}", file=sys.stderr)
    if args.json:
        print(json.dumps({"error": str(exc), "error_type": type(exc).__name__,
                          "reason": getattr(exc, "reason", None), "exit_code": code}))
    return code


def decode(args):
    from mediscan.core.imaging import DEFAULT_MAX_PIXELS, read_image
    return read_image(args.input, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS)


def load_predictor(args):
    from mediscan.inference.predictor import Predictor
    kwargs = {"uncertain_below": args.uncertain_below, "backend": args.backend}
    if args.max_pixels is not None:
        kwargs["max_pixels"] = args.max_pixels
    return Predictor(args.checkpoint, args.device, **kwargs)


# --------------------------------------------------------------------------------------------------
# one image
# --------------------------------------------------------------------------------------------------

def run_single(predictor, image, args) -> int:
    """Predict + explain one decoded image, print the result, save the figure."""
    explanation = predictor.explain(image, args.explain_class)
    figure = None
    if not args.no_figure:
        figure = args.output or Path(f"{args.input.stem}_gradcam.png")
        save_figure(explanation, figure, args.alpha)
    if args.json:
        record = explanation.to_dict()
        record["figure"] = None if figure is None else str(figure)
        print(json.dumps(record, indent=None))
    else:
        print_report(explanation, figure, predictor)
    return EXIT_OK


def print_report(explanation, figure: Path | None, predictor) -> None:
    from mediscan import NOT_FOR_CLINICAL_USE
    p = explanation.prediction
    print(f"Image:      {p.source}")
    print(f"Prediction: {p.top_class} ({p.confidence:.1%} confidence)")
    print(f"Verdict:    {p.verdict.replace('_', ' ')} -- {p.verdict_reason}")
    print()
    print(probability_table(p.probabilities, p.top_class))
    print()
    if p.ood_score is not None:
        print(f"Out-of-scope score: {p.ood_score:.2f} (limit {predictor.ood.threshold:.2f})")
    for warning in p.warnings:
        print(f"Warning: {warning}")
    if explanation.faithfulness:
        f = explanation.faithfulness
        print(f"Heatmap check: hiding the hottest 20% lowers '{explanation.explained_class}' by "
              f"{f['drop_top']:+.1%}, hiding a random 20% by {f['drop_random']:+.1%}.")
    if figure is not None:
        print(f"Figure saved to {figure} (heatmap for '{explanation.explained_class}')")
    print(NOT_FOR_CLINICAL_USE)


def probability_table(probabilities: dict[str, float], top_class: str, width: int = 30) -> str:
    """The classes sorted by probability, with a text bar each."""
    name_width = max(len("class"), *(len(name) for name in probabilities))
    lines = [f"  {'class':<{name_width}}  probability"]
    for name, prob in sorted(probabilities.items(), key=lambda item: -item[1]):
        bar = "#" * int(round(prob * width))
        marker = " <" if name == top_class else ""
        lines.append(f"  {name:<{name_width}}  {prob:7.1%}  {bar}{marker}")
    return "\n".join(lines)


def save_figure(explanation, path: Path, alpha: float = 0.4) -> Path:
    """original | heatmap | overlay, titled with the class and confidence (Agg canvas, never a window)."""
    from mediscan.evaluation.figures import new_figure

    p = explanation.prediction
    fig = new_figure(figsize=(12, 4.4), layout="constrained")   # Agg canvas: no pyplot, no GUI backend
    axes = fig.subplots(1, 3)
    axes[0].imshow(explanation.image, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title(Path(p.source).name)
    shown = axes[1].imshow(explanation.heatmap, cmap="jet", vmin=0, vmax=1)
    axes[1].set_title(f"Grad-CAM: {explanation.explained_class}")
    fig.colorbar(shown, ax=axes[1], fraction=0.046)
    axes[2].imshow(explanation.overlay(alpha))
    axes[2].set_title("overlay")
    for ax in axes:
        ax.axis("off")
    verdict = p.verdict.replace("_", " ")
    fig.suptitle(f"{p.top_class} ({p.confidence:.1%}) -- {verdict}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# --------------------------------------------------------------------------------------------------
# folder mode (the runner is mediscan.inference.archive: streaming, --resume, torchrun shards)
# --------------------------------------------------------------------------------------------------

def run_folder(args) -> int:
    """Batched predictions for every image under the folder -> CSV (+ overlays) and a summary.

    Under ``torchrun`` every process takes its share of the files (one GPU each when there are GPUs) and
    rank 0 merges the parts and prints the summary.
    """
    from mediscan.inference.archive import join_ranks, leave_ranks, rank_device

    ranks = join_ranks()
    try:
        if args.device is None:
            args.device = rank_device(ranks)
        return _run_folder(load_predictor(args), args, ranks)
    finally:
        leave_ranks(ranks)


def _run_folder(predictor, args, ranks) -> int:
    from tqdm import tqdm

    from mediscan.inference.archive import ArchiveInputError, ArchiveJob, run_archive
    from mediscan.inference.archive_csv import ResumeError

    job = ArchiveJob(args.input, args.csv or Path(CSV_NAME), args.batch_size or predictor.batch_size,
                     resume=args.resume, overlays=args.overlays, alpha=args.alpha, workers=args.workers)
    hidden = args.no_progress or not ranks.is_main or None       # None: tqdm hides itself without a terminal
    try:
        with tqdm(unit="img", disable=hidden, file=sys.stderr) as bar:
            outcome = run_archive(predictor, job, ranks, progress=bar.update, per_series=args.per_series)
    except (ArchiveInputError, ResumeError) as exc:
        if ranks.is_main:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if outcome is not None:
        print(folder_summary(outcome, args.overlays, predictor.classes))
    return EXIT_OK


def folder_summary(outcome, overlays: Path | None, classes) -> str:
    """Counts per class and per verdict, the files that failed, and where the results are."""
    from mediscan.inference.archive_csv import write_series_csv

    lines = outcome.summary.lines()
    if outcome.resumed:
        lines.append(f"resumed: {outcome.resumed} files were already in the CSV, {outcome.written} done now")
    if outcome.duplicates:
        lines.append(f"note: {outcome.duplicates} rows were in two part files and were written once")
    lines.append(f"results written to {outcome.csv_path}")
    if outcome.summary.series:
        series_csv = outcome.csv_path.with_suffix(".series.csv")
        write_series_csv(outcome.summary, series_csv, classes)
        lines.append(f"{len(outcome.summary.series)} DICOM series summarised in {series_csv}")
    if overlays is not None:
        lines.append(f"overlays written to {overlays}")
    return "\n".join(lines)

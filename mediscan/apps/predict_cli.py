"""The command line of ``test_single_image.py`` (also installed as ``mediscan-predict``).

Usage and examples are in that file's docstring and in ``--help``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mediscan.apps.exit_codes import EXIT_BAD_INPUT, EXIT_NO_MODEL, EXIT_OK

CSV_NAME = "predictions.csv"
#: Exit status after Ctrl-C: 128 + SIGINT, what a shell reports for a program the signal stopped.
EXIT_INTERRUPTED = 130


def at_least_one(text: str) -> int:
    """argparse type: a whole number >= 1 (a 0 or negative count is a mistake, not a request for the default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number from 0 to 1 (a confidence)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1 (a calibrated confidence), got {value:g}")
    return value


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
    parser.add_argument("--uncertain-below", type=fraction, default=0.6,
                        help="calibrated confidence below which the verdict is 'uncertain' (default: 0.6)")
    parser.add_argument("--max-pixels", type=at_least_one, default=None,
                        help="refuse larger images (default: the library's decompression-bomb limit)")
    parser.add_argument("--header-map", type=Path, default=None,
                        help="JSON file overriding the DICOM header-check table (default: $MEDISCAN_HEADER_MAP, "
                             "else the built-in table; see mediscan/core/dicom_header.py)")
    parser.add_argument("--dicom-out", type=Path, default=None, metavar="DIR",
                        help="for one DICOM file: also write the Secondary Capture (Grad-CAM overlay, answer burned "
                             "in) and the Structured Report the DICOM node writes, as DIR/<SOP Instance UID>.dcm "
                             "(same UIDs on every run with the same checkpoint: a re-run replaces them)")
    folder = parser.add_argument_group("folder mode (when INPUT is a folder)")
    folder.add_argument("--csv", type=Path, default=None, help=f"results CSV (default: ./{CSV_NAME})")
    folder.add_argument("--overlays", type=Path, default=None, help="also write one overlay PNG per image here")
    folder.add_argument("--batch-size", type=at_least_one, default=None,
                        help="images per forward pass (default: 8 on the CPU, 16 on a GPU)")
    folder.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    folder.add_argument("--resume", action="store_true",
                        help="keep the rows already in --csv (and in the part files of an interrupted torchrun "
                             "job) and do only the files not there yet")
    folder.add_argument("--per-series", action="store_true",
                        help="also summarise the DICOM files per SeriesInstanceUID into <csv stem>.series.csv (next "
                             "to --csv, e.g. predictions.series.csv): instances, how many were analysed, the mean "
                             "calibrated probability per class, the series' class and verdict (the DICOM node's "
                             "rule) and the header checks; computed from the finished CSV")
    folder.add_argument("--workers", type=at_least_one, default=None,
                        help="threads decoding files ahead of the model (default: up to 4)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    # Imported here so that --help is instant and a broken install still prints usage.
    from mediscan.core.checkpoint import CheckpointError
    from mediscan.core.dicom_header import HeaderMapError
    from mediscan.core.imaging import ImageReadError
    from mediscan.inference.predictor import UnknownClassError

    try:
        args.header_mapping = header_mapping(args)
        check_paths(args)           # before the (slow) model load, and before anything is written
        if args.input.is_dir():
            if args.dicom_out is not None:
                raise DicomOutError(f"--dicom-out takes one DICOM file, and {args.input} is a folder. Run it per "
                                    f"file, or send the study to the DICOM node (python app.py dicom).")
            return run_folder(args)
        try:
            image = decode(args)    # a bad image is reported before the (slow) model load
        except ImageReadError as exc:
            if exc.dicom is None or args.dicom_out is not None:
                raise
            image = args.input      # unusable pixels, readable header: the modality gate may still answer it
        if args.dicom_out is not None and image.format != "DICOM":
            raise DicomOutError(f"--dicom-out needs a DICOM input, and {args.input} is a {image.format} file. "
                                f"Leave out --dicom-out, or give the original DICOM file.")
        return run_single(load_predictor(args), image, args)
    except CheckpointError as exc:                  # ModelNotFoundError included
        return fail(args, exc, EXIT_NO_MODEL)
    except (ImageReadError, UnknownClassError, HeaderMapError, DicomOutError, PathError) as exc:
        return fail(args, exc, EXIT_BAD_INPUT)
    except KeyboardInterrupt:       # folder mode reports its own (with a count); this is loading or one image
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


class PathError(ValueError):
    """A path on the command line cannot be used (an input that is not a file, an output that cannot be written)."""


def check_paths(args) -> None:
    """Refuse an input that is neither a regular file nor a folder, and outputs that cannot be written, with
    a message naming the path; settles ``args.output`` to the file the figure really goes to."""
    source = args.input
    if source.exists() and not source.is_file() and not source.is_dir():
        # a FIFO or device would block the reader forever (missing files are left to the reader's message)
        raise PathError(f"{source} is not a regular file or a folder (a FIFO, socket or device?): reading it "
                        f"could block forever. Give an image file or a folder of images.")
    if source.is_dir():
        writable_file(args.csv or Path(CSV_NAME), "--csv")
        if args.overlays is not None:
            writable_folder(args.overlays, "--overlays")
    elif source.is_file() and not args.no_figure:     # (a missing input: its own message, no folder made)
        args.output = figure_path(args.output or Path(f"{source.stem}_gradcam.png"))
        writable_file(args.output, "--output")


def figure_path(path: Path) -> Path:
    """The file the figure is saved as: ``fig`` -> ``fig.png`` (what matplotlib would write, said up front);
    an extension matplotlib cannot write is refused."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not path.suffix:
        return path.with_name(path.name + ".png")
    formats = FigureCanvasAgg.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise PathError(f"--output {path}: cannot write a '{path.suffix}' figure. Use one of "
                        f"{', '.join('.' + name for name in sorted(formats))} (e.g. {path.with_suffix('.png')}).")
    return path


def writable_folder(folder: Path, option: str, given: Path | None = None) -> None:
    """Create ``folder`` (the run would anyway) or say why it cannot be used; ``given``: the path the user
    gave, when ``folder`` is the one it goes in."""
    named = f"{option} {given or folder}: " + ("" if given is None else f"its folder {folder} ")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PathError(f"{named}cannot be created ({exc.strerror or exc}: {exc.filename or folder}). "
                        f"Choose a path you can write to.") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PathError(f"{named}is not writable. Choose a path you can write to.")


def writable_file(path: Path, option: str) -> None:
    """Check that ``path`` can be written as a file: not a folder, in a folder that exists (created here) and is
    writable. Nothing is written to ``path`` itself."""
    if path.is_dir():
        raise PathError(f"{option} {path} is a folder; give a file name in it, e.g. "
                        f"{path / (CSV_NAME if option == '--csv' else 'figure.png')}.")
    writable_folder(path.parent, option, given=path)


class DicomOutError(ValueError):
    """--dicom-out cannot be done for this input (not DICOM, a folder, no SeriesInstanceUID, unwritable)."""


def header_mapping(args):
    """The --header-map table (``None``: the default one, or ``$MEDISCAN_HEADER_MAP``'s)."""
    from mediscan.core.dicom_header import HeaderMapping
    return HeaderMapping.from_file(args.header_map) if args.header_map else None


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
    kwargs = {"uncertain_below": args.uncertain_below, "backend": args.backend,
              "header_mapping": getattr(args, "header_mapping", None)}
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
    if not args.no_figure and explanation.prediction.analysed:   # a gated input has no heatmap to draw
        figure = args.output                 # settled by check_paths: the file the figure goes to
        save_figure(explanation, figure, args.alpha)
    written = None if args.dicom_out is None else write_dicom_out(predictor, args)
    if args.json:
        record = explanation.to_dict()
        record["figure"] = None if figure is None else str(figure)
        if written is not None:
            record["dicom_out"] = [str(path) for path in written]
        print(json.dumps(record, indent=None))
    else:
        print_report(explanation, figure, predictor)
        for path in written or ():
            print(f"DICOM result written to {path}")
    return EXIT_OK


def write_dicom_out(predictor, args) -> list:
    """The Secondary Capture + Structured Report the DICOM node stores for a series, made for this one file
    by the node's own functions (a one-instance series), written to ``--dicom-out``; returns their paths."""
    from mediscan import __version__
    from mediscan.core.dicom_pixels import read_dataset
    from mediscan.dicom.results import result_datasets
    from mediscan.dicom.sender import DeliveryError, FolderDestination
    from mediscan.dicom.series import PendingSeries, analyse_series, decode_instance
    from mediscan.dicom.uids import checkpoint_sha256

    data = args.input.read_bytes()
    header, _ = read_dataset(data, str(args.input))
    series_uid = str(header.get("SeriesInstanceUID", "") or "")
    if not series_uid:
        raise DicomOutError(f"{args.input} has no SeriesInstanceUID, which the result's UIDs are derived from "
                            f"(and a PACS files it under). Give a file exported from an archive, not a bare image.")
    series = PendingSeries(series_uid, max_slices=1)
    series.add(decode_instance(data, name=str(args.input), max_pixels=predictor.max_pixels,
                               modalities=predictor.modalities), header, None)
    result = analyse_series(predictor, series, max_slices=1, mapping=args.header_mapping)
    datasets = result_datasets(result, checkpoint_sha256=checkpoint_sha256(predictor.checkpoint_path),
                               version=__version__)
    try:
        FolderDestination(args.dicom_out).send(datasets)
    except DeliveryError as exc:
        raise DicomOutError(f"--dicom-out {exc}. Choose a folder you can write to.") from None
    return [args.dicom_out / f"{ds.SOPInstanceUID}.dcm" for ds in datasets]


def print_report(explanation, figure: Path | None, predictor) -> None:
    from mediscan import NOT_FOR_CLINICAL_USE
    p = explanation.prediction
    print(f"Image:      {printable(p.source)}")
    if p.analysed:
        print(f"Prediction: {p.top_class} ({p.confidence:.1%} confidence)")
    else:
        print("Prediction: none (not analysed)")
    print(f"Verdict:    {p.verdict.replace('_', ' ')} -- {p.verdict_reason}")
    for line in dicom_lines(p):
        print(line)
    print()
    if p.analysed:
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
        print(f"Figure saved to {printable(figure)} (heatmap for '{explanation.explained_class}')")
    print(NOT_FOR_CLINICAL_USE)


def dicom_lines(prediction) -> list[str]:
    """Modality, BodyPartExamined and the header check of a DICOM answer (nothing for other inputs; never a
    patient field)."""
    if prediction.dicom is None:
        return []
    header = prediction.dicom
    lines = [(f"DICOM:      Modality {header.get('modality') or '(empty)'}, "
              f"BodyPartExamined {header.get('body_part_examined') or '(empty)'}")]
    check = prediction.header_check
    if check is not None:
        based = f" ({check['field']} '{check['value']}')" if check.get("field") else ""
        lines.append(f"Header:     {check['status'].replace('_', ' ')}{based}")
    return lines


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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    except OSError as exc:          # checked up front, but the disk can still fill or the folder go away
        raise PathError(f"--output {path}: cannot write the figure ({exc.strerror or exc}). Choose a path you "
                        f"can write to, or pass --no-figure.") from None
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

    from mediscan.inference.archive import ArchiveInputError, ArchiveJob, parts_dir_for, run_archive
    from mediscan.inference.archive_csv import ResumeError

    batch_size = predictor.batch_size if args.batch_size is None else args.batch_size
    job = ArchiveJob(args.input, args.csv or Path(CSV_NAME), batch_size,
                     resume=args.resume, overlays=args.overlays, alpha=args.alpha, workers=args.workers)
    hidden = args.no_progress or not ranks.is_main or None       # None: tqdm hides itself without a terminal
    written = 0

    def progress(rows: int) -> None:        # called once a batch's rows are flushed to the CSV
        nonlocal written
        written += rows
        bar.update(rows)

    try:
        with tqdm(unit="img", disable=hidden, file=sys.stderr) as bar:
            outcome = run_archive(predictor, job, ranks, progress=progress)
    except (ArchiveInputError, ResumeError) as exc:
        if ranks.is_main:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:              # input files' errors become rows: this is an output that failed
        if ranks.is_main:
            print(f"error: cannot read or write {printable(exc.filename or job.csv_path)}: {exc.strerror or exc}. "
                  f"Free space, fix its permissions or choose other --csv / --overlays paths, then rerun with "
                  f"--resume.", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        if ranks.is_main:
            # Rows go to part files under torchrun and when resuming an earlier torchrun run (merged at the end).
            kept = parts_dir_for(job.csv_path) if parts_dir_for(job.csv_path).is_dir() else job.csv_path
            print(f"interrupted after {written} files{' on this rank' if ranks.enabled else ''}; the rows written "
                  f"so far are kept in {printable(kept)}. Rerun the same command with --resume to continue.",
                  file=sys.stderr)
        return EXIT_INTERRUPTED
    if outcome is not None:
        print(printable(folder_summary(outcome, args.overlays)))
        if args.per_series:
            print(printable(series_summary(predictor, outcome.csv_path)))
    return EXIT_OK


def printable(text) -> str:
    """``text`` safe to print: a file name that is not UTF-8 (kept as surrogates) shows its bytes as ``\\xe9``
    instead of making print() raise UnicodeEncodeError."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def series_summary(predictor, csv_path: Path) -> str:
    """Write ``<csv stem>.series.csv`` from the finished CSV (streamed: one small record per series) and say where."""
    from mediscan.inference.archive_csv import summarize_csv, write_series_csv

    threshold = None if predictor.ood is None else float(predictor.ood.threshold)
    summary = summarize_csv(csv_path, predictor.classes, per_series=True, ood_threshold=threshold)
    if not summary.series:
        return "no DICOM series in the results (--per-series summarises files that have a SeriesInstanceUID)"
    target = series_csv_path(csv_path)
    write_series_csv(summary, target, predictor.classes, uncertain_below=predictor.uncertain_below,
                     ood_threshold=threshold, has_detector=predictor.ood is not None)
    return f"{len(summary.series)} DICOM series summarised in {target}"


def series_csv_path(csv_path: Path) -> Path:
    """``results.csv`` -> ``results.series.csv`` (beside it)."""
    return csv_path.with_suffix(".series.csv")


def folder_summary(outcome, overlays: Path | None) -> str:
    """Counts per class and per verdict, the files that failed, and where the results are."""
    lines = outcome.summary.lines()
    if outcome.resumed:
        lines.append(f"resumed: {outcome.resumed} files were already in the CSV, {outcome.written} done now")
    if outcome.duplicates:
        lines.append(f"note: {outcome.duplicates} rows were in two part files and were written once")
    lines.append(f"results written to {outcome.csv_path}")
    if overlays is not None:
        lines.append(f"overlays written to {overlays}")
    return "\n".join(lines)

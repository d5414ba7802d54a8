"""test_single_image.py, the command line: single image, --json, folder mode, exit codes 0 / 2 / 3.

``main([...])`` runs in-process (capsys); one subprocess run proves the script works as a program.
"""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import test_single_image as cli
from mediscan.apps import predict_cli
from mediscan.devtools.synthetic import dicom_bytes, write_tiny_checkpoint
from mediscan.inference.predictor import ENV_CHECKPOINT, TRAIN_COMMAND, Predictor

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["bone", "brain", "heart", "lungs"]


def image_u8(height: int = 72, width: int = 96, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    blob = np.exp(-(((yy - height / 2) / (0.3 * height)) ** 2 + ((xx - width / 2) / (0.25 * width)) ** 2))
    return np.clip((0.1 + 0.8 * blob + rng.normal(0, 0.03, blob.shape)) * 255, 0, 255).astype(np.uint8)


def save_png(path: Path, pixels: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_u8() if pixels is None else pixels).save(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Tiny 64-px random model with an OOD detector fitted on random features."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("cli") / "best.safetensors", classes=CLASSES,
                                 with_ood=True, temperature=1.5)


@pytest.fixture(scope="module")
def shared_predictor(checkpoint) -> Predictor:
    return Predictor(checkpoint, device="cpu")


@pytest.fixture
def fast_load(monkeypatch, checkpoint, shared_predictor):
    """Reuse one loaded model when the CLI asks for the test checkpoint with default options.

    Loading dominates an in-process run on a busy CPU; the real loading path is still exercised by
    the first test below, the exit-3 tests and the subprocess run.
    """
    real = predict_cli.load_predictor

    def load(args):
        defaults = args.max_pixels is None and args.device is None and args.uncertain_below == 0.6
        return shared_predictor if args.checkpoint == checkpoint and defaults else real(args)

    monkeypatch.setattr(predict_cli, "load_predictor", load)


@pytest.fixture
def image(tmp_path) -> Path:
    return save_png(tmp_path / "chest.png")


def run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


# --------------------------------------------------------------------------------------------------
# single image
# --------------------------------------------------------------------------------------------------

def test_single_image_prints_table_verdict_and_saves_figure(checkpoint, image, tmp_path, capsys):
    figure = tmp_path / "figs" / "result.png"
    code, out, _ = run([image, "--checkpoint", checkpoint, "--output", figure], capsys)
    assert code == 0
    assert "Prediction:" in out and "Verdict:" in out and "probability" in out
    assert all(name in out for name in CLASSES)
    assert "Not a medical device" in out and str(figure) in out
    with Image.open(figure) as fig:
        assert fig.format == "PNG" and fig.width > 2 * fig.height     # original | heatmap | overlay


def test_default_figure_goes_to_the_current_folder(fast_load, checkpoint, image, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, _ = run([image, "--checkpoint", checkpoint], capsys)
    assert code == 0 and (tmp_path / "chest_gradcam.png").is_file()


def test_json_output_parses(fast_load, checkpoint, image, tmp_path, capsys):
    figure = tmp_path / "fig.png"
    code, out, _ = run([image, "--checkpoint", checkpoint, "--json", "--output", figure,
                        "--explain-class", "brain"], capsys)
    assert code == 0
    record = json.loads(out)
    prediction = record["prediction"]
    assert set(prediction["probabilities"]) == set(CLASSES)
    assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    assert prediction["verdict"] in ("confident", "uncertain", "out_of_scope")
    assert record["explained_class"] == "brain" and record["figure"] == str(figure) and figure.is_file()


def test_dicom_input_and_its_warning(fast_load, checkpoint, tmp_path, capsys):
    scan = tmp_path / "cine.dcm"
    frames = np.stack([image_u8().astype(np.uint16) * 16] * 2)
    scan.write_bytes(dicom_bytes(frames, frames=2))
    code, out, _ = run([scan, "--checkpoint", checkpoint, "--no-figure"], capsys)
    assert code == 0 and "Warning: multi-frame DICOM" in out


# --------------------------------------------------------------------------------------------------
# exit 2: bad input, with the library's message and no traceback
# --------------------------------------------------------------------------------------------------

def _truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image_u8()).save(buffer, format="JPEG")
    return buffer.getvalue()[:400]


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_FILES = {
    "empty": (b"", "empty (0 bytes)"),
    "not_image": (b"\x00\x01\x02 definitely not an image \xff" * 8, "not a recognised image format"),
    "truncated": (_truncated_jpeg(), "ends before all pixels"),
    "no_pixel_data": (dicom_bytes(None), "no pixel data"),
    "too_small": (_png(16, 64), "at least 32"),
}


@pytest.mark.parametrize("reason", sorted(BAD_FILES))
def test_bad_input_exits_2_with_the_message(checkpoint, tmp_path, capsys, reason):
    data, phrase = BAD_FILES[reason]
    path = tmp_path / f"{reason}.png"
    path.write_bytes(data)
    code, out, err = run([path, "--checkpoint", checkpoint], capsys)
    assert code == 2
    assert err.startswith("error: Cannot read image") and phrase in err and path.name in err
    assert not list(tmp_path.glob("*_gradcam.png"))


def test_missing_file_exits_2(checkpoint, tmp_path, capsys):
    code, _, err = run([tmp_path / "nope.png", "--checkpoint", checkpoint], capsys)
    assert code == 2 and "does not exist" in err


def test_decompression_bomb_exits_2(checkpoint, tmp_path, capsys):
    path = tmp_path / "huge.png"
    path.write_bytes(_png(200, 200))
    code, _, err = run([path, "--checkpoint", checkpoint, "--max-pixels", "10000"], capsys)
    assert code == 2 and "more than the limit" in err


def test_bad_input_with_json_prints_a_json_error(checkpoint, tmp_path, capsys):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    code, out, _ = run([path, "--checkpoint", checkpoint, "--json"], capsys)
    record = json.loads(out)
    assert code == 2 and record["exit_code"] == 2 and record["reason"] == "empty" and "0 bytes" in record["error"]


@pytest.mark.parametrize("option, value, phrase", [
    ("--uncertain-below", "1.5", "from 0 to 1"), ("--uncertain-below", "-0.1", "from 0 to 1"),
    ("--batch-size", "-1", ">= 1"), ("--batch-size", "0", ">= 1"), ("--workers", "-1", ">= 1"),
    ("--workers", "0", ">= 1"), ("--max-pixels", "-5", ">= 1"), ("--batch-size", "two", ">= 1")])
def test_invalid_option_values_exit_2_naming_the_option(fast_load, checkpoint, tmp_path, capsys, option, value,
                                                        phrase):
    folder = tmp_path / "incoming"
    save_png(folder / "a.png")
    with pytest.raises(SystemExit) as stopped:        # argparse's usage error, before anything runs
        cli.main([str(folder), "--checkpoint", str(checkpoint), "--csv", str(tmp_path / "r.csv"), option, value])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and option in err and phrase in err and "Traceback" not in err
    assert not (tmp_path / "r.csv").exists()


@pytest.mark.parametrize("case", ["csv_is_a_folder", "csv_under_a_file", "overlays_under_a_file",
                                  "output_under_a_file", "output_unknown_format"])
def test_unusable_output_paths_exit_2_naming_the_path(fast_load, checkpoint, image, tmp_path, capsys, case):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder would have to be")   # unwritable even for root
    folder = tmp_path / "incoming"
    save_png(folder / "a.png")
    argv, named, advice = {            # the path as given, and what the message tells the user to do
        "csv_is_a_folder": ([folder, "--csv", tmp_path], tmp_path, "give a file name in it"),
        "csv_under_a_file": ([folder, "--csv", blocker / "r.csv"], blocker / "r.csv", "Choose a path"),
        "overlays_under_a_file": ([folder, "--overlays", blocker / "ov"], blocker / "ov", "Choose a path"),
        "output_under_a_file": ([image, "--output", blocker / "fig.png"], blocker / "fig.png", "Choose a path"),
        "output_unknown_format": ([image, "--output", tmp_path / "fig.xyz"], tmp_path / "fig.xyz", ".png"),
    }[case]
    code, out, err = run([*argv, "--checkpoint", checkpoint, "--no-progress"], capsys)
    assert code == 2 and err.startswith(f"error: {argv[1]} {named}") and advice in err
    assert not list(tmp_path.rglob("*.csv")) and not (tmp_path / "fig.xyz").exists()


def test_figure_without_extension_is_reported_as_the_file_written(fast_load, checkpoint, image, tmp_path, capsys):
    code, out, _ = run([image, "--checkpoint", checkpoint, "--output", tmp_path / "out" / "fig"], capsys)
    written = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert code == 0 and written == ["fig.png"] and f"Figure saved to {tmp_path / 'out' / 'fig.png'} " in out


def test_a_fifo_is_refused_instead_of_blocking(checkpoint, tmp_path, capsys):
    fifo = tmp_path / "f.png"
    os.mkfifo(fifo)
    result = {}
    worker = threading.Thread(target=lambda: result.update(code=cli.main([str(fifo), "--checkpoint",
                                                                          str(checkpoint)])), daemon=True)
    worker.start()
    worker.join(20)
    if worker.is_alive():               # blocked reading the FIFO: give it an end so that the thread finishes
        with open(fifo, "wb"):
            pass
        worker.join(60)
        pytest.fail("reading the FIFO blocked")
    err = capsys.readouterr().err
    assert result["code"] == 2 and str(fifo) in err and "not a regular file" in err and "Traceback" not in err


def test_unknown_explain_class_exits_2_naming_the_classes(fast_load, checkpoint, image, capsys):
    code, _, err = run([image, "--checkpoint", checkpoint, "--explain-class", "liver", "--no-figure"], capsys)
    assert code == 2 and "liver" in err and all(name in err for name in CLASSES)


# --------------------------------------------------------------------------------------------------
# exit 3: no model
# --------------------------------------------------------------------------------------------------

def test_no_model_exits_3_with_the_training_command(image, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(ENV_CHECKPOINT, raising=False)
    monkeypatch.chdir(tmp_path)              # no models/best.safetensors here
    code, out, err = run([image], capsys)
    assert code == 3 and "models/best.safetensors" in err and TRAIN_COMMAND in err
    code, out, _ = run([image, "--json"], capsys)
    assert code == 3 and json.loads(out)["error_type"] == "ModelNotFoundError"


def test_corrupt_checkpoint_exits_3(image, tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = run([image, "--checkpoint", bad], capsys)
    assert code == 3 and "broken.safetensors" in err


# --------------------------------------------------------------------------------------------------
# folder mode
# --------------------------------------------------------------------------------------------------

def test_folder_mode_writes_one_row_per_file_including_errors(fast_load, checkpoint, tmp_path, capsys):
    folder = tmp_path / "incoming"
    save_png(folder / "a.png")
    save_png(folder / "nested" / "b.png", image_u8(seed=1))
    (folder / "nested" / "deeper").mkdir()
    (folder / "nested" / "deeper" / "c.dcm").write_bytes(dicom_bytes(image_u8(seed=2).astype(np.uint16)))
    (folder / "broken.jpg").write_bytes(_truncated_jpeg())
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image, and not named like one")
    results, overlays = tmp_path / "out" / "results.csv", tmp_path / "overlays"

    code, out, _ = run([folder, "--checkpoint", checkpoint, "--csv", results, "--overlays", overlays,
                        "--batch-size", "2"], capsys)
    assert code == 0
    with open(results, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == ["a.png", "broken.jpg", "empty.png", "nested/b.png",
                                             "nested/deeper/c.dcm"]
    assert list(rows[0]) == ["path", "class", "confidence", *(f"p_{c}" for c in CLASSES), "verdict",
                             "ood_score", "error", "study_instance_uid", "series_instance_uid",
                             "sop_instance_uid", "modality", "body_part_examined", "header_check"]
    errors = {row["path"]: row for row in rows if row["error"]}
    assert set(errors) == {"broken.jpg", "empty.png"} and all(r["verdict"] == "error" for r in errors.values())
    for row in rows:
        if not row["error"]:
            assert row["class"] in CLASSES and row["verdict"] in ("confident", "uncertain", "out_of_scope")
            assert sum(float(row[f"p_{c}"]) for c in CLASSES) == pytest.approx(1.0, abs=1e-3)
    assert "5 files: 3 predicted, 2 errors" in out and "per class:" in out and "per verdict:" in out
    assert sorted(p.relative_to(overlays).as_posix() for p in overlays.rglob("*.png")) == [
        "a.png.png", "nested/b.png.png", "nested/deeper/c.dcm.png"]


def test_folder_mode_resume_keeps_the_rows_and_does_the_new_files(fast_load, checkpoint, tmp_path, capsys):
    folder, results = tmp_path / "incoming", tmp_path / "results.csv"
    save_png(folder / "b.png")
    (folder / "c.png").write_bytes(b"")
    argv = [folder, "--checkpoint", checkpoint, "--csv", results, "--no-progress"]
    assert run(argv, capsys)[0] == 0
    first = results.read_text()
    save_png(folder / "d.png", image_u8(seed=3))            # arrives after the first run
    code, out, _ = run(argv + ["--resume"], capsys)
    assert code == 0 and "resumed: 2 files were already in the CSV, 1 done now" in out
    assert "3 files: 2 predicted, 1 errors" in out          # the summary counts the whole CSV
    text = results.read_text()
    assert text.startswith(first) and [line.split(",")[0] for line in text.splitlines()[1:]] == [
        "b.png", "c.png", "d.png"]


def test_folder_mode_with_file_names_that_are_not_utf8(fast_load, checkpoint, tmp_path, capsys):
    folder, results = tmp_path / "latin", tmp_path / "results.csv"
    save_png(folder / os.fsdecode(b"caf\xe9.png"))                # a Latin-1 name, as Linux allows
    (folder / os.fsdecode(b"cut\xe9.png")).write_bytes(b"")       # its error line prints the name
    argv = [folder, "--checkpoint", checkpoint, "--csv", results, "--no-progress"]
    code, out, _ = run(argv, capsys)
    assert code == 0 and "2 files: 1 predicted, 1 errors" in out and "cut\\xe9.png" in out
    save_png(folder / "new.png", image_u8(seed=1))
    code, out, _ = run(argv + ["--resume"], capsys)
    assert code == 0 and "resumed: 2 files were already in the CSV, 1 done now" in out
    assert results.read_bytes().count(b"caf\xe9.png") == 1


def test_outputs_inside_the_input_folder_are_not_read_as_inputs(fast_load, checkpoint, tmp_path, capsys):
    folder = tmp_path / "incoming"
    save_png(folder / "a.png")
    save_png(folder / "b.png", image_u8(seed=1))
    results, overlays = folder / "results.csv", folder / "zz"
    argv = [folder, "--checkpoint", checkpoint, "--csv", results, "--overlays", overlays, "--no-progress"]
    for _ in range(2):                  # the second run finds the first one's overlays in the folder
        code, out, _ = run(argv, capsys)
        assert code == 0 and "2 files: 2 predicted, 0 errors" in out
    with open(results, newline="") as handle:
        assert [row["path"] for row in csv.DictReader(handle)] == ["a.png", "b.png"]
    assert sorted(p.relative_to(overlays).as_posix() for p in overlays.rglob("*")) == ["a.png.png", "b.png.png"]


def test_overlays_into_the_input_folder_itself_are_refused(fast_load, checkpoint, tmp_path, capsys):
    folder = tmp_path / "incoming"
    save_png(folder / "a.png")
    code, _, err = run([folder, "--checkpoint", checkpoint, "--csv", tmp_path / "r.csv", "--overlays", folder,
                        "--no-progress"], capsys)
    assert code == 2 and f"--overlays {folder}" in err and "Choose a folder outside" in err
    assert sorted(p.name for p in folder.iterdir()) == ["a.png"] and not (tmp_path / "r.csv").exists()


def test_ctrl_c_in_folder_mode_exits_130_keeping_the_rows(fast_load, checkpoint, shared_predictor, tmp_path, capsys,
                                                          monkeypatch):
    folder, results = tmp_path / "incoming", tmp_path / "results.csv"
    for k in range(5):
        save_png(folder / f"{k}.png", image_u8(seed=k))
    real, calls = shared_predictor.run_prepared, []

    def interrupted(items, **kwargs):
        calls.append(len(items))
        if len(calls) == 3:
            raise KeyboardInterrupt         # what Ctrl-C raises, here inside the third batch's forward pass
        return real(items, **kwargs)

    monkeypatch.setattr(shared_predictor, "run_prepared", interrupted)
    argv = [str(a) for a in (folder, "--checkpoint", checkpoint, "--csv", results, "--batch-size", "1",
                             "--no-progress")]
    try:
        code = cli.main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main(): the user sees a traceback")
    err = capsys.readouterr().err
    assert code == 130 and "interrupted after 2 files" in err and "--resume" in err and "Traceback" not in err
    assert [line.split(",")[0] for line in results.read_text().splitlines()[1:]] == ["0.png", "1.png"]
    monkeypatch.setattr(shared_predictor, "run_prepared", real)
    code, out, _ = run(argv + ["--resume"], capsys)
    assert code == 0 and "resumed: 2 files were already in the CSV, 3 done now" in out


def test_empty_folder_exits_2(checkpoint, tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    code, _, err = run([tmp_path / "nothing", "--checkpoint", checkpoint, "--csv", tmp_path / "r.csv"], capsys)
    assert code == 2 and "no image files" in err


# --------------------------------------------------------------------------------------------------
# the script as a program
# --------------------------------------------------------------------------------------------------

def test_help_lists_examples():
    text = cli.get_args_parser().format_help()
    assert "--checkpoint" in text and "--json" in text and "--csv" in text and cli.__doc__.count("python ") >= 4


def test_runs_as_a_program(checkpoint, image):
    completed = subprocess.run(
        [sys.executable, str(ROOT / "test_single_image.py"), str(image), "--checkpoint", str(checkpoint),
         "--json", "--no-figure"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["prediction"]["source"] == str(image)

"""Folder / archive mode: lazy sorted listing, bounded decode pool, --resume, and torchrun shards
(2 CPU processes, gloo) merged into the CSV a single process writes.

The torchrun tests run the real launcher (``python -m torch.distributed.run``) on a dozen 64 px files with a
tiny model whose head is scaled so that its probabilities are not saturated at 0/1 (otherwise any two runs
would trivially agree). They use ``--batch-size 1``: a different batch composition changes probabilities by
~1e-7 on the CPU, which can flip the 4th decimal written to the CSV, so only batch-1 runs are comparable
exactly; full batches are tested in-process below and in tests/test_cli_single_image.py.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import test_single_image as cli
from conftest import ROOT
from mediscan.core.imaging import looks_like_image_file
from mediscan.devtools.synthetic import CLASSES, dicom_bytes, pattern_image, tiny_model, write_tiny_checkpoint
from mediscan.inference import archive
from mediscan.inference.archive import ArchiveJob, iter_archive, parts_dir_for, run_archive
from mediscan.inference.archive_csv import csv_fields, merge_csvs, record_path_for
from mediscan.inference.predictor import Predictor

P_COLUMNS = [f"p_{name}" for name in CLASSES]


# -------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """64 px random-init model, head scaled to logits with a spread of about 1, with an OOD detector."""
    model = tiny_model()
    rng = np.random.default_rng(0)
    batch = torch.stack([torch.from_numpy(pattern_image(k % 4, 64, rng)).float()[None] / 255 * 2048 - 1024
                         for k in range(8)])
    with torch.no_grad():
        model.head.fc.weight.mul_(1.0 / float(model(batch).std()))
        model.head.fc.bias.zero_()
    return write_tiny_checkpoint(tmp_path_factory.mktemp("archive") / "best.safetensors", model=model,
                                 with_ood=True, temperature=1.5)


@pytest.fixture(scope="module")
def predictor(checkpoint) -> Predictor:
    return Predictor(checkpoint, device="cpu", backend="torch")


def write_archive(root: Path) -> Path:
    """12 files in nested folders: 9 PNGs, one DICOM, one truncated PNG, one empty file (+ a text file)."""
    rng = np.random.default_rng(1)
    names = ["a.png", "a-b.png", "B.png", "a/x.png", "a/y/z.png", "b/1.png", "b/10.png", "b/2.png", "c/d/e/f.png"]
    for k, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pattern_image(k % 4, 72, rng)).save(root / name)
    (root / "b" / "scan").write_bytes(dicom_bytes(pattern_image(2, 72, rng).astype(np.uint16) * 16))  # no suffix
    good = (root / "a.png").read_bytes()
    (root / "a" / "cut.png").write_bytes(good[: len(good) // 2])
    (root / "c" / "empty.png").write_bytes(b"")
    (root / "c" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_archive(tmp_path_factory.mktemp("archive") / "incoming")


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def assert_same_rows(rows: list[dict], reference: list[dict]) -> None:
    assert [row["path"] for row in rows] == [row["path"] for row in reference]
    for row, ref in zip(rows, reference):
        for column in ("confidence", *P_COLUMNS):
            if ref[column]:
                assert abs(float(row[column]) - float(ref[column])) <= 1e-6, (row["path"], column, row, ref)
        if ref["ood_score"]:     # ~2000: its 3rd decimal is float32 noise
            assert float(row["ood_score"]) == pytest.approx(float(ref["ood_score"]), rel=1e-6), (row, ref)
        for column in ("class", "verdict", "error", "header_check"):
            assert row[column] == ref[column], (row["path"], column, row, ref)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, folder, predictor) -> list[dict]:
    """A single-process, batch-1 run of the whole folder."""
    out = tmp_path_factory.mktemp("reference") / "ref.csv"
    run_archive(predictor, ArchiveJob(folder, out, batch_size=1))
    rows = read_rows(out)
    assert len(rows) == 12 and sum(bool(row["error"]) for row in rows) == 2
    spread = max(float(row["confidence"]) for row in rows if row["confidence"])
    assert spread < 0.9          # unsaturated probabilities: the comparisons below mean something
    return rows


# -------------------------------------------------------------------------------------------- listing

def test_listing_is_the_sorted_walk_and_lazy(folder, tmp_path):
    # the order of sorting every image path (what the folder mode always wrote), computed independently
    expected = sorted(p.relative_to(folder).parts for p in folder.rglob("*") if p.is_file()
                      and looks_like_image_file(p))
    listed = [path for path, problem in iter_archive(folder)]
    assert [tuple(path.split("/")) for path in listed] == expected
    assert "b/scan" in listed and "c/notes.txt" not in listed

    root = tmp_path / "lazy"
    for name in ("a/1.png", "z/1.png"):
        (root / name).parent.mkdir(parents=True)
        Image.fromarray(pattern_image(0, 40)).save(root / name)
    stream = iter_archive(root)
    assert next(stream) == ("a/1.png", None)
    Image.fromarray(pattern_image(0, 40)).save(root / "z" / "0.png")   # a folder not listed yet
    assert list(stream) == [("z/0.png", None), ("z/1.png", None)]


def test_listing_skips_fifos_and_does_not_follow_folder_links(tmp_path):
    root = tmp_path / "odd"
    root.mkdir()
    Image.fromarray(pattern_image(1, 40)).save(root / "ok.png")
    os.mkfifo(root / "pipe.png")                     # reading it would block the run forever
    (root / "loop").symlink_to(root, target_is_directory=True)
    assert list(iter_archive(root)) == [("ok.png", None)]


def test_decoding_runs_a_bounded_window_ahead(folder, predictor, monkeypatch):
    prepared = []
    real = archive._prepare
    monkeypatch.setattr(archive, "_prepare", lambda p, path: prepared.append(path) or real(p, path))
    job = ArchiveJob(folder, Path("unused.csv"), batch_size=2, workers=1, prefetch=3)
    stream = archive._decoded(predictor, job, iter_archive(folder))
    next(stream)
    time.sleep(0.5)                                   # the pool would run on if it were not bounded
    assert 1 <= len(prepared) <= 4
    assert len(list(stream)) == 11 and len(prepared) == 12   # then every file, each decoded once


# -------------------------------------------------------------------------------------------- CSV and resume

def test_merge_keeps_listing_order_and_one_row_per_path(tmp_path, predictor):
    fields = csv_fields(CLASSES)
    blank = [""] * (len(fields) - 1)
    # each part in listing order, as a rank writes it; a/x.png in both (a merge interrupted after its rename)
    parts = {"p1.csv": ["a/x.png", "b/c.png", "b.png"], "p2.csv": ["a/x.png", "a.png", "b/a.png", "c.png"]}
    for name, paths in parts.items():
        with open(tmp_path / name, "w", newline="") as handle:
            csv.writer(handle).writerows([fields, *([path, *blank] for path in paths)])
    assert merge_csvs([tmp_path / "p1.csv", tmp_path / "p2.csv"], tmp_path / "out.csv", fields, "ck") == 1
    assert [row["path"] for row in read_rows(tmp_path / "out.csv")] == ["a/x.png", "a.png", "b/a.png", "b/c.png",
                                                                       "b.png", "c.png"]


def test_resume_after_a_crash_mid_row_finishes_without_duplicates(folder, predictor, reference, tmp_path, capsys):
    # what a killed run leaves: the header, 5 whole rows and half of the 6th
    out = tmp_path / "results.csv"
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(reference[0]))
        writer.writeheader()
        writer.writerows(reference[:5])
        partial = ",".join(reference[5].values())
        handle.write(partial[: len(partial) // 2])
    seen = []
    job = ArchiveJob(folder, out, batch_size=1, resume=True)
    outcome = run_archive(predictor, job, progress=seen.append)
    assert_same_rows(read_rows(out), reference)
    assert outcome.resumed == 5 and outcome.written == 7 and sum(seen) == 7
    assert outcome.summary.files == 12 and outcome.summary.error_count == 2


def test_resume_refuses_a_csv_of_other_classes(folder, checkpoint, tmp_path, capsys):
    out = tmp_path / "other.csv"
    out.write_text("path,class,confidence,p_cat,p_dog,verdict,ood_score,error\nx.png,cat,0.9,0.9,0.1,confident,,\n")
    before = out.read_bytes()
    code = cli.main([str(folder), "--checkpoint", str(checkpoint), "--csv", str(out), "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Cannot resume" in err and "cat, dog" in err and "bone, brain, heart, lungs" in err
    assert "--csv" in err and "Traceback" not in err
    assert out.read_bytes() == before                  # nothing lost


def test_non_utf8_file_names_survive_the_summary_resume_and_merge(predictor, tmp_path):
    root = tmp_path / "latin"
    root.mkdir()
    # Linux allows any bytes in a name; Python keeps the ones that are not UTF-8 as surrogates
    Image.fromarray(pattern_image(0, 64)).save(root / os.fsdecode(b"caf\xe9.png"))
    (root / os.fsdecode(b"cut\xe9.png")).write_bytes(b"")
    out = tmp_path / "latin.csv"
    outcome = run_archive(predictor, ArchiveJob(root, out, batch_size=1))
    assert (outcome.summary.files, outcome.summary.error_count) == (2, 1)
    assert out.read_bytes().count(b"caf\xe9.png") == 1          # the name's own bytes, no replacement character
    Image.fromarray(pattern_image(1, 64)).save(root / "new.png")
    outcome = run_archive(predictor, ArchiveJob(root, out, batch_size=1, resume=True))
    assert (outcome.resumed, outcome.written, outcome.summary.files) == (2, 1, 3)
    merged = tmp_path / "merged.csv"
    assert merge_csvs([out], merged, csv_fields(CLASSES), "ck") == 0
    assert merged.read_bytes() == out.read_bytes()               # one file in listing order merges to itself


def test_resume_refuses_a_csv_written_by_another_checkpoint(folder, predictor, checkpoint, tmp_path, capsys):
    out = tmp_path / "results.csv"
    run_archive(predictor, ArchiveJob(folder, out, batch_size=4))
    record = json.loads(record_path_for(out).read_text())
    assert record["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    before = out.read_bytes()
    other = write_tiny_checkpoint(tmp_path / "other.safetensors", seed=1, with_ood=True)   # same classes
    code = cli.main([str(folder), "--checkpoint", str(other), "--csv", str(out), "--resume", "--no-progress",
                     "--backend", "torch"])
    err = capsys.readouterr().err
    assert code == 2 and f"Cannot resume {out}" in err and str(checkpoint) in err and str(other) in err
    assert "--csv" in err and "--resume" in err and "Traceback" not in err
    assert out.read_bytes() == before                           # nothing mixed in
    outcome = run_archive(predictor, ArchiveJob(folder, out, batch_size=4, resume=True))   # the same one may
    assert (outcome.resumed, outcome.written) == (12, 0)


def test_a_csv_without_a_checkpoint_record_is_resumed_with_a_warning_and_never_certified(folder, predictor,
                                                                                         tmp_path, capsys):
    """A CSV from before the record existed: nobody knows which checkpoint wrote its rows. It is resumed (with
    a warning), but no record is written for it: one naming this checkpoint would certify the old rows, and
    every later resume would then trust them."""
    out = tmp_path / "old.csv"
    run_archive(predictor, ArchiveJob(folder, out, batch_size=4))
    record_path_for(out).unlink()
    capsys.readouterr()
    outcome = run_archive(predictor, ArchiveJob(folder, out, batch_size=4, resume=True))
    assert (outcome.resumed, outcome.written) == (12, 0)
    err = capsys.readouterr().err
    assert "has no checkpoint record" in err and "Leave out --resume" in err
    assert not record_path_for(out).exists()


def test_a_fresh_run_with_part_files_removes_the_old_csv_before_any_row(folder, predictor, tmp_path, monkeypatch):
    """Without --resume, under torchrun, rows go to part files and the CSV is only replaced by the final
    merge. The old CSV must go at the start: a run killed before the merge would otherwise leave the old
    model's rows beside a record naming the new checkpoint, and a --resume would mix the two."""
    out = tmp_path / "results.csv"
    run_archive(predictor, ArchiveJob(folder, out, batch_size=4))                  # checkpoint A's rows
    monkeypatch.setattr(archive.Ranks, "barrier", lambda self: None)              # rank 0 of 2, alone here
    plan = archive._plan(ArchiveJob(folder, out, batch_size=4), archive.Ranks(0, 2, 0), csv_fields(CLASSES),
                         "b.safetensors", "b" * 64)
    assert plan.merge and plan.target.parent == parts_dir_for(out)
    assert not out.exists()
    assert json.loads(record_path_for(out).read_text())["checkpoint_sha256"] == "b" * 64


# -------------------------------------------------------------------------------------------- torchrun

def torchrun(*args, processes: int = 2, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(ROOT / "test_single_image.py"), *map(str, args), "--no-progress", "--batch-size", "1",
               "--backend", "torch"]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out + err


@pytest.mark.slow
def test_two_processes_merge_into_the_single_process_csv(folder, checkpoint, reference, tmp_path):
    out = tmp_path / "merged.csv"
    code, log = finish(torchrun(folder, "--checkpoint", checkpoint, "--csv", out))
    assert code == 0, log[-3000:]
    assert_same_rows(read_rows(out), reference)
    assert log.count("12 files: 10 predicted, 2 errors") == 1          # rank 0 alone prints the summary
    assert "rows were in two part files" not in log                     # each file done by one rank
    assert not parts_dir_for(out).exists()


def rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    import psutil
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "test_single_image.py" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    return None


def rows_in(path: Path) -> int:
    return max(0, path.read_bytes().count(b"\n") - 1) if path.is_file() else 0


@pytest.mark.slow
def test_resume_after_killing_one_rank_finishes_without_duplicates(folder, checkpoint, reference, tmp_path):
    out = tmp_path / "killed.csv"
    launcher = torchrun(folder, "--checkpoint", checkpoint, "--csv", out)
    part = parts_dir_for(out) / "part-g0001-r00001.csv"
    deadline = time.monotonic() + 240
    while rows_in(part) < 1 and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    pid = rank_pid(launcher, 1)
    assert pid is not None, "rank 1 not found"
    os.kill(pid, signal.SIGKILL)                  # rank 1 dies mid-shard; torchrun then stops rank 0 too
    code, log = finish(launcher)
    assert code != 0 and not out.exists()
    done = sum(rows_in(path) for path in parts_dir_for(out).glob("*.csv"))
    assert 1 <= done < 12, f"the kill came too late to test a resume ({done} rows done)"

    code, log = finish(torchrun(folder, "--checkpoint", checkpoint, "--csv", out, "--resume"))
    assert code == 0, log[-3000:]
    assert_same_rows(read_rows(out), reference)              # every file once, in order, same values
    assert f"resumed: {done} files were already in the CSV" in log and "rows were in two part files" not in log
    assert not parts_dir_for(out).exists()

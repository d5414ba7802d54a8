"""End-to-end training on a tiny learnable synthetic set: checkpoints, report, resume, evaluation, CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import softmax
from sklearn import metrics as skm

import densenet121_xray_classifier as cli
from conftest import ROOT
from mediscan.core.checkpoint import load_checkpoint, read_metadata
from mediscan.core.dataset import load_split, scan_dataset
from mediscan.devtools.synthetic import make_dataset
from mediscan.training.fit import TrainConfig, fit, is_better
from test_metrics import reference_ece, reference_temperature

FAST = dict(weights="none", input_size=32, head_epochs=3, finetune_epochs=1, batch_size=8,
            progress=False, workers=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = make_dataset(root / "dataset", per_class=8, seed=1)
    config = TrainConfig(data=str(data), out=str(root / "models"), **FAST)
    lines: list[str] = []
    result = fit(config, log=lines.append)
    return config, result, lines


def test_run_writes_checkpoints_history_and_report(trained):
    config, result, lines = trained
    out = Path(config.out)
    for name in ("best.safetensors", "last.safetensors", "history.csv", "training_curves.png", "report.md",
                 "confusion_matrix.png", "confusion_matrix.json", "metrics.json", "gradcam_gallery.png"):
        assert (out / name).is_file(), name
    assert len(result.history) == 4 and [h["stage"] for h in result.history] == [1, 1, 1, 2]
    report = (out / "report.md").read_text()
    assert "Not a medical device" in report and "| heart |" in report and "gradcam_gallery.png" in report
    assert any(line.startswith("epoch   4/4 stage 2") for line in lines)
    peak = [line for line in lines if line.startswith("peak memory: process RSS ")]
    assert peak and float(peak[0].split()[4]) > 0.05      # GiB: torch alone takes more than 50 MiB


def test_synthetic_classes_are_learned_well_above_chance(trained):
    _, result, _ = trained
    assert result.test_metrics["accuracy"] >= 0.6          # chance is 0.25
    assert result.test_metrics["macro_roc_auc"] >= 0.8


def test_best_checkpoint_carries_metadata_and_reproduces_its_metrics(trained):
    config, result, _ = trained
    loaded = load_checkpoint(result.best_path)
    meta = loaded.meta
    assert meta["classes"] == ["bone", "brain", "heart", "lungs"]
    assert meta["train_args"]["head_epochs"] == 3 and meta["train_args"]["batch_size"] == 8
    assert meta["dataset_fingerprint"]["files"] == 96
    assert meta["temperature"] > 0 and meta["ood"]["threshold"] > 0
    assert [layer["name"] for layer in meta["ood"]["layers"]] == ["denseblock1", "norm5"]
    assert {"ood.denseblock1.means", "ood.norm5.precision"} <= set(loaded.extra)
    assert "torch" in meta["versions"] and meta["weight_source"].startswith("none")
    # The report's figures, recomputed from the loaded model's logits by scikit-learn / scipy (never by
    # mediscan.evaluation): metrics.json, the checkpoint's headline, and the temperature fitted on val.
    splits = scan_dataset(config.data)
    size = meta["preprocessing"]["input_size"]
    (test, _), (val, _) = load_split(splits.test, size), load_split(splits.val, size)
    with torch.no_grad():
        logits, val_logits = loaded.model(test.images).double().numpy(), loaded.model(val.images).double().numpy()
    y, k = test.labels.numpy(), list(range(4))
    probs, pred = softmax(logits, axis=1), logits.argmax(1)
    reported = json.loads((Path(config.out) / "metrics.json").read_text())["test"]
    expected = {"accuracy": skm.accuracy_score(y, pred), "macro_f1": skm.f1_score(y, pred, average="macro"),
                "macro_roc_auc": skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"),
                "ece": reference_ece(probs, y), "ece_calibrated": reference_ece(softmax(logits / meta["temperature"], 1), y)}
    for key, value in expected.items():
        assert reported[key] == pytest.approx(value, abs=1e-5), key
        assert meta["metrics"]["test"][key] == pytest.approx(value, abs=1e-5), key
    assert reported["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=k).tolist()
    assert reported["nll_calibrated"] == pytest.approx(
        skm.log_loss(y, softmax(logits / meta["temperature"], axis=1), labels=k), abs=1e-5)
    assert meta["temperature"] == pytest.approx(reference_temperature(val_logits, val.labels.numpy()), rel=1e-2)


def test_best_is_the_best_validation_epoch(trained):
    _, result, _ = trained
    best_epoch = read_metadata(result.best_path)["best"]["epoch"]
    best = max(result.history, key=lambda h: (h["val_acc"], -h["val_loss"]))
    assert best_epoch == best["epoch"]
    assert is_better({"val_acc": 0.9, "val_loss": 0.5}, {"val_acc": 0.9, "val_loss": 0.6})
    assert not is_better({"val_acc": 0.8, "val_loss": 0.1}, {"val_acc": 0.9, "val_loss": 0.6})


def test_frozen_stage_keeps_backbone_and_its_batchnorm_statistics(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "dataset", per_class=4)
    config = TrainConfig(data=str(data), out=str(tmp_path / "m"),
                         **{**FAST, "head_epochs": 2, "finetune_epochs": 0, "gallery": False})
    from mediscan.training import fit as training
    snapshots = []
    real_features, real_head = training.pooled_training_features, training.train_head_epoch

    def snapshot(model):
        snapshots.append({k: v.clone() for k, v in model.features.state_dict().items()})

    def features_spy(model, *args, **kwargs):
        snapshot(model)                       # before the stage-1 epoch touches the backbone
        return real_features(model, *args, **kwargs)

    def head_spy(model, *args, **kwargs):
        out = real_head(model, *args, **kwargs)
        snapshot(model)                       # after the epoch's head training
        return out
    monkeypatch.setattr(training, "pooled_training_features", features_spy)
    monkeypatch.setattr(training, "train_head_epoch", head_spy)
    fit(config, log=lambda _: None)
    assert len(snapshots) == 4
    for later in snapshots[1:]:
        for key, value in snapshots[0].items():
            assert torch.equal(value, later[key]), key      # weights AND BatchNorm running statistics


def test_resume_refuses_a_changed_dataset(trained, tmp_path):
    config, _, _ = trained
    import shutil
    data = tmp_path / "dataset"
    shutil.copytree(config.data, data)
    (data / "train" / "bone" / "bone_train_0.png").unlink()
    out = tmp_path / "m"
    shutil.copytree(config.out, out)
    code = cli.main(["--data", str(data), "--out", str(out), "--weights", "none", "--input-size", "32",
                     "--resume", "--no-progress"])
    assert code == cli.EXIT_NO_MODEL


def test_cli_reports_dataset_problems_without_traceback(tmp_path, capsys):
    code = cli.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "m"), "--weights", "none"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT
    assert "does not exist" in err and "Traceback" not in err


def test_cli_resume_without_a_previous_run(tmp_path, capsys):
    data = make_dataset(tmp_path / "dataset", per_class=2)
    code = cli.main(["--data", str(data), "--out", str(tmp_path / "m"), "--weights", "none", "--resume"])
    assert code == cli.EXIT_NO_MODEL
    assert "no " in capsys.readouterr().err


def test_evaluate_alone_in_a_fresh_process(trained, tmp_path):
    config, result, _ = trained
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, str(ROOT / "densenet121_xray_classifier.py"), "--evaluate",
                           str(result.best_path), "--data", config.data, "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())["test"]
    assert metrics["accuracy"] == pytest.approx(result.test_metrics["accuracy"])
    assert "Not a medical device" in (out / "report.md").read_text()


def test_evaluate_and_refit_read_the_pixel_cache_and_never_convert_a_whole_split(trained, tmp_path, capsys,
                                                                                   monkeypatch):
    """--cache-dir serves --refit-ood and --evaluate as it serves training; neither (nor the report's gallery)
    turns a whole split into floats, which a million-image test split could not afford."""
    from mediscan.core.dataset import TensorSplit
    config, result, _ = trained

    def whole_split(self):
        raise AssertionError("a whole split was converted to floats")
    monkeypatch.setattr(TensorSplit, "images", property(whole_split))
    cache = tmp_path / "cache"
    refit = ["--refit-ood", str(result.best_path), "--data", config.data, "--cache-dir", str(cache)]
    assert cli.main(refit + ["--out", str(tmp_path / "a")]) == cli.EXIT_OK
    assert capsys.readouterr().out.count("pixel cache built") == 2                    # train and val
    assert cli.main(refit + ["--out", str(tmp_path / "b")]) == cli.EXIT_OK
    assert capsys.readouterr().out.count("pixel cache reused") == 2
    first, second = (read_metadata(tmp_path / name / "best.safetensors")["ood"] for name in "ab")
    assert first["threshold"] == second["threshold"]
    entries = len(list(cache.iterdir()))
    code = cli.main(["--evaluate", str(result.best_path), "--data", config.data, "--cache-dir", str(cache),
                     "--out", str(tmp_path / "eval")])
    assert code == cli.EXIT_OK, capsys.readouterr().err
    assert len(list(cache.iterdir())) > entries                                        # the test split joined it
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["test"]
    assert metrics["accuracy"] == pytest.approx(result.test_metrics["accuracy"])
    assert (tmp_path / "eval" / "gradcam_gallery.png").is_file()


def test_colour_training_images_are_named_in_the_log_and_the_report_notes(tmp_path):
    from PIL import Image

    from mediscan.training.data import describe_dataset, load_tensors
    # One training image recoloured: the same structure in an orange-and-blue duotone.
    data = make_dataset(tmp_path / "dataset", per_class=3)
    gray = np.asarray(Image.open(data / "train" / "heart" / "heart_train_0.png"))
    tinted = np.stack([gray, gray // 2, 255 - gray], -1).astype(np.uint8)
    Image.fromarray(tinted).save(data / "train" / "heart" / "heart_train_0.png")
    config = TrainConfig(data=str(data), out=str(tmp_path / "m"), **FAST)
    scanned, lines = scan_dataset(data), []
    tensors, splits = load_tensors(scanned, config, lines.append)
    assert scanned.colour == [] and scanned.skipped == []          # the caller's splits are left as they were
    assert tensors["train"].colour_paths == [data / "train" / "heart" / "heart_train_0.png"]
    assert tensors["val"].colour_paths == [] and len(tensors["train"]) == 12      # still trained on
    warning = [line for line in lines if line.startswith("WARNING: 1 image(s) are colour pictures")]
    assert warning and "heart_train_0.png" in warning[0] and "out of scope" in warning[0]
    assert warning[0] in describe_dataset(splits, config)


def _as_legacy_checkpoint(best: Path, target: Path) -> Path:
    """``best`` rewritten as a checkpoint from before the detector read several layers: method
    "mahalanobis-tied", one final-layer statistic under ood.means / ood.precision, a raw threshold."""
    from mediscan.core.checkpoint import save_checkpoint
    loaded = load_checkpoint(best)
    final = loaded.extra["ood.norm5.means"], loaded.extra["ood.norm5.precision"]
    meta = dict(loaded.meta, ood={"method": "mahalanobis-tied", "threshold": 12.5, "percentile": 95.0,
                                  "shrinkage": 0.1, "n_train": 32, "n_val": 32})
    return save_checkpoint(target, loaded.model, meta, {"ood.means": final[0], "ood.precision": final[1]})


def test_refit_ood_upgrades_an_old_checkpoint_to_what_training_stores(trained, tmp_path, capsys):
    from mediscan.core.ood import OODDetector
    config, result, _ = trained
    old = _as_legacy_checkpoint(result.best_path, tmp_path / "old" / "best.safetensors")
    before = load_checkpoint(old)
    assert OODDetector.from_checkpoint(before.extra, before.meta).layer_names == ("norm5",)

    code = cli.main(["--refit-ood", str(old), "--data", config.data, "--out", str(tmp_path / "new")])
    assert code == cli.EXIT_OK, capsys.readouterr().err
    assert "refitted on 32 train / 32 val images (max of denseblock1, norm5" in capsys.readouterr().out
    assert load_checkpoint(old).meta["ood"]["method"] == "mahalanobis-tied"      # --out: original untouched
    refitted = load_checkpoint(tmp_path / "new" / "best.safetensors")
    trained_meta = read_metadata(result.best_path)
    # Same model, same data, same code as training's own fit: the same detector.
    assert refitted.meta["ood"]["threshold"] == pytest.approx(trained_meta["ood"]["threshold"], rel=1e-5)
    assert [layer["name"] for layer in refitted.meta["ood"]["layers"]] == ["denseblock1", "norm5"]
    assert not {"ood.means", "ood.precision"} & set(refitted.extra)
    for name, tensor in before.model.state_dict().items():                       # predictions unchanged
        assert torch.equal(tensor, refitted.model.state_dict()[name]), name
    assert refitted.meta["temperature"] == before.meta["temperature"]


def test_refit_ood_refuses_a_dataset_with_other_classes(trained, tmp_path, capsys):
    _, result, _ = trained
    other = make_dataset(tmp_path / "other", per_class=2, classes=("hand", "knee", "skull", "spine"))
    code = cli.main(["--refit-ood", str(result.best_path), "--data", str(other), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_NO_MODEL and "has classes ['hand', 'knee', 'skull', 'spine']" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_report_figures_leave_the_callers_matplotlib_backend_alone(tmp_path):
    """Writing the report and the gallery must not switch the process's plotting backend (a user's
    notebook or GUI session) nor go through pyplot's global, thread-unsafe figure registry."""
    script = """
import sys, matplotlib, numpy as np, torch
matplotlib.use("svg")
from pathlib import Path
from mediscan.core.model import build_model
from mediscan.evaluation import gallery, report
out = Path(sys.argv[1])
report.save_confusion_matrix([[2, 0], [1, 1]], ["a", "b"], out)
report.save_history([{"epoch": 1, "stage": 1, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0,
                      "val_acc": 0.5}], out)
model, _ = build_model(2, "none")
gallery.save_gradcam_gallery(model.eval(), [(np.random.default_rng(0).random((40, 40)), 0, "x.png")],
                             ["a", "b"], out / "g.png", input_size=32)
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["svg", "False"]
    for name in ("confusion_matrix.png", "training_curves.png", "g.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_the_threshold_is_fitted_on_validation_as_the_predictor_decodes_it(trained):
    """The "at most 5 % of validation flagged" promise is about the Predictor's numbers: float pixels straight
    from the files, not the 8-bit copy training keeps (these 40 px images are resized to 32, so rounding them
    moves every score). Reference: the same fit on validation features computed by hand through the
    Predictor's own decoding."""
    from mediscan.core.imaging import read_image
    from mediscan.core.ood import DEFAULT_LAYERS, fit_ood
    from mediscan.core.preprocessing import preprocess
    from mediscan.core.runtime import predict_split
    config, result, _ = trained
    saved = load_checkpoint(result.best_path)
    splits = scan_dataset(config.data, val_fraction=0.15, seed=0)
    train, _ = load_split(splits.split("train"), config.input_size, workers=1)
    val_files = [s.path for s in splits.split("val")]
    as_predictor = torch.stack([preprocess(read_image(f).pixels, config.input_size)[0] for f in val_files])
    _, val_pooled = predict_split(saved.model, as_predictor, 64, torch.device("cpu"), layers=DEFAULT_LAYERS)
    _, train_pooled = predict_split(saved.model, train.pixels, 64, torch.device("cpu"), layers=DEFAULT_LAYERS)
    reference = fit_ood(train_pooled, train.labels, val_pooled)
    assert saved.meta["ood"]["threshold"] == pytest.approx(reference.threshold, rel=1e-6)
    rounded_val, _ = load_split(splits.split("val"), config.input_size, workers=1)
    _, rounded_pooled = predict_split(saved.model, rounded_val.pixels, 64, torch.device("cpu"), layers=DEFAULT_LAYERS)
    rounded = fit_ood(train_pooled, train.labels, rounded_pooled)
    assert rounded.threshold != pytest.approx(reference.threshold, rel=1e-6)    # the test can tell the two apart

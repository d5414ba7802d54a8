"""ONNX Runtime backend: export, parity with the PyTorch Predictor (probabilities, OOD scores, Grad-CAM maps,
faithfulness, batches), stale-export refusal, the --export-onnx and --backend CLIs, clear errors, threads.

A tiny random-initialised checkpoint (64 px input) is exported once per module (~10 s on 2 busy cores). Torch runs
on one thread here (conftest's session fixture), so the ONNX Runtime sessions made here get one intra-op thread too.
"""
from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Plain imports, not importorskip: requirements-dev.txt installs both, so a missing one is a failure.
import onnx  # noqa: E402,F401
import onnxruntime  # noqa: E402,F401

import densenet121_xray_classifier as train_cli  # noqa: E402
import test_single_image as single_cli  # noqa: E402
from mediscan.core.checkpoint import CheckpointError, new_metadata, save_checkpoint  # noqa: E402
from mediscan.core.imaging import DecodedImage  # noqa: E402
from mediscan.core.model import build_model  # noqa: E402
from mediscan.core.preprocessing import PreprocessConfig, preprocess  # noqa: E402
from mediscan.devtools.synthetic import detector_around
from mediscan.inference import onnx_backend, onnx_export  # noqa: E402
from mediscan.inference.onnx_backend import OnnxBackendError, OnnxClassifier, StaleOnnxError, onnx_path_for  # noqa: E402
from mediscan.inference.onnx_export import export_onnx  # noqa: E402
from mediscan.inference.predictor import Predictor  # noqa: E402

CLASSES = ["bone", "brain", "heart", "lungs"]
SIZE = 64
PARITY = 1e-4          # the bound on max |probability difference|
MAP_TOLERANCE = 1e-4   # Grad-CAM maps are in [0, 1]


def xray_like(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cy, cx = height * rng.uniform(0.3, 0.7), width * rng.uniform(0.3, 0.7)
    blob = np.exp(-(((yy - cy) / (0.3 * height)) ** 2 + ((xx - cx) / (0.25 * width)) ** 2))
    return np.clip(0.1 + 0.8 * blob + rng.normal(0, 0.03, blob.shape), 0, 1).astype(np.float32)


def decoded(seed: int, height: int = 72, width: int = 96) -> DecodedImage:
    return DecodedImage(xray_like(height, width, seed), f"synthetic_{seed}.png", "PNG", 8)


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.round(xray_like(80, 64, seed) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES = [decoded(seed, 60 + 7 * seed, 100 - 5 * seed) for seed in range(6)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """best.safetensors: temperature 2, OOD statistics, a head whose probabilities are not saturated."""
    torch.manual_seed(0)
    model, source = build_model(len(CLASSES), weights="none")
    model.eval()
    with torch.no_grad():
        model.head.fc.weight.mul_(0.05)
        model.head.fc.bias.copy_(torch.tensor([1.0, 0.0, -0.5, -1.0]))
        batch = torch.stack([preprocess(image.pixels, SIZE)[0] for image in IMAGES[:4]])
    detector = detector_around(model, batch)          # reads denseblock1 and norm5
    meta = new_metadata(CLASSES, PreprocessConfig(SIZE), source, temperature=2.0, ood=detector.to_meta())
    folder = tmp_path_factory.mktemp("onnx")
    return save_checkpoint(folder / "best.safetensors", model, meta, detector.to_tensors())


@pytest.fixture(scope="module")
def exported(checkpoint) -> onnx_export.OnnxExport:
    return export_onnx(checkpoint)


@pytest.fixture(scope="module")
def torch_predictor(checkpoint) -> Predictor:
    return Predictor(checkpoint, "cpu", backend="torch")


@pytest.fixture(scope="module")
def onnx_predictor(checkpoint, exported) -> Predictor:
    return Predictor(checkpoint, backend="onnx")


def probabilities(prediction) -> np.ndarray:
    return np.array([prediction.probabilities[name] for name in CLASSES])


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------

def test_export_writes_bound_metadata_next_to_the_checkpoint(checkpoint, exported):
    import onnx
    assert exported.path == checkpoint.with_suffix(".onnx") == onnx_path_for(checkpoint)
    assert exported.max_probability_difference < PARITY
    model = onnx.load(str(exported.path))
    props = {p.key: p.value for p in model.metadata_props}
    assert props[onnx_backend.META_SHA256] == onnx_backend.file_sha256(checkpoint) == exported.checkpoint_sha256
    meta = json.loads(props[onnx_backend.META_CHECKPOINT_META])
    assert meta["classes"] == CLASSES and meta["preprocessing"]["input_size"] == SIZE
    assert [i.name for i in model.graph.input] == ["image"]
    # The final layer's pooled features are the map's mean; the earlier layer the detector reads gets an output.
    assert [o.name for o in model.graph.output] == ["logits", "feature_map", "pooled.denseblock1"]
    assert not list(checkpoint.parent.glob("*.tmp"))            # atomic write left no temporary file


def test_graph_outputs_match_the_model_at_several_batch_sizes(checkpoint, exported, torch_predictor, onnx_predictor):
    model, net = torch_predictor.model, onnx_predictor.net
    assert isinstance(net, OnnxClassifier) and not net.training
    for batch in (1, 2, 5):
        x = (torch.rand(batch, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(batch)) * 2 - 1) * 1024
        logits, feature_map = net.run(x)
        with torch.no_grad():
            reference_map = torch.relu(model.features(x))
            reference = model(x)
        assert feature_map.shape == (batch, 1024, 2, 2) and logits.shape == (batch, len(CLASSES))
        torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
        # float32 round-off (ONNX Runtime fuses conv + batch norm) relative to the map's scale
        scale = float(reference_map.abs().max())
        assert float((feature_map - reference_map).abs().max()) <= 1e-5 * scale
        # The pooled features the out-of-scope detector reads, from the same single session call.
        layers = ("denseblock1", "norm5")
        _, pooled = net.tapped_features(x, layers)
        with torch.no_grad():
            _, reference_pooled = model.tapped_features(x, layers)
        assert list(pooled) == list(layers)
        for name in layers:
            scale = float(reference_pooled[name].abs().max())
            assert float((pooled[name] - reference_pooled[name]).abs().max()) <= 1e-5 * scale, name


# --------------------------------------------------------------------------------------------------
# Predictor parity
# --------------------------------------------------------------------------------------------------

def test_backend_attributes(torch_predictor, onnx_predictor):
    assert torch_predictor.backend == "torch" and torch_predictor.net is torch_predictor.model
    assert onnx_predictor.backend == "onnx" and onnx_predictor.device.type == "cpu"
    assert onnx_predictor.model_card()["backend"] == "onnx" and "backend='onnx'" in repr(onnx_predictor)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_explain_parity_single_images(torch_predictor, onnx_predictor, method):
    worst = 0.0
    for image in IMAGES:
        a = torch_predictor.explain(image, method=method)
        b = onnx_predictor.explain(image, method=method)
        worst = max(worst, float(np.abs(probabilities(a.prediction) - probabilities(b.prediction)).max()))
        assert (a.prediction.top_class, a.prediction.verdict) == (b.prediction.top_class, b.prediction.verdict)
        assert a.prediction.ood_score == pytest.approx(b.prediction.ood_score, rel=1e-4)
        assert a.explained_class == b.explained_class and a.heatmap.shape == b.heatmap.shape
        assert a.heatmap.max() > 0
        np.testing.assert_allclose(b.heatmap, a.heatmap, atol=MAP_TOLERANCE)
        for key, value in a.faithfulness.items():           # extra forward passes go through ONNX too
            assert b.faithfulness[key] == pytest.approx(value, abs=1e-4)
    assert worst < PARITY
    other = torch_predictor.explain(IMAGES[0], "heart", method=method)
    np.testing.assert_allclose(onnx_predictor.explain(IMAGES[0], "heart", method=method).heatmap, other.heatmap,
                               atol=MAP_TOLERANCE)


def test_batched_parity(torch_predictor, onnx_predictor):
    a = torch_predictor.explain_many(IMAGES, batch_size=4)
    b = onnx_predictor.explain_many(IMAGES, batch_size=4)
    for x, y in zip(a, b):
        assert np.abs(probabilities(x.prediction) - probabilities(y.prediction)).max() < PARITY
        np.testing.assert_allclose(y.heatmap, x.heatmap, atol=MAP_TOLERANCE)
    singles = [onnx_predictor.predict(image) for image in IMAGES]
    batched = onnx_predictor.predict_many(IMAGES, batch_size=4)
    for x, y in zip(singles, batched):
        assert np.abs(probabilities(x) - probabilities(y)).max() < PARITY


class CountingSession:
    """The real session, counting ``run`` calls and the batch size of each."""

    def __init__(self, session):
        self.session, self.batches = session, []

    def run(self, names, feeds):
        self.batches.append(len(feeds["image"]))
        return self.session.run(names, feeds)


def test_batches_are_fed_to_the_session_run_batch_rows_at_a_time(checkpoint, onnx_predictor):
    net = onnx_predictor.net
    assert net.run_batch == 1          # ONNX Runtime ran batch 8 slower per image than batch 1 (benchmarks.md)
    x = (torch.rand(5, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(7)) * 2 - 1) * 1024
    whole = OnnxClassifier(CountingSession(net.session), net.head.fc, net.path, run_batch=8)
    rows = OnnxClassifier(CountingSession(net.session), net.head.fc, net.path, run_batch=2)
    layers = ("denseblock1", "norm5")
    (map_a, pooled_a), (map_b, pooled_b) = whole.tapped_features(x, layers), rows.tapped_features(x, layers)
    assert whole.session.batches == [5] and rows.session.batches == [2, 2, 1]
    torch.testing.assert_close(map_b, map_a, rtol=1e-5, atol=1e-5)
    for name in layers:
        torch.testing.assert_close(pooled_b[name], pooled_a[name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows(x), whole(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="run_batch"):
        OnnxClassifier(net.session, net.head.fc, net.path, run_batch=0)


def test_session_threads_sleep_instead_of_spinning(onnx_predictor):
    options = onnx_predictor.net.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.inter_op_num_threads == 1


def test_onnx_predictor_is_thread_safe(onnx_predictor):
    inputs = [png_bytes(seed) for seed in range(4)]
    expected = [onnx_predictor.explain(data, faithfulness=False) for data in inputs]

    def job(k: int):
        result = onnx_predictor.explain(inputs[k % 4], faithfulness=False)
        return k % 4, probabilities(result.prediction), result.heatmap

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(job, range(24)))
    for index, probs, heatmap in results:
        np.testing.assert_allclose(probs, probabilities(expected[index].prediction), atol=1e-6)
        np.testing.assert_allclose(heatmap, expected[index].heatmap, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# choosing the backend, errors
# --------------------------------------------------------------------------------------------------

def test_onnx_without_export_names_the_export_command(checkpoint, tmp_path):
    lonely = tmp_path / "lonely.safetensors"
    lonely.write_bytes(checkpoint.read_bytes())
    with pytest.raises(OnnxBackendError) as info:
        Predictor(lonely, backend="onnx")
    message = str(info.value)
    assert isinstance(info.value, CheckpointError) and str(lonely.with_suffix(".onnx")) in message
    assert f"python densenet121_xray_classifier.py --export-onnx {lonely}" in message
    assert Predictor(lonely, "cpu", backend="auto").backend == "torch"       # auto: no file, no fuss


def test_auto_uses_a_fresh_export_on_the_cpu_only(checkpoint, exported, monkeypatch):
    # The documented choice (README, docs/benchmarks.md "ONNX Runtime vs PyTorch on the CPU"): "auto" runs
    # a fresh export on the CPU. Stated here outright, not read from the flag the code reads.
    assert Predictor(checkpoint, "cpu").backend == "onnx"
    monkeypatch.setattr(onnx_backend, "AUTO_PREFERS_ONNX_ON_CPU", False)
    assert Predictor(checkpoint, "cpu").backend == "torch"


def test_bad_backend_arguments(checkpoint, exported):
    with pytest.raises(ValueError, match="backend must be one of"):
        Predictor(checkpoint, "cpu", backend="tensorrt")
    with pytest.raises(ValueError, match="runs on the CPU"):
        Predictor(checkpoint, "cuda", backend="onnx")


def test_stale_export_is_refused(checkpoint, exported, tmp_path, monkeypatch):
    folder = tmp_path / "stale"
    folder.mkdir()
    copy = folder / "best.safetensors"
    copy.write_bytes(checkpoint.read_bytes())
    (folder / "best.onnx").write_bytes(exported.path.read_bytes())
    assert Predictor(copy, backend="onnx").backend == "onnx"     # same bytes: fine
    # "Retrain": same architecture and classes, other weights.
    model, source = build_model(len(CLASSES), weights="none")
    save_checkpoint(copy, model.eval(), new_metadata(CLASSES, PreprocessConfig(SIZE), source))
    with pytest.raises(StaleOnnxError) as info:
        Predictor(copy, backend="onnx")
    message = str(info.value)
    assert "stale" in message and f"--export-onnx {copy}" in message
    monkeypatch.setattr(onnx_backend, "AUTO_PREFERS_ONNX_ON_CPU", True)
    with pytest.warns(RuntimeWarning, match="stale"):
        assert Predictor(copy, "cpu").backend == "torch"        # auto falls back, and says why


def test_export_without_the_detectors_layers_is_refused(checkpoint, tmp_path, monkeypatch):
    """An export of this very checkpoint made before the detector read an earlier layer (no
    pooled.denseblock1 output) cannot feed the out-of-scope check: refused, with the re-export command."""
    copy = tmp_path / "best.safetensors"
    copy.write_bytes(checkpoint.read_bytes())
    with monkeypatch.context() as patch:
        patch.setattr(onnx_export, "exported_taps", lambda layers: ())
        export_onnx(copy)
    with pytest.raises(OnnxBackendError, match="pooled denseblock1 features") as error:
        Predictor(copy, backend="onnx")
    assert "--export-onnx" in str(error.value)
    with pytest.warns(RuntimeWarning, match="pooled denseblock1"):
        assert Predictor(copy, "cpu").backend == "torch"        # auto falls back, and says why


def test_foreign_or_broken_onnx_file_is_refused(checkpoint, tmp_path):
    copy = tmp_path / "best.safetensors"
    copy.write_bytes(checkpoint.read_bytes())
    (tmp_path / "best.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(OnnxBackendError, match="not a usable ONNX model"):
        Predictor(copy, backend="onnx")


# --------------------------------------------------------------------------------------------------
# command lines
# --------------------------------------------------------------------------------------------------

def test_export_onnx_cli(checkpoint, tmp_path, capsys):
    out = tmp_path / "exports" / "model.onnx"
    assert train_cli.main(["--export-onnx", str(checkpoint), "--onnx-out", str(out)]) == train_cli.EXIT_OK
    assert out.is_file() and str(out) in capsys.readouterr().out
    predictor = Predictor(checkpoint, backend="onnx", onnx_path=out)
    assert predictor.backend == "onnx" and predictor.net.path == out
    missing = tmp_path / "missing.safetensors"
    assert train_cli.main(["--export-onnx", str(missing)]) == train_cli.EXIT_NO_MODEL
    assert str(missing) in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cli.main(["--onnx-out", str(out)])


def test_single_image_cli_backend_flag(checkpoint, exported, tmp_path, capsys):
    image = tmp_path / "chest.png"
    image.write_bytes(png_bytes(3))
    records = {}
    for backend in ("torch", "onnx"):
        code = single_cli.main([str(image), "--checkpoint", str(checkpoint), "--device", "cpu", "--backend", backend,
                                "--json", "--no-figure"])
        assert code == single_cli.EXIT_OK
        records[backend] = json.loads(capsys.readouterr().out)
    a, b = records["torch"]["prediction"], records["onnx"]["prediction"]
    assert a["top_class"] == b["top_class"]
    assert max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in CLASSES) < PARITY
    lonely = tmp_path / "lonely.safetensors"
    lonely.write_bytes(checkpoint.read_bytes())
    code = single_cli.main([str(image), "--checkpoint", str(lonely), "--backend", "onnx", "--no-figure"])
    assert code == single_cli.EXIT_NO_MODEL and "--export-onnx" in capsys.readouterr().err

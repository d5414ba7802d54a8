"""Optional ONNX Runtime CPU backend for :class:`mediscan.inference.predictor.Predictor`.

Export once, next to the checkpoint (``models/best.onnx`` for ``models/best.safetensors``; the export and
its parity check are :mod:`mediscan.inference.onnx_export`)::

    python densenet121_xray_classifier.py --export-onnx models/best.safetensors [--onnx-out PATH]

then ``Predictor(backend="onnx")`` (or ``test_single_image.py --backend onnx``) runs the network in
ONNX Runtime on the CPU. Everything else -- preprocessing, calibration, the out-of-scope check, verdicts,
Grad-CAM and its faithfulness check -- stays the Predictor's own code.

The exported graph has one input and two or more outputs:

* ``image``: ``(B, 1, S, S)`` float32 in [-1024, 1024], dynamic batch;
* ``logits``: ``(B, n_classes)``;
* ``feature_map``: ``(B, 1024, h, w)``, the final feature map after norm5 + ReLU (``model.head.relu``);
* ``pooled.<layer>``: ``(B, channels)`` for each earlier backbone stage the checkpoint's out-of-scope
  detector reads (e.g. ``pooled.denseblock1``); the final layer's pooled features are the map's mean.

Grad-CAM's fast path needs only that map and the head's Linear weights (closed form), so
:class:`OnnxClassifier` exposes the map as ``.features`` and the checkpoint's own ``head.fc``:
:func:`grad_cam.grad_cam` (fast path) and :func:`mediscan.explain.faithfulness.faithfulness` run on it
unchanged, and the maps are computed by exactly the same code as on the PyTorch backend.

Staleness: the ONNX file's ``metadata_props`` hold the checkpoint's metadata (the same JSON string as the
safetensors header) and the sha256 of the checkpoint file it was exported from. A checkpoint that has
changed since (retrained, restored, replaced) no longer matches and the ONNX file is refused
(:class:`StaleOnnxError`) with the command that re-exports it.

Loading an ONNX file runs nothing but ONNX Runtime (no pickle, no Python code from the file). The
session is created once, on the CPUExecutionProvider; ``InferenceSession.run`` is thread-safe, so one
Predictor on this backend serves many threads like the PyTorch one.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mediscan.core.checkpoint import CheckpointError
from mediscan.core.ood import FINAL_LAYER
from mediscan.core.runtime import select_device

__all__ = ["BACKENDS", "AUTO_PREFERS_ONNX_ON_CPU", "ONNX_RUN_BATCH", "INPUT_NAME", "OUTPUT_NAMES", "OPSET", "pooled_output_name",
           "exported_taps", "OnnxBackendError", "StaleOnnxError", "OnnxRuntimeMissingError", "OnnxClassifier",
           "onnx_path_for", "export_command", "file_sha256", "optional_module", "onnx_session", "load_onnx_classifier",
           "backend_device", "select_backend"]

BACKENDS = ("auto", "torch", "onnx")
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "feature_map")        # always the first two outputs; pooled.<layer> may follow
OPSET = 17
#: metadata_props keys written by :func:`mediscan.inference.onnx_export.export_onnx`.
META_FORMAT, META_SHA256, META_CHECKPOINT_META, META_CHECKPOINT_NAME = (
    "mediscan.format", "mediscan.checkpoint_sha256", "mediscan.checkpoint_meta", "mediscan.checkpoint_name")
FORMAT = "mediscan-onnx/1"

#: Whether ``backend="auto"`` uses an up-to-date ONNX export on the CPU. bench/infer_speed.py measured
#: ONNX Runtime clearly faster than PyTorch on the CPU (single images and batches, at equal threads and
#: more so when PyTorch's OpenMP threads share busy cores) with probabilities equal within the parity
#: tolerance, so "auto" uses a fresh export when one sits next to the checkpoint (figures:
#: docs/benchmarks.md, "ONNX Runtime vs PyTorch on the CPU"). It never exports one itself: ONNX stays
#: opt-in (one --export-onnx), and a stale export falls back to PyTorch with a warning.
AUTO_PREFERS_ONNX_ON_CPU = True

#: Images per ONNX Runtime ``session.run`` call. A batch is fed to the session this many images at a time
#: and the outputs joined: on the 2-core CPU, one intra-op thread, ONNX Runtime's DenseNet at 224 px ran
#: batch 8 at 0.6-0.9x the per-image speed of batch 1 (the activations of 8 images no longer fit the
#: caches; with 2 threads the two were even), and ``predict_many(8)`` had measured slower than one image
#: at a time. Feeding the rows one by one keeps everything else batched (preprocessing, calibration, the
#: out-of-scope scores, Grad-CAM) and the session at its best size; it was never the slower of the two.
#: Figures: docs/benchmarks.md ("ONNX Runtime and folder mode: batched against one at a time").
ONNX_RUN_BATCH = 1


class OnnxBackendError(CheckpointError):
    """The ONNX backend cannot be used: no file, onnxruntime missing, a file that does not fit the model."""


class StaleOnnxError(OnnxBackendError):
    """The ONNX file was exported from another version of the checkpoint."""


class OnnxRuntimeMissingError(OnnxBackendError):
    """onnxruntime (an optional dependency) is not installed."""


def onnx_path_for(checkpoint: str | os.PathLike) -> Path:
    """Where the ONNX export of ``checkpoint`` lives by default: same folder, ``.onnx`` suffix."""
    return Path(checkpoint).with_suffix(".onnx")


def export_command(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None) -> str:
    """The command line that (re-)exports ``checkpoint`` (quoted in error messages)."""
    command = f"python densenet121_xray_classifier.py --export-onnx {checkpoint}"
    if out is not None and Path(out) != onnx_path_for(checkpoint):
        command += f" --onnx-out {out}"
    return command


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def optional_module(name: str, message: str, error: type[OnnxBackendError] = OnnxBackendError):
    """Import the optional package ``name`` (onnx, onnxruntime); when it is not installed, raise
    ``error(message)`` with ``{exc}`` in ``message`` replaced by the ImportError."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise error(message.format(exc=exc)) from None


def _import_onnxruntime():
    return optional_module("onnxruntime", "The ONNX backend needs onnxruntime ({exc}); install it with "
                           "'pip install onnxruntime', or use backend='torch'.", OnnxRuntimeMissingError)


# --------------------------------------------------------------------------------------------------
# Graph layout (shared with mediscan.inference.onnx_export)
# --------------------------------------------------------------------------------------------------

def pooled_output_name(layer: str) -> str:
    """The graph output holding backbone stage ``layer``'s pooled, rectified features."""
    return f"pooled.{layer}"


def exported_taps(layers) -> tuple[str, ...]:
    """The stages that need outputs of their own: all but the final one (the map's mean gives that)."""
    return tuple(layer for layer in layers if layer != FINAL_LAYER)


# --------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------

def onnx_session(model: bytes | str, threads: int | None):
    """An ONNX Runtime session on the CPU for a file path or serialised model; ``threads``: intra-op threads
    (default: torch's thread count). One sequential executor: ``run`` may be called from many threads.

    Its intra-op threads sleep between operators instead of spinning: a spinning pool keeps every core
    busy between calls, taking them from the threads that decode the next files (folder mode, the API's
    request threads) and from other processes on a shared machine."""
    ort = _import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3          # errors only
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class _Head(nn.Module):
    def __init__(self, fc: nn.Linear):
        super().__init__()
        self.fc = fc


class OnnxClassifier(nn.Module):
    """An ONNX Runtime session behind the inference surface of :class:`mediscan.core.model.OrganClassifier`.

    * ``run(x)`` -> ``(logits, feature_map)``: one session call, CPU float32 tensors;
    * ``forward(x)`` -> logits (what :func:`mediscan.explain.faithfulness.faithfulness` calls);
    * ``features(x)`` -> the final feature map, already rectified (``grad_cam``'s fast path applies ReLU
      to it again, which changes nothing), and ``head.fc`` -> the checkpoint's Linear layer: together all
      the closed-form Grad-CAM fast path needs;
    * ``tapped_features(x, layers)`` -> the map and the pooled features of ``layers`` (out-of-scope check),
      from one session call, like :meth:`mediscan.core.model.OrganClassifier.tapped_features`.

    On the fast path, ``grad_cam`` computes the logits as ``head.fc(mean(map))`` from the one session call,
    exactly as it does for PyTorch; the graph's own ``logits`` output serves ``forward`` (faithfulness) and
    other consumers of the .onnx file. It has no state besides the session (thread-safe ``run``) and the
    read-only Linear layer, and is always in eval mode.
    """

    def __init__(self, session, fc: nn.Linear, path: Path, run_batch: int = ONNX_RUN_BATCH):
        super().__init__()
        if run_batch < 1:
            raise ValueError(f"run_batch must be >= 1, got {run_batch}")
        self.session = session
        self.head = _Head(fc)
        self.path = path
        self.run_batch = int(run_batch)
        self.eval()

    def train(self, mode: bool = True) -> "OnnxClassifier":
        if mode:
            raise RuntimeError("an ONNX Runtime model is inference-only")
        return super().train(False)

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feature_map = self._outputs(x, OUTPUT_NAMES)
        return logits, feature_map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[0]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[1]

    def tapped_features(self, x: torch.Tensor, layers=()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        taps = exported_taps(layers)
        feature_map, *outputs = self._outputs(x, [OUTPUT_NAMES[1], *(pooled_output_name(name) for name in taps)])
        pooled = dict(zip(taps, outputs))
        if FINAL_LAYER in layers:
            pooled[FINAL_LAYER] = feature_map.mean(dim=(2, 3))
        return feature_map, {name: pooled[name] for name in layers}

    def _outputs(self, x: torch.Tensor, names) -> list[torch.Tensor]:
        """The graph outputs ``names`` for ``x``, as CPU float32 tensors: one session call per
        :attr:`run_batch` rows (:data:`ONNX_RUN_BATCH`), joined along the batch."""
        array = x.detach().to("cpu", torch.float32).numpy()
        names = list(names)
        parts = [self.session.run(names, {INPUT_NAME: np.ascontiguousarray(array[start:start + self.run_batch])})
                 for start in range(0, max(len(array), 1), self.run_batch)]
        if len(parts) == 1:
            return [torch.from_numpy(value) for value in parts[0]]
        return [torch.from_numpy(np.concatenate(values)) for values in zip(*parts)]


def load_onnx_classifier(onnx_path: str | os.PathLike, checkpoint: str | os.PathLike, fc: nn.Linear,
                         input_size: int, *, threads: int | None = None, taps=()) -> OnnxClassifier:
    """Open ``onnx_path`` for the (already loaded) ``checkpoint`` whose head Linear layer is ``fc``;
    ``taps``: the backbone stages whose pooled features the caller will ask for (the OOD detector's).

    Raises :class:`OnnxBackendError` when the file is missing (naming the export command), onnxruntime
    is not installed, or the graph does not fit; :class:`StaleOnnxError` when it was exported from
    another checkpoint file. ``threads``: ONNX Runtime intra-op threads (default: torch's thread count).
    """
    onnx_path, checkpoint = Path(onnx_path), Path(checkpoint)
    if not onnx_path.is_file():
        raise OnnxBackendError(f"No ONNX export of {checkpoint} at {onnx_path}. Create it with\n"
                               f"    {export_command(checkpoint, onnx_path)}\n"
                               f"or use backend='torch' (--backend torch).")
    try:
        session = onnx_session(str(onnx_path), threads)
    except OnnxBackendError:
        raise
    except Exception as exc:  # noqa: BLE001 -- onnxruntime raises its own exception types
        raise OnnxBackendError(f"{onnx_path} is not a usable ONNX model ({type(exc).__name__}: "
                               f"{str(exc)[:300]}); re-export it with\n    "
                               f"{export_command(checkpoint, onnx_path)}") from None
    _check_bound(session, onnx_path, checkpoint)
    _check_graph(session, onnx_path, checkpoint, fc.out_features, input_size, taps)
    return OnnxClassifier(session, fc, onnx_path)


def _check_bound(session, onnx_path: Path, checkpoint: Path) -> None:
    """Refuse a file that is not a MediScan export, or one exported from another version of ``checkpoint``."""
    props = session.get_modelmeta().custom_metadata_map
    if props.get(META_FORMAT) != FORMAT:
        raise OnnxBackendError(f"{onnx_path} is not a MediScan ONNX export (no '{FORMAT}' metadata); "
                               f"re-export it with\n    {export_command(checkpoint, onnx_path)}")
    expected = props.get(META_SHA256)
    actual = file_sha256(checkpoint)
    if expected != actual:
        raise StaleOnnxError(
            f"{onnx_path} is stale: it was exported from a checkpoint with sha256 {str(expected)[:12]}..., "
            f"but {checkpoint} now has sha256 {actual[:12]}... (retrained or replaced). Re-export it with\n"
            f"    {export_command(checkpoint, onnx_path)}")


def _check_graph(session, onnx_path: Path, checkpoint: Path, n_classes: int, input_size: int, taps) -> None:
    """Refuse a graph whose inputs and outputs do not fit the checkpoint (size, classes, pooled taps)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    output_names = [o.name for o in outputs]
    names_ok = [i.name for i in inputs] == [INPUT_NAME] and output_names[:2] == list(OUTPUT_NAMES)
    missing = [name for name in exported_taps(taps) if pooled_output_name(name) not in output_names]
    if names_ok and missing:
        raise OnnxBackendError(f"{onnx_path} has no output for the pooled {', '.join(missing)} features that the "
                               f"checkpoint's out-of-scope check reads (exported by an older MediScan); "
                               f"re-export it with\n    {export_command(checkpoint, onnx_path)}")
    if not names_ok or list(inputs[0].shape[1:]) != [1, input_size, input_size] \
            or outputs[0].shape[1] != n_classes:
        raise OnnxBackendError(f"{onnx_path} does not fit {checkpoint} (inputs "
                               f"{[(i.name, i.shape) for i in inputs]}, outputs "
                               f"{[(o.name, o.shape) for o in outputs]}); re-export it with\n"
                               f"    {export_command(checkpoint, onnx_path)}")


def backend_device(backend: str, device: str | torch.device | None) -> torch.device:
    """Check ``backend`` and choose the device it runs on, before anything is loaded: the CPU for ``"onnx"``
    (also when ``device`` is None); otherwise :func:`~mediscan.core.runtime.select_device` -- ``device``
    as given, ``None`` = CUDA when available, else the CPU (never MPS unasked: the Predictor has not been
    checked there)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "onnx":
        device = torch.device(device if device is not None else "cpu")
        if device.type != "cpu":
            raise ValueError(f"the ONNX backend runs on the CPU; got device {device} (pass device='cpu')")
        return device
    return select_device(device, mps=False)


def select_backend(requested: str, checkpoint: Path, device: torch.device, model: nn.Module,
                   input_size: int, onnx_path: str | os.PathLike | None = None,
                   taps=()) -> tuple[str, nn.Module]:
    """The Predictor's choice: ``(backend name, the module to run)`` for ``backend=requested``; ``taps``
    as for :func:`load_onnx_classifier`.

    ``"torch"``: ``model``. ``"onnx"``: the ONNX file (``onnx_path`` or next to the checkpoint) on the CPU,
    or an :class:`OnnxBackendError` saying why not. ``"auto"``: ONNX only on the CPU, when
    :data:`AUTO_PREFERS_ONNX_ON_CPU`, the file exists, onnxruntime imports and the file matches the
    checkpoint -- else PyTorch (a stale or broken file also gives a warning).
    """
    backend_device(requested, device)
    path = Path(onnx_path).expanduser() if onnx_path else onnx_path_for(checkpoint)
    if requested == "onnx":
        return "onnx", load_onnx_classifier(path, checkpoint, model.head.fc, input_size, taps=taps)
    if requested == "torch" or device.type != "cpu" or not AUTO_PREFERS_ONNX_ON_CPU or not path.is_file():
        return "torch", model
    try:
        return "onnx", load_onnx_classifier(path, checkpoint, model.head.fc, input_size, taps=taps)
    except OnnxRuntimeMissingError:                  # an optional extra that is simply not installed
        return "torch", model
    except OnnxBackendError as exc:
        warnings.warn(f"using the PyTorch backend: {exc}", RuntimeWarning, stacklevel=3)
        return "torch", model

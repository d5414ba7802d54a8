"""Optional ONNX Runtime CPU backend for :class:`mediscan.predictor.Predictor`.

Export once, next to the checkpoint (``models/best.onnx`` for ``models/best.safetensors``)::

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
:class:`OnnxClassifier` exposes the map as ``.features`` and the checkpoint's own ``head.fc``: the
functions of :mod:`grad_cam` (``grad_cam`` fast path, ``faithfulness``) run on it unchanged, and the
maps are computed by exactly the same code as on the PyTorch backend.

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
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mediscan.core.checkpoint import CheckpointError, atomic_write_bytes, load_checkpoint
from mediscan.core.ood import FINAL_LAYER, OODDetector

__all__ = ["BACKENDS", "AUTO_PREFERS_ONNX_ON_CPU", "INPUT_NAME", "OUTPUT_NAMES", "OPSET", "pooled_output_name",
           "OnnxBackendError", "StaleOnnxError", "OnnxRuntimeMissingError", "OnnxExport", "OnnxClassifier",
           "onnx_path_for", "export_command", "file_sha256", "export_onnx", "load_onnx_classifier",
           "backend_device", "select_backend"]

BACKENDS = ("auto", "torch", "onnx")
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "feature_map")        # always the first two outputs; pooled.<layer> may follow
OPSET = 17
#: metadata_props keys written by :func:`export_onnx`.
META_FORMAT, META_SHA256, META_CHECKPOINT_META, META_CHECKPOINT_NAME = (
    "mediscan.format", "mediscan.checkpoint_sha256", "mediscan.checkpoint_meta", "mediscan.checkpoint_name")
FORMAT = "mediscan-onnx/1"
#: Largest max |probability difference| against PyTorch that :func:`export_onnx` accepts.
PARITY_TOLERANCE = 1e-4

#: Whether ``backend="auto"`` uses an up-to-date ONNX export on the CPU. Measured with bench/infer_speed.py
#: (random-init 224 px model with unsaturated probabilities, 512 px PNG files, torch 2.14.1 vs onnxruntime
#: 1.32.0, same process, calls interleaved) on the shared 2-core development machine:
#:   --threads 1, load average 3.2-3.9: batch-1 predict+heatmap (explain) p50 239.7 -> 126.7 ms (1.89x),
#:     p95 271.6 -> 142.3 ms (1.91x); predict 2.10x; explain + faithfulness 1.63x; batched predict_many(16)
#:     2.96 -> 7.78 images/s (2.63x);
#:   torch's default 2 threads, load average 3.8-3.9: explain p50 4598 -> 282 ms (16x; PyTorch's OpenMP
#:     threads stall when the 2 cores are shared), batched 1.93 -> 5.47 images/s (2.84x);
#:   parity: max |probability difference| 1.8e-7 (tolerance 1e-4), heatmaps 1.4e-6, same class and verdict
#:     on every image.
#: ONNX Runtime is clearly faster (>= 1.2x, here ~1.9x even at equal threads) and parity holds, so "auto"
#: uses it when a fresh export sits next to the checkpoint. It never exports one itself: ONNX stays opt-in
#: (one --export-onnx), and a stale export falls back to PyTorch with a warning.
AUTO_PREFERS_ONNX_ON_CPU = True


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


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise OnnxRuntimeMissingError(f"The ONNX backend needs onnxruntime ({exc}); install it with "
                               f"'pip install onnxruntime', or use backend='torch'.") from None
    return onnxruntime


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------

def pooled_output_name(layer: str) -> str:
    """The graph output holding backbone stage ``layer``'s pooled, rectified features."""
    return f"pooled.{layer}"


def _exported_taps(layers) -> tuple[str, ...]:
    """The stages that need outputs of their own: all but the final one (the map's mean gives that)."""
    return tuple(layer for layer in layers if layer != FINAL_LAYER)


class _ExportGraph(nn.Module):
    """What is exported: the classifier with its final feature map (and pooled earlier stages) as outputs."""

    def __init__(self, model: nn.Module, taps: tuple[str, ...] = ()):
        super().__init__()
        self.model = model
        self.taps = taps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        final, pooled_taps = self.model.tapped_features(x, self.taps)
        feature_map = self.model.head.relu(final)
        pooled = F.adaptive_avg_pool2d(feature_map, 1).flatten(1)
        # dropout is the identity in eval mode
        return (self.model.head.fc(pooled), feature_map, *(pooled_taps[name] for name in self.taps))


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote: the file, the checkpoint hash it is bound to, the parity it measured."""

    path: Path
    checkpoint_sha256: str
    max_probability_difference: float
    max_logit_difference: float


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None, *,
                opset: int = OPSET, verify: bool = True) -> OnnxExport:
    """Export ``checkpoint`` to ONNX (default: next to it, ``.onnx`` suffix), atomically.

    With ``verify`` (default) the exported graph is run in ONNX Runtime on a few seeded inputs and
    compared with PyTorch; a max probability difference of :data:`PARITY_TOLERANCE` or more raises
    :class:`OnnxBackendError` and nothing is written.
    Raises :class:`CheckpointError` for a checkpoint that cannot be loaded.
    """
    checkpoint = Path(checkpoint)
    out = Path(out) if out is not None else onnx_path_for(checkpoint)
    if out.resolve() == checkpoint.resolve():
        raise ValueError(f"the ONNX output {out} would overwrite the checkpoint")
    try:
        import onnx
    except ImportError as exc:
        raise OnnxBackendError(f"Exporting needs the onnx package ({exc}); install it with "
                               f"'pip install onnx onnxruntime'.") from None
    sha_before = file_sha256(checkpoint) if checkpoint.is_file() else None
    loaded = load_checkpoint(checkpoint, "cpu")     # CheckpointError for missing / corrupt files
    raw_meta = _raw_checkpoint_meta(checkpoint)
    if file_sha256(checkpoint) != sha_before:
        raise CheckpointError(f"{checkpoint} changed while it was being exported; run the export again.")

    detector = OODDetector.from_checkpoint(loaded.extra, loaded.meta)
    taps = _exported_taps(detector.layer_names if detector is not None else ())
    output_names = [*OUTPUT_NAMES, *(pooled_output_name(name) for name in taps)]
    graph = _ExportGraph(loaded.model.eval(), taps).eval()
    size = loaded.preprocessing.input_size
    generator = torch.Generator().manual_seed(0)
    # Batch 2 so that nothing in the trace specialises to a batch of one; the batch axis is dynamic.
    example = (torch.rand(2, 1, size, size, generator=generator) * 2 - 1) * 1024
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch >= 2.9 defaults to the torch.export-based exporter, which needs onnxscript (not a
        # MediScan dependency); the TorchScript exporter handles this plain CNN and warns that it is
        # deprecated. When torch drops it, switch to dynamo=True and add onnxscript.
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), buffer, input_names=[INPUT_NAME], output_names=output_names,
                          dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *output_names)},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
    proto.doc_string = (f"MediScan organ classifier exported from {checkpoint.name}: input 'image' "
                        f"(B, 1, {size}, {size}) in [-1024, 1024]; outputs 'logits', 'feature_map' "
                        f"(post-ReLU final map, for Grad-CAM)"
                        + "".join(f", '{pooled_output_name(name)}'" for name in taps)
                        + (" (pooled features for the out-of-scope check)" if taps else "")
                        + ". Not a medical device.")
    for key, value in {META_FORMAT: FORMAT, META_SHA256: sha_before, META_CHECKPOINT_META: raw_meta,
                       META_CHECKPOINT_NAME: checkpoint.name}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    payload = proto.SerializeToString()

    prob_diff = logit_diff = float("nan")
    if verify:
        prob_diff, logit_diff = _parity(payload, graph, size, loaded.temperature)
        if not prob_diff < PARITY_TOLERANCE:
            raise OnnxBackendError(
                f"The ONNX export of {checkpoint} does not match PyTorch: max probability difference "
                f"{prob_diff:.2e} (tolerance {PARITY_TOLERANCE:.0e}); nothing was written.")
    atomic_write_bytes(out, payload)
    return OnnxExport(out, sha_before, prob_diff, logit_diff)


def _raw_checkpoint_meta(checkpoint: Path) -> str:
    """The checkpoint's metadata JSON string exactly as stored in its safetensors header."""
    from safetensors import safe_open
    with safe_open(str(checkpoint), framework="pt") as handle:
        return (handle.metadata() or {})["meta"]


def _parity(payload: bytes, graph: nn.Module, size: int, temperature: float) -> tuple[float, float]:
    """Max |probability| and |logit| differences, ONNX Runtime vs PyTorch, on seeded inputs of batch 1 and 3."""
    session = _session(payload, threads=None)
    generator = torch.Generator().manual_seed(1)
    prob_diff = logit_diff = 0.0
    for batch in (1, 3):
        x = (torch.rand(batch, 1, size, size, generator=generator) * 2 - 1) * 1024
        with torch.no_grad():
            reference = graph(x)[0]
        logits = torch.from_numpy(session.run([OUTPUT_NAMES[0]], {INPUT_NAME: x.numpy()})[0])
        logit_diff = max(logit_diff, float((logits - reference).abs().max()))
        probs = torch.softmax(logits / temperature, 1) - torch.softmax(reference / temperature, 1)
        prob_diff = max(prob_diff, float(probs.abs().max()))
    return prob_diff, logit_diff


# --------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------

def _session(model: bytes | str, threads: int | None):
    ort = _import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3          # errors only
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class _Head(nn.Module):
    def __init__(self, fc: nn.Linear):
        super().__init__()
        self.fc = fc


class OnnxClassifier(nn.Module):
    """An ONNX Runtime session behind the inference surface of :class:`mediscan.model.OrganClassifier`.

    * ``run(x)`` -> ``(logits, feature_map)``: one session call, CPU float32 tensors;
    * ``forward(x)`` -> logits (what :func:`grad_cam.faithfulness` calls);
    * ``features(x)`` -> the final feature map, already rectified (``grad_cam``'s fast path applies ReLU
      to it again, which changes nothing), and ``head.fc`` -> the checkpoint's Linear layer: together all
      the closed-form Grad-CAM fast path needs;
    * ``tapped_features(x, layers)`` -> the map and the pooled features of ``layers`` (out-of-scope check),
      from one session call, like :meth:`mediscan.model.OrganClassifier.tapped_features`.

    On the fast path, ``grad_cam`` computes the logits as ``head.fc(mean(map))`` from the one session call,
    exactly as it does for PyTorch; the graph's own ``logits`` output serves ``forward`` (faithfulness) and
    other consumers of the .onnx file. It has no state besides the session (thread-safe ``run``) and the
    read-only Linear layer, and is always in eval mode.
    """

    def __init__(self, session, fc: nn.Linear, path: Path):
        super().__init__()
        self.session = session
        self.head = _Head(fc)
        self.path = path
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
        taps = _exported_taps(layers)
        feature_map, *outputs = self._outputs(x, [OUTPUT_NAMES[1], *(pooled_output_name(name) for name in taps)])
        pooled = dict(zip(taps, outputs))
        if FINAL_LAYER in layers:
            pooled[FINAL_LAYER] = feature_map.mean(dim=(2, 3))
        return feature_map, {name: pooled[name] for name in layers}

    def _outputs(self, x: torch.Tensor, names) -> list[torch.Tensor]:
        """One session call: the graph outputs ``names`` for ``x``, as CPU float32 tensors."""
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return [torch.from_numpy(value) for value in self.session.run(list(names), {INPUT_NAME: array})]


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
        session = _session(str(onnx_path), threads)
    except OnnxBackendError:
        raise
    except Exception as exc:  # noqa: BLE001 -- onnxruntime raises its own exception types
        raise OnnxBackendError(f"{onnx_path} is not a usable ONNX model ({type(exc).__name__}: "
                               f"{str(exc)[:300]}); re-export it with\n    "
                               f"{export_command(checkpoint, onnx_path)}") from None
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
    inputs, outputs = session.get_inputs(), session.get_outputs()
    output_names = [o.name for o in outputs]
    names_ok = [i.name for i in inputs] == [INPUT_NAME] and output_names[:2] == list(OUTPUT_NAMES)
    missing = [name for name in _exported_taps(taps) if pooled_output_name(name) not in output_names]
    if names_ok and missing:
        raise OnnxBackendError(f"{onnx_path} has no output for the pooled {', '.join(missing)} features that the "
                               f"checkpoint's out-of-scope check reads (exported by an older MediScan); "
                               f"re-export it with\n    {export_command(checkpoint, onnx_path)}")
    if not names_ok or list(inputs[0].shape[1:]) != [1, input_size, input_size] \
            or outputs[0].shape[1] != fc.out_features:
        raise OnnxBackendError(f"{onnx_path} does not fit {checkpoint} (inputs "
                               f"{[(i.name, i.shape) for i in inputs]}, outputs "
                               f"{[(o.name, o.shape) for o in outputs]}); re-export it with\n"
                               f"    {export_command(checkpoint, onnx_path)}")
    return OnnxClassifier(session, fc, onnx_path)


def backend_device(backend: str, device: str | torch.device | None) -> torch.device | None:
    """Check ``backend`` and the device it runs on, before anything is loaded: the CPU for ``"onnx"``
    (also when ``device`` is None), ``device`` as given otherwise (``None``: the caller's default)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "onnx":
        device = torch.device(device if device is not None else "cpu")
        if device.type != "cpu":
            raise ValueError(f"the ONNX backend runs on the CPU; got device {device} (pass device='cpu')")
    return torch.device(device) if device is not None else None


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

"""Export a checkpoint to ONNX for :mod:`mediscan.inference.onnx_backend`, and prove the export matches PyTorch.

Run it once per checkpoint::

    python densenet121_xray_classifier.py --export-onnx models/best.safetensors [--onnx-out PATH]

The graph's inputs, outputs and metadata are described in :mod:`mediscan.inference.onnx_backend`, which
reads them. Before anything is written, the exported graph runs in ONNX Runtime on seeded inputs and its
probabilities are compared with PyTorch's (:data:`PARITY_TOLERANCE`): a file that disagrees is never
written, so the backend can trust any export it finds.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mediscan.core.checkpoint import CheckpointError, atomic_write_bytes, load_checkpoint
from mediscan.core.ood import OODDetector
from mediscan.inference.onnx_backend import (
    FORMAT, INPUT_NAME, META_CHECKPOINT_META, META_CHECKPOINT_NAME, META_FORMAT, META_SHA256, OPSET, OUTPUT_NAMES,
    OnnxBackendError, exported_taps, file_sha256, onnx_path_for, onnx_session, optional_module, pooled_output_name,
)

__all__ = ["PARITY_TOLERANCE", "OnnxExport", "export_onnx"]

#: Largest max |probability difference| against PyTorch that :func:`export_onnx` accepts.
PARITY_TOLERANCE = 1e-4


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
    onnx = optional_module("onnx", "Exporting needs the onnx package ({exc}); install it with "
                           "'pip install onnx onnxruntime'.")
    sha_before = file_sha256(checkpoint) if checkpoint.is_file() else None
    loaded = load_checkpoint(checkpoint, "cpu")     # CheckpointError for missing / corrupt files
    raw_meta = _raw_checkpoint_meta(checkpoint)
    if file_sha256(checkpoint) != sha_before:
        raise CheckpointError(f"{checkpoint} changed while it was being exported; run the export again.")

    detector = OODDetector.from_checkpoint(loaded.extra, loaded.meta)
    taps = exported_taps(detector.layer_names if detector is not None else ())
    graph = _ExportGraph(loaded.model.eval(), taps).eval()
    size = loaded.preprocessing.input_size
    proto = onnx.load_from_string(_trace(graph, size, taps, opset))
    proto.doc_string = _doc_string(checkpoint.name, size, taps)
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


def _trace(graph: nn.Module, size: int, taps: tuple[str, ...], opset: int) -> bytes:
    """The serialised ONNX model of ``graph`` for ``(B, 1, size, size)`` inputs, batch axis dynamic."""
    output_names = [*OUTPUT_NAMES, *(pooled_output_name(name) for name in taps)]
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
    return buffer.getvalue()


def _doc_string(checkpoint_name: str, size: int, taps: tuple[str, ...]) -> str:
    """The model's ``doc_string``: what goes in and out, for anyone who opens the file in another tool."""
    return (f"MediScan organ classifier exported from {checkpoint_name}: input 'image' "
            f"(B, 1, {size}, {size}) in [-1024, 1024]; outputs 'logits', 'feature_map' "
            f"(post-ReLU final map, for Grad-CAM)"
            + "".join(f", '{pooled_output_name(name)}'" for name in taps)
            + (" (pooled features for the out-of-scope check)" if taps else "")
            + ". Not a medical device.")


def _raw_checkpoint_meta(checkpoint: Path) -> str:
    """The checkpoint's metadata JSON string exactly as stored in its safetensors header."""
    from safetensors import safe_open
    with safe_open(str(checkpoint), framework="pt") as handle:
        return (handle.metadata() or {})["meta"]


def _parity(payload: bytes, graph: nn.Module, size: int, temperature: float) -> tuple[float, float]:
    """Max |probability| and |logit| differences, ONNX Runtime vs PyTorch, on seeded inputs of batch 1 and 3."""
    session = onnx_session(payload, threads=None)
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

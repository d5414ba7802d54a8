"""The one inference path: load a checkpoint once, then predict and explain images.

The CLI (``test_single_image.py``), the Streamlit dashboard and the Flask API all go through
:class:`Predictor`, so decoding, preprocessing, calibration, the out-of-scope check and the
Grad-CAM heatmap are identical everywhere. One image is a batch of one: :meth:`Predictor.predict` and
:meth:`Predictor.explain` run the same batched code as :meth:`Predictor.predict_many` and
:meth:`Predictor.explain_many`.

Usage::

    from mediscan.inference.predictor import Predictor
    predictor = Predictor()                    # $MEDISCAN_MODEL, else models/best.safetensors
    p = predictor.predict("chest.png")         # Prediction: probabilities, verdict, timings
    e = predictor.explain("chest.png")         # Explanation: + heatmap on the original image
    png = e.overlay_png()                      # heatmap over the image, as PNG bytes

Thread safety: one :class:`Predictor` may serve many threads at once. The model is loaded once,
put in eval mode and never modified afterwards; every call works on its own tensors and keeps no
state on the model or on the predictor (no hooks left registered, no "last result" attribute).
Grad-CAM runs on its closed-form fast path, which needs no hooks and no backward pass.

Backends: the network runs in PyTorch, or on the CPU in ONNX Runtime from an export next to the
checkpoint (``backend="onnx"``; ``"auto"`` picks it when that is faster and the file is up to date,
see :mod:`mediscan.inference.onnx_backend`). Everything around the network is the same code for both.

Modality gate: a DICOM input whose Modality or SOP class is outside the checkpoint's ``meta["modalities"]``
(:mod:`mediscan.core.modality_gate`) is answered ``out_of_scope`` at :meth:`Predictor.prepare` time and never
enters a batch: its Prediction has ``top_class=None``, ``confidence=None`` and no probabilities. DICOM answers
carry the header summary and the header check (:mod:`mediscan.core.dicom_header`).

Verdicts (confident / uncertain / out_of_scope) come from :func:`mediscan.core.verdicts.verdict`; the
results are :mod:`mediscan.inference.results`, the checkpoint lookup :mod:`mediscan.inference.checkpoint_path`
and the "about" facts :mod:`mediscan.inference.model_card`.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
import torch

from mediscan.core.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint
from mediscan.core.decoded import header_only
from mediscan.core.dicom_header import HeaderMapping, header_check
from mediscan.core.imaging import DEFAULT_MAX_PIXELS, DecodedImage, ImageReadError, read_image
from mediscan.core.modality_gate import checkpoint_modalities, gate_unreadable, modality_gate
from mediscan.core.ood import OODDetector
from mediscan.core.preprocessing import CropGeometry, preprocess
from mediscan.core.verdicts import DEFAULT_UNCERTAIN_BELOW, VERDICTS, verdict
from mediscan.inference.checkpoint_path import (
    DEFAULT_CHECKPOINT, ENV_CHECKPOINT, TRAIN_COMMAND, ModelNotFoundError, resolve_checkpoint_path,
)
from mediscan.inference.model_card import model_card
from mediscan.inference.onnx_backend import backend_device, select_backend
from mediscan.inference.results import Explanation, Prediction

# The names other modules have always imported from here stay importable from here.
__all__ = [
    "DEFAULT_CHECKPOINT", "ENV_CHECKPOINT", "TRAIN_COMMAND", "VERDICTS",
    "ModelNotFoundError", "UnknownClassError", "Prediction", "Explanation", "Predictor",
    "resolve_checkpoint_path",
]

#: Images per forward pass in predict_many / explain_many when the caller does not say. On the CPU,
#: DenseNet's activations for 16 images at 224 px no longer fit the caches and batch 8 was the fastest
#: (bench/infer_speed.py; docs/benchmarks.md, "Batch size on the CPU"). GPUs keep 16.
CPU_BATCH_SIZE, GPU_BATCH_SIZE = 8, 16

ImageInput = Any  # str | os.PathLike | bytes | binary file-like | DecodedImage


class UnknownClassError(ValueError):
    """A class name that the loaded model does not know; the message lists the valid ones."""


_NO_PIXELS = np.zeros((0, 0), np.float32)
_NO_PIXELS.setflags(write=False)        # shared by every item that dropped its pixels: never written


class PreparedImage(NamedTuple):
    """One decoded, preprocessed image waiting for the model (:meth:`Predictor.prepare`); callers that
    decode in worker threads, like the archive runner, hand batches of them to :meth:`Predictor.run_prepared`."""

    decoded: DecodedImage
    tensor: torch.Tensor | None   # (1, S, S) model input (None when the modality gate stopped the input)
    geometry: CropGeometry | None # where that square came from in the decoded image
    timings: dict[str, float]     # decode and preprocess milliseconds
    stop: str | None = None       # the modality gate's sentence: this input never reaches the network

    def without_pixels(self) -> PreparedImage:
        """This item with the decoded image's pixels dropped, for a prediction without a heatmap.

        A prediction needs only the model input and the decoded image's metadata (source, colour, warnings,
        DICOM header); the full-size pixels of a large upload are hundreds of MB (a 7.8 kB PNG can decode
        to 64 megapixels x 4 bytes), so callers that queue items before the forward pass drop them."""
        return self._replace(decoded=dataclasses.replace(self.decoded, pixels=_NO_PIXELS))


@dataclass(frozen=True)
class _Forward:
    """What one batched forward pass gave: a prediction per row, the input batch and the CAM result."""

    predictions: list[Prediction]
    batch: torch.Tensor
    cam: Any                      # grad_cam.CamResult: logits, maps, class_indices


class Predictor:
    """Load a checkpoint once; predict and explain images from any thread.

    Args:
        checkpoint: path to a ``.safetensors`` checkpoint (or a folder holding ``best.safetensors``);
            ``None`` = ``$MEDISCAN_MODEL``, else ``models/best.safetensors``.
        device: ``"cpu"``, ``"cuda"`` ...; ``None`` = CUDA when available, else CPU (always CPU for
            ``backend="onnx"``).
        max_pixels: larger images are refused before decoding (decompression-bomb guard).
        uncertain_below: calibrated confidence under which the verdict is ``uncertain``.
        backend: ``"torch"``, ``"onnx"`` (ONNX Runtime on the CPU; needs the export, see
            :mod:`mediscan.inference.onnx_backend`) or ``"auto"`` (ONNX on the CPU when an up-to-date export exists
            and ONNX Runtime is the faster one, else PyTorch).
        onnx_path: the ONNX file (default: next to the checkpoint, ``best.onnx`` for ``best.safetensors``).
        header_mapping: the header-check table (:class:`~mediscan.core.dicom_header.HeaderMapping`, e.g. from
            ``--header-map FILE``); ``None`` = the default table, or the file ``$MEDISCAN_HEADER_MAP`` names.

    Raises :class:`ModelNotFoundError` when there is no checkpoint file, :class:`CheckpointError`
    when it cannot be used (:class:`~mediscan.inference.onnx_backend.OnnxBackendError`, a subclass, when
    ``backend="onnx"`` cannot be: no export, a stale one, no onnxruntime).

    Attributes: ``checkpoint_path``, ``classes`` (tuple), ``meta`` (the checkpoint's metadata),
    ``input_size``, ``temperature``, ``device``, ``ood`` (:class:`OODDetector` or ``None``), ``modalities``
    (the DICOM modalities the model was trained on: ``meta["modalities"]`` or the documented default),
    ``max_pixels``, ``uncertain_below``, ``batch_size`` (default of the batched calls), ``backend``
    (``"torch"`` or ``"onnx"``: the one in use),
    ``net`` (what runs: ``model`` itself, or an :class:`~mediscan.inference.onnx_backend.OnnxClassifier`).
    """

    def __init__(self, checkpoint: str | os.PathLike | None = None, device: str | torch.device | None = None,
                 *, max_pixels: int = DEFAULT_MAX_PIXELS, uncertain_below: float = DEFAULT_UNCERTAIN_BELOW,
                 backend: str = "auto", onnx_path: str | os.PathLike | None = None,
                 header_mapping: HeaderMapping | None = None):
        if not 0.0 <= uncertain_below <= 1.0:
            raise ValueError(f"uncertain_below must be in [0, 1], got {uncertain_below}")
        self.checkpoint_path = resolve_checkpoint_path(checkpoint)
        self.device = backend_device(backend, device)
        loaded = load_checkpoint(self.checkpoint_path, self.device)
        self.model = loaded.model.eval()
        for parameter in self.model.parameters():   # read-only: inference never needs gradients
            parameter.requires_grad_(False)
        self.meta: dict = loaded.meta
        self.classes: tuple[str, ...] = tuple(loaded.classes)
        self.input_size: int = loaded.preprocessing.input_size
        self.temperature: float = _valid_temperature(loaded.temperature)
        self.ood: OODDetector | None = _detector(loaded, self.checkpoint_path)
        self.modalities: tuple[str, ...] = _modalities(self.meta, self.checkpoint_path)
        self.header_mapping = header_mapping
        self.max_pixels = int(max_pixels)
        self.uncertain_below = float(uncertain_below)
        self.batch_size = CPU_BATCH_SIZE if self.device.type == "cpu" else GPU_BATCH_SIZE
        self.backend, self.net = select_backend(backend, self.checkpoint_path, self.device, self.model,
                                                self.input_size, onnx_path, taps=self._ood_layers)

    def __repr__(self) -> str:
        return (f"Predictor({str(self.checkpoint_path)!r}, classes={list(self.classes)}, "
                f"device={str(self.device)!r}, backend={self.backend!r}, ood={'yes' if self.ood else 'no'})")

    def model_card(self) -> dict:
        """JSON-ready facts about the loaded model (:func:`mediscan.inference.model_card.model_card`)."""
        return model_card(self)

    # ---------------------------------------------------------------------------------- public calls

    def predict(self, image: ImageInput, *, name: str | None = None) -> Prediction:
        """Classify one image (path, bytes, binary file-like or :class:`DecodedImage`).

        ``name`` labels bytes / file-like input (e.g. the upload's file name).
        Raises :class:`ImageReadError` (with a user-facing message) when the input cannot be decoded.
        """
        return self.run_prepared([self.prepare(image, name)])[0]

    def explain(self, image: ImageInput, class_name: str | None = None, *, name: str | None = None,
                method: str = "gradcam", faithfulness: bool = True) -> Explanation:
        """Predict and compute the heatmap for ``class_name`` (``None`` = the predicted class).

        One forward pass gives both the prediction and the map. ``faithfulness=True`` adds one more
        batched forward pass (hottest / random 20 % of the input hidden); interactive callers that
        only draw the overlay can pass ``False``.
        Raises :class:`ImageReadError` for bad input, :class:`UnknownClassError` for an unknown class.
        """
        target = None if class_name is None else self.class_index(class_name)
        item = self.prepare(image, name)
        if item.stop is not None:                  # the modality gate: no network, so no map to explain
            return self._stopped_explanation(item, method)
        run = self._forward([item], None if target is None else [target], method)
        explanation = self._explanation(run, 0, item, method)
        if faithfulness:
            explanation = dataclasses.replace(explanation, faithfulness=self._faithfulness(run))
        return explanation

    def predict_many(self, images: Iterable[ImageInput], *, batch_size: int | None = None,
                     names: Sequence[str | None] | None = None, progress=None) -> list[Prediction | ImageReadError]:
        """Classify many images with batched forward passes (folder mode, API batch endpoint),
        ``batch_size`` at a time (default :attr:`batch_size`: 8 on the CPU, 16 on a GPU).

        Returns one item per input, in order: a :class:`Prediction`, or the :class:`ImageReadError`
        for an input that could not be decoded (so one bad file never stops a batch).
        ``progress`` (optional) is called with the number of images finished after each batch.
        """
        return self._run_many(images, batch_size, names, with_maps=False, progress=progress)

    def explain_many(self, images: Iterable[ImageInput], *, batch_size: int | None = None,
                     names: Sequence[str | None] | None = None, progress=None) -> list[Explanation | ImageReadError]:
        """Like :meth:`predict_many`, with each image's heatmap for its predicted class (no faithfulness)."""
        return self._run_many(images, batch_size, names, with_maps=True, progress=progress)

    def class_index(self, class_name: str) -> int:
        """Index of ``class_name`` in :attr:`classes`; :class:`UnknownClassError` lists the valid names."""
        try:
            return self.classes.index(class_name)
        except ValueError:
            raise UnknownClassError(f"Unknown class {class_name!r}; this model knows "
                                    f"{', '.join(self.classes)}.") from None

    # ---------------------------------------------------------------------------------- the pipeline

    def prepare(self, image: ImageInput, name: str | None = None) -> PreparedImage:
        """Decode + preprocess one input (raises :class:`ImageReadError` for one that cannot be decoded, unless
        its DICOM header alone puts it out of scope: a report or an undecodable ultrasound cine is answered
        ``out_of_scope`` like any input the modality gate stops).

        Thread-safe and model-free: run it in worker threads ahead of :meth:`run_prepared`."""
        t0 = time.perf_counter()
        try:
            if isinstance(image, DecodedImage):
                decoded = dataclasses.replace(image, source=name) if name else image
            else:
                decoded = read_image(image, name=name, max_pixels=self.max_pixels)
        except ImageReadError as exc:
            # A report, presentation state or ultrasound cine has no pixels this program can use, but its
            # header says it is out of scope: that is the answer, not "cannot read".
            stop = gate_unreadable(exc, self.modalities)
            if stop is None:
                raise
            return PreparedImage(header_only(exc), None, None, {"decode": _ms_since(t0), "preprocess": 0.0}, stop)
        decode_ms = _ms_since(t0)
        stop = modality_gate(decoded.dicom, self.modalities)
        if stop is not None:
            return PreparedImage(decoded, None, None, {"decode": decode_ms, "preprocess": 0.0}, stop)
        t0 = time.perf_counter()
        tensor, geometry = preprocess(decoded.pixels, self.input_size)
        return PreparedImage(decoded, tensor, geometry, {"decode": decode_ms, "preprocess": _ms_since(t0)})

    def _forward(self, items: Sequence[PreparedImage], targets: list[int] | None = None,
                 method: str = "gradcam") -> _Forward:
        """ONE batched forward pass over ``items``: logits and maps (for ``targets``, ``None`` = the
        predicted classes), calibrated probabilities, out-of-scope scores and each row's prediction."""
        t0 = time.perf_counter()
        batch = torch.stack([item.tensor for item in items]).to(self.device)
        cam, pooled = self._cam(batch, targets, method)
        probs, scores, flags = self._calibrate(cam.logits, pooled)
        share = _ms_since(t0) / len(items)   # each image's share of the batched forward pass
        predictions = [self._prediction(item, probs[row], None if scores is None else float(scores[row]),
                                        bool(flags[row]) if flags is not None else False, share)
                       for row, item in enumerate(items)]
        return _Forward(predictions, batch, cam)

    @property
    def _ood_layers(self) -> tuple[str, ...]:
        return self.ood.layer_names if self.ood is not None else ()

    def _cam(self, batch: torch.Tensor, targets: list[int] | None, method: str):
        """One forward pass: the Grad-CAM result (logits and maps, from grad_cam's closed-form fast path on
        the final feature map, for "gradcam" and "gradcam++" alike: no hooks, no backward, no state) and
        the pooled features of the layers the out-of-scope detector reads."""
        from grad_cam import grad_cam
        with torch.no_grad():
            feature_map, pooled = self.net.tapped_features(batch, self._ood_layers)
            cam = grad_cam(self.net, batch, targets, method=method, feature_map=feature_map)
        return cam, pooled

    def _calibrate(self, logits: torch.Tensor, pooled: dict[str, torch.Tensor]):
        """Temperature-scaled probabilities, OOD scores and the detector's flags (``None`` without one)."""
        probs = torch.softmax(logits.detach().float() / self.temperature, dim=1).cpu()
        if self.ood is None:
            return probs, None, None
        scores = self.ood.score(pooled, logits)   # logits: for the energy part of OE-trained checkpoints
        return probs, scores, self.ood.flag(scores)   # the same rule as OODDetector.is_out_of_scope

    def _prediction(self, item: PreparedImage, probs: torch.Tensor, score: float | None, flagged: bool,
                    model_ms: float) -> Prediction:
        probabilities = {name: float(p) for name, p in zip(self.classes, probs.tolist())}
        top = int(torch.argmax(probs))
        confidence = float(probs[top])
        decoded = item.decoded
        decision = verdict(self.classes[top], confidence, uncertain_below=self.uncertain_below,
                           is_colour=decoded.is_colour, colourfulness=decoded.colourfulness,
                           has_detector=self.ood is not None, flagged=flagged, ood_score=score,
                           ood_threshold=None if self.ood is None else self.ood.threshold)
        timings = {**item.timings, "model": model_ms}
        timings["total"] = sum(timings.values())
        check = None if decoded.dicom is None else header_check(
            decoded.dicom, self.classes[top], self.classes, self.header_mapping).to_dict()
        return Prediction(decoded.source, self.classes, probabilities, self.classes[top], confidence,
                          decision.name, decision.reason, score, timings, tuple(decoded.warnings),
                          _header_dict(decoded), check)

    def _stopped(self, item: PreparedImage) -> Prediction:
        """The answer for an input the modality gate stopped: out of scope, no class, no probabilities."""
        timings = {**item.timings, "model": 0.0}
        timings["total"] = sum(timings.values())
        decoded = item.decoded
        return Prediction(decoded.source, self.classes, {}, None, None, "out_of_scope", item.stop, None, timings,
                          tuple(decoded.warnings), _header_dict(decoded), None)

    def _stopped_explanation(self, item: PreparedImage, method: str) -> Explanation:
        pixels = item.decoded.pixels
        return Explanation(self._stopped(item), None, method, pixels, np.zeros(pixels.shape, np.float32))

    def _explanation(self, run: _Forward, row: int, item: PreparedImage, method: str) -> Explanation:
        """Row ``row``'s prediction and its map, mapped back onto the decoded image (0 outside the crop)."""
        from grad_cam import cam_to_original
        explained = int(run.cam.class_indices[row])
        heatmap = cam_to_original(run.cam.cams[row].numpy(), item.geometry)
        return Explanation(run.predictions[row], self.classes[explained], method, item.decoded.pixels, heatmap)

    def _faithfulness(self, run: _Forward) -> dict[str, float]:
        """Faithfulness of the first row's map (:func:`mediscan.explain.faithfulness.faithfulness`)."""
        from mediscan.explain.faithfulness import faithfulness
        result = faithfulness(self.net, run.batch, run.cam.cams, [int(run.cam.class_indices[0])])
        return {name: float(values[0]) for name, values in result.items()}

    def run_prepared(self, items: Sequence[PreparedImage], *, with_maps: bool = False) -> list:
        """ONE batched forward pass over prepared images: a :class:`Prediction` (``with_maps``: an
        :class:`Explanation` of the predicted class) per item, in order. Items the modality gate stopped
        (``item.stop``) stay out of the batch and get their out-of-scope answer (all-zero map) directly."""
        runnable = [item for item in items if item.stop is None]
        run = self._forward(runnable) if runnable else None
        results, row = [], 0
        for item in items:
            if item.stop is not None:
                results.append(self._stopped_explanation(item, "gradcam") if with_maps else self._stopped(item))
                continue
            results.append(self._explanation(run, row, item, "gradcam") if with_maps else run.predictions[row])
            row += 1
        return results

    def _run_many(self, images: Iterable[ImageInput], batch_size: int | None, names, *, with_maps: bool,
                  progress=None) -> list:
        """Decode every input, then run the good ones through :meth:`run_prepared` ``batch_size`` at a time."""
        batch_size = self.batch_size if batch_size is None else batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        images = list(images)
        if names is not None and len(names) != len(images):
            raise ValueError(f"{len(names)} names for {len(images)} images")
        results: list = [None] * len(images)
        pending: list[tuple[int, PreparedImage]] = []

        def flush() -> None:
            outputs = self.run_prepared([item for _, item in pending], with_maps=with_maps)
            for (index, _), output in zip(pending, outputs):
                results[index] = output
            if progress is not None:
                progress(len(pending))
            pending.clear()

        for index, image in enumerate(images):
            try:
                item = self.prepare(image, None if names is None else names[index])
                # Without maps only the model input is needed: keep one full-size image alive, not a batch of
                # them (and no local name for the full item, or it lives on while the next image decodes).
                pending.append((index, item if with_maps else item.without_pixels()))
                del item
            except ImageReadError as error:
                results[index] = error
                if progress is not None:
                    progress(1)
                continue
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
        return results


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def _ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def _valid_temperature(value: float) -> float:
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise CheckpointError(f"checkpoint temperature must be a positive number, got {value}")
    return value


def _header_dict(decoded: DecodedImage) -> dict | None:
    return None if decoded.dicom is None else decoded.dicom.to_dict()


def _modalities(meta: dict, path: os.PathLike) -> tuple[str, ...]:
    try:
        return checkpoint_modalities(meta)
    except ValueError as exc:
        raise CheckpointError(f"{path} has damaged metadata: {exc}; retrain or restore the checkpoint.") from None


def _detector(loaded: LoadedCheckpoint, path: os.PathLike) -> OODDetector | None:
    """The checkpoint's out-of-scope detector (``None``: it has none); damaged statistics are a CheckpointError."""
    try:
        return OODDetector.from_checkpoint(loaded.extra, loaded.meta)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} has damaged out-of-scope statistics ({exc}); "
                              f"retrain or restore the checkpoint.") from None

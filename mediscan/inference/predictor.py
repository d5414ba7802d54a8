"""The one inference path: load a checkpoint once, then predict and explain images.

The CLI (``test_single_image.py``), the Streamlit dashboard and the Flask API all go through
:class:`Predictor`, so decoding, preprocessing, calibration, the out-of-scope check and the
Grad-CAM heatmap are identical everywhere.

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
see :mod:`mediscan.onnx_backend`). Everything around the network is the same code for both.

Verdicts (in this order):

* ``out_of_scope`` -- the file is a colour image (colourfulness above ``mediscan.imaging.COLOUR_LIMIT``:
  radiographs are grayscale), or the out-of-scope detector stored in the checkpoint says the image does not
  resemble the training images (a photo, a blank page, another kind of scan ...). Checkpoints without detector
  statistics apply only the colour check (:meth:`Predictor.model_card` says so).
* ``uncertain`` -- the temperature-calibrated confidence is below ``uncertain_below``.
* ``confident`` -- otherwise.
"""
from __future__ import annotations

import base64
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from mediscan import NOT_FOR_CLINICAL_USE, __version__
from mediscan.core.checkpoint import CheckpointError, load_checkpoint
from mediscan.core.imaging import COLOUR_LIMIT, DEFAULT_MAX_PIXELS, DecodedImage, ImageReadError, read_image
from mediscan.core.ood import OODDetector
from mediscan.core.preprocessing import CropGeometry, preprocess
from mediscan.inference.onnx_backend import backend_device, select_backend

__all__ = [
    "DEFAULT_CHECKPOINT", "ENV_CHECKPOINT", "TRAIN_COMMAND", "VERDICTS",
    "ModelNotFoundError", "UnknownClassError", "Prediction", "Explanation", "Predictor",
    "resolve_checkpoint_path",
]

DEFAULT_CHECKPOINT = Path("models/best.safetensors")
#: Environment variable naming the checkpoint when no path is passed.
ENV_CHECKPOINT = "MEDISCAN_MODEL"
#: The command that produces ``models/best.safetensors`` (quoted in "no model" messages).
TRAIN_COMMAND = "python densenet121_xray_classifier.py --data dataset --out models"
VERDICTS = ("confident", "uncertain", "out_of_scope")
DEFAULT_UNCERTAIN_BELOW = 0.6
#: Images per forward pass in predict_many / explain_many when the caller does not say. On the CPU,
#: DenseNet's activations for 16 images at 224 px no longer fit the caches: bench/infer_speed.py on the
#: 2-core development machine (1 thread, PyTorch) gave 8.1 images/s at batch 8 and 5.4 at batch 16,
#: against 6.4-8.4 one image at a time; ONNX Runtime was flat (11.6-12.8). GPUs keep 16.
CPU_BATCH_SIZE, GPU_BATCH_SIZE = 8, 16

ImageInput = Any  # str | os.PathLike | bytes | binary file-like | DecodedImage


class ModelNotFoundError(CheckpointError):
    """No checkpoint file where one was expected; the message names the path and the training command."""


class UnknownClassError(ValueError):
    """A class name that the loaded model does not know; the message lists the valid ones."""


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    """What the model says about one image.

    Attributes:
        source: the image's label (file path, upload name, or ``name=`` given by the caller).
        classes: class names in the model's output order.
        probabilities: ``{class: probability}``, temperature-calibrated, summing to 1.
        top_class: the most probable class (reported even when the verdict is not ``confident``).
        confidence: its probability.
        verdict: ``"confident"``, ``"uncertain"`` or ``"out_of_scope"``.
        verdict_reason: one plain-language sentence explaining the verdict.
        ood_score: out-of-scope score (the largest of the per-layer Mahalanobis distances, each relative
            to validation images; higher = stranger; above ``Predictor.ood.threshold`` is out of scope),
            ``None`` when the checkpoint has no out-of-scope statistics.
        timings_ms: ``decode``, ``preprocess``, ``model`` (forward + calibration + OOD) and ``total``
            milliseconds (in batched calls ``model`` is this image's share of the batch).
        warnings: non-fatal notes from decoding (multi-frame DICOM, ignored EXIF, ...).
    """

    source: str
    classes: tuple[str, ...]
    probabilities: dict[str, float]
    top_class: str
    confidence: float
    verdict: str
    verdict_reason: str
    ood_score: float | None
    timings_ms: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @property
    def is_out_of_scope(self) -> bool:
        return self.verdict == "out_of_scope"

    def to_dict(self) -> dict:
        """JSON-ready dict (plain str/float/list/None values only)."""
        return {
            "source": self.source,
            "classes": list(self.classes),
            "probabilities": {k: float(v) for k, v in self.probabilities.items()},
            "top_class": self.top_class,
            "confidence": float(self.confidence),
            "verdict": self.verdict,
            "verdict_reason": self.verdict_reason,
            "ood_score": None if self.ood_score is None else float(self.ood_score),
            "timings_ms": {k: round(float(v), 3) for k, v in self.timings_ms.items()},
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class Explanation:
    """A prediction plus the Grad-CAM heatmap for one class, mapped back onto the original image.

    Attributes:
        prediction: the :class:`Prediction` from the same forward pass.
        explained_class: the class the heatmap is for (the predicted one unless asked otherwise).
        method: the CAM method (``"gradcam"`` or ``"gradcam++"``).
        image: ``(H, W)`` float32 in [0, 1], the image as decoded (original size and orientation).
        heatmap: ``(H, W)`` float32 in [0, 1] on the same pixels; zero outside the square the model saw.
        faithfulness: ``prob`` (explained class), ``prob_top_removed``, ``prob_random_removed``,
            ``drop_top``, ``drop_random`` -- hiding the hottest 20 % of the input should hurt the
            prediction more than hiding a random 20 % if the map is faithful (plain softmax probabilities
            of the model, without temperature). Empty when not computed.
    """

    prediction: Prediction
    explained_class: str
    method: str
    image: np.ndarray
    heatmap: np.ndarray
    faithfulness: dict[str, float] = field(default_factory=dict)

    def overlay(self, alpha: float = 0.4, colormap: str = "jet") -> np.ndarray:
        """``(H, W, 3)`` RGB uint8: the heatmap blended over the image. Cheap: no model call."""
        from mediscan.explain.overlays import overlay
        return overlay(self.image, self.heatmap, alpha=alpha, colormap=colormap)

    def overlay_png(self, alpha: float = 0.4, colormap: str = "jet") -> bytes:
        """The overlay encoded as PNG bytes (for downloads and HTTP responses)."""
        from mediscan.explain.overlays import png_bytes
        return png_bytes(self.overlay(alpha, colormap))

    def heatmap_grid(self, size: int) -> list[list[float]]:
        """The heatmap averaged down to ``size`` x ``size`` cells (rounded), for compact JSON."""
        import cv2
        small = cv2.resize(np.asarray(self.heatmap, np.float32), (size, size), interpolation=cv2.INTER_AREA)
        return np.round(small, 4).tolist()

    def to_dict(self, include_overlay: bool = False, grid: int | None = None) -> dict:
        """JSON-ready dict: the prediction, explained class, method, faithfulness and image size.

        ``grid=N`` adds ``heatmap_grid`` (N x N floats in [0, 1]); ``include_overlay=True`` adds
        ``overlay_png_base64`` (the default overlay as a base64 PNG).
        """
        out = {
            "prediction": self.prediction.to_dict(),
            "explained_class": self.explained_class,
            "method": self.method,
            "faithfulness": {k: float(v) for k, v in self.faithfulness.items()},
            "image_size": {"height": int(self.image.shape[0]), "width": int(self.image.shape[1])},
        }
        if grid:
            out["heatmap_grid"] = self.heatmap_grid(int(grid))
        if include_overlay:
            out["overlay_png_base64"] = base64.b64encode(self.overlay_png()).decode("ascii")
        return out


# --------------------------------------------------------------------------------------------------
# Checkpoint location
# --------------------------------------------------------------------------------------------------

def resolve_checkpoint_path(path: str | os.PathLike | None = None) -> Path:
    """The checkpoint to load: ``path`` if given, else ``$MEDISCAN_MODEL``, else ``models/best.safetensors``.

    Raises :class:`ModelNotFoundError` (saying which path was tried, why, and how to train a model)
    when there is no file there.
    """
    if path:
        chosen, why = Path(path).expanduser(), "the path given"
    elif os.environ.get(ENV_CHECKPOINT):
        chosen, why = Path(os.environ[ENV_CHECKPOINT]).expanduser(), f"the path in ${ENV_CHECKPOINT}"
    else:
        chosen, why = DEFAULT_CHECKPOINT, "the default path"
    if chosen.is_dir():
        best = chosen / DEFAULT_CHECKPOINT.name
        if best.is_file():
            return best
    if not chosen.is_file():
        raise ModelNotFoundError(
            f"No trained model at {chosen} ({why}). Train one with\n"
            f"    {TRAIN_COMMAND}\n"
            f"which writes models/best.safetensors, or point to a checkpoint with --checkpoint PATH "
            f"or the {ENV_CHECKPOINT} environment variable.")
    return chosen


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------------
# Predictor
# --------------------------------------------------------------------------------------------------

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
            :mod:`mediscan.onnx_backend`) or ``"auto"`` (ONNX on the CPU when an up-to-date export exists
            and ONNX Runtime is the faster one, else PyTorch).
        onnx_path: the ONNX file (default: next to the checkpoint, ``best.onnx`` for ``best.safetensors``).

    Raises :class:`ModelNotFoundError` when there is no checkpoint file, :class:`CheckpointError`
    when it cannot be used (:class:`~mediscan.onnx_backend.OnnxBackendError`, a subclass, when
    ``backend="onnx"`` cannot be: no export, a stale one, no onnxruntime).

    Attributes: ``checkpoint_path``, ``classes`` (tuple), ``meta`` (the checkpoint's metadata),
    ``input_size``, ``temperature``, ``device``, ``ood`` (:class:`OODDetector` or ``None``),
    ``max_pixels``, ``uncertain_below``, ``batch_size`` (default of the batched calls), ``backend``
    (``"torch"`` or ``"onnx"``: the one in use),
    ``net`` (what runs: ``model`` itself, or an :class:`~mediscan.onnx_backend.OnnxClassifier`).
    """

    def __init__(self, checkpoint: str | os.PathLike | None = None, device: str | torch.device | None = None,
                 *, max_pixels: int = DEFAULT_MAX_PIXELS, uncertain_below: float = DEFAULT_UNCERTAIN_BELOW,
                 backend: str = "auto", onnx_path: str | os.PathLike | None = None):
        if not 0.0 <= uncertain_below <= 1.0:
            raise ValueError(f"uncertain_below must be in [0, 1], got {uncertain_below}")
        self.checkpoint_path = resolve_checkpoint_path(checkpoint)
        self.device = backend_device(backend, device) or default_device()
        loaded = load_checkpoint(self.checkpoint_path, self.device)
        self.model = loaded.model.eval()
        for parameter in self.model.parameters():   # read-only: inference never needs gradients
            parameter.requires_grad_(False)
        self.meta: dict = loaded.meta
        self.classes: tuple[str, ...] = tuple(loaded.classes)
        self.input_size: int = loaded.preprocessing.input_size
        self.temperature: float = _valid_temperature(loaded.temperature)
        try:
            self.ood: OODDetector | None = OODDetector.from_checkpoint(loaded.extra, loaded.meta)
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{self.checkpoint_path} has damaged out-of-scope statistics ({exc}); "
                                  f"retrain or restore the checkpoint.") from None
        self.max_pixels = int(max_pixels)
        self.uncertain_below = float(uncertain_below)
        self.batch_size = CPU_BATCH_SIZE if self.device.type == "cpu" else GPU_BATCH_SIZE
        self.backend, self.net = select_backend(backend, self.checkpoint_path, self.device, self.model,
                                                self.input_size, onnx_path, taps=self._ood_layers)

    def __repr__(self) -> str:
        return (f"Predictor({str(self.checkpoint_path)!r}, classes={list(self.classes)}, "
                f"device={str(self.device)!r}, backend={self.backend!r}, ood={'yes' if self.ood else 'no'})")

    # ---------------------------------------------------------------------------------- model card

    def model_card(self) -> dict:
        """JSON-ready facts about the loaded model, for the dashboard's and the API's "about" views."""
        metrics = self.meta.get("metrics") or {}
        test, val = _split_metrics(metrics, "test"), _split_metrics(metrics, "val")
        calibration = test or val
        ood_meta = self.meta.get("ood") or {}
        colour_line = f"Colour images (colourfulness > {COLOUR_LIMIT:g}) are out of scope: X-rays are grayscale."
        if self.ood is not None:
            held_out = "validation" if self.ood.threshold_from == "validation" else "held-out training"
            layers = ", ".join(self.ood.layer_names)
            ood_line = (f"Images whose features lie further from the training images than "
                        f"{self.ood.percentile:g}% of {held_out} images (Mahalanobis score on {layers} > "
                        f"{self.ood.threshold:.3g}) are reported as out of scope. {colour_line}")
        else:
            ood_line = (f"This checkpoint has no out-of-scope statistics, so only the colour check applies: "
                        f"{colour_line} Any grayscale image, even a photo of a page of text, gets one of the "
                        f"organ classes. Retrain to add the out-of-scope check.")
        return {
            "classes": list(self.classes),
            "checkpoint": str(self.checkpoint_path),
            "architecture": self.meta.get("architecture"),
            "input_size": self.input_size,
            "weight_source": self.meta.get("weight_source"),
            "created": self.meta.get("created"),
            "test_accuracy": test.get("accuracy"),
            "test_macro_f1": test.get("macro_f1"),
            "val_accuracy": val.get("accuracy"),
            # Predictions are temperature-scaled, so the ECE that describes them is the calibrated one
            # (on the test split when there was one, else on validation).
            "ece": calibration.get("ece_calibrated", calibration.get("ece")),
            "ece_before_calibration": calibration.get("ece"),
            "temperature": self.temperature,
            "uncertain_below": self.uncertain_below,
            "out_of_scope_check": self.ood is not None,
            "out_of_scope": ood_line,
            "ood": ood_meta or None,
            "device": str(self.device),
            "backend": self.backend,
            "version": __version__,
            "library_versions": self.meta.get("versions"),
            "not_for_clinical_use": NOT_FOR_CLINICAL_USE,
        }

    # ---------------------------------------------------------------------------------- public calls

    def predict(self, image: ImageInput, *, name: str | None = None) -> Prediction:
        """Classify one image (path, bytes, binary file-like or :class:`DecodedImage`).

        ``name`` labels bytes / file-like input (e.g. the upload's file name).
        Raises :class:`ImageReadError` (with a user-facing message) when the input cannot be decoded.
        """
        prediction, *_ = self._single(image, None, name, "gradcam")
        return prediction

    def explain(self, image: ImageInput, class_name: str | None = None, *, name: str | None = None,
                method: str = "gradcam", faithfulness: bool = True) -> Explanation:
        """Predict and compute the heatmap for ``class_name`` (``None`` = the predicted class).

        One forward pass gives both the prediction and the map. ``faithfulness=True`` adds one more
        batched forward pass (hottest / random 20 % of the input hidden); interactive callers that
        only draw the overlay can pass ``False``.
        Raises :class:`ImageReadError` for bad input, :class:`UnknownClassError` for an unknown class.
        """
        target = None if class_name is None else self.class_index(class_name)
        prediction, decoded, geometry, batch, cam = self._single(image, target, name, method)
        explained = int(cam.class_indices[0])
        heatmap = self._heatmap_on_original(cam.cams[0], geometry)
        faith = self._faithfulness(batch, cam.cams, explained) if faithfulness else {}
        return Explanation(prediction, self.classes[explained], method, decoded.pixels, heatmap, faith)

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

    # ---------------------------------------------------------------------------------- internals

    def _single(self, image: ImageInput, target: int | None, name: str | None, method: str):
        """Decode, preprocess and run one image; returns the prediction and what a map needs."""
        started = time.perf_counter()
        decoded, tensor, geometry, timings = self._prepare(image, name)
        t0 = time.perf_counter()
        batch = tensor.unsqueeze(0).to(self.device)
        cam, pooled = self._cam(batch, None if target is None else [target], method)
        probs, scores, flags = self._calibrate(cam.logits, pooled)
        timings["model"] = _ms_since(t0)
        prediction = self._prediction(decoded, probs[0], scores, flags, 0, timings, started)
        return prediction, decoded, geometry, batch, cam

    def _decode(self, image: ImageInput, name: str | None) -> tuple[DecodedImage, float]:
        t0 = time.perf_counter()
        if isinstance(image, DecodedImage):
            return (dataclasses.replace(image, source=name) if name else image), _ms_since(t0)
        return read_image(image, name=name, max_pixels=self.max_pixels), _ms_since(t0)

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
        """Temperature-scaled probabilities and OOD scores/flags (``None`` without a detector)."""
        probs = torch.softmax(logits.detach().float() / self.temperature, dim=1).cpu()
        if self.ood is None:
            return probs, None, None
        scores = self.ood.score(pooled)
        return probs, scores, scores > self.ood.threshold

    def _prediction(self, decoded: DecodedImage, probs: torch.Tensor, scores, flags, row: int,
                    timings: dict[str, float], started: float | None) -> Prediction:
        probabilities = {name: float(p) for name, p in zip(self.classes, probs.tolist())}
        top = int(torch.argmax(probs))
        confidence = float(probs[top])
        score = None if scores is None else float(scores[row])
        flagged = bool(flags[row]) if flags is not None else False
        verdict, reason = self._verdict(self.classes[top], confidence, score, flagged, decoded)
        timings = dict(timings)
        timings["total"] = _ms_since(started) if started is not None else sum(timings.values())
        return Prediction(decoded.source, self.classes, probabilities, self.classes[top], confidence,
                          verdict, reason, score, timings, tuple(decoded.warnings))

    def _verdict(self, top_class: str, confidence: float, score: float | None, flagged: bool,
                 decoded: DecodedImage) -> tuple[str, str]:
        percent = f"{confidence:.0%}"
        if decoded.is_colour:
            return "out_of_scope", (
                f"This is a colour image (colourfulness {decoded.colourfulness:.2f}, above {COLOUR_LIMIT:g}) "
                f"and X-rays are grayscale, so the '{top_class}' prediction should not be trusted. Upload "
                f"the original grayscale radiograph.")
        if flagged:
            return "out_of_scope", (
                f"This image does not resemble the X-rays the model was trained on (out-of-scope score "
                f"{score:.2f} is above the limit of {self.ood.threshold:.2f}), so the '{top_class}' "
                f"prediction should not be trusted.")
        if confidence < self.uncertain_below:
            return "uncertain", (
                f"The model is unsure: its best guess '{top_class}' has only {percent} confidence, below "
                f"the {self.uncertain_below:.0%} needed for a confident answer.")
        check = ("and the image resembles the training images" if self.ood is not None
                 else "but this model cannot tell whether the image is an X-ray at all")
        return "confident", f"The model says '{top_class}' with {percent} confidence, {check}."

    @staticmethod
    def _heatmap_on_original(cam: torch.Tensor, geometry: CropGeometry) -> np.ndarray:
        """(S, S) map on the model input -> (H, W) map on the decoded image (0 outside the crop)."""
        from grad_cam import cam_to_original
        return cam_to_original(cam.numpy(), geometry)

    def _faithfulness(self, batch: torch.Tensor, cams: torch.Tensor, class_index: int) -> dict[str, float]:
        from mediscan.explain.faithfulness import faithfulness
        result = faithfulness(self.net, batch, cams, [class_index])
        return {name: float(values[0]) for name, values in result.items()}

    def _run_many(self, images: Iterable[ImageInput], batch_size: int, names, *, with_maps: bool,
                  progress=None) -> list:
        """Decode every input, then run the good ones through the model ``batch_size`` at a time."""
        batch_size = self.batch_size if batch_size is None else batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        images = list(images)
        if names is not None and len(names) != len(images):
            raise ValueError(f"{len(names)} names for {len(images)} images")
        results: list = [None] * len(images)
        pending: list[tuple[int, DecodedImage, torch.Tensor, CropGeometry, dict]] = []
        for index, image in enumerate(images):
            try:
                item = self._prepare(image, None if names is None else names[index])
            except ImageReadError as error:
                results[index] = error
                if progress is not None:
                    progress(1)
                continue
            pending.append((index, *item))
            if len(pending) == batch_size:
                self._run_batch(pending, results, with_maps, progress)
                pending = []
        if pending:
            self._run_batch(pending, results, with_maps, progress)
        return results

    def _prepare(self, image: ImageInput, name: str | None):
        """Decode + preprocess: (decoded, (1, S, S) tensor, crop geometry, timings in ms)."""
        decoded, decode_ms = self._decode(image, name)
        t0 = time.perf_counter()
        tensor, geometry = preprocess(decoded.pixels, self.input_size)
        return decoded, tensor, geometry, {"decode": decode_ms, "preprocess": _ms_since(t0)}

    def _run_batch(self, pending: list, results: list, with_maps: bool, progress) -> None:
        t0 = time.perf_counter()
        batch = torch.stack([tensor for _, _, tensor, _, _ in pending]).to(self.device)
        cam, pooled = self._cam(batch, None, "gradcam")
        probs, scores, flags = self._calibrate(cam.logits, pooled)
        share = _ms_since(t0) / len(pending)   # each image's share of the batched forward pass
        for row, (index, decoded, _, geometry, timings) in enumerate(pending):
            prediction = self._prediction(decoded, probs[row], scores, flags, row,
                                          {**timings, "model": share}, None)
            if with_maps:
                heatmap = self._heatmap_on_original(cam.cams[row], geometry)
                results[index] = Explanation(prediction, prediction.top_class, "gradcam", decoded.pixels, heatmap)
            else:
                results[index] = prediction
        if progress is not None:
            progress(len(pending))


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


def _split_metrics(metrics: dict, split: str) -> dict:
    """One split's headline metrics; training stores ``{"val": {...}, "test": {...} or None}``.

    Flat ``{"test_accuracy": ...}`` records (hand-made checkpoints) are understood too.
    """
    nested = metrics.get(split)
    if isinstance(nested, dict):
        return nested
    prefix = f"{split}_"
    return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}

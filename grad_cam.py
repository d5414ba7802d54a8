"""Grad-CAM and Grad-CAM++ for the MediScan organ classifier: the CAM maths, nothing else.

Imports only torch / numpy / OpenCV / Pillow / the standard library -- nothing of the project -- and relies
on duck typing: a model with ``model.features`` (backbone, output ``(B, C, h, w)`` *before* its final ReLU)
and ``model.head`` whose forward is ReLU -> global average pool -> dropout -> ``model.head.fc`` (Linear).

Two ways to compute a map:

* **Fast path** (default target ``"head.relu"``: the full final feature map, 1024 channels after
  norm5 + ReLU). The class score is linear in the pooled features, ``logit_c = W_c . mean_ij(A) + b_c``,
  so d logit_c / d A_kij = W_ck / (h w) everywhere and the Grad-CAM / Grad-CAM++ weights are closed form.
  One forward pass under ``torch.no_grad`` gives the prediction and the map; no backward pass.
* **General path** (any other module, by path string or object). A forward hook captures the layer's
  output in this call only, and ``torch.autograd.grad`` gives the gradient of the chosen class scores.

Both paths give the same map on the final layer; the tests check that, and agreement with
pytorch-grad-cam's ``GradCAM``.

Thread safety: the model is shared across request threads. Nothing per request is stored on it; hooks
only record tensors produced by the call that registered them and are removed before returning; the
model must already be in eval mode (checked, never changed here).

Example::

    result = grad_cam(model, x)                       # x: (B, 1, S, S) in [-1024, 1024]
    heat = cam_to_original(result.cams[0].numpy(), geometry)

Overlays live in ``mediscan.explain.overlays`` and the faithfulness score in ``mediscan.explain.faithfulness``.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEFAULT_TARGET", "METHODS", "CamResult", "grad_cam", "cam_to_original", "check_eval", "class_index_tensor",
           "model_device"]

#: The full final feature map: 1024 channels after norm5 + ReLU (the output of ``model.head.relu``).
DEFAULT_TARGET = "head.relu"
METHODS = ("gradcam", "gradcam++")

# A min-max range at or below this fraction of the map's largest magnitude is treated as flat (float noise
# would otherwise be stretched to full contrast).
_FLAT_RELATIVE = 1e-6


@dataclass
class CamResult:
    """What :func:`grad_cam` returns. All tensors are detached and on the CPU."""

    logits: torch.Tensor           # (B, n_classes) from the same forward pass as the maps
    class_indices: torch.Tensor    # (B,) long: the class each map explains
    cams: torch.Tensor             # (B, S, S) float32 in [0, 1] at the model input size; all-zero when flat
    raw_cams: torch.Tensor         # (B, h, w) unnormalised ReLU'd map at the layer's resolution
    pooled_features: torch.Tensor | None  # (B, C) pooled post-ReLU features (fast path only), else None


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------

def grad_cam(model: nn.Module, inputs: torch.Tensor, classes=None, *, method: str = "gradcam",
             target_layer: str | nn.Module | None = None, feature_map: torch.Tensor | None = None) -> CamResult:
    """Explain a batch: class-activation maps for the chosen classes, with the logits of the same pass.

    Args:
        model: classifier with ``.features`` and ``.head.fc``, **in eval mode** (a model in training mode,
            or with any submodule in training mode, raises ``ValueError``: dropout would change the score
            and BatchNorm would update its running statistics, and we never flip a shared model's mode).
        inputs: ``(B, 1, S, S)`` float tensor in the model's input range.
        classes: ``None`` (each item's predicted class), one ``int`` for the whole batch, or ``B`` ints.
        method: ``"gradcam"`` (default) or ``"gradcam++"``.
        target_layer: ``None`` / ``DEFAULT_TARGET`` -> closed-form fast path on the final feature map;
            otherwise a module path (``"features.denseblock4.denselayer16.conv2"``) or an ``nn.Module`` of
            ``model`` -> general gradient path (passing the ``model.head.relu`` module itself runs the
            general path on the final map, which must agree with the fast path).
        feature_map: fast path only: ``model.features(inputs)``, when the caller has already run the
            backbone (e.g. to read intermediate layers in the same pass); the map is then computed from
            it without another forward pass.

    Returns:
        :class:`CamResult` with CPU tensors.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_eval(model)
    if not isinstance(inputs, torch.Tensor) or inputs.ndim != 4 or inputs.shape[0] == 0:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be a non-empty (B, C, H, W) tensor, got {shape}")
    device = model_device(model)
    if device is not None:
        inputs = inputs.to(device)

    fast = target_layer is None or (isinstance(target_layer, str) and target_layer == DEFAULT_TARGET)
    if feature_map is not None and not fast:
        raise ValueError("feature_map is the final feature map: it only serves the default target layer")
    if fast:
        logits, class_indices, raw, pooled = _fast_path(model, inputs, classes, method, feature_map)
    else:
        layer = _resolve_layer(model, target_layer)
        logits, class_indices, raw = _general_path(model, inputs, classes, method, layer)
        pooled = None

    cams = _upsample_and_normalise(raw, tuple(inputs.shape[-2:]))
    return CamResult(logits=logits.detach().float().cpu(), class_indices=class_indices.cpu(),
                     cams=cams.cpu(), raw_cams=raw.detach().float().cpu(),
                     pooled_features=None if pooled is None else pooled.detach().float().cpu())


# --------------------------------------------------------------------------------------------------
# Fast path: closed-form weights on the final feature map
# --------------------------------------------------------------------------------------------------

def _fast_path(model, inputs, classes, method, feature_map=None):
    fc = model.head.fc
    with torch.no_grad():
        # Same ops as the head (ReLU -> adaptive average pool -> Linear; dropout is the identity in eval),
        # written functionally so this pass triggers no hooks other callers may have on head modules.
        if feature_map is None:
            feature_map = model.features(inputs)
        elif feature_map.ndim != 4 or feature_map.shape[0] != inputs.shape[0]:
            raise ValueError(f"feature_map must be (B, C, h, w) for the {inputs.shape[0]} inputs, "
                             f"got {tuple(feature_map.shape)}")
        activations = F.relu(feature_map)                               # (B, C, h, w)
        pooled = F.adaptive_avg_pool2d(activations, 1).flatten(1)      # (B, C)
        logits = fc(pooled)
        class_indices = class_index_tensor(classes, logits)
        h, w = activations.shape[-2:]
        # d logit_c / d A_kij = W_ck / (h w), the same at every position.
        grads = fc.weight[class_indices].to(activations.dtype) / (h * w)  # (B, C)
        if method == "gradcam":
            weights = grads                                             # spatial mean of a constant
        else:
            # Grad-CAM++ (eq. 19 of Chattopadhay et al., as pytorch-grad-cam writes it, without its eps):
            # alpha_kij = g^2 / (2 g^2 + sum_ab A_kab g^3) = 1 / (2 + S_k g) for g > 0, S_k = h w pooled_k,
            # weight_k = sum_ij relu(g) alpha_kij = h w relu(g) / (2 + S_k g).
            sums = pooled * (h * w)
            weights = (h * w) * _plusplus_terms(grads, sums)
        raw = torch.relu(torch.einsum("bk,bkhw->bhw", weights, activations))
    return logits, class_indices, raw, pooled


def _plusplus_terms(grads: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """relu(g) * alpha for Grad-CAM++, elementwise: g / (2 + S g) where g > 0, else 0.

    This is g^2 / (2 g^2 + S g^3) with g^2 divided out, which removes the eps=1e-6 pytorch-grad-cam adds to
    the denominator. On this model the final-map gradients are W_ck / (h w) ~ 1e-3, so g^2 is no larger
    than that eps, which would then dominate and make the map depend on the input resolution; here the
    product S_k g_k = pooled_k W_ck is channel k's share of the logit, whatever the resolution.
    Grad-CAM++ assumes non-negative (post-ReLU) activations, so S >= 0 and the denominator >= 2. On a layer
    with signed outputs (a bare conv) it can be <= 0; like pytorch-grad-cam we keep such terms (only an
    exact zero is dropped), so the two agree there too, but the method means little on such layers.
    """
    denominator = 2.0 + sums * grads
    usable = (grads > 0) & (denominator != 0)
    safe = torch.where(usable, denominator, torch.ones_like(denominator))
    return torch.where(usable, grads / safe, torch.zeros_like(grads))


# --------------------------------------------------------------------------------------------------
# General path: forward hook + autograd on any layer
# --------------------------------------------------------------------------------------------------

# Which capture (if any) the current thread / async task is running. A forward hook sits on a module of a
# model that other threads may be running forward through at the same moment; the hook fires in whatever
# thread calls the module. ContextVar values are per thread (and per asyncio task, and per greenlet where
# gevent patches contextvars), so a hook records a tensor only when it fires inside the very call that
# registered it -- other threads see a different value and are left untouched. This is sounder than
# comparing thread ids: it also separates two nested captures in one thread and is never fooled by a
# thread id being reused.
_ACTIVE_CAPTURE: contextvars.ContextVar["_LayerCapture | None"] = contextvars.ContextVar(
    "grad_cam_active_capture", default=None)


class _LayerCapture:
    """Context manager: record the output of ``module`` produced by this call only, as a grad leaf.

    The hook replaces the layer's output (in the owning call only) by ``leaf.clone()`` where ``leaf`` is a
    detached copy that requires grad. Gradients are then taken with ``torch.autograd.grad(score, leaf)``:
    * no backward hooks at all (module backward hooks misbehave with in-place ops, and tensor hooks may
      run on autograd worker threads where the ContextVar above is not visible);
    * the values we keep cannot be overwritten by an in-place op downstream (it hits the clone), and the
      gradient is the one w.r.t. the layer's real output, not a later in-place result;
    * nothing is accumulated into the shared parameters' ``.grad`` (``loss.backward()`` would write
      there: per-request state on the model, and a data race between threads);
    * backward stops at the layer: nothing upstream of it is differentiated.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.activation: torch.Tensor | None = None
        self.calls = 0
        self._handle = None
        self._token = None

    def _hook(self, module, args, output):
        if _ACTIVE_CAPTURE.get() is not self:
            return None                          # another thread's (or another capture's) forward
        self.calls += 1
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"target layer {type(module).__name__} returns {type(output).__name__}, "
                             f"not a tensor")
        leaf = output.detach().requires_grad_(True)
        self.activation = leaf
        return leaf.clone()

    def __enter__(self) -> "_LayerCapture":
        self._token = _ACTIVE_CAPTURE.set(self)
        try:
            self._handle = self.module.register_forward_hook(self._hook)
        except BaseException:
            _ACTIVE_CAPTURE.reset(self._token)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._handle is not None:
                self._handle.remove()
                self._handle = None
        finally:
            _ACTIVE_CAPTURE.reset(self._token)
        return None


def _general_path(model, inputs, classes, method, layer):
    # Inference tensors cannot be part of an autograd graph: copy the input outside inference mode.
    # Grad mode is enabled explicitly because callers often run under no_grad / inference_mode.
    with torch.inference_mode(False), torch.enable_grad():
        x = inputs.detach().clone()
        with _LayerCapture(layer) as capture:
            logits = model(x)
        if capture.calls != 1 or capture.activation is None:
            raise ValueError(f"target layer ran {capture.calls} times in one forward pass; Grad-CAM needs a "
                             f"module that runs exactly once")
        activations = capture.activation
        if activations.ndim != 4:
            raise ValueError(f"target layer output must be (B, C, h, w), got {tuple(activations.shape)}")
        class_indices = class_index_tensor(classes, logits.detach())
        score = logits.gather(1, class_indices[:, None]).sum()  # items are independent in eval mode
        (grads,) = torch.autograd.grad(score, activations)
    with torch.no_grad():
        activations = activations.detach()
        if method == "gradcam":
            weights = grads.mean(dim=(2, 3))
        else:
            sums = activations.sum(dim=(2, 3), keepdim=True)
            weights = _plusplus_terms(grads, sums).sum(dim=(2, 3))
        raw = torch.relu(torch.einsum("bk,bkhw->bhw", weights, activations))
    return logits.detach(), class_indices, raw


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------

def check_eval(model: nn.Module) -> None:
    """Raise ValueError unless every module of ``model`` is in eval mode (nothing here changes the mode)."""
    training = [name or "<model>" for name, module in model.named_modules() if module.training]
    if training:
        raise ValueError(f"grad_cam needs a model in eval mode (call model.eval() once when loading it); "
                         f"in training mode: {', '.join(training[:3])}{' ...' if len(training) > 3 else ''}")


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the first parameter, or None for a model without parameters."""
    for parameter in model.parameters():
        return parameter.device
    return None


def _resolve_layer(model: nn.Module, target_layer: str | nn.Module) -> nn.Module:
    if isinstance(target_layer, nn.Module):
        if not any(module is target_layer for module in model.modules()):
            raise ValueError(f"target layer {type(target_layer).__name__} is not a submodule of the model")
        return target_layer
    if isinstance(target_layer, str):
        try:
            return model.get_submodule(target_layer)
        except AttributeError as exc:
            raise ValueError(f"no module {target_layer!r} in the model ({exc})") from None
    raise TypeError(f"target_layer must be None, a module path string or an nn.Module, "
                    f"got {type(target_layer).__name__}")


def class_index_tensor(classes, logits: torch.Tensor) -> torch.Tensor:
    """None / int / sequence / tensor -> (B,) long tensor on the logits' device, range-checked."""
    batch, n_classes = logits.shape
    if classes is None:
        indices = logits.argmax(dim=1)
    elif isinstance(classes, (int, np.integer)) and not isinstance(classes, bool):
        indices = torch.full((batch,), int(classes), dtype=torch.long, device=logits.device)
    else:
        indices = torch.as_tensor(np.asarray(classes) if not isinstance(classes, torch.Tensor) else classes)
        if indices.ndim == 0:
            indices = indices.expand(batch)
        if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.shape != (batch,):
            raise ValueError(f"classes must be None, an int or {batch} ints, got {classes!r}")
        # A copy: never alias the caller's tensor, and never keep an inference-mode tensor (it could not
        # take part in the general path's autograd graph).
        indices = indices.to(device=logits.device, dtype=torch.long).clone()
    if bool(((indices < 0) | (indices >= n_classes)).any()):
        raise ValueError(f"class indices must be in [0, {n_classes}), got {indices.tolist()}")
    return indices


def _upsample_and_normalise(raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W) float32 in [0, 1]: bilinear upsampling (half-pixel centres, as cv2.resize's
    INTER_LINEAR), then per-item min-max. Min-max is affine and bilinear weights sum to one, so this equals
    normalise -> upsample -> normalise (what pytorch-grad-cam does). Flat maps become all zero, never NaN."""
    with torch.no_grad():
        maps = F.interpolate(raw.detach().float()[:, None], size=size, mode="bilinear",
                             align_corners=False)[:, 0]
        flat = maps.flatten(1)
        low = flat.min(dim=1).values[:, None, None]
        high = flat.max(dim=1).values[:, None, None]
        spread = high - low
        scale = torch.maximum(high.abs(), low.abs())
        usable = spread > scale * _FLAT_RELATIVE
        normalised = (maps - low) / torch.where(usable, spread, torch.ones_like(spread))
        return torch.where(usable, normalised, torch.zeros_like(maps)).clamp_(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Back to the uploaded image, colour, PNG
# --------------------------------------------------------------------------------------------------

def cam_to_original(cam: np.ndarray, geometry) -> np.ndarray:
    """Map an ``(S, S)`` model-input heatmap onto the image as uploaded.

    ``geometry`` has ``original_height, original_width, top, left, side``: the model saw the centre square
    ``[top:top+side, left:left+side]`` resized to ``S x S``. The map is resized back to ``side x side``
    (bilinear, same pixel-centre convention as the preprocessing resize) and placed there; outside the
    crop is 0. Returns float32 ``(original_height, original_width)`` in [0, 1].
    """
    cam = np.asarray(cam.detach().cpu() if isinstance(cam, torch.Tensor) else cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"cam must be 2-D, got shape {cam.shape}")
    cam = np.clip(np.nan_to_num(cam, nan=0.0), 0.0, 1.0)
    height, width = int(geometry.original_height), int(geometry.original_width)
    top, left, side = int(geometry.top), int(geometry.left), int(geometry.side)
    if side <= 0 or top < 0 or left < 0 or top + side > height or left + side > width:
        raise ValueError(f"crop geometry does not fit the image: {geometry}")
    if cam.shape != (side, side):
        cam = cv2.resize(cam, (side, side), interpolation=cv2.INTER_LINEAR)
    full = np.zeros((height, width), dtype=np.float32)
    full[top:top + side, left:left + side] = np.clip(cam, 0.0, 1.0)
    return full

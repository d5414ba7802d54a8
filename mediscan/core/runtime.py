"""Where and how the network runs: the device choice, autocast and the batched forward pass.

Everything that runs the model on many images (training, evaluation, refitting the out-of-scope statistics)
goes through :func:`predict_split`, so they all see the same eval-mode, fp32-on-CPU numbers;
:func:`predict_files` gives the same outputs for image files decoded exactly as the Predictor decodes them.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch

from mediscan.core.model import OrganClassifier
from mediscan.core.pixel_cache import gather, to_model_range


def select_device(name: str | torch.device | None = "auto", *, mps: bool = True) -> torch.device:
    """The one device chooser. ``"auto"`` (or ``None``) picks cuda, then mps (unless ``mps=False``), then cpu;
    any other name is that device, refused with a clear message when it is CUDA and there is none."""
    if name is not None and str(name) != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if mps and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when ``enabled``; elsewhere (and when not) plain fp32."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def to_memory_format(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``images`` in the memory layout that is fastest on ``device`` (channels-last on CUDA)."""
    # channels-last lets cuDNN pick its fastest convolution kernels for bf16 on recent GPUs.
    return images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images


@torch.inference_mode()
def predict_split(model: OrganClassifier, images: torch.Tensor, batch_size: int, device: torch.device,
                  amp: bool = False, layers: Sequence[str] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits ``(N, C)`` for every image, in eval mode, on the CPU, and ``{layer: (N, channels)}`` pooled
    features of the backbone stages in ``layers`` (see :meth:`OrganClassifier.tapped_features`)."""
    was_training = model.training
    model.eval()
    logits, pooled = [], {name: [] for name in layers}
    try:
        for start in range(0, len(images), batch_size):
            # uint8 grey levels (a decoded split) become model-range floats here, on the device
            batch = to_model_range(gather(images, slice(start, start + batch_size), device))
            batch = to_memory_format(batch, device)
            with autocast(device, amp):
                final, taps = model.tapped_features(batch, layers)
                out = model.head(final)
            logits.append(out.float().cpu())
            for name, value in taps.items():
                pooled[name].append(value.float().cpu())
    finally:
        model.train(was_training)
    return _joined(model, logits, pooled, layers)


def predict_files(model: OrganClassifier, paths: Sequence[str | Path], input_size: int, batch_size: int,
                  device: torch.device, layers: Sequence[str] = (),
                  workers: int = 2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`predict_split`'s outputs for image files decoded as the Predictor decodes them: float pixels,
    not the 8-bit grey levels a decoded split keeps.

    Why: a resized image rounded to 256 levels moves by up to half a level, which moves an out-of-scope
    score by a few hundredths -- enough to put one more validation image above a threshold fitted on the
    rounded numbers than the promise ("at most 5 % of validation flagged") allows, as the Predictor scores
    it. Files are read ``batch_size`` at a time (``workers`` threads), so memory stays flat however many
    there are. An unreadable file raises :class:`~mediscan.core.decoded.ImageReadError`.
    """
    from mediscan.core.imaging import read_image
    from mediscan.core.preprocessing import preprocess

    def decode(path) -> torch.Tensor:
        return preprocess(read_image(path).pixels, input_size)[0]
    logits, pooled = [], {name: [] for name in layers}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(paths), batch_size):
            batch = torch.stack(list(pool.map(decode, paths[start:start + batch_size])))
            out, taps = predict_split(model, batch, batch_size, device, amp=False, layers=layers)
            logits.append(out)
            for name, value in taps.items():
                pooled[name].append(value)
    return _joined(model, logits, pooled, layers)


def _joined(model: OrganClassifier, logits: list[torch.Tensor], pooled: dict[str, list[torch.Tensor]],
            layers: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-batch outputs concatenated; empty tensors of the right width when there were no images."""
    if not logits:
        return torch.empty(0, model.num_classes), {name: torch.empty(0, 0) for name in layers}
    return torch.cat(logits), {name: torch.cat(values) for name, values in pooled.items()}

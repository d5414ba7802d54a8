"""One training epoch of either stage, and the per-stage set-up it needs.

Stage 1 (``head_epochs``): the backbone is frozen -- its weights AND its BatchNorm running statistics --
and only the head's Linear layer learns, on pooled features computed without gradients. Stage 2: every
layer learns, eagerly or by replaying a captured CUDA graph. Both stages run the same loop
(:func:`_epoch_loop`): batches, a step, the running totals on the progress bar.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mediscan.core.dataset import TensorSplit
from mediscan.core.model import OrganClassifier
from mediscan.core.pixel_cache import gather, to_model_range
from mediscan.core.runtime import autocast, predict_split, to_memory_format
from mediscan.training.augment import augment_batch
from mediscan.training.config import TrainConfig
from mediscan.training.distributed import DistEnv
from mediscan.training.outliers import outlier_exposure_loss

#: One step of a loop: the start of its batch -> (loss, logits, labels), or None to skip that batch.
Step = Callable[[int], "tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None"]


def configure_stage(model: OrganClassifier, stage: int) -> None:
    """Stage 1 freezes the backbone's parameters; stage 2 unfreezes them."""
    model.features.requires_grad_(stage == 2)
    model.head.requires_grad_(True)


def set_train_mode(model: OrganClassifier, stage: int) -> None:
    """Training mode, except a frozen backbone stays in eval mode so its BatchNorm statistics don't drift."""
    model.train()
    if stage == 1:
        model.features.eval()


def make_optimizer(model: OrganClassifier, stage: int, config: TrainConfig,
                   capturable: bool = False) -> torch.optim.Optimizer:
    """Adam over the head's Linear layer (stage 1) or every parameter (stage 2).

    ``capturable`` keeps Adam's step counters on the GPU so the update can live inside a CUDA graph.
    """
    params = model.head.fc.parameters() if stage == 1 else model.parameters()
    lr = config.head_lr if stage == 1 else config.finetune_lr
    return torch.optim.Adam(params, lr=lr, capturable=capturable)


def wrap_for_stage(model: OrganClassifier, stage: int, env: DistEnv, device: torch.device) -> nn.Module:
    """What the optimizer's gradients flow through: the head's Linear in stage 1, the whole model in stage 2,
    wrapped in DistributedDataParallel when several processes train (re-wrapped at the stage switch, since
    DDP only synchronises parameters that required gradients when it was built)."""
    module = model.head.fc if stage == 1 else model
    if not env.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


@torch.no_grad()
def calibrate_batchnorm(features: nn.Module, images, batch_size: int, device: torch.device,
                        max_images: int = 2048) -> None:
    """Re-estimate the BatchNorm running statistics of ``features`` on (at most ``max_images``) training images.

    Two uses. A fresh backbone's statistics (mean 0, variance 1) are meaningless for [-1024, 1024] inputs,
    and stage 1 keeps them frozen, so without this the frozen features would be scaled by ~1000 and the
    head would start from huge logits (pretrained backbones keep the statistics they were trained with).
    And after an outlier-exposure epoch (:func:`precise_batchnorm_after_outliers`).

    The images are spread evenly over the split, not its first rows: a split is stored class by class, and
    the first 2,048 rows of a large one are a single class. ``images``: model-range floats, or a split's
    uint8 ``pixels`` (converted per batch on ``device``).
    """
    norms = [m for m in features.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved_momentum = [m.momentum for m in norms]
    was_training = features.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None                       # cumulative average over all batches seen
    rows = spread_rows(len(images), max_images)
    features.train()
    try:
        for start in range(0, len(rows), batch_size):
            features(to_model_range(gather(images, rows[start:start + batch_size], device)))
    finally:
        for m, momentum in zip(norms, saved_momentum):
            m.momentum = momentum
        features.train(was_training)


def spread_rows(count: int, wanted: int) -> torch.Tensor:
    """``min(count, wanted)`` distinct row numbers spread evenly over ``range(count)``, in order."""
    if count <= wanted:
        return torch.arange(count)
    return torch.div(torch.arange(wanted) * count, wanted, rounding_mode="floor")


def precise_batchnorm_after_outliers(model: OrganClassifier, split: TensorSplit, config: TrainConfig,
                                     device: torch.device) -> None:
    """After a stage-2 epoch with outlier exposure: BatchNorm statistics from training images alone.

    Why: the outliers share every training forward pass with the batch (so BatchNorm's batch statistics
    see both, which the loss needs), and the running statistics the evaluated model uses are an average
    of those mixed batches -- about a third synthetic outliers at ``oe_fraction`` 0.5. At validation,
    test and prediction time only real images come, normalised by statistics that describe something
    else. Re-estimating them on clean training images ("precise BN", Wu & Johnson 2021) after every such
    epoch means validation, the best checkpoint and everything fitted on it see the statistics the
    model is used with. Measured on the short CPU schedule (docs/benchmarks.md, "Outlier exposure with
    precise BatchNorm"). Training itself is unaffected: in train mode BatchNorm uses batch statistics.
    """
    if config.outlier_exposure:
        calibrate_batchnorm(model.features, split.pixels, config.batch_size * 4, device)


def class_weight_tensor(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, normalised to mean 1 (absent classes get weight 0)."""
    counts = torch.bincount(labels, minlength=n_classes).float()
    weights = torch.where(counts > 0, counts.sum() / (n_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights * (n_classes / weights.sum())


def epoch_generator(config: TrainConfig, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    """Augmentation randomness seeded by (seed, epoch, rank): a resumed run repeats what it would have drawn."""
    return torch.Generator(device=device).manual_seed(config.seed * 100_003 + epoch * 101 + rank)


@torch.no_grad()
def pooled_training_features(model: OrganClassifier, split: TensorSplit, indices: torch.Tensor | None,
                             config: TrainConfig, device: torch.device,
                             generator: torch.Generator | None) -> torch.Tensor:
    """Frozen-backbone features of (augmented) training images, computed in large no-grad batches.

    Stage 1 only trains the head's Linear layer, which sees nothing but these pooled features, so the
    backbone runs once per image per epoch without keeping activations -- and once for the whole
    stage when augmentation is off. ``indices``: the rows of ``split`` to use, in order (None: all of them).
    """
    model.features.eval()                     # frozen means frozen: BatchNorm uses, never updates, its statistics
    chunks = []
    count = len(split) if indices is None else len(indices)
    for start in range(0, count, config.batch_size * 8):
        rows = slice(start, start + config.batch_size * 8)
        batch = split.batch(rows if indices is None else indices[rows], device)
        if config.augment and generator is not None:
            batch = augment_batch(batch, generator)
        with autocast(device, config.amp):
            chunks.append(model.head.pool_features(model.features(to_memory_format(batch, device))).float())
    return torch.cat(chunks) if chunks else torch.empty(0, model.head.fc.in_features, device=device)


def train_head_epoch(model: OrganClassifier, head: nn.Module, pooled: torch.Tensor, labels: torch.Tensor,
                     optimizer: torch.optim.Optimizer, criterion: nn.Module, config: TrainConfig,
                     local_batch: int, epoch: int) -> torch.Tensor:
    """Stage 1: steps of ``local_batch`` on this rank's pooled features. Returns [loss sum, correct, seen]."""
    def step(start: int):
        x, y = pooled[start:start + local_batch], labels[start:start + local_batch]
        logits = head(model.head.dropout(x))
        loss = criterion(logits.float(), y)
        _optimize(optimizer, loss)
        return loss, logits, y
    return _epoch_loop(model, 1, len(labels), local_batch, config, epoch, pooled.device, step)


def train_full_epoch(model: OrganClassifier, network: nn.Module, split: TensorSplit, indices: torch.Tensor,
                     optimizer: torch.optim.Optimizer, criterion: nn.Module, config: TrainConfig,
                     local_batch: int, epoch: int, device: torch.device, generator: torch.Generator,
                     graphed=None) -> torch.Tensor:
    """Stage 2: every layer learns. ``network`` is the model or its DDP wrapper; ``graphed`` an optional
    :class:`~mediscan.training.graphed_step.GraphedTrainStep` for full batches. Returns [loss sum, correct,
    seen]."""
    def step(start: int):
        index = indices[start:start + local_batch]
        images = split.batch(index, device)          # uint8 rows, converted to model range on the device
        labels = split.labels[index.to(split.labels.device)].to(device, non_blocking=True)
        if graphed is not None:
            if len(index) != local_batch:
                return None                   # the graph has a fixed shape: drop the last partial batch
            loss, logits = graphed(images, labels)
            return loss, logits, labels
        if config.augment:
            images = augment_batch(images, generator)
        if config.outlier_exposure:         # synthetic outliers ride along in the same forward pass
            loss, logits = outlier_exposure_loss(network, images, labels, criterion, config, generator, device)
            _optimize(optimizer, loss)
            return loss, logits, labels
        with autocast(device, config.amp):
            logits = network(to_memory_format(images, device))
        loss = criterion(logits.float(), labels)
        _optimize(optimizer, loss)
        return loss, logits, labels
    return _epoch_loop(model, 2, len(indices), local_batch, config, epoch, device, step)


def _optimize(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _epoch_loop(model: OrganClassifier, stage: int, n: int, local_batch: int, config: TrainConfig, epoch: int,
                device: torch.device, step: Step) -> torch.Tensor:
    """The skeleton both stages share: ``step`` per batch start, totals [loss sum, correct, seen] kept."""
    set_train_mode(model, stage)
    totals = torch.zeros(3, device=device)
    bar = _progress(range(0, n, local_batch), f"epoch {epoch}/{config.total_epochs} (stage {stage})",
                    config.progress)
    for index, start in enumerate(bar):
        done = step(start)
        if done is None:
            continue
        _accumulate(totals, *done)
        _show_running(bar, totals, index)
    return totals


def _accumulate(totals: torch.Tensor, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
    # Kept on the device: a .item() per step would force a GPU sync and stall the launch queue.
    with torch.no_grad():
        totals[0] += loss.detach().float() * len(labels)
        totals[1] += (logits.argmax(1) == labels).sum()
        totals[2] += len(labels)


def _show_running(bar, totals: torch.Tensor, step: int, every: int = 10) -> None:
    """Running loss/accuracy on the progress bar (every few steps: reading them syncs the GPU)."""
    if hasattr(bar, "set_postfix") and step % every == 0:
        loss_sum, correct, seen = totals.tolist()
        bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}", acc=f"{correct / max(seen, 1):.3f}")


def _progress(iterable, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, leave=False, unit="batch", dynamic_ncols=True)


def validate(model: OrganClassifier, split: TensorSplit, criterion: nn.Module, config: TrainConfig,
             device: torch.device) -> dict:
    """Validation loss (same class weighting as training) and accuracy."""
    logits, _ = predict_split(model, split.pixels, config.batch_size * 4, device, config.amp)
    labels = split.labels.cpu()
    if not len(labels):
        return {"val_loss": float("nan"), "val_acc": 0.0}
    weight = None if getattr(criterion, "weight", None) is None else criterion.weight.cpu()
    return {"val_loss": float(F.cross_entropy(logits, labels, weight=weight)),
            "val_acc": float((logits.argmax(1) == labels).float().mean())}


def is_better(candidate: dict, best: dict | None) -> bool:
    """Higher validation accuracy wins; equal accuracy, lower validation loss wins."""
    if best is None:
        return True
    if candidate["val_acc"] != best["val_acc"]:
        return candidate["val_acc"] > best["val_acc"]
    return candidate["val_loss"] < best["val_loss"]

"""Two-stage fine-tuning of the organ classifier, from a dataset folder to a calibrated checkpoint and report.

Stage 1 (``head_epochs``): backbone frozen -- its weights AND its BatchNorm running statistics -- and
only the head learns (Adam, ``head_lr``). Stage 2 (``finetune_epochs``): everything learns at the small
``finetune_lr``. The best epoch on validation (accuracy, ties broken by lower loss) is ``best.safetensors``;
every epoch also writes ``last.safetensors`` with the optimizer state, from which ``resume`` continues.
After training, the best weights get a temperature (fitted on val), out-of-scope statistics (fitted on
train features) and test metrics, and a report is written next to them.

This module runs the pieces in order: :mod:`~mediscan.training.config` (the knobs),
:mod:`~mediscan.training.data` (decode once), :mod:`~mediscan.training.epochs` (one epoch of a stage),
:mod:`~mediscan.training.resume` (per-epoch checkpoints) and :mod:`~mediscan.training.finalize`.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mediscan.core.checkpoint import BackgroundCheckpointWriter, CheckpointError, new_metadata
from mediscan.core.dataset import DatasetSplits, TensorSplit, scan_dataset
from mediscan.core.model import OrganClassifier, build_model
from mediscan.core.preprocessing import PreprocessConfig
from mediscan.core.runtime import select_device, to_memory_format
from mediscan.training.config import FitResult, TrainConfig
from mediscan.training.data import describe_dataset, load_tensors, to_device
from mediscan.training.distributed import (
    DistEnv,
    all_reduce_sum,
    barrier,
    epoch_indices,
    init_distributed,
    local_batch_size,
    shutdown,
)
from mediscan.training.epochs import (
    calibrate_batchnorm,
    class_weight_tensor,
    configure_stage,
    epoch_generator,
    is_better,
    make_optimizer,
    pooled_training_features,
    precise_batchnorm_after_outliers,
    set_train_mode,
    train_full_epoch,
    train_head_epoch,
    validate,
    wrap_for_stage,
)
from mediscan.training.finalize import finalize
from mediscan.training.modalities import training_modalities
from mediscan.training.resume import resume, save_epoch

__all__ = ["FitResult", "TrainConfig", "fit", "is_better", "peak_memory_summary"]


def fit(config: TrainConfig, log: Callable[[str], None] = print) -> FitResult:
    """Run both stages, keep best/last checkpoints, then calibrate, evaluate and write the report.

    Under ``torchrun`` every process trains its shard; only rank 0 logs and writes files.
    """
    env = init_distributed(prefer_cuda=config.device == "auto" or config.device.startswith("cuda"))
    try:
        return _fit(config, env, log if env.is_main else (lambda _line: None))
    finally:
        shutdown(env)


@dataclass
class _Run:
    """What the epochs of one run share, and the state they carry from one epoch to the next."""

    config: TrainConfig
    env: DistEnv
    device: torch.device
    model: OrganClassifier
    train: TensorSplit
    val: TensorSplit
    local_batch: int
    log: Callable[[str], None]
    criterion: nn.Module | None = None
    history: list[dict] = field(default_factory=list)
    best: dict | None = None                   # epoch, val_acc and val_loss of the best epoch so far
    optimizer: torch.optim.Optimizer | None = None
    trainable: nn.Module | None = None         # what the optimizer's gradients flow through (see wrap_for_stage)
    graphed: object | None = None              # the stage-2 GraphedTrainStep, once captured
    cached_pooled: torch.Tensor | None = None  # stage-1 features without augmentation: computed once

    @property
    def use_graphs(self) -> bool:
        return (self.device.type == "cuda" and self.config.cuda_graphs and not self.env.enabled
                and not self.config.outlier_exposure)   # the captured step has no outlier half


def _fit(config: TrainConfig, env: DistEnv, log: Callable[[str], None]) -> FitResult:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    device = training_device(config, env)
    local_batch = local_batch_size(config.batch_size, env)
    if not env.is_main:
        config = dataclasses.replace(config, progress=False)
    if env.is_main:
        Path(config.out).mkdir(parents=True, exist_ok=True)
    splits, data = _prepare_data(config, device, log)
    model, meta = _build(config, splits, env, device, log)
    run = _Run(config, env, device, model, data["train"], data["val"], local_batch, log)
    first_epoch = _start(run, splits)
    _train_epochs(run, meta, first_epoch)
    barrier(env)
    report_path, test_metrics = None, None
    if env.is_main:
        if not config.best_path.exists():
            raise CheckpointError(f"training produced no {config.best_path} (0 epochs requested?)")
        report_path, test_metrics = finalize(config.best_path, data, splits, config, device, run.history, log)
        log(f"peak memory: {peak_memory_summary(device)}")
    return FitResult(config.best_path, config.last_path, report_path, run.history, test_metrics,
                     time.perf_counter() - started)


def training_device(config: TrainConfig, env: DistEnv) -> torch.device:
    """Under torchrun on CUDA each process takes the GPU of its local rank; otherwise ``--device``."""
    if env.enabled and torch.cuda.is_available() and config.device in ("auto", "cuda"):
        return torch.device("cuda", env.local_rank)
    return select_device(config.device)


def _prepare_data(config: TrainConfig, device: torch.device,
                  log: Callable[[str], None]) -> tuple[DatasetSplits, dict[str, TensorSplit]]:
    """Scan and check the dataset, log what it holds, decode it once (onto the GPU when training there)."""
    splits = scan_dataset(config.data, val_fraction=config.val_fraction, seed=config.seed,
                          skip_bad=config.skip_bad)
    for line in describe_dataset(splits, config):
        log(line)
    data, splits = load_tensors(splits, config, log)
    return splits, to_device(data, device, log)


def _build(config: TrainConfig, splits: DatasetSplits, env: DistEnv, device: torch.device,
           log: Callable[[str], None]) -> tuple[OrganClassifier, dict]:
    """The model on its device, and the metadata every checkpoint of this run carries."""
    build_start = time.perf_counter()
    model, weight_source = build_model(len(splits.classes), config.weights, config.dropout, config.weights_cache)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    log(f"model: DenseNet121 ({weight_source}), {config.input_size}x{config.input_size} input, device {device}"
        + (f", {env.world_size} processes (global batch {config.batch_size})" if env.enabled else "")
        + f", ready in {time.perf_counter() - build_start:.1f}s")
    meta = new_metadata(splits.classes, PreprocessConfig(config.input_size), weight_source, config.dropout,
                        train_args={**dataclasses.asdict(config), "world_size": env.world_size},
                        dataset_fingerprint=splits.fingerprint,
                        modalities=training_modalities((s.path for s in splits.split("train")), config.modalities))
    return model, meta


def _start(run: _Run, splits: DatasetSplits) -> int:
    """A fresh start (BatchNorm statistics estimated for random weights) or a resumed one; the loss.

    Returns the first epoch to run.
    """
    config, first_epoch = run.config, 1
    if config.weights.lower() == "none" and not config.resume:
        calibrate_batchnorm(run.model.features, run.train.pixels, config.batch_size * 4, run.device)
    if config.resume:
        first_epoch, run.history, run.best, run.optimizer = resume(run.model, splits, config, run.device, run.log,
                                                                   run.use_graphs)
    class_weights = class_weight_tensor(run.train.labels.cpu(), len(splits.classes)).to(run.device) \
        if config.class_weights else None
    run.criterion = nn.CrossEntropyLoss(weight=class_weights)
    return first_epoch


def _train_epochs(run: _Run, meta: dict, first_epoch: int) -> None:
    """Every remaining epoch: train, validate, keep best/last (rank 0), log one line."""
    config = run.config
    writer = BackgroundCheckpointWriter()   # epochs go on while the previous checkpoints are written
    try:
        for epoch in range(first_epoch, config.total_epochs + 1):
            record = _train_epoch(run, epoch)
            improved = is_better(record, run.best)
            if improved:
                run.best = {k: record[k] for k in ("epoch", "val_acc", "val_loss")}
            if run.env.is_main:
                save_epoch(writer, run.model, run.optimizer, meta, record, run.best, run.history, improved, config)
            run.log(f"epoch {epoch:>3}/{config.total_epochs} stage {record['stage']}  train loss "
                    f"{record['train_loss']:.4f} acc {record['train_acc']:.3f}  val loss {record['val_loss']:.4f} "
                    f"acc {record['val_acc']:.3f}  {record['seconds']:.1f}s" + ("  * best" if improved else ""))
    finally:
        writer.close()                       # every checkpoint is on disk before anyone reads it


def _train_epoch(run: _Run, epoch: int) -> dict:
    """One epoch of its stage over this rank's shard, then validation; the epoch's record (also in history)."""
    config, env, device = run.config, run.env, run.device
    stage = config.stage_of(epoch)
    _enter_stage(run, epoch, stage)
    epoch_start = time.perf_counter()
    generator = epoch_generator(config, epoch, env.rank, device)
    indices = epoch_indices(len(run.train), epoch, config.seed, env)
    if stage == 1:
        totals = _head_epoch(run, epoch, indices, generator)
    else:
        if run.use_graphs and run.graphed is None:
            run.graphed = _try_graph(run, indices)
        totals = train_full_epoch(run.model, run.trainable, run.train, indices, run.optimizer, run.criterion,
                                  config, run.local_batch, epoch, device, generator, run.graphed)
        precise_batchnorm_after_outliers(run.model, run.train, config, device)   # same rows on every rank
    loss_sum, correct, seen = all_reduce_sum(totals, env).tolist()
    record = {"epoch": epoch, "stage": stage, "train_loss": loss_sum / max(seen, 1),
              "train_acc": correct / max(seen, 1)}
    record.update(validate(run.model, run.val, run.criterion, config, device))
    record["seconds"] = round(time.perf_counter() - epoch_start, 2)
    run.history.append(record)
    return record


def _enter_stage(run: _Run, epoch: int, stage: int) -> None:
    """At the first epoch run and at the switch to stage 2: the stage's optimizer and what it trains through."""
    switching = epoch == run.config.head_epochs + 1
    if run.optimizer is None or switching:
        configure_stage(run.model, stage)
        run.optimizer = make_optimizer(run.model, stage, run.config, capturable=run.use_graphs and stage == 2)
        run.graphed = None
    if run.trainable is None or switching:
        run.trainable = wrap_for_stage(run.model, stage, run.env, run.device)


def _head_epoch(run: _Run, epoch: int, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Stage 1 on pooled features: fresh ones per epoch under augmentation, else computed once and reused."""
    config, train = run.config, run.train
    if config.augment:
        pooled = pooled_training_features(run.model, train, indices, config, run.device, generator)
    else:                                     # nothing changes between stage-1 epochs: compute once
        if run.cached_pooled is None:
            run.cached_pooled = pooled_training_features(run.model, train, None, config, run.device, None)
        pooled = run.cached_pooled[indices.to(run.cached_pooled.device)]
    labels = train.labels[indices.to(train.labels.device)].to(run.device)
    return train_head_epoch(run.model, run.trainable, pooled, labels, run.optimizer, run.criterion, config,
                            run.local_batch, epoch)


def _try_graph(run: _Run, indices: torch.Tensor):
    """Capture the stage-2 step as a CUDA graph; on any failure log why and train eagerly instead."""
    from mediscan.training.graphed_step import GraphedTrainStep
    if len(indices) < run.local_batch:
        return None
    train, device = run.train, run.device
    first = indices[:run.local_batch]
    try:
        set_train_mode(run.model, 2)
        step = GraphedTrainStep(run.model, run.optimizer, run.criterion,
                                to_memory_format(train.batch(first, device), device),
                                train.labels[first.to(train.labels.device)].to(device),
                                augment=run.config.augment, amp=run.config.amp)
        run.log("stage 2 runs as a captured CUDA graph (whole step replayed per batch)")
        return step
    except Exception as exc:  # noqa: BLE001 -- graphs are an optimisation; eager training is always correct
        run.log(f"CUDA graph capture unavailable ({exc.__class__.__name__}: {exc}); training eagerly")
        run.optimizer.zero_grad(set_to_none=True)
        return None


def peak_memory_summary(device: torch.device) -> str:
    """This process's peak resident memory, plus the peak CUDA allocation when training ran on a GPU."""
    try:
        import resource  # POSIX only
    except ImportError:
        text = "process RSS not measured on this platform"
    else:
        # ru_maxrss is in KiB on Linux but in bytes on macOS.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        text = f"process RSS {rss / 2**30:.2f} GiB"
    if device.type == "cuda":
        text += f", GPU {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return text

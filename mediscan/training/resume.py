"""Resumable state: every epoch writes ``last.safetensors`` with the optimizer inside; ``--resume`` reads it.

safetensors holds tensors only, so Adam's state travels as flat named tensors (``optim.<param>.<key>``)
and its param groups (plain numbers) as JSON in the checkpoint's metadata, beside the epoch history.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from mediscan.core.checkpoint import BackgroundCheckpointWriter, CheckpointError, load_checkpoint, read_metadata
from mediscan.core.dataset import DatasetSplits
from mediscan.core.model import OrganClassifier
from mediscan.training.config import TrainConfig
from mediscan.training.epochs import configure_stage, make_optimizer


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Optimizer state as flat named tensors (safetensors) plus JSON-able param groups."""
    state = optimizer.state_dict()
    tensors = {f"optim.{pid}.{key}": value for pid, entry in state["state"].items()
               for key, value in entry.items() if isinstance(value, torch.Tensor)}
    return tensors, state["param_groups"]


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """The inverse of :func:`optimizer_tensors` (tensors not named ``optim.*`` are ignored)."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_epoch(writer: BackgroundCheckpointWriter, model: OrganClassifier, optimizer: torch.optim.Optimizer,
               meta: dict, record: dict, best: dict | None, history: list[dict], improved: bool,
               config: TrainConfig) -> None:
    """best.safetensors when validation improved; last.safetensors (with optimizer state) every epoch."""
    epoch, stage = record["epoch"], record["stage"]
    if improved:
        writer.submit(config.best_path, model, {**meta, "epoch": epoch, "stage": stage, "best": best})
    optim_tensors, groups = optimizer_tensors(optimizer)
    writer.submit(config.last_path, model, {**meta, "epoch": epoch, "stage": stage, "best": best,
                                             "training_state": {"history": history, "optimizer_groups": groups}},
                  optim_tensors)


def resume(model: OrganClassifier, splits: DatasetSplits, config: TrainConfig, device: torch.device,
           log: Callable[[str], None], capturable: bool):
    """Load ``last`` (weights, optimizer, history) after checking it belongs to this dataset.

    Returns ``(first epoch to run, history, best, optimizer)``; ``capturable`` as in :func:`make_optimizer`
    (for a stage-2 optimizer only).
    """
    last_path = config.last_path
    meta = _checked_metadata(last_path, splits, config)
    loaded = load_checkpoint(last_path, device)
    model.load_state_dict(loaded.model.state_dict())
    epoch = int(meta["epoch"])
    stage = config.stage_of(epoch + 1) if epoch < config.total_epochs else 2
    configure_stage(model, stage)
    optimizer = make_optimizer(model, stage, config, capturable=capturable and stage == 2)
    if config.stage_of(epoch) == stage:    # same stage: Adam's moments carry on
        restore_optimizer(optimizer, {k: v.to(device) for k, v in loaded.extra.items()},
                          meta["training_state"]["optimizer_groups"])
    log(f"resuming after epoch {epoch} from {last_path}")
    return epoch + 1, list(meta["training_state"]["history"]), meta.get("best"), optimizer


def _checked_metadata(last_path: Path, splits: DatasetSplits, config: TrainConfig) -> dict:
    """``last_path``'s metadata, or a :class:`CheckpointError` saying why it cannot continue on ``splits``."""
    if not last_path.exists():
        raise CheckpointError(f"--resume: no {last_path} to resume from (train without --resume first)")
    meta = read_metadata(last_path)
    if meta.get("classes") != splits.classes:
        raise CheckpointError(f"--resume: {last_path} was trained on classes {meta.get('classes')}, "
                              f"the dataset now has {splits.classes}")
    if (meta.get("dataset_fingerprint") or {}).get("sha256") != splits.fingerprint["sha256"]:
        raise CheckpointError(f"--resume: the files under {config.data} changed since {last_path} was written; "
                              f"start a new run (without --resume) or restore the dataset")
    return meta

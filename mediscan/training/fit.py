"""Two-stage fine-tuning of the organ classifier.

Stage 1 (``head_epochs``): backbone frozen -- its weights AND its BatchNorm running statistics -- and
only the head learns (Adam, ``head_lr``). Stage 2 (``finetune_epochs``): everything learns at the small
``finetune_lr``. The best epoch on validation (accuracy, ties broken by lower loss) is ``best.safetensors``;
every epoch also writes ``last.safetensors`` with the optimizer state, from which ``resume`` continues.
After training, the best weights get a temperature (fitted on val), out-of-scope statistics (fitted on
train features) and test metrics, and a report is written next to them.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mediscan.core.checkpoint import (
    BackgroundCheckpointWriter,
    CheckpointError,
    load_checkpoint,
    new_metadata,
    read_metadata,
    save_checkpoint,
)
from mediscan.core.dataset import DatasetError, DatasetSplits, TensorSplit, load_split, scan_dataset
from mediscan.core.model import DEFAULT_WEIGHTS, OrganClassifier, build_model
from mediscan.core.preprocessing import DEFAULT_INPUT_SIZE, PreprocessConfig
from mediscan.core.runtime import autocast, predict_split, select_device, to_memory_format
from mediscan.training.augment import augment_batch
from mediscan.training.distributed import (
    DistEnv,
    all_reduce_sum,
    barrier,
    epoch_indices,
    init_distributed,
    local_batch_size,
    shutdown,
)

BEST_NAME = "best.safetensors"
LAST_NAME = "last.safetensors"


@dataclass
class TrainConfig:
    """Every knob of a training run; saved inside each checkpoint as ``train_args``."""

    data: str = "dataset"
    out: str = "models"
    weights: str = DEFAULT_WEIGHTS
    weights_cache: str | None = None
    input_size: int = DEFAULT_INPUT_SIZE
    head_epochs: int = 5
    finetune_epochs: int = 10
    head_lr: float = 1e-3
    finetune_lr: float = 1e-5
    batch_size: int = 16
    dropout: float = 0.0
    class_weights: bool = False
    augment: bool = True
    val_fraction: float = 0.15
    skip_bad: bool = False
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    amp: bool = True
    cuda_graphs: bool = True
    resume: bool = False
    progress: bool = True
    gallery: bool = True

    @property
    def total_epochs(self) -> int:
        return self.head_epochs + self.finetune_epochs

    def stage_of(self, epoch: int) -> int:
        """Stage (1 or 2) of a 1-based epoch number."""
        return 1 if epoch <= self.head_epochs else 2


@dataclass
class FitResult:
    best_path: Path
    last_path: Path
    report_path: Path | None
    history: list[dict]
    test_metrics: dict | None
    seconds: float
    notes: list[str] = field(default_factory=list)


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


@torch.no_grad()
def calibrate_batchnorm(features: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device,
                        max_images: int = 2048) -> None:
    """Re-estimate BatchNorm running statistics of a randomly initialised backbone on training images.

    A fresh backbone's statistics (mean 0, variance 1) are meaningless for [-1024, 1024] inputs, and
    stage 1 keeps them frozen, so without this the frozen features would be scaled by ~1000 and the
    head would start from huge logits. Pretrained backbones keep the statistics they were trained with.
    """
    norms = [m for m in features.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved_momentum = [m.momentum for m in norms]
    was_training = features.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None                       # cumulative average over all batches seen
    features.train()
    try:
        for start in range(0, min(len(images), max_images), batch_size):
            features(images[start:start + batch_size].to(device))
    finally:
        for m, momentum in zip(norms, saved_momentum):
            m.momentum = momentum
        features.train(was_training)


def class_weight_tensor(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, normalised to mean 1 (absent classes get weight 0)."""
    counts = torch.bincount(labels, minlength=n_classes).float()
    weights = torch.where(counts > 0, counts.sum() / (n_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights * (n_classes / weights.sum())


def _epoch_generator(config: TrainConfig, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    """Augmentation randomness seeded by (seed, epoch, rank): a resumed run repeats what it would have drawn."""
    return torch.Generator(device=device).manual_seed(config.seed * 100_003 + epoch * 101 + rank)


@torch.no_grad()
def pooled_training_features(model: OrganClassifier, images: torch.Tensor, config: TrainConfig,
                             device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """Frozen-backbone features of (augmented) training images, computed in large no-grad batches.

    Stage 1 only trains the head's Linear layer, which sees nothing but these pooled features, so the
    backbone runs once per image per epoch without keeping activations -- and once for the whole
    stage when augmentation is off.
    """
    model.features.eval()                     # frozen means frozen: BatchNorm uses, never updates, its statistics
    chunks = []
    for start in range(0, len(images), config.batch_size * 8):
        batch = images[start:start + config.batch_size * 8].to(device, non_blocking=True)
        if config.augment and generator is not None:
            batch = augment_batch(batch, generator)
        with autocast(device, config.amp):
            chunks.append(model.head.pool_features(model.features(to_memory_format(batch, device))).float())
    return torch.cat(chunks) if chunks else torch.empty(0, model.head.fc.in_features, device=device)


def train_head_epoch(model: OrganClassifier, head: nn.Module, pooled: torch.Tensor, labels: torch.Tensor,
                     optimizer: torch.optim.Optimizer, criterion: nn.Module, config: TrainConfig,
                     local_batch: int, epoch: int) -> torch.Tensor:
    """Stage 1: steps of ``local_batch`` on this rank's pooled features. Returns [loss sum, correct, seen]."""
    set_train_mode(model, 1)
    totals = torch.zeros(3, device=pooled.device)
    bar = _progress(range(0, len(labels), local_batch), f"epoch {epoch}/{config.total_epochs} (stage 1)",
                    config.progress)
    for step, start in enumerate(bar):
        x, y = pooled[start:start + local_batch], labels[start:start + local_batch]
        logits = head(model.head.dropout(x))
        loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _accumulate(totals, loss, logits, y)
        _show_running(bar, totals, step)
    return totals


def train_full_epoch(model: OrganClassifier, network: nn.Module, split: TensorSplit, indices: torch.Tensor,
                     optimizer: torch.optim.Optimizer, criterion: nn.Module, config: TrainConfig,
                     local_batch: int, epoch: int, device: torch.device, generator: torch.Generator,
                     graphed=None) -> torch.Tensor:
    """Stage 2: every layer learns. ``network`` is the model or its DDP wrapper; ``graphed`` an optional
    :class:`~mediscan.graphed_step.GraphedTrainStep` for full batches. Returns [loss sum, correct, seen]."""
    set_train_mode(model, 2)
    totals = torch.zeros(3, device=device)
    bar = _progress(range(0, len(indices), local_batch), f"epoch {epoch}/{config.total_epochs} (stage 2)",
                    config.progress)
    for step, start in enumerate(bar):
        index = indices[start:start + local_batch].to(split.images.device)
        images = split.images[index].to(device, non_blocking=True)
        labels = split.labels[index].to(device, non_blocking=True)
        if graphed is not None:
            if len(index) != local_batch:
                continue                      # the graph has a fixed shape: drop the last partial batch
            loss, logits = graphed(images, labels)
        else:
            if config.augment:
                images = augment_batch(images, generator)
            with autocast(device, config.amp):
                logits = network(to_memory_format(images, device))
            loss = criterion(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        _accumulate(totals, loss, logits, labels)
        _show_running(bar, totals, step)
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
    logits, _ = predict_split(model, split.images, config.batch_size * 4, device, config.amp)
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


# --------------------------------------------------------------------------------------------------
# Resumable state
# --------------------------------------------------------------------------------------------------

def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Optimizer state as flat named tensors (safetensors) plus JSON-able param groups."""
    state = optimizer.state_dict()
    tensors = {f"optim.{pid}.{key}": value for pid, entry in state["state"].items()
               for key, value in entry.items() if isinstance(value, torch.Tensor)}
    return tensors, state["param_groups"]


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------

def describe_dataset(splits: DatasetSplits, config: TrainConfig) -> list[str]:
    """Human-readable lines about the data, for the log and the report."""
    lines = [f"classes: {', '.join(splits.classes)}"]
    for name in ("train", "val", "test"):
        counts = splits.class_counts(name)
        lines.append(f"{name}: {sum(counts.values())} images ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    if splits.val_from_train:
        lines.append(f"no val/ folder: held out {config.val_fraction:.0%} of train/ per class "
                     f"(stratified, seed {config.seed}) for validation")
    if splits.duplicates:
        shown = "; ".join(f"{a} == {b}" for a, b in splits.duplicates[:5])
        lines.append(f"WARNING: {len(splits.duplicates)} identical file(s) appear in two splits (leakage: "
                     f"test/val scores will be optimistic): {shown}"
                     + (" ..." if len(splits.duplicates) > 5 else ""))
    if splits.skipped:
        lines.append(f"skipped {len(splits.skipped)} bad file(s): " + "; ".join(splits.skipped[:10]))
    if splits.colour:
        lines.append(colour_warning(splits.colour))
    return lines


def colour_warning(paths: list[str]) -> str:
    """Colour pictures train like any image, but every predictor answers a colour upload with
    ``out_of_scope`` (radiographs are grayscale): say so before the user wonders why."""
    return (f"WARNING: {len(paths)} image(s) are colour pictures, not grayscale X-rays (e.g. "
            f"{'; '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}). They are trained on in grayscale, but "
            f"MediScan reports colour uploads as out of scope: save your X-rays as grayscale.")


def load_tensors(splits: DatasetSplits, config: TrainConfig, log: Callable[[str], None]) -> dict[str, TensorSplit]:
    """Decode every split once; unreadable files are errors unless --skip-bad."""
    tensors, bad_all = {}, []
    total = len(splits.train) + len(splits.val) + len(splits.test)
    started = time.perf_counter()
    for name in ("train", "val", "test"):
        split, bad = load_split(splits.split(name), config.input_size, workers=config.workers, skip_bad=True)
        tensors[name] = split
        bad_all += bad
        splits.colour += [str(path) for path in split.colour_paths]
    if bad_all and not config.skip_bad:
        raise DatasetError(f"{len(bad_all)} file(s) could not be read:\n  - " + "\n  - ".join(bad_all)
                           + "\n(--skip-bad leaves them out and lists them)")
    splits.skipped += bad_all
    log(f"decoded {total - len(bad_all)} images in {time.perf_counter() - started:.1f}s"
        + (f", skipped {len(bad_all)} unreadable" if bad_all else ""))
    if splits.colour:
        log(colour_warning(splits.colour))
    for name, split in tensors.items():
        if name != "test" and len(split) == 0:
            raise DatasetError(f"the {name} split has no readable images")
    return tensors


def fit(config: TrainConfig, log: Callable[[str], None] = print) -> FitResult:
    """Run both stages, keep best/last checkpoints, then calibrate, evaluate and write the report.

    Under ``torchrun`` every process trains its shard; only rank 0 logs and writes files.
    """
    env = init_distributed(prefer_cuda=config.device == "auto" or config.device.startswith("cuda"))
    try:
        return _fit(config, env, log if env.is_main else (lambda _line: None))
    finally:
        shutdown(env)


def _fit(config: TrainConfig, env: DistEnv, log: Callable[[str], None]) -> FitResult:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    out = Path(config.out)
    best_path, last_path = out / BEST_NAME, out / LAST_NAME
    device = torch.device("cuda", env.local_rank) if env.enabled and torch.cuda.is_available() and \
        config.device in ("auto", "cuda") else select_device(config.device)
    local_batch = local_batch_size(config.batch_size, env)
    if not env.is_main:
        config = dataclasses.replace(config, progress=False)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)

    splits = scan_dataset(config.data, val_fraction=config.val_fraction, seed=config.seed,
                          skip_bad=config.skip_bad)
    for line in describe_dataset(splits, config):
        log(line)
    data = load_tensors(splits, config, log)
    if device.type == "cuda":                 # the whole decoded set lives on the GPU: no loader per step
        for split in data.values():
            split.images = split.images.pin_memory().to(device, non_blocking=True)
            split.labels = split.labels.to(device)

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
                        dataset_fingerprint=splits.fingerprint)

    history: list[dict] = []
    best: dict | None = None
    first_epoch, optimizer = 1, None
    if config.weights.lower() == "none" and not config.resume:
        calibrate_batchnorm(model.features, data["train"].images, config.batch_size * 4, device)
    if config.resume:
        capturable = device.type == "cuda" and config.cuda_graphs and not env.enabled
        first_epoch, history, best, optimizer = _resume(model, last_path, splits, config, device, log, capturable)

    train = data["train"]
    class_weights = class_weight_tensor(train.labels.cpu(), len(splits.classes)).to(device) \
        if config.class_weights else None
    criterion = nn.CrossEntropyLoss(weight=class_weights)
    use_graphs = device.type == "cuda" and config.cuda_graphs and not env.enabled
    cached_pooled, trainable, graphed = None, None, None
    writer = BackgroundCheckpointWriter()   # epochs go on while the previous checkpoints are written
    try:
        for epoch in range(first_epoch, config.total_epochs + 1):
            stage = config.stage_of(epoch)
            if optimizer is None or epoch == config.head_epochs + 1:
                configure_stage(model, stage)
                optimizer = make_optimizer(model, stage, config, capturable=use_graphs and stage == 2)
                graphed = None
            if trainable is None or epoch == config.head_epochs + 1:
                trainable = _wrap_for_stage(model, stage, env, device)
            epoch_start = time.perf_counter()
            generator = _epoch_generator(config, epoch, env.rank, device)
            indices = epoch_indices(len(train), epoch, config.seed, env)
            if stage == 1:
                if config.augment:
                    pooled = pooled_training_features(model, train.images[indices.to(train.images.device)], config,
                                                      device, generator)
                else:                             # nothing changes between stage-1 epochs: compute once
                    if cached_pooled is None:
                        cached_pooled = pooled_training_features(model, train.images, config, device, None)
                    pooled = cached_pooled[indices.to(cached_pooled.device)]
                labels = train.labels[indices.to(train.labels.device)].to(device)
                totals = train_head_epoch(model, trainable, pooled, labels, optimizer, criterion, config,
                                          local_batch, epoch)
            else:
                if use_graphs and graphed is None:
                    graphed = _try_graph(model, optimizer, criterion, train, indices, local_batch, config, device, log)
                totals = train_full_epoch(model, trainable, train, indices, optimizer, criterion, config,
                                          local_batch, epoch, device, generator, graphed)
            loss_sum, correct, seen = all_reduce_sum(totals, env).tolist()
            record = {"epoch": epoch, "stage": stage, "train_loss": loss_sum / max(seen, 1),
                      "train_acc": correct / max(seen, 1)}
            record.update(validate(model, data["val"], criterion, config, device))
            record["seconds"] = round(time.perf_counter() - epoch_start, 2)
            history.append(record)
            improved = is_better(record, best)
            if improved:
                best = {k: record[k] for k in ("epoch", "val_acc", "val_loss")}
            if env.is_main:
                _save_epoch(writer, model, optimizer, meta, epoch, stage, best, history, improved, best_path, last_path)
            log(f"epoch {epoch:>3}/{config.total_epochs} stage {stage}  train loss {record['train_loss']:.4f} "
                f"acc {record['train_acc']:.3f}  val loss {record['val_loss']:.4f} acc {record['val_acc']:.3f}  "
                f"{record['seconds']:.1f}s" + ("  * best" if improved else ""))
    finally:
        writer.close()                       # every checkpoint is on disk before anyone reads it

    barrier(env)
    report_path, test_metrics, notes = None, None, []
    if env.is_main:
        if not best_path.exists():
            raise CheckpointError(f"training produced no {best_path} (0 epochs requested?)")
        report_path, test_metrics, notes = finalize(best_path, data, splits, config, device, history, log)
        log(f"peak memory: {peak_memory_summary(device)}")
    return FitResult(best_path, last_path, report_path, history, test_metrics,
                     time.perf_counter() - started, notes)


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


def _wrap_for_stage(model: OrganClassifier, stage: int, env: DistEnv, device: torch.device) -> nn.Module:
    """What the optimizer's gradients flow through: the head's Linear in stage 1, the whole model in stage 2,
    wrapped in DistributedDataParallel when several processes train (re-wrapped at the stage switch, since
    DDP only synchronises parameters that required gradients when it was built)."""
    module = model.head.fc if stage == 1 else model
    if not env.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def _try_graph(model, optimizer, criterion, train: TensorSplit, indices, local_batch, config, device, log):
    """Capture the stage-2 step as a CUDA graph; on any failure log why and train eagerly instead."""
    from mediscan.training.graphed_step import GraphedTrainStep
    if len(indices) < local_batch:
        return None
    first = indices[:local_batch].to(train.images.device)
    try:
        set_train_mode(model, 2)
        step = GraphedTrainStep(model, optimizer, criterion,
                                to_memory_format(train.images[first].to(device), device),
                                train.labels[first].to(device), augment=config.augment, amp=config.amp)
        log("stage 2 runs as a captured CUDA graph (whole step replayed per batch)")
        return step
    except Exception as exc:  # noqa: BLE001 -- graphs are an optimisation; eager training is always correct
        log(f"CUDA graph capture unavailable ({exc.__class__.__name__}: {exc}); training eagerly")
        optimizer.zero_grad(set_to_none=True)
        return None


def _save_epoch(writer, model, optimizer, meta, epoch, stage, best, history, improved, best_path, last_path) -> None:
    """best.safetensors when validation improved; last.safetensors (with optimizer state) every epoch."""
    if improved:
        writer.submit(best_path, model, {**meta, "epoch": epoch, "stage": stage, "best": best})
    optim_tensors, groups = optimizer_tensors(optimizer)
    writer.submit(last_path, model, {**meta, "epoch": epoch, "stage": stage, "best": best,
                                       "training_state": {"history": history, "optimizer_groups": groups}},
                    optim_tensors)


def _resume(model, last_path: Path, splits: DatasetSplits, config: TrainConfig, device, log, capturable: bool):
    """Load ``last`` (weights, optimizer, history) after checking it belongs to this dataset."""
    if not last_path.exists():
        raise CheckpointError(f"--resume: no {last_path} to resume from (train without --resume first)")
    meta = read_metadata(last_path)
    if meta.get("classes") != splits.classes:
        raise CheckpointError(f"--resume: {last_path} was trained on classes {meta.get('classes')}, "
                              f"the dataset now has {splits.classes}")
    if (meta.get("dataset_fingerprint") or {}).get("sha256") != splits.fingerprint["sha256"]:
        raise CheckpointError(f"--resume: the files under {config.data} changed since {last_path} was written; "
                              f"start a new run (without --resume) or restore the dataset")
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


def finalize(best_path: Path, data: dict[str, TensorSplit], splits: DatasetSplits, config: TrainConfig,
             device: torch.device, history: list[dict], log: Callable[[str], None]):
    """Calibrate, fit the out-of-scope detector, evaluate on test, rewrite best with it all, write the report."""
    from mediscan.core.ood import DEFAULT_LAYERS as OOD_LAYERS
    from mediscan.core.ood import fit_ood
    from mediscan.evaluation.metrics import classification_metrics, fit_temperature
    from mediscan.evaluation.report import save_history, save_split_gallery, write_report

    started = time.perf_counter()
    best = load_checkpoint(best_path, device)
    model, meta = best.model, best.meta
    batch = config.batch_size * 4
    # fp32 even where training ran under bf16 autocast: the Predictor answers in fp32, and the
    # temperature and the out-of-scope threshold only mean what they promise ("at most 5 % of validation
    # flagged") on the numbers it computes. Fitted on bf16 features, a trained checkpoint flagged 6.5 %.
    val_logits, val_pooled = predict_split(model, data["val"].images, batch, device, amp=False, layers=OOD_LAYERS)
    temperature = fit_temperature(val_logits, data["val"].labels)
    _, train_pooled = predict_split(model, data["train"].images, batch, device, amp=False, layers=OOD_LAYERS)
    detector = fit_ood(train_pooled, data["train"].labels.cpu(), val_pooled)
    val_metrics = classification_metrics(val_logits, data["val"].labels, splits.classes, temperature)
    test_metrics = None
    if len(data["test"]):
        test_logits, _ = predict_split(model, data["test"].images, batch, device, amp=False)
        test_metrics = classification_metrics(test_logits, data["test"].labels, splits.classes, temperature)
    meta.update(temperature=temperature, ood=detector.to_meta(),
                metrics={"val": _headline(val_metrics), "test": _headline(test_metrics)})
    save_checkpoint(best_path, model, meta, detector.to_tensors())
    log(f"temperature {temperature:.3f} (fitted on val); out-of-scope threshold {detector.threshold:.2f}")

    log(f"calibration and out-of-scope fit: {time.perf_counter() - started:.1f}s")
    out = best_path.parent
    _, curves = save_history(history, out)
    notes = describe_dataset(splits, config)
    report = None
    if test_metrics is not None:
        gallery = None
        if config.gallery:
            gallery = save_split_gallery(model, data["test"], splits.classes, out / "gradcam_gallery.png")
        report = write_report(out, classes=splits.classes, metrics=test_metrics, meta=meta, checkpoint=best_path,
                              history_png=curves, gallery_png=gallery, val_metrics=val_metrics,
                              dataset_notes=notes)
        roc_auc = test_metrics["macro_roc_auc"]
        log(f"test: accuracy {test_metrics['accuracy']:.3f}, macro F1 {test_metrics['macro_f1']:.3f}, "
            f"macro ROC-AUC {roc_auc if roc_auc is None else round(roc_auc, 3)}, "
            f"ECE {test_metrics['ece']:.3f} -> {test_metrics['ece_calibrated']:.3f}")
        log(f"report: {report}")
    return report, test_metrics, notes


def _headline(metrics: dict | None) -> dict | None:
    if metrics is None:
        return None
    keys = ("n", "accuracy", "macro_f1", "macro_roc_auc", "ece", "ece_calibrated")
    return {k: metrics[k] for k in keys}

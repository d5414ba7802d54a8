"""What a training run is asked to do (:class:`TrainConfig`) and what it hands back (:class:`FitResult`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mediscan.core.model import DEFAULT_WEIGHTS
from mediscan.core.preprocessing import DEFAULT_INPUT_SIZE

#: File names inside ``TrainConfig.out``: the best validation epoch, and the latest epoch (resumable).
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
    cache_dir: str | None = None           # decoded uint8 pixels on disk (None: in RAM)
    amp: bool = True
    cuda_graphs: bool = True
    resume: bool = False
    progress: bool = True
    gallery: bool = True
    modalities: str | None = None          # DICOM modalities for meta["modalities"] (None: from the data)
    outlier_exposure: bool = False         # stage 2 also trains on synthetic outliers (training/outliers.py)
    oe_weight: float = 0.1                 # weight of the energy-margin loss on in-scope images and outliers
    oe_fraction: float = 0.5               # outliers per step, as a share of the batch
    # Which synthetic outlier kinds (comma-separated names, or all): outliers.DEFAULT_OUTLIER_KINDS.
    oe_kinds: str = "patch_shuffle,phase_scramble,mosaic,warp,texture"

    @property
    def total_epochs(self) -> int:
        return self.head_epochs + self.finetune_epochs

    def stage_of(self, epoch: int) -> int:
        """Stage (1 or 2) of a 1-based epoch number."""
        return 1 if epoch <= self.head_epochs else 2

    @property
    def best_path(self) -> Path:
        return Path(self.out) / BEST_NAME

    @property
    def last_path(self) -> Path:
        return Path(self.out) / LAST_NAME


@dataclass
class FitResult:
    """The checkpoints and report a run wrote, its per-epoch history, test metrics and wall time."""

    best_path: Path
    last_path: Path
    report_path: Path | None
    history: list[dict]
    test_metrics: dict | None
    seconds: float

"""Checkpoints: one ``.safetensors`` file holding the weights and a JSON metadata record.

Loading never unpickles (safetensors holds raw tensors only), and saving is atomic: the file is written
to a temporary name in the same folder, flushed to disk, then renamed over the old one, so a crash or a
full disk mid-save leaves the previous checkpoint intact.

Tensor names: ``model.<state-dict key>`` for the classifier, ``<group>.<name>`` for extra tensors
(``ood.*`` out-of-scope statistics, ``optim.*`` optimizer state in resumable training checkpoints).

Metadata keys (JSON, see :func:`new_metadata`): ``classes``, ``architecture``, ``preprocessing``,
``dropout``, ``weight_source``, ``temperature``, ``train_args``, ``dataset_fingerprint``, ``metrics``,
``versions``, ``created``, plus whatever else the writer adds (``ood``, ``epoch``, ``stage`` ...).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from mediscan.core.atomic_file import atomic_write_bytes
from mediscan.core.model import ARCHITECTURE, OrganClassifier, densenet121_features
from mediscan.core.preprocessing import PreprocessConfig

FORMAT = "mediscan-checkpoint"
FORMAT_VERSION = "1"
MODEL_PREFIX = "model."


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not fit this program (message says which and why)."""


@dataclass
class LoadedCheckpoint:
    model: OrganClassifier
    meta: dict
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = None

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def preprocessing(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.meta["preprocessing"])

    @property
    def temperature(self) -> float:
        return float(self.meta.get("temperature") or 1.0)


def library_versions() -> dict[str, str]:
    """Versions that matter for reproducing a checkpoint."""
    import numpy
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    try:
        from importlib.metadata import version
        versions["torchxrayvision"] = version("torchxrayvision")
    except Exception:  # noqa: BLE001 -- metadata is informative only
        pass
    return versions


def new_metadata(classes: list[str], preprocessing: PreprocessConfig, weight_source: str,
                 dropout: float = 0.0, **extra) -> dict:
    """The metadata record every checkpoint starts from."""
    meta = {
        "classes": list(classes),
        "architecture": ARCHITECTURE,
        "preprocessing": preprocessing.to_dict(),
        "dropout": float(dropout),
        "weight_source": weight_source,
        "temperature": 1.0,
        "train_args": {},
        "dataset_fingerprint": None,
        "metrics": {},
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(extra)
    return meta


def checkpoint_tensors(model: torch.nn.Module, meta: dict,
                       extra: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A private CPU copy of everything a checkpoint stores (training may go on changing the originals)."""
    if len(meta.get("classes", [])) != model.head.fc.out_features:
        raise CheckpointError(f"metadata lists {len(meta.get('classes', []))} classes but the model has "
                              f"{model.head.fc.out_features} outputs")

    def cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
        # .to("cpu") alone returns the same storage for CPU tensors; a checkpoint needs a snapshot.
        return tensor.detach().to("cpu", copy=True).contiguous()

    tensors = {MODEL_PREFIX + k: cpu_copy(v) for k, v in model.state_dict().items()}
    for name, tensor in (extra or {}).items():
        if name.startswith(MODEL_PREFIX):
            raise ValueError(f"extra tensor name {name!r} clashes with the model's prefix")
        tensors[name] = cpu_copy(tensor)
    return tensors


def write_checkpoint_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Serialise tensors + metadata to ``path`` atomically."""
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "meta": json.dumps(meta, default=str)}
    path = Path(path)
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=header))
    return path


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, meta: dict,
                    extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` + ``meta`` (+ extra tensors) to ``path`` atomically and return the path."""
    return write_checkpoint_tensors(path, checkpoint_tensors(model, meta, extra), meta)


class BackgroundCheckpointWriter:
    """Writes checkpoints on one background thread, in submission order, so training need not wait for
    the disk (an epoch's ``last`` checkpoint with Adam's state is ~3x the weights). The snapshot is taken
    at submission; a failed write is raised by the next :meth:`submit` or by :meth:`wait`."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: list = []

    def submit(self, path: str | os.PathLike, model: torch.nn.Module, meta: dict,
               extra: dict[str, torch.Tensor] | None = None) -> None:
        self._raise_failures(block=False)
        tensors = checkpoint_tensors(model, meta, extra)
        frozen_meta = json.loads(json.dumps(meta, default=str))    # the caller keeps appending to its lists
        self._pending.append(self._pool.submit(write_checkpoint_tensors, path, tensors, frozen_meta))

    def wait(self) -> None:
        """Block until every submitted checkpoint is on disk (re-raising a write error)."""
        self._raise_failures(block=True)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def _raise_failures(self, block: bool) -> None:
        finished = [f for f in self._pending if block or f.done()]
        self._pending = [f for f in self._pending if f not in finished]
        for future in finished:                 # a failure is raised once, then forgotten
            future.result()


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata record only (reads the header, not the weights)."""
    path = Path(path)
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint ({exc}). It may be corrupt or "
                              f"truncated; retrain or restore it from a backup.") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a MediScan checkpoint "
                              f"(no '{FORMAT}' header).")
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} uses checkpoint format {header.get('format_version')}, "
                              f"this MediScan reads format {FORMAT_VERSION}.")
    try:
        return json.loads(header["meta"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} has corrupt metadata ({exc}).") from None


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load a checkpoint into a fresh :class:`OrganClassifier` in eval mode.

    Raises :class:`CheckpointError` for a missing or corrupt file, another architecture, missing or
    unexpected weights, or a class count that does not match the weights.
    """
    path = Path(path)
    meta = read_metadata(path)
    if meta.get("architecture") != ARCHITECTURE:
        raise CheckpointError(f"{path} holds a {meta.get('architecture')!r} model; "
                              f"this MediScan builds {ARCHITECTURE!r}.")
    classes = meta.get("classes") or []
    if "preprocessing" not in meta:
        # Guessing the defaults would feed the model images it was never trained on.
        raise CheckpointError(f"{path} has no 'preprocessing' record in its metadata, so the input size and "
                              f"scaling it was trained with are unknown; retrain it with this MediScan.")
    try:
        PreprocessConfig.from_dict(meta["preprocessing"])
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} could not be read ({exc}); it may be corrupt.") from None

    state = {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    extra = {k: v for k, v in tensors.items() if not k.startswith(MODEL_PREFIX)}
    fc_weight = state.get("head.fc.weight")
    if fc_weight is None:
        raise CheckpointError(f"{path} has no classifier head weights (head.fc.weight).")
    if fc_weight.shape[0] != len(classes):
        raise CheckpointError(f"{path} lists {len(classes)} classes {classes} but its head has "
                              f"{fc_weight.shape[0]} outputs.")

    model = OrganClassifier(densenet121_features(), len(classes), float(meta.get("dropout", 0.0)))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path} does not fit the {ARCHITECTURE} model: {len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(wrong)} wrongly shaped weights (first: {(missing + unexpected + wrong)[:3]}).")
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    return LoadedCheckpoint(model=model, meta=meta, extra=extra, path=path)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"No checkpoint at {path}.")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; point to the .safetensors file inside it.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); an interrupted copy? Restore or retrain it.")

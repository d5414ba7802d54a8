"""Which checkpoint file a Predictor loads, and what to tell a user who has none yet."""
from __future__ import annotations

import os
from pathlib import Path

from mediscan.core.checkpoint import CheckpointError

__all__ = ["DEFAULT_CHECKPOINT", "ENV_CHECKPOINT", "TRAIN_COMMAND", "ModelNotFoundError", "resolve_checkpoint_path"]

DEFAULT_CHECKPOINT = Path("models/best.safetensors")
#: Environment variable naming the checkpoint when no path is passed.
ENV_CHECKPOINT = "MEDISCAN_MODEL"
#: The command that produces ``models/best.safetensors`` (quoted in "no model" messages).
TRAIN_COMMAND = "python densenet121_xray_classifier.py --data dataset --out models"


class ModelNotFoundError(CheckpointError):
    """No checkpoint file where one was expected; the message names the path and the training command."""


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

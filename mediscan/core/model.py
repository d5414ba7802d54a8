"""The organ classifier: torchxrayvision's DenseNet121 backbone with a small organ head.

Input: ``(B, 1, S, S)`` float tensors in [-1024, 1024] (see :mod:`mediscan.preprocessing`).
Output: ``(B, n_classes)`` logits.

Where the backbone weights come from (``build_model(weights=...)``):

* a torchxrayvision name such as ``densenet121-res224-chex`` -- downloaded once into the library's cache
  folder (``~/.torchxrayvision``) when online;
* a local file -- a torchxrayvision ``.pt`` (pickled model or state dict) or an original CheXNet
  ``model.pth.tar`` (``module.`` prefixes, ``norm.1``-style key names, 3-channel ImageNet input);
* ``none`` -- random initialisation.

Files are never unpickled with arbitrary code: see :func:`_safe_torch_load`.
"""
from __future__ import annotations

import importlib
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

ARCHITECTURE = "xrv-densenet121"
FEATURE_CHANNELS = 1024
DEFAULT_WEIGHTS = "densenet121-res224-chex"
NO_WEIGHTS = "none"


class WeightsError(RuntimeError):
    """The requested starting weights cannot be found, fetched or understood (message says what to do)."""


class OrganHead(nn.Module):
    """ReLU -> global average pool -> dropout -> Linear, as torchxrayvision's ``features2`` pools.

    The ReLU is a module of its own (not in-place) so that Grad-CAM can hook the full final feature map.
    """

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def pool_features(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) backbone output -> (B, C) pooled, rectified features."""
        return self.pool(self.relu(feature_map)).flatten(1)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.pool_features(feature_map)))


class OrganClassifier(nn.Module):
    """DenseNet121 ``features`` (ending at norm5, before its ReLU) followed by :class:`OrganHead`."""

    def __init__(self, features: nn.Sequential, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.features = features
        self.head = OrganHead(FEATURE_CHANNELS, num_classes, dropout)

    @property
    def num_classes(self) -> int:
        return self.head.fc.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1024) features the head's Linear layer sees."""
        return self.head.pool_features(self.features(x))

    def tapped_features(self, x: torch.Tensor,
                        layers: Sequence[str] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One backbone pass: the final feature map (as :attr:`features` returns it, before the head's
        ReLU) and, for each named stage of ``features`` in ``layers``, its output rectified and
        spatially averaged to ``(B, channels)`` -- what the out-of-scope detector reads.

        ``"norm5"`` (the last stage) gives exactly :meth:`pooled_features`. Unknown names raise
        ``ValueError``, listing the stages there are.
        """
        wanted = set(layers)
        unknown = wanted - {name for name, _ in self.features.named_children()}
        if unknown:
            raise ValueError(f"no backbone stage named {', '.join(sorted(unknown))}; stages are "
                             f"{', '.join(name for name, _ in self.features.named_children())}")
        pooled = {}
        h = x
        for name, stage in self.features.named_children():
            h = stage(h)
            if name in wanted:
                pooled[name] = self.head.pool_features(h)    # ReLU -> mean, as the head pools norm5
        return h, {name: pooled[name] for name in layers}


def densenet121_features() -> nn.Sequential:
    """A freshly initialised 1-channel torchxrayvision DenseNet121 feature extractor."""
    xrv_models = _import_xrv_models()
    backbone = xrv_models.DenseNet(weights=None, in_channels=1).features
    # In-place ReLUs overwrite the tensor a forward hook captured, which silently rectifies
    # activations seen by Grad-CAM on intermediate layers and breaks module backward hooks.
    for module in backbone.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return backbone


def build_model(num_classes: int, weights: str = DEFAULT_WEIGHTS, dropout: float = 0.0,
                cache_dir: str | os.PathLike | None = None) -> tuple[OrganClassifier, str]:
    """Build the classifier and load backbone weights.

    Returns the model and a one-line description of where the backbone weights came from
    (stored in every checkpoint). Raises :class:`WeightsError` with instructions when the weights
    cannot be had -- there is never a silent fallback to random weights.
    """
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    features = densenet121_features()
    if str(weights).lower() == NO_WEIGHTS:
        source = "none (random initialisation)"
    elif Path(weights).expanduser().is_file():
        path = Path(weights).expanduser()
        _load_backbone_state(features, backbone_state_from_file(path), str(path))
        source = f"file:{path.name}"
    elif weights in _xrv_weight_names():
        path = fetch_xrv_weights(weights, cache_dir)
        _load_backbone_state(features, backbone_state_from_file(path), str(path))
        source = f"torchxrayvision:{weights}"
    else:
        raise WeightsError(
            f"--weights {weights!r} is neither an existing file nor a torchxrayvision DenseNet name. "
            f"Use one of {', '.join(sorted(_xrv_weight_names()))}, a path to a .pt / model.pth.tar file, "
            f"or 'none' for random initialisation.")
    return OrganClassifier(features, num_classes, dropout), source


# --------------------------------------------------------------------------------------------------
# torchxrayvision names: cache location and download
# --------------------------------------------------------------------------------------------------

def _import_xrv_models():
    # torchxrayvision calls warnings.filterwarnings("ignore") at import, silencing every warning in
    # the process (including ours and PyTorch's); keep the filters as they were.
    saved_filters = list(warnings.filters)
    try:
        return importlib.import_module("torchxrayvision.models")
    finally:
        warnings.filters[:] = saved_filters
        warnings._filters_mutated()


def _xrv_weight_names() -> set[str]:
    return {name for name in _import_xrv_models().model_urls if name.startswith("densenet121")}


def xrv_weights_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where torchxrayvision keeps (or would keep) the weights file for ``name``."""
    xrv_models = _import_xrv_models()
    folder = Path(cache_dir) if cache_dir else Path(xrv_models.utils.get_cache_dir())
    return folder.expanduser() / os.path.basename(xrv_models.model_urls[name]["weights_url"])


def fetch_xrv_weights(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the cached weights file for ``name``, downloading it first if it is not there yet."""
    xrv_models = _import_xrv_models()
    path = xrv_weights_path(name, cache_dir)
    if path.is_file():
        return path
    url = xrv_models.model_urls[name]["weights_url"]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        xrv_models.utils.download(url, str(partial))
        os.replace(partial, path)
    except Exception as exc:  # noqa: BLE001 -- any network failure gets the same instructions
        partial.unlink(missing_ok=True)
        raise WeightsError(
            f"Could not download the pretrained weights {name!r} ({exc.__class__.__name__}: {exc}).\n"
            f"  Missing file: {path}\n"
            f"  Put a copy of {url.rsplit('/', 1)[-1]} in {path.parent} (or pass --weights PATH to a local "
            f"file), or train from scratch with --weights none.") from None
    return path


# --------------------------------------------------------------------------------------------------
# Local weight files: torchxrayvision .pt and CheXNet model.pth.tar
# --------------------------------------------------------------------------------------------------

# ImageNet statistics the original CheXNet was trained with (3-channel input).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_OLD_KEY = re.compile(r"\.(norm|relu|conv)\.(\d+)\.")


def _safe_torch_load(path: Path):
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, no code runs.

    Whole pickled torchxrayvision models are also accepted, but only nn.Module classes from torch,
    torchvision or torchxrayvision are allowed to be reconstructed (as plain attribute bags).
    """
    allowed: list[type] = []
    for _ in range(64):  # each pass allows one more module class the file names
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 -- decide below what it was
            cls = _trusted_module_class(str(exc))
            if cls is None or cls in allowed:
                raise WeightsError(
                    f"{path} is not a weights file MediScan can read safely ({_first_line(exc)}). "
                    f"Expected a torchxrayvision .pt or a CheXNet model.pth.tar; files that need "
                    f"arbitrary code to load are refused.") from None
            allowed.append(cls)
    raise WeightsError(f"{path}: too many module classes to allow.")


def _trusted_module_class(message: str) -> type | None:
    """The nn.Module subclass named in a weights_only refusal, if it comes from a trusted package."""
    match = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"global ['\"]?([\w.]+)", message)
    if not match:
        return None
    dotted = match.group(1)
    module_name, _, attr = dotted.rpartition(".")
    if not module_name.split(".")[0] in {"torch", "torchvision", "torchxrayvision"}:
        return None
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) and issubclass(obj, nn.Module) else None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]


def backbone_state_from_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file and return a 1-channel ``features.*`` state dict (keys without the prefix)."""
    loaded = _safe_torch_load(path)
    if isinstance(loaded, nn.Module):
        state = loaded.state_dict()
    elif isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        state = loaded["state_dict"]          # CheXNet: {'epoch', 'arch', 'state_dict', ...}
    elif isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        state = loaded["model"]
    elif isinstance(loaded, dict):
        state = loaded
    else:
        raise WeightsError(f"{path} holds a {type(loaded).__name__}, not a model or a state dict.")

    features: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = _OLD_KEY.sub(r".\1\2.", key)
        for prefix in ("module.", "densenet121.", "model."):
            key = key.removeprefix(prefix)
        if key.startswith("features."):      # the 14/18-output pathology head is dropped
            features[key.removeprefix("features.")] = value
    if not features:
        raise WeightsError(f"{path} contains no DenseNet 'features.*' weights.")
    conv0 = features.get("conv0.weight")
    if conv0 is not None and conv0.shape[1] == 3:
        _fold_imagenet_rgb_into_grayscale(features)
    return features


def _fold_imagenet_rgb_into_grayscale(features: dict[str, torch.Tensor]) -> None:
    """Turn CheXNet's 3-channel ImageNet-normalised first layer into one that takes our input.

    CheXNet saw x_c = (p - mean_c) / std_c for a grey pixel p in [0, 1]; we feed x = (2p - 1) * 1024,
    so x_c = x / (2048 std_c) + (0.5 - mean_c) / std_c. The linear part folds into conv0's weights;
    the constant part is a per-output-channel offset, absorbed by norm0's running mean
    (exact away from the zero-padded border).
    """
    weight = features["conv0.weight"].float()                       # (64, 3, 7, 7)
    std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
    mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
    features["conv0.weight"] = (weight / (2048.0 * std)).sum(dim=1, keepdim=True)
    offset = (weight * ((0.5 - mean) / std)).sum(dim=(1, 2, 3))     # (64,)
    if "norm0.running_mean" in features:
        features["norm0.running_mean"] = features["norm0.running_mean"].float() - offset


def _load_backbone_state(features: nn.Sequential, state: dict[str, torch.Tensor], origin: str) -> None:
    expected = features.state_dict()
    missing = sorted(set(expected) - set(state))
    wrong_shape = sorted(k for k in expected if k in state and state[k].shape != expected[k].shape)
    if missing or wrong_shape:
        detail = (f"{len(missing)} missing (e.g. {missing[:3]})" if missing else
                  f"shape mismatch for {wrong_shape[:3]}")
        raise WeightsError(f"{origin} does not fit a 1-channel DenseNet121 backbone: {detail}.")
    features.load_state_dict({k: state[k] for k in expected}, strict=True)

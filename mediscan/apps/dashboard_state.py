"""The dashboard's state: the model, loaded once per process and shared by every session, and each
session's bounded cache of explanations (so a slider move never runs the model again).

The :class:`~mediscan.inference.predictor.Predictor` is thread-safe; Streamlit shares it across sessions.
"""
from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import streamlit as st

from mediscan.inference.predictor import (
    DEFAULT_CHECKPOINT,
    ENV_CHECKPOINT,
    Explanation,
    Predictor,
    resolve_checkpoint_path,
)

#: Images are shown at most this many pixels wide/high: a 3000 px X-ray sent three times per slider move
#: would make the page sluggish. Downloads keep the full resolution.
PREVIEW_MAX_SIDE = 768
_CACHE_STATE_KEY = "mediscan_explanations"

# --------------------------------------------------------------------------------------------------
# Model loading (once per process, shared across sessions)
# --------------------------------------------------------------------------------------------------

def default_checkpoint_text() -> str:
    """The checkpoint path field's initial value: ``$MEDISCAN_MODEL``, else ``models/best.safetensors``."""
    return os.environ.get(ENV_CHECKPOINT) or str(DEFAULT_CHECKPOINT)


@st.cache_resource(max_entries=2, show_spinner="Loading the model ...")
def _cached_predictor(path: str, mtime_ns: int, size: int) -> Predictor:
    # mtime and size are part of the key only: a retrained checkpoint at the same path is reloaded, and
    # max_entries=2 lets the replaced model be freed.
    del mtime_ns, size
    return Predictor(path)


def load_predictor(path_text: str | None) -> Predictor:
    """The shared :class:`Predictor` for the checkpoint at ``path_text`` (empty = the Predictor's default).

    Raises :class:`ModelNotFoundError` when there is no file, :class:`CheckpointError` when it is unusable.
    """
    path = resolve_checkpoint_path(path_text or None).resolve()
    stat = path.stat()
    return _cached_predictor(str(path), stat.st_mtime_ns, stat.st_size)


def model_key(predictor: Predictor) -> str:
    """Identifies the loaded weights, so cached explanations never outlive a model switch."""
    path = Path(predictor.checkpoint_path)
    try:
        return f"{path}:{path.stat().st_mtime_ns}"
    except OSError:
        return str(path)


# --------------------------------------------------------------------------------------------------
# Per-session explanation cache
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CachedExplanation:
    """An explanation at full resolution (downloads) plus a small copy for the page (previews)."""

    full: Explanation
    preview: Explanation

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (self.full.image, self.full.heatmap,
                                           self.preview.image, self.preview.heatmap))


def preview_of(explanation: Explanation, max_side: int = PREVIEW_MAX_SIDE) -> Explanation:
    """The same explanation with image and heatmap shrunk to at most ``max_side`` pixels."""
    height, width = explanation.image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return explanation
    size = (max(1, round(width * scale)), max(1, round(height * scale)))   # cv2 wants (width, height)
    image = cv2.resize(explanation.image, size, interpolation=cv2.INTER_AREA)
    heatmap = cv2.resize(explanation.heatmap, size, interpolation=cv2.INTER_AREA)
    return dataclasses.replace(explanation, image=image, heatmap=heatmap)


class ExplanationCache:
    """A bounded LRU of explanations keyed by (model, image-bytes hash, explained class).

    Lives in ``st.session_state`` (see :func:`session_cache`): results of one user's images stay in that
    user's session and disappear with it. Bounded by entry count and by bytes, because full-resolution
    X-rays are tens of MB each.
    """

    def __init__(self, max_entries: int = 24, max_bytes: int = 512 * 2**20):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, CachedExplanation] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple) -> CachedExplanation | None:
        """The cached entry (marked as recently used), or ``None``."""
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: tuple, item: CachedExplanation) -> None:
        """Store ``item``, evicting the least recently used entries beyond the bounds (never ``item``)."""
        self._items[key] = item
        self._items.move_to_end(key)
        while len(self._items) > 1 and (len(self._items) > self.max_entries or self._total_bytes() > self.max_bytes):
            self._items.popitem(last=False)

    def _total_bytes(self) -> int:
        # Several keys may share one entry (the default-class alias); count each object once.
        return sum(item.nbytes for item in {id(i): i for i in self._items.values()}.values())

    def explain(self, predictor: Predictor, data: bytes, class_name: str | None, *, name: str,
                model: str, digest: str) -> CachedExplanation:
        """The explanation of ``data`` for ``class_name`` (``None`` = predicted class), computing it only once.

        ``digest`` is the SHA-256 of ``data`` (the caller already has it). Raises what
        :meth:`Predictor.explain` raises (:class:`ImageReadError` for a bad image).
        """
        key = (model, digest, class_name)
        cached = self.get(key)
        if cached is not None:
            return cached
        explanation = predictor.explain(data, class_name, name=name)
        item = CachedExplanation(explanation, preview_of(explanation))
        self.put(key, item)
        if class_name is None:   # choosing the predicted class by name later must not run the model again
            self.put((model, digest, explanation.explained_class), item)
        return item


def session_cache() -> ExplanationCache:
    """This session's :class:`ExplanationCache` (created on first use)."""
    if _CACHE_STATE_KEY not in st.session_state:
        st.session_state[_CACHE_STATE_KEY] = ExplanationCache()
    return st.session_state[_CACHE_STATE_KEY]

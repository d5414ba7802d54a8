"""The one way MediScan makes a matplotlib figure: an Agg canvas, never pyplot.

Report figures, the Grad-CAM gallery and the CLI's three-panel picture are drawn by servers, CI and
worker threads. pyplot would pick a GUI backend where a display exists (``matplotlib.use("Agg")`` at
import time switches it for the whole process, the user's own plots included) and keeps every figure in
a global registry that is not thread-safe. A :class:`~matplotlib.figure.Figure` attached to its own Agg
canvas draws to PNG anywhere and is freed like any object, without ``plt.close``.
"""
from __future__ import annotations


def new_figure(**kwargs):
    """A :class:`matplotlib.figure.Figure` (``kwargs`` as for it: ``figsize``, ``dpi``, ``layout`` ...) on an
    Agg canvas, ready for ``subplots`` and ``savefig``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure

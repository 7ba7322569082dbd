"""PNG plots of loss landscapes (matplotlib's Agg renderer, no display, no pyplot global state).

Figures are built as ``matplotlib.figure.Figure`` objects and saved through
:func:`esam_timm.fileio.atomic_open`, so a plot file is either complete or absent and importing this
module never changes the caller's matplotlib backend.
"""
import math
from typing import Mapping, Sequence, Tuple

from esam_timm.fileio import atomic_open

from .landscape import Landscape1D, Landscape2D

__all__ = ['plot_landscapes_1d', 'plot_landscape_2d', 'plot_interpolations']


def _figure(size: Tuple[float, float] = (6.0, 4.5)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str) -> None:
    figure.tight_layout()
    with atomic_open(path, 'wb') as f:
        figure.savefig(f, format='png')


def plot_landscapes_1d(curves: Mapping[str, Landscape1D], path: str, title: str = 'Loss along a filter-normalised '
                       'random direction') -> None:
    """One line per checkpoint: loss against the step along its filter-normalised direction."""
    figure = _figure()
    axes = figure.add_subplot()
    for name, curve in curves.items():
        axes.plot(curve.alphas, curve.losses, marker='.', label=name)
    axes.axvline(0.0, color='0.7', linewidth=0.8)
    axes.set_xlabel('alpha (step along the direction, in units of the filter norms)')
    axes.set_ylabel('training loss')
    axes.set_title(title)
    axes.legend()
    _save(figure, path)


def plot_landscape_2d(grid: Landscape2D, path: str, title: str) -> None:
    """Filled contours of the loss over the plane of two filter-normalised directions."""
    import numpy as np
    figure = _figure((5.5, 4.5))
    axes = figure.add_subplot()
    losses = np.asarray(grid.losses, dtype=float)
    finite = losses[np.isfinite(losses)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if not high > low:
        high = low + max(abs(low), 1.0) * 1e-6
    levels = np.linspace(low, high, 21)
    filled = axes.contourf(grid.alphas, grid.betas, np.nan_to_num(losses, nan=high, posinf=high), levels=levels,
                           cmap='viridis', extend='max')
    lines = axes.contour(grid.alphas, grid.betas, np.nan_to_num(losses, nan=high, posinf=high), levels=levels[::4],
                         colors='white', linewidths=0.6)
    axes.clabel(lines, fontsize=7, fmt='%.3g')
    figure.colorbar(filled, ax=axes, label='training loss')
    axes.plot([0.0], [0.0], marker='+', color='red', markersize=10)
    axes.set_xlabel('alpha (direction 1)')
    axes.set_ylabel('beta (direction 2)')
    axes.set_title(title)
    _save(figure, path)


def plot_interpolations(curves: Sequence[Tuple[str, Landscape1D]], path: str) -> None:
    """The loss along the straight line from one checkpoint (alpha = 0) to another (alpha = 1)."""
    figure = _figure()
    axes = figure.add_subplot()
    for label, curve in curves:
        axes.plot(curve.alphas, curve.losses, marker='.', label=label)
    for end in (0.0, 1.0):
        axes.axvline(end, color='0.7', linewidth=0.8)
    axes.set_xlabel('alpha ((1 - alpha) * A + alpha * B)')
    axes.set_ylabel('training loss')
    axes.set_title('Linear interpolation between checkpoints')
    axes.legend()
    finite = [v for _, c in curves for v in c.losses if math.isfinite(v)]
    if finite and max(finite) > 50 * max(min(finite), 1e-3):
        axes.set_yscale('log')
    _save(figure, path)

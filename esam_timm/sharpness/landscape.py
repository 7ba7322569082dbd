"""Loss landscapes: the loss along filter-normalised random directions (Li et al., "Visualizing the
Loss Landscape of Neural Nets", NeurIPS 2018) and along the line between two checkpoints.

A random direction is only comparable between networks once it is scaled to the weights it moves:
:func:`filter_normalized_direction` rescales each filter (each slice along a weight's first dim) of a
Gaussian direction to the norm of the same filter of the weights, and leaves biases and norm-layer
parameters still (Li et al.'s default). Drawn from a seeded generator, the same seed gives two
checkpoints of one architecture the same raw direction, each normalised to its own weights.

Every curve is measured in eval mode (BatchNorm running statistics) on the same fixed batches, and
the model's weights and buffers are restored bitwise afterwards.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .checkpoints import state_dict_mismatch
from .core import (Batch, LossFn, check_batches, evaluate_loss, measuring, progress_bar, restored_after,
                   seeded_generator, trainable_parameters, unwrap_model)

__all__ = ['Landscape1D', 'Landscape2D', 'filter_normalized_direction', 'loss_landscape_1d', 'loss_landscape_2d',
           'interpolate_checkpoints', 'linspace']

Direction = Dict[str, Tensor]


@dataclass
class Landscape1D:
    """Losses along a line: ``losses[i]`` at coordinate ``alphas[i]`` (0 = the model's weights, or
    the first checkpoint for an interpolation, where 1 is the second)."""
    alphas: List[float]
    losses: List[float]

    def to_dict(self) -> Dict[str, Any]:
        return {'alphas': list(self.alphas), 'losses': list(self.losses)}


@dataclass
class Landscape2D:
    """Losses on a plane: ``losses[j][i]`` at ``alphas[i]`` along the first direction and ``betas[j]``
    along the second (rows are betas, as matplotlib's ``contour(alphas, betas, losses)`` reads them)."""
    alphas: List[float]
    betas: List[float]
    losses: List[List[float]]

    def to_dict(self) -> Dict[str, Any]:
        return {'alphas': list(self.alphas), 'betas': list(self.betas), 'losses': [list(r) for r in self.losses]}


def linspace(low: float, high: float, points: int) -> List[float]:
    """``points`` evenly spaced coordinates from ``low`` to ``high`` (both included; 0 exactly when
    the range is symmetric and ``points`` odd, so the centre is the unperturbed model)."""
    if points < 2:
        raise ValueError(f'points={points} is invalid: a curve needs at least 2 points')
    step = (high - low) / (points - 1)
    values = [float(f'{low + i * step:.12g}') for i in range(points)]  # 0.3, not 0.30000000000000004
    values[-1] = float(high)
    if low == -high and points % 2:
        values[points // 2] = 0.0
    return values


def filter_normalized_direction(model: nn.Module, *, seed: int = 0, ignore_1d: bool = True) -> Direction:
    """A Gaussian direction over the trainable parameters, each filter rescaled to its weights' norm.

    For every parameter with 2 or more dims, slice ``d[k]`` (one output filter / row) is scaled to
    ``||w[k]||``. Parameters with fewer dims (biases, norm-layer scales and shifts) get a zero direction
    with ``ignore_1d`` (Li et al.'s default), else the weights themselves (their ``ignore=''`` choice).
    Drawn from a generator seeded with ``seed``; the global RNG is not used. Returns
    ``{parameter name: direction}``.
    """
    names, params = trainable_parameters(unwrap_model(model))
    generator = seeded_generator(params[0].device, seed)
    direction: Direction = {}
    with torch.no_grad():
        for name, param in zip(names, params):
            noise = torch.randn(param.shape, generator=generator, device=param.device, dtype=param.dtype)
            if param.dim() <= 1:
                direction[name] = torch.zeros_like(noise) if ignore_1d else param.detach().clone()
                continue
            shape = (-1,) + (1,) * (param.dim() - 1)
            weight_norms = param.detach().flatten(1).norm(dim=1).view(shape)
            noise_norms = noise.flatten(1).norm(dim=1).view(shape)
            direction[name] = noise.mul_(weight_norms / (noise_norms + 1e-10))
    return direction


def _aligned(direction: Mapping[str, Tensor], names: Sequence[str], params: Sequence[Tensor],
             what: str) -> List[Tensor]:
    """The direction's tensors in parameter order; refuses one that does not cover the trainable
    parameters with their shapes."""
    missing = [n for n in names if n not in direction]
    extra = [n for n in direction if n not in set(names)]
    if missing or extra:
        raise ValueError(f'{what} does not match the model\'s trainable parameters: '
                         f'{len(missing)} missing (e.g. {missing[:1]}), {len(extra)} unknown (e.g. {extra[:1]}); '
                         f'build it with filter_normalized_direction(model)')
    out = []
    for name, param in zip(names, params):
        tensor = direction[name]
        if tensor.shape != param.shape:
            raise ValueError(f'{what}[{name!r}] has shape {list(tensor.shape)}, the parameter {list(param.shape)}')
        out.append(tensor.to(device=param.device, dtype=param.dtype))
    return out


def _scan(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn, directions: Sequence[Direction],
          points: Sequence[Tuple[float, ...]], desc: str, progress: bool) -> List[float]:
    """The loss at ``w + sum_k c_k d_k`` for each coordinate tuple ``c`` in ``points``."""
    with measuring(model) as inner:
        names, params = trainable_parameters(inner)
        dirs = [_aligned(d, names, params, f'direction {k}') for k, d in enumerate(directions)]
        losses = []
        bar = progress_bar(len(points), desc, progress)
        try:
            with restored_after(params) as original, torch.no_grad():
                for coords in points:
                    torch._foreach_copy_(params, original)
                    for scale, direction in zip(coords, dirs):
                        if scale != 0.0:
                            torch._foreach_add_(params, direction, alpha=scale)
                    losses.append(evaluate_loss(inner, batches, loss_fn))
                    bar.update()
        finally:
            bar.close()
    return torch.stack(losses).tolist()


def loss_landscape_1d(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn, *,
                      direction: Optional[Direction] = None, alphas: Optional[Sequence[float]] = None,
                      seed: int = 0, progress: bool = False) -> Landscape1D:
    """The mean loss over ``batches`` at ``w + alpha * d`` for each alpha (default 21 points in [-1, 1]).

    ``d`` defaults to :func:`filter_normalized_direction` with ``seed``; pass ``direction`` to reuse one.
    """
    batches = check_batches(batches)
    alphas = list(alphas) if alphas is not None else linspace(-1.0, 1.0, 21)
    if direction is None:
        direction = filter_normalized_direction(model, seed=seed)
    losses = _scan(model, batches, loss_fn, [direction], [(a,) for a in alphas], 'Loss landscape 1D', progress)
    return Landscape1D(alphas=[float(a) for a in alphas], losses=losses)


def loss_landscape_2d(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn, *,
                      directions: Optional[Tuple[Direction, Direction]] = None,
                      alphas: Optional[Sequence[float]] = None, betas: Optional[Sequence[float]] = None,
                      seed: int = 0, progress: bool = False) -> Landscape2D:
    """The mean loss over ``batches`` at ``w + alpha * d1 + beta * d2`` on a grid (default 11 x 11 in
    [-1, 1]^2; ``betas`` default to ``alphas``).

    ``d1``, ``d2`` default to filter-normalised directions drawn with ``seed + 1`` and ``seed + 2``
    (``seed`` itself is the 1D landscape's direction).
    """
    batches = check_batches(batches)
    alphas = list(alphas) if alphas is not None else linspace(-1.0, 1.0, 11)
    betas = list(betas) if betas is not None else list(alphas)
    if directions is None:
        directions = (filter_normalized_direction(model, seed=seed + 1),
                      filter_normalized_direction(model, seed=seed + 2))
    if len(directions) != 2:
        raise ValueError(f'directions holds {len(directions)} directions; a 2D landscape needs 2')
    flat = _scan(model, batches, loss_fn, list(directions), [(a, b) for b in betas for a in alphas],
                 'Loss landscape 2D', progress)
    rows = [flat[j * len(alphas):(j + 1) * len(alphas)] for j in range(len(betas))]
    return Landscape2D(alphas=[float(a) for a in alphas], betas=[float(b) for b in betas], losses=rows)


def interpolate_checkpoints(model: nn.Module, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor],
                            batches: Sequence[Batch], loss_fn: LossFn, *, alphas: Optional[Sequence[float]] = None,
                            progress: bool = False) -> Landscape1D:
    """The mean loss over ``batches`` along ``(1 - alpha) * A + alpha * B`` between two state dicts of
    ``model``'s architecture (default 13 points in [-0.25, 1.25]: beyond both ends too).

    Every floating tensor of the state is interpolated, BatchNorm's running statistics included (they
    are what eval mode normalises with; beyond the ends, BatchNorm variances are kept >= 0); integer
    buffers keep the model's values. ``torch.lerp`` makes alpha = 0 and 1 exactly A and B, so the
    endpoints are the checkpoints' own losses. The model's state is restored bitwise afterwards.
    """
    batches = check_batches(batches)
    alphas = list(alphas) if alphas is not None else linspace(-0.25, 1.25, 13)
    with measuring(model) as inner:
        own = inner.state_dict()
        for label, state in (('state_a', state_a), ('state_b', state_b)):
            mismatch = state_dict_mismatch(own, state)
            if mismatch:
                raise ValueError(f'{label} does not fit the model: {mismatch}')
        keys = [k for k, v in own.items() if v.is_floating_point()]
        targets = [own[k] for k in keys]
        variances = [own[k] for k in keys if k.endswith('running_var')]
        ends_a = [state_a[k].to(device=t.device, dtype=t.dtype) for k, t in zip(keys, targets)]
        ends_b = [state_b[k].to(device=t.device, dtype=t.dtype) for k, t in zip(keys, targets)]
        losses = []
        bar = progress_bar(len(alphas), 'Interpolation', progress)
        try:
            with restored_after(targets), torch.no_grad():
                for alpha in alphas:
                    torch._foreach_copy_(targets, ends_a)
                    torch._foreach_lerp_(targets, ends_b, float(alpha))
                    if variances:  # extrapolated past an end, a BatchNorm variance may cross zero
                        torch._foreach_clamp_min_(variances, 0.0)
                    losses.append(evaluate_loss(inner, batches, loss_fn))
                    bar.update()
        finally:
            bar.close()
    return Landscape1D(alphas=[float(a) for a in alphas], losses=torch.stack(losses).tolist())

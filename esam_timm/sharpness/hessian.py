"""Curvature of the training loss from Hessian-vector products (double backward).

``H v`` is the gradient of ``<grad L(w), v>``: one forward, one backward that keeps its graph and one
more backward per product, never the Hessian itself, so it works on any model whose ops have a double
backward. Attention runs through PyTorch's math SDPA kernel here, because the fused (flash /
memory-efficient) kernels have none.

- :func:`hessian_top_eigenvalue`: power iteration on ``H v`` for the top eigenvalue, the curvature
  along the sharpest direction (shifted when the dominant eigenvalue is negative).
- :func:`hessian_trace`: Hutchinson's estimator ``E[z^T H z]`` over Rademacher ``z``, with its
  standard error: the sum of all eigenvalues, a steadier number than the top one.
"""
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .core import (Batch, LossFn, batch_weights, check_batches, dot, global_norm, measuring, progress_bar,
                   seeded_generator, sum_over_ranks_, trainable_parameters)

__all__ = ['EigenResult', 'TraceResult', 'hessian_vector_product', 'hessian_top_eigenvalue', 'hessian_trace']

_logger = logging.getLogger(__name__)


@dataclass
class EigenResult:
    """Outcome of :func:`hessian_top_eigenvalue`: the eigenvalue, the iterations run, whether the
    estimate settled within the tolerance, and the (unit) eigenvector, parameter-shaped."""
    value: float
    iterations: int
    converged: bool
    vector: List[Tensor]


@dataclass
class TraceResult:
    """Outcome of :func:`hessian_trace`: the estimate, its standard error and the probes used."""
    value: float
    std_error: float
    samples: int


@contextmanager
def _double_backward_ready() -> Iterator[None]:
    """Grad on (the caller may sit in ``no_grad``) and attention on the twice-differentiable kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        yield


def _gradients(loss: Tensor, params: Sequence[Tensor], create_graph: bool) -> List[Tensor]:
    return list(torch.autograd.grad(loss, list(params), create_graph=create_graph, allow_unused=True,
                                    materialize_grads=True))


def _hvp_from_grads(grads: Sequence[Tensor], params: Sequence[Tensor], vector: Sequence[Tensor],
                    retain_graph: bool) -> List[Tensor]:
    """``H v`` from gradients built with ``create_graph=True`` (zeros where the loss is linear)."""
    projection = dot(grads, vector)
    if not projection.requires_grad:
        return [torch.zeros_like(p) for p in params]
    return list(torch.autograd.grad(projection, list(params), retain_graph=retain_graph, allow_unused=True,
                                    materialize_grads=True))


def _weighted_hvp(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn, params: Sequence[Tensor],
                  vector: Sequence[Tensor], bar: Any, weights: Sequence[float], distributed: bool) -> List[Tensor]:
    out = [torch.zeros_like(p) for p in params]
    for (inputs, targets), weight in zip(batches, weights):
        grads = _gradients(loss_fn(model(inputs), targets), params, create_graph=True)
        torch._foreach_add_(out, _hvp_from_grads(grads, params, vector, retain_graph=False), alpha=weight)
        bar.update()
    sum_over_ranks_(out, distributed)
    return out


def hessian_vector_product(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn,
                           vector: Sequence[Tensor]) -> List[Tensor]:
    """``H v`` for the Hessian of the mean loss over ``batches`` w.r.t. the trainable parameters.

    ``vector`` is one tensor per trainable parameter (in ``named_parameters`` order). The model runs in
    eval mode and without autocast; its weights and ``.grad`` are not touched.
    """
    batches = check_batches(batches)
    with measuring(model) as inner, _double_backward_ready():
        _, params = trainable_parameters(inner)
        if len(vector) != len(params) or any(v.shape != p.shape for v, p in zip(vector, params)):
            raise ValueError(f'vector has {len(vector)} tensors; it needs one per trainable parameter '
                             f'({len(params)}), each of that parameter\'s shape')
        return _weighted_hvp(inner, batches, loss_fn, params, vector, progress_bar(0, '', False),
                             batch_weights(batches), distributed=False)


def _gaussian_like(params: Sequence[Tensor], generator: torch.Generator) -> List[Tensor]:
    return [torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) for p in params]


def _rademacher_like(params: Sequence[Tensor], generator: torch.Generator) -> List[Tensor]:
    return [torch.randint(0, 2, p.shape, generator=generator, device=p.device).to(p.dtype).mul_(2).sub_(1)
            for p in params]


def _power_iteration(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn, params: Sequence[Tensor],
                     vector: List[Tensor], shift: float, iters: int, tol: float, bar: Any, weights: Sequence[float],
                     distributed: bool) -> Tuple[float, int, bool, List[Tensor]]:
    """Power iteration on ``H - shift * I`` from the unit ``vector``; returns the Rayleigh quotient of
    ``H`` itself, the iterations run, whether it settled within ``tol`` and the last unit vector. Every
    rank gets the same product (summed over the ranks) and so takes the same decisions."""
    value = math.nan
    for iteration in range(1, iters + 1):
        product = _weighted_hvp(model, batches, loss_fn, params, vector, bar, weights, distributed)
        estimate = float(dot(vector, product))
        if shift:
            torch._foreach_add_(product, vector, alpha=-shift)
        length = global_norm(product)
        if float(length) == 0.0:  # an exact eigenvector of the shifted operator with eigenvalue 0
            return estimate, iteration, True, vector
        vector = torch._foreach_div(product, length)
        if iteration > 1 and abs(estimate - value) <= tol * abs(value):
            return estimate, iteration, True, vector
        value = estimate
    return value, iters, False, vector


def hessian_top_eigenvalue(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn, *, iters: int = 20,
                           tol: float = 1e-3, seed: int = 0, progress: bool = False,
                           distributed: bool = False) -> EigenResult:
    """The largest Hessian eigenvalue of the mean loss over ``batches``, by power iteration.

    Power iteration finds the eigenvalue of largest magnitude. Near a minimum that is the top one; when
    it comes out negative (a saddle, an untrained model), the remaining iterations run on the shifted
    ``H - value * I``, whose dominant eigenvalue is the top one of ``H`` minus ``value``. Each phase
    starts from a Gaussian vector of a generator seeded with ``seed`` (the global RNG is not used) and
    stops when the Rayleigh quotient changes by at most ``tol`` relative to its previous value.
    ``iters`` bounds the products of both phases together (each costs one forward and two backwards
    per batch); ``converged`` says whether the answer settled. Eval mode, no autocast; weights, flags
    and ``.grad`` are left as found. With ``distributed`` every rank calls it with its own batches (a
    collective) and all get the eigenvalue of the mean loss over every rank's batches.
    """
    if iters < 1:
        raise ValueError(f'iters={iters} is invalid: power iteration needs at least 1 iteration')
    if not tol > 0:
        raise ValueError(f'tol={tol} is invalid: give a positive relative tolerance (e.g. 1e-3)')
    batches = check_batches(batches, distributed)
    weights = batch_weights(batches, distributed)
    with measuring(model) as inner, _double_backward_ready():
        _, params = trainable_parameters(inner)
        generator = seeded_generator(params[0].device, seed)

        def start() -> List[Tensor]:
            vector = _gaussian_like(params, generator)
            return torch._foreach_div(vector, global_norm(vector))

        bar = progress_bar(iters * len(batches), 'Hessian eigenvalue', progress)
        try:
            value, iterations, converged, vector = _power_iteration(inner, batches, loss_fn, params, start(), 0.0,
                                                                    iters, tol, bar, weights, distributed)
            if value < 0:
                if iterations < iters:
                    value, more, converged, vector = _power_iteration(inner, batches, loss_fn, params, start(), value,
                                                                      iters - iterations, tol, bar, weights,
                                                                      distributed)
                    iterations += more
                else:
                    converged = False
        finally:
            bar.close()
    if not math.isfinite(value):
        _logger.warning('Hessian eigenvalue estimate is %s: the loss or its gradient is not finite on these batches',
                        value)
    elif not converged:
        _logger.warning('Hessian top eigenvalue %.6g did not settle within tol %g after %d iterations: pass more '
                        'iterations for a tighter estimate', value, tol, iters)
    return EigenResult(value=value, iterations=iterations, converged=converged,
                       vector=[v.detach() for v in vector])


def hessian_trace(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn, *, samples: int = 10,
                  seed: int = 0, progress: bool = False, distributed: bool = False) -> TraceResult:
    """Hutchinson's estimate of the Hessian trace of the mean loss over ``batches``, with its standard
    error (the probes' standard deviation / sqrt(samples)).

    Each probe is a Rademacher vector ``z`` (entries +-1) from a generator seeded with ``seed`` and the
    probe's index, so every batch sees the same ``z`` and each probe's ``z^T H z`` is exact for the whole
    set; the graph of a batch's gradient is built once and serves all probes. Cost: one forward and
    backward per batch plus one backward per batch and probe. Needs at least 2 probes (for the error).
    """
    if samples < 2:
        raise ValueError(f'samples={samples} is invalid: Hutchinson\'s estimate needs at least 2 probes '
                         f'(its standard error needs two)')
    batches = check_batches(batches, distributed)
    weights = batch_weights(batches, distributed)
    with measuring(model) as inner, _double_backward_ready():
        _, params = trainable_parameters(inner)
        device = params[0].device
        quadratic = torch.zeros(samples, dtype=torch.float64, device=device)
        bar = progress_bar(samples * len(batches), 'Hessian trace', progress)
        try:
            for (inputs, targets), weight in zip(batches, weights):
                grads = _gradients(loss_fn(inner(inputs), targets), params, create_graph=True)
                for index in range(samples):
                    probe = _rademacher_like(params, seeded_generator(device, seed * 1_000_003 + index))
                    product = _hvp_from_grads(grads, params, probe, retain_graph=index + 1 < samples)
                    quadratic[index] += dot(probe, product).to(torch.float64) * weight
                    bar.update()
                del grads
        finally:
            bar.close()
    sum_over_ranks_([quadratic], distributed)
    std_error = float(quadratic.std() / math.sqrt(samples))
    return TraceResult(value=float(quadratic.mean()), std_error=std_error, samples=samples)

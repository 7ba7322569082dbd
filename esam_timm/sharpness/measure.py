"""SAM's m-sharpness and :func:`measure_sharpness`, the one call that reports every number at once."""
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from esam_timm.distributed import all_reduce_max

from .core import (Batch, check_batches, evaluate_loss, global_norm, measuring, progress_bar, restored_after,
                   sum_over_ranks_, total_samples, trainable_parameters)
from .hessian import hessian_top_eigenvalue, hessian_trace

__all__ = ['SharpnessReport', 'm_sharpness', 'measure_sharpness']

_logger = logging.getLogger(__name__)


@dataclass
class SharpnessReport:
    """Sharpness of the training loss at one set of weights, on fixed batches.

    ``loss``: mean loss over the batches' samples (eval mode). ``top_eigenvalue``: the Hessian's
    eigenvalue of largest magnitude (None when not measured), after ``eig_iterations`` power
    iterations, ``eig_converged`` when it settled within the tolerance. ``m_sharpness``: mean rise of
    the loss after one SAM ascent of radius ``rho`` on chunks of ``m`` samples (None when ``rho`` is
    None). ``hessian_trace`` +- ``trace_std_error``: Hutchinson's estimate from ``trace_samples``
    probes (None when 0). ``num_samples``: samples in the batches; ``seconds``: wall time.
    """
    loss: float
    top_eigenvalue: Optional[float]
    eig_iterations: int
    eig_converged: bool
    m_sharpness: Optional[float]
    m: Optional[int]
    rho: Optional[float]
    hessian_trace: Optional[float]
    trace_std_error: Optional[float]
    trace_samples: int
    num_samples: int
    seconds: float

    def to_dict(self) -> Dict[str, Any]:
        """The measured numbers as a flat dict of floats, ints and bools (what was not measured is left
        out), for summary.csv, W&B and JSON."""
        return {key: value for key, value in asdict(self).items() if value is not None}


def _check_ascent(rho: float, m: Optional[int]) -> None:
    if not (isinstance(rho, (int, float)) and rho > 0 and math.isfinite(rho)):
        raise ValueError(f'rho={rho!r} is invalid: give a positive finite ascent radius (e.g. 0.05)')
    if m is not None and (not isinstance(m, int) or m < 1):
        raise ValueError(f'm={m!r} is invalid: give a positive number of samples per ascent, or None for whole batches')


def _chunks(batch: Batch, m: Optional[int]) -> Sequence[Tuple[Tensor, Tensor]]:
    inputs, targets = batch
    if m is None or m >= inputs.shape[0]:
        return [(inputs, targets)]
    return list(zip(inputs.split(m), targets.split(m)))


def m_sharpness(model: nn.Module, batches: Sequence[Batch], loss_fn: Callable[[Tensor, Tensor], Tensor], *,
                rho: float = 0.05, m: Optional[int] = None, progress: bool = False, distributed: bool = False) -> float:
    """SAM's m-sharpness: ``L_c(w + e_c) - L_c(w)`` averaged over chunks ``c`` of ``m`` samples, where
    ``e_c = rho * g_c / ||g_c||`` is the ascent from the chunk's own gradient ``g_c`` (SAM's, not
    scaled by ESAM's 1/beta) and ``L_c`` the chunk's mean loss.

    ``m=None`` makes each batch one chunk; a batch whose size ``m`` does not divide ends with a smaller
    chunk, and chunks are weighted by their size. In eval mode, so BatchNorm's running statistics make
    each sample's loss independent of the chunking: ``m`` only sets what one ascent sees. The weights are
    restored bitwise; ``.grad`` is not touched. With ``distributed`` every rank calls it with its own
    batches (a collective) and all get the mean over every rank's chunks.
    """
    _check_ascent(rho, m)
    batches = check_batches(batches, distributed)
    samples = total_samples(batches, distributed)
    chunks = [chunk for batch in batches for chunk in _chunks(batch, m)]
    with measuring(model) as inner:
        _, params = trainable_parameters(inner)
        rise = torch.zeros((), dtype=torch.float64, device=params[0].device)
        bar = progress_bar(len(chunks), 'm-sharpness', progress)
        try:
            with restored_after(params) as original:
                for inputs, targets in chunks:
                    with torch.enable_grad():
                        clean = loss_fn(inner(inputs), targets)
                        grads = list(torch.autograd.grad(clean, params, allow_unused=True, materialize_grads=True))
                    with torch.no_grad():
                        length = global_norm(grads)
                        scale = torch.where(length > 0, rho / length.clamp_min(torch.finfo(length.dtype).tiny),
                                            torch.zeros_like(length))
                        torch._foreach_mul_(grads, scale)
                        torch._foreach_add_(params, grads)
                        perturbed = loss_fn(inner(inputs), targets)
                        torch._foreach_copy_(params, original)
                        rise += (perturbed - clean.detach()).to(torch.float64) * (inputs.shape[0] / samples)
                    bar.update()
        finally:
            bar.close()
    sum_over_ranks_([rise], distributed)
    return float(rise)


def measure_sharpness(model: nn.Module, batches: Sequence[Tuple[Tensor, Tensor]],
                      loss_fn: Callable[[Tensor, Tensor], Tensor], *, rho: Optional[float] = 0.05,
                      m: Optional[int] = None, eig_iters: int = 20, eig_tol: float = 1e-3, trace_samples: int = 0,
                      seed: int = 0, progress: bool = False, distributed: bool = False) -> SharpnessReport:
    """Measure the loss, the top Hessian eigenvalue, SAM's m-sharpness and (optionally) the Hessian trace
    of ``model`` on fixed ``batches``.

    ``batches``: (inputs, integer targets) pairs on the model's device, e.g. the first few training
    batches, kept fixed so that two checkpoints are compared on the same data. ``loss_fn(logits,
    targets)`` returns the mean loss (``torch.nn.functional.cross_entropy``). Everything runs in eval mode
    (BatchNorm running statistics, no dropout), without autocast, w.r.t. the trainable parameters; the
    model's weights, ``requires_grad`` flags, train/eval modes and ``.grad`` are left exactly as found,
    and randomness comes from generators seeded with ``seed`` (the global RNG is not used). A DDP or
    compiled model is measured through its plain module; call it on one rank: it runs no collective.

    ``eig_iters=0`` skips the eigenvalue, ``rho=None`` the m-sharpness, ``trace_samples=0`` the trace.
    Cost per batch: one forward + two backwards per power iteration, one forward + backward plus one
    backward per trace probe, two forwards + one backward per m-sharpness chunk.
    """
    if eig_iters < 0:
        raise ValueError(f'eig_iters={eig_iters} is invalid: give 0 (skip the eigenvalue) or more iterations')
    if trace_samples == 1 or trace_samples < 0:
        raise ValueError(f'trace_samples={trace_samples} is invalid: give 0 (no trace) or at least 2 probes')
    if rho is not None:
        _check_ascent(rho, m)
    batches = check_batches(batches, distributed)
    start = time.perf_counter()
    with measuring(model) as inner:
        trainable_parameters(inner)  # refuse a bf16/fp16 or frozen model before any work
        loss = float(evaluate_loss(inner, batches, loss_fn, distributed))
    common = dict(progress=progress, distributed=distributed)
    eigen = hessian_top_eigenvalue(model, batches, loss_fn, iters=eig_iters, tol=eig_tol, seed=seed,
                                   **common) if eig_iters else None
    sharpness = m_sharpness(model, batches, loss_fn, rho=rho, m=m, **common) if rho is not None else None
    trace = hessian_trace(model, batches, loss_fn, samples=trace_samples, seed=seed + 1,
                          **common) if trace_samples else None
    report = SharpnessReport(
        loss=loss,
        top_eigenvalue=eigen.value if eigen else None,
        eig_iterations=eigen.iterations if eigen else 0,
        eig_converged=eigen.converged if eigen else False,
        m_sharpness=sharpness,
        m=(m if m is not None else _largest_batch(batches, distributed)) if rho is not None else None,
        rho=rho,
        hessian_trace=trace.value if trace else None,
        trace_std_error=trace.std_error if trace else None,
        trace_samples=trace_samples,
        num_samples=total_samples(batches, distributed),
        seconds=time.perf_counter() - start,
    )
    _logger.info('Sharpness on %d samples: loss %.4f, top eigenvalue %s, m-sharpness %s, trace %s (%.1f s)',
                 report.num_samples, report.loss, _fmt(report.top_eigenvalue), _fmt(report.m_sharpness),
                 _fmt(report.hessian_trace), report.seconds)
    return report


def _largest_batch(batches: Sequence[Batch], distributed: bool) -> int:
    """The largest batch (of any rank's with ``distributed``): what ``m=None`` means."""
    largest = max((b[0].shape[0] for b in batches), default=0)
    return int(all_reduce_max(largest)) if distributed else largest


def _fmt(value: Optional[float]) -> str:
    return '-' if value is None else f'{value:.6g}'

"""A diverging run stops instead of saving NaNs: the trainer's side of the step's non-finite guard.

``train_step(..., guard_nonfinite=True)`` never applies an update whose loss or final gradient is not
finite and reports it as ``stats['skipped_nonfinite']`` (an fp16 GradScaler's own overflow skips are
``skipped_overflow``: counted, never fatal). :class:`NonFiniteWatch` counts consecutive skipped updates;
``--max-nonfinite`` of them in a row mean the run has diverged (a single bad batch does not).
:func:`refuse_nonfinite` checks the weights before a checkpoint is written, so no checkpoint with NaN
or inf weights (BatchNorm statistics included) is ever saved or becomes ``model_best``.
"""
from typing import Any, Dict, List, Mapping, Optional, Union

import torch

from esam_timm.distributed import all_reduce_sum

__all__ = ['DivergedError', 'NonFiniteWatch', 'nonfinite_tensors', 'refuse_nonfinite', 'restart_advice']


class DivergedError(RuntimeError):
    """The run diverged: too many non-finite updates in a row, or weights that are no longer finite."""


class NonFiniteWatch:
    """Counts the updates in a row the step's guard skipped as non-finite (Python bools: no device sync)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.consecutive = 0

    def update(self, stats: Mapping[str, Any]) -> bool:
        """Count one update; True once ``limit`` updates in a row were skipped."""
        self.consecutive = self.consecutive + 1 if stats.get('skipped_nonfinite') else 0
        return self.consecutive >= self.limit

    def diverged(self, where: str, last_finite: Optional[str]) -> DivergedError:
        """The error to stop with, naming where and the last checkpoint with finite weights."""
        return DivergedError(
            f'training diverged at {where}: {self.consecutive} updates in a row had a non-finite loss or gradient '
            f'(--max-nonfinite {self.limit}; none of them was applied); {restart_advice(last_finite)}')


def nonfinite_tensors(state_dicts: Mapping[str, Optional[Mapping[str, torch.Tensor]]]) -> List[str]:
    """Names (``<dict>.<key>``) of the floating tensors holding a NaN or an inf, in order.

    One host sync per device the tensors live on (the EMA may be kept on the CPU).
    """
    by_device: Dict[torch.device, List[Any]] = {}
    for prefix, state in state_dicts.items():
        for key, tensor in (state or {}).items():
            if torch.is_tensor(tensor) and tensor.is_floating_point():
                by_device.setdefault(tensor.device, []).append((f'{prefix}.{key}', tensor))
    bad = []
    for entries in by_device.values():
        finite = torch.stack([torch.isfinite(t).all() for _, t in entries]).tolist()
        bad += [name for (name, _), ok in zip(entries, finite) if not ok]
    return bad


def refuse_nonfinite(state_dicts: Mapping[str, Optional[Mapping[str, torch.Tensor]]], where: str,
                     last_finite: Optional[str], device: Optional[Union[str, torch.device]] = None) -> None:
    """Raise :class:`DivergedError` on every rank unless all floating tensors are finite on every rank.

    A collective under DDP (the count is summed over ranks): call it on every rank before a checkpoint.
    """
    bad = nonfinite_tensors(state_dicts)
    count = int(all_reduce_sum([len(bad)], device).item())
    if count:
        example = f', e.g. {bad[0]}' if bad else ' on another rank'
        raise DivergedError(f'the weights after {where} are not finite ({count} tensors{example}), so no checkpoint '
                            f'was written; {restart_advice(last_finite)}')


def restart_advice(last_finite: Optional[str]) -> str:
    """What to do next, naming the last checkpoint whose weights are finite (None: no checkpoint yet)."""
    if last_finite is None:
        return ('no checkpoint was written yet: start again with a lower --lr (or --clip-grad, or bf16 instead of '
                'fp16 autocast)')
    return (f'the last checkpoint with finite weights is {last_finite}: resume from it (--resume {last_finite}) '
            f'with a lower --lr (or --clip-grad, or bf16 instead of fp16 autocast)')

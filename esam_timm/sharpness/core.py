"""Pieces every sharpness measurement shares: the parameters it differentiates, the eval-mode fp32
context it runs in, weight backups, and sample-weighted losses over a fixed set of batches.

Every measurement treats the batches as one dataset: the loss is the mean over all their samples
(each batch weighted by its size), so a short last batch does not count as much as a full one. With
``distributed=True`` the dataset is the union of every rank's batches: each rank computes its batches'
share (weights over the samples of all ranks) and the shares are summed over the ranks, so the ranks
divide the work and all get the same numbers (a rank may hold no batch).
"""
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from esam_timm.console import ProgressBar
from esam_timm.distributed import all_reduce_sum, all_reduce_sum_

__all__ = ['Batch', 'LossFn', 'unwrap_model', 'trainable_parameters', 'measuring', 'restored_after',
           'seeded_generator', 'check_batches', 'batch_weights', 'evaluate_loss', 'dot', 'global_norm', 'progress_bar',
           'sum_over_ranks_']

Batch = Tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

_MEASURABLE_DTYPES = (torch.float32, torch.float64)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and ``torch.compile`` wrappers.

    Measurements run on the plain module: a DDP forward/backward on one rank would wait for the
    others, and compiled graphs have no double backward.
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, '_orig_mod') and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def trainable_parameters(model: nn.Module) -> Tuple[List[str], List[Tensor]]:
    """Names and tensors of the parameters with ``requires_grad`` (shared ones once).

    Raises ``ValueError`` when there are none, or when one is not fp32/fp64: the Hessian of a bf16 or
    fp16 model is mostly rounding noise, so measure an fp32 copy (``copy.deepcopy(model).float()``).
    """
    names, params = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.dtype not in _MEASURABLE_DTYPES:
            raise ValueError(f'parameter {name!r} is {param.dtype}; sharpness is measured in float32 or float64: '
                             f'measure an fp32 copy of the model (copy.deepcopy(model).float())')
        names.append(name)
        params.append(param)
    if not params:
        raise ValueError('the model has no trainable parameters (none has requires_grad=True): '
                         'there is nothing to measure the sharpness of')
    return names, params


@contextmanager
def measuring(model: nn.Module) -> Iterator[nn.Module]:
    """Run a measurement on ``model`` in eval mode without autocast; every module's train/eval flag is
    restored afterwards exactly as found (submodules may differ from the root).

    Eval mode: BatchNorm uses its running statistics and dropout is off, so the loss is a
    deterministic function of the weights and the batches. Autocast is turned off for the device the
    parameters are on, and so is TF32 (the trainer's CUDA default), so the measurement runs in the
    parameters' full fp32; both are as found afterwards.
    """
    inner = unwrap_model(model)
    modules = list(inner.modules())
    modes = [m.training for m in modules]
    first = next(inner.parameters(), None)
    device_type = first.device.type if first is not None else 'cpu'
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        inner.eval()
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with torch.autocast(device_type=device_type, enabled=False):
            yield inner
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        for module, mode in zip(modules, modes):
            module.training = mode


@contextmanager
def restored_after(tensors: Sequence[Tensor]) -> Iterator[List[Tensor]]:
    """Let the block change ``tensors`` in place; copy their values back (bitwise) when it ends.

    Yields the backup, so the block can return to the original values between its own changes.
    """
    with torch.no_grad():
        backup = [t.detach().clone() for t in tensors]
    try:
        yield backup
    finally:
        with torch.no_grad():
            torch._foreach_copy_(list(tensors), backup)


def seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator of its own on ``device``: measurements draw from it, never from the global RNG."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def check_batches(batches: Sequence[Batch], distributed: bool = False) -> List[Batch]:
    """The batches as a list of (inputs, targets) pairs; refuses an empty set (on one rank; with
    ``distributed`` a rank may hold none, but not all of them) or a malformed entry."""
    out = list(batches)
    for i, batch in enumerate(out):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not all(torch.is_tensor(t) for t in batch):
            raise ValueError(f'batch {i} is {type(batch).__name__}, not an (inputs, targets) pair of tensors')
        if batch[0].shape[0] == 0 or batch[0].shape[0] != batch[1].shape[0]:
            raise ValueError(f'batch {i} holds {batch[0].shape[0]} inputs and {batch[1].shape[0]} targets: '
                             f'each batch needs the same positive number of both')
    if total_samples(out, distributed) == 0:  # with distributed a collective, on every rank, also an empty one
        raise ValueError('no batches given: pass a non-empty sequence of (inputs, targets) pairs')
    return out


def total_samples(batches: Sequence[Batch], distributed: bool = False) -> int:
    """The samples of ``batches``, summed over the ranks with ``distributed`` (a collective then)."""
    count = sum(batch[0].shape[0] for batch in batches)
    return int(all_reduce_sum([count])[0]) if distributed else count


def batch_weights(batches: Sequence[Batch], distributed: bool = False) -> List[float]:
    """Each batch's share of all samples (of every rank's batches with ``distributed``, a collective then):
    the weight of its mean loss in the mean over all samples."""
    total = float(total_samples(batches, distributed))
    return [batch[0].shape[0] / total for batch in batches]


def sum_over_ranks_(tensors: Sequence[Tensor], distributed: bool) -> None:
    """With ``distributed``, replace each rank's shares by their sum over the ranks (in place, one
    collective); without, leave them."""
    if distributed:
        all_reduce_sum_(tensors)


def evaluate_loss(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn, distributed: bool = False) -> Tensor:
    """The mean loss over all samples of ``batches`` (every rank's with ``distributed``) at the current
    weights (no grad), as a 0-dim float64 tensor on the device (no host sync outside DDP). Call it inside
    :func:`measuring`."""
    first = next(model.parameters())
    total = torch.zeros((), dtype=torch.float64, device=first.device)
    with torch.no_grad():
        for (inputs, targets), weight in zip(batches, batch_weights(batches, distributed)):
            total += loss_fn(model(inputs), targets).detach().to(torch.float64) * weight
    sum_over_ranks_([total], distributed)
    return total


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Inner product of two parameter-shaped tensor lists (a 0-dim tensor, differentiable)."""
    return torch.stack([(x * y).sum() for x, y in zip(a, b)]).sum()


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """The 2-norm of a tensor list taken as one vector."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors))))


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """The console's progress bar (shown only on a terminal) when ``enabled``, else a no-op."""
    if not enabled:
        return _NoBar()
    return ProgressBar(total=total, desc=desc, enabled=True)

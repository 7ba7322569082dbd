"""Cross-rank reductions: the one place the package sums numbers over DDP ranks."""
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

__all__ = ['is_distributed', 'collective_device', 'all_reduce_sum', 'all_reduce_sum_', 'all_reduce_max']


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    """Where the default process group's collectives need their tensors: the current CUDA device under
    NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def all_reduce_sum(values: Union[torch.Tensor, Sequence[float]],
                   device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Sum ``values`` over all ranks and return a float64 copy (the local values outside DDP).

    One collective for a whole vector of totals, e.g. ``(loss_sum, correct, count)``: call it on every
    rank. The result is on ``device`` (default: where the process group reduces, :func:`collective_device`).
    """
    if device is None:
        device = collective_device() if is_distributed() else getattr(values, 'device', None)
    tensor = torch.as_tensor(values).detach().to(device=device, dtype=torch.float64).clone()
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(value: float) -> float:
    """The largest of the ranks' ``value`` (``value`` itself outside DDP)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum a list of same-dtype tensors over all ranks, in place, in one collective (nothing outside DDP).

    For parameter-shaped lists (a Hessian-vector product): flattened into one buffer, reduced, copied
    back. With NCCL the tensors are on the rank's CUDA device.
    """
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    torch._foreach_copy_(list(tensors), [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]),
                                                                           tensors)])

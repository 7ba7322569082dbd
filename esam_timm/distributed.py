"""Cross-rank reductions: the one place the package sums numbers over DDP ranks."""
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

__all__ = ['is_distributed', 'all_reduce_sum']


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: Union[torch.Tensor, Sequence[float]],
                   device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Sum ``values`` over all ranks and return a float64 copy (the local values outside DDP).

    One collective for a whole vector of totals, e.g. ``(loss_sum, correct, count)``: call it on every
    rank. With NCCL pass the rank's CUDA ``device``.
    """
    tensor = torch.as_tensor(values).detach().to(device=device, dtype=torch.float64).clone()
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor

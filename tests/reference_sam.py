"""Independent, deliberately plain SAM / ESAM computations the tests compare the package against.

Written from the paper and the released code's semantics, sharing no code with esam_timm: per-parameter
loops, full gradients masked by hand, a fresh forward for every pass, fp32.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def swp_keep_mask(generator: torch.Generator, num_tensors: int, beta: float) -> List[bool]:
    """The per-tensor SWP draw: keep a tensor with probability beta."""
    if beta >= 1.0:
        return [True] * num_tensors
    return [bool(v) for v in (torch.rand(num_tensors, generator=generator) < beta)]


def esam_gradient(model: nn.Module, params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                  rho: float, beta: float, gamma: float, keep: List[bool],
                  clip: Optional[float] = None) -> List[torch.Tensor]:
    """Final ESAM gradient (taken at w + e on the selected samples); leaves the weights at w."""
    for p in params:
        p.grad = None
    loss_clean = F.cross_entropy(model(x), y, reduction='none')
    loss_clean.mean().backward()
    grads = [p.grad.clone() if (k and p.grad is not None) else None for p, k in zip(params, keep)]
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None))
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.add_(g * (rho / (norm + 1e-7) / beta))
    batch = x.shape[0]
    k = max(1, round(gamma * batch))
    if k < batch:
        with torch.no_grad():
            delta = F.cross_entropy(model(x), y, reduction='none') - loss_clean.detach()
        order = sorted(range(batch), key=lambda i: -delta[i].item())
        idx = torch.tensor(sorted(order[:k]))
        x, y = x[idx], y[idx]
    for p in params:
        p.grad = None
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        for p, w in zip(params, saved):
            p.copy_(w)
    final = [p.grad.clone() for p in params]
    if clip is not None:
        total = torch.sqrt(sum((g ** 2).sum() for g in final))
        factor = min(1.0, clip / (total.item() + 1e-6))
        final = [g * factor for g in final]
    return final


def nesterov_sgd_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], bufs: List,
                      lr: float, momentum: float, weight_decay: float) -> None:
    """torch.optim.SGD(nesterov=True) written out, one parameter at a time."""
    with torch.no_grad():
        for i, (p, g) in enumerate(zip(params, grads)):
            d = g + weight_decay * p
            if bufs[i] is None:
                bufs[i] = d.clone()
            else:
                bufs[i].mul_(momentum).add_(d)
            p.sub_(lr * (d + momentum * bufs[i]))

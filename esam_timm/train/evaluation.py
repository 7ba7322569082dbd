"""What the trainer measures between epochs: validation loss and accuracy over all ranks, BatchNorm
statistics made equal across ranks (``--dist-bn``), and the model's flatness (``--sharpness-interval``)."""
import itertools
import logging
import time
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from esam_timm.data.backends import Loader
from esam_timm.distributed import all_reduce_sum

__all__ = ['validate', 'distribute_bn', 'FlatnessProbe']

_logger = logging.getLogger(__name__)

Batch = Tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def validate(model: nn.Module, loader: Iterable[Batch], *, device: torch.device, amp_dtype: Optional[torch.dtype],
             tag: str = 'eval', log: bool = True) -> Dict[str, float]:
    """Loss, top-1 and top-5 over the whole split, summed over all ranks (a collective: every rank calls
    it); ``log`` writes the result line (rank 0)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for inputs, targets in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(inputs)
        logits = logits.float()
        k = min(5, logits.shape[1])
        correct = logits.topk(k, dim=1).indices.eq(targets[:, None])
        sums += torch.stack([
            F.cross_entropy(logits, targets, reduction='sum').double(),
            correct[:, 0].sum().double(), correct.any(dim=1).sum().double(),
            torch.tensor(float(targets.shape[0]), dtype=torch.float64, device=device)])
    loss, top1, top5, count = all_reduce_sum(sums).tolist()
    if count == 0:
        raise RuntimeError('the validation split yielded no samples')
    metrics = {'loss': loss / count, 'top1': 100.0 * top1 / count, 'top5': 100.0 * top5 / count}
    if log:
        _logger.info('%s: loss %.4f  top-1 %.3f%%  top-5 %.3f%%  (%d images)', tag.capitalize(), metrics['loss'],
                     metrics['top1'], metrics['top5'], int(count))
    return metrics


def distribute_bn(mode: str, world_size: int, models: Iterable[nn.Module]) -> None:
    """``--dist-bn``: make BatchNorm running statistics agree across ranks ('reduce': their mean,
    'broadcast': rank 0's) before they are evaluated or saved (each rank's saw only its own batches)."""
    from timm.utils import distribute_bn as timm_distribute_bn
    for model in models:
        timm_distribute_bn(model, world_size, reduce=mode == 'reduce')


class FlatnessProbe:
    """``--sharpness-interval``: the top Hessian eigenvalue and m-sharpness of the model every ``interval``
    epochs and after the last, on ``num_batches`` validation batches (the same ones every time: taken
    once), in fp32.

    Every rank measures (a collective): the batches are dealt over the ranks (rank r takes the first
    ``len(range(r, num_batches, world_size))`` batches of its own validation share) and the ranks add up
    their parts of each product, so the work is shared and no rank waits in a collective while another
    measures alone (NCCL ends such a wait after its timeout, 10 minutes by default)."""

    def __init__(self, loader: Loader, *, interval: int, num_batches: int, rho: float, iters: int,
                 seed: int, progress: bool, rank: int = 0, world_size: int = 1) -> None:
        self.loader = loader
        self.interval = interval
        self.num_batches = num_batches
        self.rho, self.iters, self.seed, self.progress = rho, iters, seed, progress
        self.rank, self.world_size = rank, world_size
        self._batches: Optional[List[Batch]] = None

    def due(self, epoch: int, num_epochs: int) -> bool:
        return bool(self.interval) and ((epoch + 1) % self.interval == 0 or epoch + 1 == num_epochs)

    def measure(self, model: nn.Module, epoch: int) -> Dict[str, float]:
        """The measurements as ``sharpness_*`` metrics (the keys of summary.csv and W&B), logged in one line."""
        from esam_timm.sharpness import measure_sharpness
        if self._batches is None:
            share = len(range(self.rank, self.num_batches, self.world_size))
            self._batches = list(itertools.islice(iter(self.loader), share))
        t0 = time.perf_counter()
        report = measure_sharpness(model, self._batches, F.cross_entropy, rho=self.rho, eig_iters=self.iters,
                                   seed=self.seed, progress=self.progress and self.rank == 0,
                                   distributed=self.world_size > 1)
        if self.rank == 0:
            _logger.info('Flatness after epoch %d: top Hessian eigenvalue %.4g (%s after %d iterations), m-sharpness '
                         '%.4g (rho %g) on %d validation images, in %.1fs', epoch, report.top_eigenvalue,
                         'converged' if report.eig_converged else 'not converged', report.eig_iterations,
                         report.m_sharpness, self.rho, report.num_samples, time.perf_counter() - t0)
        return {f'sharpness_{k}': v for k, v in report.to_dict().items()}

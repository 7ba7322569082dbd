"""What every data-loader worker process of ours does first: leave SIGINT and SIGTERM to the trainer.

A scheduler's stop reaches the workers too: SLURM signals every process of a job step, ``kill --
-PGID`` and a terminal's Ctrl-C a whole process group, and torchrun forwards the signal it gets to each
rank's process group. PyTorch's worker loop installs a SIGTERM handler that lets a worker die of any
SIGTERM not sent by its own trainer, and the trainer then fails with "DataLoader worker (pid N) is
killed by signal: Terminated", losing the epoch's progress. With the signals ignored in the workers,
the trainer alone decides: it finishes the update, writes its recovery checkpoint and shuts the workers
down (they leave when the trainer tells them, or when it is gone).
"""
import signal
from typing import Any, Callable, Optional

from torch.utils.data import DataLoader

__all__ = ['ignore_stop_signals', 'leave_stop_signals_to_the_trainer']

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGINT and SIGTERM (it runs after PyTorch's own
    worker signal set-up, so it replaces PyTorch's SIGTERM handler)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class _Chained:
    """``worker_init_fn`` that runs the loader's own one (timm's seeding), then :func:`ignore_stop_signals`;
    a class, not a closure, so that spawned workers can unpickle it."""

    def __init__(self, first: Optional[Callable[[int], Any]]) -> None:
        self.first = first

    def __call__(self, worker_id: int) -> None:
        if self.first is not None:
            self.first(worker_id)
        ignore_stop_signals(worker_id)


def leave_stop_signals_to_the_trainer(loader: Any) -> None:
    """Make the workers of a DataLoader built elsewhere (timm's ``create_loader``, also inside its
    ``PrefetchLoader``) ignore SIGINT and SIGTERM, after its own ``worker_init_fn``. Call before the
    loader's first iteration."""
    while not isinstance(loader, DataLoader):
        loader = loader.loader  # timm's PrefetchLoader (and MultiEpochsDataLoader's) inner loader
    if not isinstance(loader.worker_init_fn, _Chained):
        loader.worker_init_fn = _Chained(loader.worker_init_fn)

"""What every data-loader worker process of ours does first: leave SIGINT and SIGTERM to the trainer.

A scheduler's stop reaches the workers too: SLURM signals every process of a job step, ``kill --
-PGID`` and a terminal's Ctrl-C a whole process group, and torchrun forwards the signal it gets to each
rank's process group. PyTorch's worker loop installs a SIGTERM handler that lets a worker die of any
SIGTERM not sent by its own trainer, and the trainer then fails with "DataLoader worker (pid N) is
killed by signal: Terminated", losing the epoch's progress. Here a worker ignores SIGINT and every
SIGTERM but its own trainer's: the trainer alone decides, finishes the update, writes its recovery
checkpoint and shuts the workers down. Its SIGTERM still ends a worker at once, as in PyTorch: that is
how ``multiprocessing`` ends the daemonic workers of loaders still alive when the trainer exits (a
worker ignoring it would keep the exiting trainer waiting forever).
"""
import os
import signal
import threading
from typing import Any, Callable, Optional

from torch.utils.data import DataLoader

__all__ = ['ignore_stop_signals', 'leave_stop_signals_to_the_trainer']


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGINT, and SIGTERM unless its parent (the
    trainer) sent it. Runs after PyTorch's own worker signal set-up and replaces its SIGTERM handler:
    SIGTERM is blocked in the worker's threads and a thread of its own takes each one with
    ``sigwaitinfo``, which tells the sender; the parent's ends the worker at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here inherit the mask
    threading.Thread(target=_exit_on_the_parents_sigterm, args=(os.getppid(),), daemon=True,
                     name='sigterm-from-trainer').start()


def _exit_on_the_parents_sigterm(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)  # as PyTorch's worker handler does for its trainer's SIGTERM


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

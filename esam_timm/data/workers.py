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

A worker is born with SIGINT and SIGTERM blocked (:func:`signals_held_context` starts it so): a stop
signal that arrives while it starts, before its ``worker_init_fn``, waits for that function instead of
killing the worker with PyTorch's handler.
"""
import multiprocessing
import os
import signal
import threading
from multiprocessing.context import BaseContext, ForkContext, ForkProcess, SpawnContext, SpawnProcess
from typing import Any, Callable, Optional, Union

from torch.utils.data import DataLoader

__all__ = ['ignore_stop_signals', 'leave_stop_signals_to_the_trainer', 'signals_held_context']

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


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


class _StartsWithSignalsHeld:
    """A process whose stop signals are blocked from its first instruction: the starting thread blocks them
    while it starts the process (fork inherits the mask, exec keeps it), then restores its own mask."""

    def start(self) -> None:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            super().start()  # type: ignore[misc]
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _HeldForkProcess(_StartsWithSignalsHeld, ForkProcess):
    pass


class _HeldSpawnProcess(_StartsWithSignalsHeld, SpawnProcess):
    pass


class _HeldForkContext(ForkContext):
    Process = _HeldForkProcess


class _HeldSpawnContext(SpawnContext):
    Process = _HeldSpawnProcess


def signals_held_context(context: Union[None, str, BaseContext] = None) -> BaseContext:
    """A ``multiprocessing`` context for a DataLoader's ``multiprocessing_context`` whose processes start
    with SIGINT and SIGTERM blocked, for ``context`` (None: the default start method; a method name; a
    context). A signal sent to a worker while it starts then waits for :func:`ignore_stop_signals`. The
    trainer's thread blocks them only while it starts the process: one sent to the trainer meanwhile is
    handled by another thread or right after. ``forkserver`` is returned as it is (its processes are
    forked by the server, whose mask this cannot set): there, a signal in that short window can still end
    a worker."""
    if isinstance(context, (_HeldForkContext, _HeldSpawnContext)):
        return context
    if not isinstance(context, BaseContext):
        context = multiprocessing.get_context(context)
    method = context.get_start_method()
    if method == 'fork':
        return _HeldForkContext()
    if method == 'spawn':
        return _HeldSpawnContext()
    return context


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
    ``PrefetchLoader``) ignore SIGINT and SIGTERM, after its own ``worker_init_fn``, and start them with
    both held (:func:`signals_held_context`). Call before the loader's first iteration."""
    while not isinstance(loader, DataLoader):
        loader = loader.loader  # timm's PrefetchLoader (and MultiEpochsDataLoader's) inner loader
    if loader.num_workers == 0:
        return
    if not isinstance(loader.worker_init_fn, _Chained):
        loader.worker_init_fn = _Chained(loader.worker_init_fn)
    loader.multiprocessing_context = signals_held_context(loader.multiprocessing_context)

"""The run folder and what is kept in it: a lock for the life of the run, and the checkpoints.

A run folder belongs to one run. :func:`claim_run_folder` never lets a new run write into a folder
that holds another run's files: it picks the next free suffixed name (``<name>-1``, ``<name>-2``, ...,
as timm's ``get_outdir(inc=True)`` does) unless the run resumes from a checkpoint in that folder, and
it takes an exclusive lock that a second process asking for the same folder is refused by.
:class:`CheckpointManager` writes ``last.pth.tar`` every epoch, the best ``max_history`` epochs as
``checkpoint-<epoch>.pth.tar`` plus ``model_best.pth.tar``, and the latest recovery checkpoint; every
file goes through :mod:`esam_timm.fileio`, so a crash never leaves a half-written one.
"""
import logging
import math
import os
import socket
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

from torch import Tensor

from esam_timm.fileio import atomic_copy, atomic_torch_save

__all__ = ['CheckpointManager', 'RunFolder', 'RunFolderBusy', 'claim_run_folder', 'state_dict_mismatch', 'LOCK_NAME']

_logger = logging.getLogger(__name__)

LOCK_NAME = '.lock'


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunFolder:
    """A run folder held under an exclusive ``flock`` on ``<path>/.lock`` until :meth:`release` (or the
    process ends: the kernel drops the lock of a killed process, so a crash never leaves it stuck)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock_file: Optional[Any] = None

    def acquire(self) -> None:
        import fcntl
        lock_path = os.path.join(self.path, LOCK_NAME)
        handle = open(lock_path, 'a+')
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or 'another process'
            handle.close()
            raise RunFolderBusy(
                f'run folder {self.path} is in use by {owner}: wait for that run to end, or pass another '
                f'--experiment (or --output) for this one') from None
        handle.seek(0)
        handle.truncate()
        handle.write(f'pid {os.getpid()} on {socket.gethostname()} since {time.strftime("%Y-%m-%d %H:%M:%S")}\n')
        handle.flush()
        self._lock_file = handle

    def release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing drops the flock
            self._lock_file = None


def _holds_a_run(path: str) -> bool:
    return os.path.isdir(path) and any(name != LOCK_NAME for name in os.listdir(path))


def claim_run_folder(root: str, name: str, resume: str = '') -> RunFolder:
    """Create (or reuse) the run folder ``root/name`` for this run and lock it.

    The folder is reused when it is empty or when ``resume`` is a checkpoint inside it (the run goes
    on where it stopped). A folder holding another run's files is left alone: this run gets the first
    free ``name-<n>``, created atomically so that two runs started together never share one.
    """
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, name)
    resumes_here = bool(resume) and os.path.realpath(os.path.dirname(resume)) == os.path.realpath(path)
    if _holds_a_run(path) and not resumes_here:
        suffix = 1
        while True:
            candidate = f'{path}-{suffix}'
            try:
                os.mkdir(candidate)
                break
            except FileExistsError:
                suffix += 1
        _logger.warning('Run folder %s holds another run; this run writes to %s (to continue that run, '
                        'pass --resume %s)', path, candidate, os.path.join(path, 'last.pth.tar'))
        path = candidate
    os.makedirs(path, exist_ok=True)
    folder = RunFolder(path)
    folder.acquire()
    return folder


def state_dict_mismatch(own: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> str:
    """Why ``state`` does not load into a model whose state dict is ``own``, in one line ('' if it fits):
    missing and unexpected keys and shape mismatches, each counted with an example."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f'{k}: checkpoint {list(state[k].shape)} vs model {list(v.shape)}'
              for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = [f'{len(missing)} missing keys (e.g. {missing[0]})' if missing else '',
             f'{len(unexpected)} unexpected keys (e.g. {unexpected[0]})' if unexpected else '',
             f'{len(shapes)} shape mismatches (e.g. {shapes[0]})' if shapes else '']
    return ', '.join(p for p in parts if p)


def remove_if_exists(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class CheckpointManager:
    """``last.pth.tar`` every epoch, the best ``max_history`` epochs as ``checkpoint-<epoch>.pth.tar``
    plus ``model_best.pth.tar``, and the latest ``recovery-<epoch>-<batch>.pth.tar``."""

    def __init__(self, output_dir: str, max_history: int, decreasing: bool) -> None:
        self.output_dir = output_dir
        self.max_history = max_history
        self.decreasing = decreasing
        self.history: List[Tuple[float, int]] = []
        self.last_recovery: Optional[str] = None

    def _path(self, name: str) -> str:
        return os.path.join(self.output_dir, name)

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.decreasing else a > b

    @property
    def best(self) -> Optional[Tuple[float, int]]:
        return self.history[0] if self.history else None

    def save_epoch(self, state: Dict[str, Any], epoch: int, metric: Optional[float]) -> None:
        """Write last.pth.tar and, if ``metric`` ranks among the best, a kept checkpoint for ``epoch``."""
        keep = metric is not None and math.isfinite(metric) and (
            len(self.history) < self.max_history or self._better(metric, self.history[-1][0]))
        history = list(self.history)
        if keep:
            history = [h for h in history if h[1] != epoch] + [(metric, epoch)]
            history.sort(key=lambda h: h[0], reverse=not self.decreasing)
        dropped, history = history[self.max_history:], history[:self.max_history]
        state['checkpoint_history'] = [list(h) for h in history]
        last = self._path('last.pth.tar')
        atomic_torch_save(state, last)
        self.history = history
        if keep:
            atomic_copy(last, self._path(f'checkpoint-{epoch}.pth.tar'))
            if self.history[0][1] == epoch:
                atomic_copy(last, self._path('model_best.pth.tar'))
        for _, old_epoch in dropped:
            if old_epoch != epoch:
                remove_if_exists(self._path(f'checkpoint-{old_epoch}.pth.tar'))
        self.remove_recovery()

    def save_recovery(self, state: Dict[str, Any], epoch: int, batches_done: int) -> str:
        """Write a mid-epoch recovery checkpoint; the previous one is removed once this one exists."""
        state['checkpoint_history'] = [list(h) for h in self.history]
        path = self._path(f'recovery-{epoch}-{batches_done}.pth.tar')
        atomic_torch_save(state, path)
        previous, self.last_recovery = self.last_recovery, path
        if previous and previous != path:
            remove_if_exists(previous)
        return path

    def adopt_recovery(self, path: str) -> None:
        """Treat a recovery checkpoint this run resumed from as its own: the next save removes it."""
        if os.path.realpath(os.path.dirname(path)) == os.path.realpath(self.output_dir) and \
                os.path.basename(path).startswith('recovery-'):
            self.last_recovery = path

    def remove_recovery(self) -> None:
        if self.last_recovery:
            remove_if_exists(self.last_recovery)
            self.last_recovery = None

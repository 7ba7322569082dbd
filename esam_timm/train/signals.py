"""Graceful stop: SIGINT (Ctrl-C) and SIGTERM (preemption) end a run with a checkpoint it can resume from.

The first signal only sets a flag. The trainer finishes the update in progress, writes a recovery
checkpoint and raises :class:`TrainingStopped`, which ``train_esam.py`` turns into one line holding the
exact ``--resume`` command and exit code 128 + signal (130 for SIGINT, 143 for SIGTERM), as a shell
reports a process killed by that signal. A second signal stops at once, without a checkpoint; one that
follows the first within :data:`REPEAT_AFTER_S` is taken as the same stop request, because a signal
sent to every process of a job (SLURM, ``kill -- -PGID``) also reaches each trainer through torchrun,
which forwards the signals it receives to its workers.

Under DDP every rank must stop after the same update (a rank that stops early leaves the others
waiting in a collective). :meth:`GracefulStop.requested` agrees on the flag through a 4-byte all-reduce
on a gloo (CPU) process group: it starts one per update and reads it at the next, so the exchange
overlaps an update and adds no device synchronisation under NCCL; a stop is agreed one update after
the signal. Forked data-loader workers inherit the handler but ignore the signal: the trainer decides
and shuts them down.
"""
import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ['GracefulStop', 'TrainingStopped', 'REPEAT_AFTER_S']

_logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_AFTER_S = 1.0


class TrainingStopped(Exception):
    """A signal stopped the run after a checkpoint was written; the message says how to resume."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class GracefulStop:
    """Turns SIGINT/SIGTERM into a stop request the trainer reads between updates.

    Args:
        group: a gloo process group spanning all ranks to agree on the request (None: one process).
    """

    def __init__(self, group: Optional[Any] = None) -> None:
        self.group = group
        self.signum: Optional[int] = None
        self._first_at = 0.0
        self._owner_pid = -1
        self._previous: Dict[int, Any] = {}
        self._pending: Optional[Tuple[Any, torch.Tensor]] = None

    def __enter__(self) -> 'GracefulStop':
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            self._owner_pid = os.getpid()
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._pending is not None:
            self._pending[0].wait()  # every rank started it: it completes
            self._pending = None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if os.getpid() != self._owner_pid:
            return  # a forked data-loader worker: the trainer stops it
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            _logger.warning('%s received: finishing the current update, then writing a checkpoint and stopping '
                            '(send it again to stop at once, without a checkpoint)', name)
        elif time.monotonic() - self._first_at >= REPEAT_AFTER_S:
            _logger.warning('%s received again: stopping now, without a checkpoint', name)
            os._exit(128 + signum)

    def requested(self) -> int:
        """The signal to stop for after this update (0: go on), the same on every rank. Call once per update
        on every rank (one non-blocking all-reduce on the gloo group, read at the next call)."""
        if self.group is None:
            return self.signum or 0
        agreed = 0
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = int(flag.item())
        self._pending = self._start_reduce()
        return agreed

    def requested_now(self) -> int:
        """Like :meth:`requested`, agreed with a blocking all-reduce (e.g. at an epoch's end)."""
        if self.group is None:
            return self.signum or 0
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
        work, flag = self._start_reduce()
        work.wait()
        return int(flag.item())

    def _start_reduce(self) -> Tuple[Any, torch.Tensor]:
        """All-reduce (max) this rank's signal number: a CPU tensor on the gloo group, so no device sync."""
        flag = torch.tensor([self.signum or 0], dtype=torch.int32)
        return dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag

    def barrier(self) -> None:
        """Wait for every rank (e.g. until rank 0 has written the checkpoint before anyone exits)."""
        if self.group is not None:
            dist.barrier(group=self.group)

"""The console every command of the package shares: timestamped log lines on stderr and a progress bar.

Used by the trainer and the sharpness CLI alike (a shared home, so neither imports the other for it).
While a :class:`ProgressBar` is on screen, log lines are printed above it, never through it.
"""
import logging
import os
import sys
from typing import Optional

__all__ = ['setup_logging', 'ProgressBar']


def setup_logging(rank: Optional[int] = None, level: int = logging.INFO) -> None:
    """Log to stderr with timestamps; ranks other than 0 (default: torchrun's RANK) only show warnings."""
    if rank is None:
        rank = int(os.environ.get('RANK', '0'))
    root = logging.getLogger()
    if not any(isinstance(h, _ProgressSafeHandler) for h in root.handlers):
        handler = _ProgressSafeHandler(sys.stderr)
        handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s', '%H:%M:%S'))
        root.addHandler(handler)
    root.setLevel(level if rank == 0 else logging.WARNING)


class _ProgressSafeHandler(logging.StreamHandler):
    """Writes log lines through ``tqdm.write`` while a progress bar is on screen, so a line never lands
    in the middle of the bar (tqdm clears the bar, prints the line, redraws the bar)."""

    def emit(self, record: logging.LogRecord) -> None:
        if not ProgressBar.active:
            super().emit(record)
            return
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # a log line must never take training down
            self.handleError(record)


class ProgressBar:
    """A tqdm progress bar over an epoch's batches when a person watches (stderr is a terminal).

    Elsewhere (logs, CI) it does nothing; the per-interval log lines show progress there. While one is
    shown, :func:`setup_logging`'s handler prints log lines above it instead of through it.
    """

    active = 0  # bars on screen now

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self._bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
                ProgressBar.active += 1
            except ImportError:
                self._bar = None

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            ProgressBar.active -= 1

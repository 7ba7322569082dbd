"""What the trainer reports: console lines, the progress bar, summary.csv and optional W&B.

Step statistics stay on the device between log intervals (no host sync per step); they are read once
per interval. Console lines follow timm's train.py: each value for the interval, then the epoch's
running average in parentheses. summary.csv and the epoch-level W&B log share timm's flat keys
(``train_loss``, ``eval_top1``, ...). W&B is optional and never fatal: a missing package or a failing
init/log is a warning.
"""
import csv
import io
import logging
import math
import os
import sys
import time
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch

from esam_timm.distributed import all_reduce_sum
from esam_timm.fileio import atomic_write_text

__all__ = ['setup_logging', 'StepMeter', 'format_train_line', 'write_summary', 'WandbLogger', 'ProgressBar']

_logger = logging.getLogger(__name__)


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


class StepMeter:
    """Accumulates train_step statistics over a span of updates without reading them to the host.

    The trainer keeps two: one per log interval and one per epoch (the running average). The epoch
    meter's :meth:`state_dict` goes into recovery checkpoints, so a resumed epoch's summary row covers
    the whole epoch.
    """

    _SUMMED = ('loss', 'grad_norm', 'sharpness', 'perturb_norm', 'skipped_ascents')
    # Python bools of the step's non-finite guard, counted on the host and not reduced: the same on every
    # rank, since the guard reads the all-reduced gradient, which a non-finite loss on any rank poisons.
    _COUNTED = ('skipped_nonfinite', 'skipped_overflow')

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums: Dict[str, torch.Tensor] = {}
        self._counts: Dict[str, int] = {}
        self._host_counts: Dict[str, int] = {}
        self.selected = 0.0
        self.samples = 0
        self.steps = 0
        self.data_time = 0.0
        self.elapsed_before = 0.0  # time spent in this span before a resume
        self.start = time.perf_counter()

    def update(self, stats: Mapping[str, Any], batch_size: int, data_time: float) -> None:
        """Add one update's statistics (tensors stay where they are)."""
        for key in self._SUMMED:
            value = stats.get(key)
            if value is None:
                continue
            value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
            self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()
            self._counts[key] = self._counts.get(key, 0) + 1
        for key in self._COUNTED:
            if key in stats:
                self._host_counts[key] = self._host_counts.get(key, 0) + int(bool(stats[key]))
        self.selected += float(stats.get('selected_fraction', 1.0))
        self.samples += batch_size
        self.steps += 1
        self.data_time += data_time

    def read(self, world_size: int = 1) -> Dict[str, float]:
        """Averages over the span as floats (one host sync; one collective when distributed).

        ``loss`` is averaged over ranks, ``skipped_ascents`` is the count summed over ranks, the other
        statistics are this rank's; samples/s is global. ``skipped_nonfinite``/``skipped_overflow`` count
        the updates the guard skipped (the same on every rank).
        """
        out: Dict[str, float] = {}
        keys = list(self._sums)
        if keys:
            totals = torch.stack([self._sums[k].to(torch.float64) for k in keys])
            reduced = all_reduce_sum(totals) if world_size > 1 else totals
            for key, local, total in zip(keys, totals.tolist(), reduced.tolist()):
                if key == 'skipped_ascents':
                    out[key] = total
                elif key == 'loss':
                    out[key] = total / world_size / self._counts[key]
                else:
                    out[key] = local / self._counts[key]
        out.update({key: float(count) for key, count in self._host_counts.items()})
        elapsed = max(self.elapsed_before + time.perf_counter() - self.start, 1e-9)
        steps = max(self.steps, 1)
        out['selected_share'] = self.selected / steps
        out['samples_per_sec'] = self.samples * world_size / elapsed
        out['data_time'] = self.data_time / steps
        out['step_time'] = elapsed / steps
        return out

    def state_dict(self) -> Dict[str, Any]:
        """The span so far, for a recovery checkpoint (sums as CPU tensors, bitwise)."""
        return {'sums': {k: v.detach().cpu() for k, v in self._sums.items()}, 'counts': dict(self._counts),
                'host_counts': dict(self._host_counts), 'selected': self.selected, 'samples': self.samples,
                'steps': self.steps,
                'data_time': self.data_time,
                'elapsed': self.elapsed_before + time.perf_counter() - self.start}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        """Continue a span saved by :meth:`state_dict` (e.g. the epoch a run resumes in)."""
        self.reset()
        self._sums = {k: v.to(device) for k, v in state['sums'].items()}
        self._counts = dict(state['counts'])
        self._host_counts = dict(state.get('host_counts', {}))
        self.selected, self.samples, self.steps = state['selected'], state['samples'], state['steps']
        self.data_time, self.elapsed_before = state['data_time'], state['elapsed']


def _fmt(value: Optional[float], spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '-'
    return format(value, spec)


def format_train_line(epoch: int, batch: int, num_batches: int, interval: Mapping[str, float],
                      running: Mapping[str, float], lr: float) -> str:
    """One console line in timm's style: each value over the last interval (the epoch's running average).

    Position, loss, global samples/s, lr, data time and, for SAM/ESAM, sharpness, the selected share
    and the epoch's skipped ascents so far (summed over ranks); for msam, the perturbation norm; with the
    non-finite guard, the epoch's skipped updates so far.
    """
    def pair(key: str, spec: str, scale: float = 1.0) -> str:
        now, avg = interval.get(key), running.get(key)
        return (f'{_fmt(None if now is None else now * scale, spec)} '
                f'({_fmt(None if avg is None else avg * scale, spec)})')

    pct = 100.0 * batch / max(num_batches, 1)
    parts = [
        f'Train: {epoch} [{batch:>5d}/{num_batches} ({pct:3.0f}%)]',
        f'Loss: {pair("loss", ".4f")}',
        f'{interval["samples_per_sec"]:.1f}/s ({running["samples_per_sec"]:.1f}/s)',
        f'LR: {lr:.3e}',
        f'Data: {pair("data_time", ".1f", 1000.0)} ms',
    ]
    if 'sharpness' in running or 'skipped_ascents' in running:
        parts += [
            f'Sharpness: {pair("sharpness", ".4f")}',
            f'Selected: {interval["selected_share"]:.2f}',
            f'Skipped ascents: {int(running.get("skipped_ascents", 0))}',
        ]
    elif 'perturb_norm' in running:  # msam: no ascent, no selection; its ||w~ - w||
        parts.append(f'Perturb: {pair("perturb_norm", ".3f")}')
    if 'skipped_nonfinite' in running:
        skipped = int(running['skipped_nonfinite'] + running.get('skipped_overflow', 0))
        parts.append(f'Skipped updates: {skipped}')
    return '  '.join(parts)


def write_summary(path: str, row: Mapping[str, Any]) -> None:
    """Append one epoch row to summary.csv (rewritten atomically; columns are the union of all rows).

    A row for an epoch already in the file replaces it, so a resumed run does not duplicate epochs.
    """
    rows: List[Dict[str, Any]] = []
    if os.path.exists(path):
        with open(path, newline='') as f:
            rows = [r for r in csv.DictReader(f) if str(r.get('epoch')) != str(row.get('epoch'))]
    rows.append(dict(row))
    columns: List[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval='')
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


class WandbLogger:
    """Thin wrapper over wandb that turns every failure into a warning and disables itself."""

    def __init__(self, enabled: bool, *, project: Optional[str], tags: Iterable[str], config: Mapping[str, Any],
                 output_dir: str, resume_id: str = '', name: Optional[str] = None) -> None:
        self.run = None
        if not enabled:
            return
        try:
            import wandb
        except ImportError:
            warnings.warn('--log-wandb given but wandb is not installed (pip install wandb); '
                          'training continues without W&B.')
            return
        kwargs: Dict[str, Any] = dict(project=project, config=dict(config), tags=list(tags) or None,
                                      name=name, dir=os.environ.get('WANDB_DIR', output_dir))
        if resume_id:
            kwargs.update(id=resume_id, resume='allow')
        try:
            self.run = wandb.init(**kwargs)
        except Exception as e:  # wandb raises many types (network, auth, usage): none may stop training
            warnings.warn(f'wandb.init failed ({type(e).__name__}: {e}); training continues without W&B.')
            self.run = None

    @property
    def active(self) -> bool:
        return self.run is not None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log a dict of scalars at a global step; a failure warns once and disables W&B."""
        if self.run is None:
            return
        try:
            self.run.log(dict(metrics), step=step)
        except Exception as e:
            warnings.warn(f'wandb.log failed ({type(e).__name__}: {e}); W&B logging disabled.')
            self.run = None

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as e:
            warnings.warn(f'wandb.finish failed ({type(e).__name__}: {e}).')
        self.run = None


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

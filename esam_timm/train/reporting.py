"""What the trainer reports: console lines, summary.csv and W&B, all behind :class:`RunLog` (one call per
event writes every sink, as timm's ``update_summary`` writes CSV and W&B together). The console and the
W&B wrapper themselves are :mod:`esam_timm.console` and :mod:`esam_timm.wandb_logger`, shared with the
sharpness CLI.

Step statistics stay on the device between log intervals (no host sync per step); they are read once
per interval. Console lines follow timm's train.py: each value for the interval, then the epoch's
running average in parentheses. summary.csv and the epoch-level W&B log share timm's flat keys
(``train_loss``, ``eval_top1``, ...).
"""
import csv
import io
import logging
import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional

import torch

from esam_timm.distributed import all_reduce_sum
from esam_timm.fileio import atomic_write_text
from esam_timm.wandb_logger import WandbLogger

__all__ = ['RunLog', 'StepMeter', 'format_epoch_line', 'format_train_line', 'write_summary']

_logger = logging.getLogger(__name__)


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
        out['data_wait_share'] = min(1.0, self.data_time / elapsed)  # a starving loader shows here
        return out

    def state_dict(self, world_size: int = 1) -> Dict[str, Any]:
        """The span so far, for a recovery checkpoint (sums as CPU tensors, bitwise); ``global_samples``
        counts every process's samples, so a run resumed on another number of processes goes on counting."""
        return {'sums': {k: v.detach().cpu() for k, v in self._sums.items()}, 'counts': dict(self._counts),
                'host_counts': dict(self._host_counts), 'selected': self.selected, 'samples': self.samples,
                'global_samples': self.samples * world_size, 'steps': self.steps,
                'data_time': self.data_time,
                'elapsed': self.elapsed_before + time.perf_counter() - self.start}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device, world_size: int = 1) -> None:
        """Continue a span saved by :meth:`state_dict` (e.g. the epoch a run resumes in) on ``world_size``
        processes."""
        self.reset()
        self._sums = {k: v.to(device) for k, v in state['sums'].items()}
        self._counts = dict(state['counts'])
        self._host_counts = dict(state.get('host_counts', {}))
        self.selected, self.steps = state['selected'], state['steps']
        self.samples = state['global_samples'] / world_size if 'global_samples' in state else state['samples']
        self.data_time, self.elapsed_before = state['data_time'], state['elapsed']


def _fmt(value: Optional[float], spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '-'
    return format(value, spec)


def format_train_line(epoch: int, batch: int, num_batches: int, interval: Mapping[str, float],
                      running: Mapping[str, float], lr: float) -> str:
    """One console line in timm's style: each value over the last interval (the epoch's running average).

    Position, loss, global samples/s, lr, data time (and the share of the step spent waiting for data:
    near 0 when the loader keeps up) and, for SAM/ESAM, sharpness, the selected share
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
        f'Data: {pair("data_time", ".1f", 1000.0)} ms' + (
            f', wait {interval["data_wait_share"]:.0%}' if 'data_wait_share' in interval else ''),
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


def format_epoch_line(epoch: int, epoch_time: float, train: Mapping[str, float], top1: Optional[float],
                      best: Optional[str], fp16: bool) -> str:
    """The console line that ends an epoch: time, train loss, samples/s, top-1, skipped updates (fp16
    overflows with ``fp16``), unreadable data, and ``best`` (the best checkpoint so far, if any)."""
    notes = ''
    if 'skipped_nonfinite' in train:
        notes += f', skipped updates: {int(train["skipped_nonfinite"])} non-finite'
        if fp16:
            notes += f', {int(train["skipped_overflow"])} fp16 overflow'
    if train.get('bad_samples') or train.get('bad_shards'):
        bad = int(train['bad_samples'])
        notes += (f', unreadable data: {bad} of {bad + int(train["samples_read"])} samples read '
                  f'({train["bad_fraction"]:.2%}), {int(train["bad_shards"])} broken shards')
    return (f'Epoch {epoch} done in {epoch_time:.1f}s: train loss {train.get("loss", float("nan")):.4f}, '
            f'{train["samples_per_sec"]:.1f} samples/s' + (f', top-1 {top1:.2f}%' if top1 is not None else '')
            + notes + (f'  ({best})' if best else ''))


class RunLog:
    """Every sink of a run behind one call per event: the console, ``summary.csv`` and W&B.

    Only the primary rank (``enabled``) writes; on the other ranks every call does nothing, so the
    trainer calls it on every rank without asking which one it is.
    """

    def __init__(self, output_dir: str, wandb: Optional[WandbLogger] = None, enabled: bool = True) -> None:
        self.summary_path = os.path.join(output_dir, 'summary.csv')
        self.wandb = wandb
        self.enabled = enabled

    def _log_wandb(self, metrics: Mapping[str, Any], step: int) -> None:
        if self.wandb is not None and self.wandb.active:
            self.wandb.log(metrics, step=step)

    def interval(self, epoch: int, done: int, num_batches: int, interval: Mapping[str, float],
                 running: Mapping[str, float], lr: float, step: int) -> None:
        """One log interval: the console line, and the interval's values under ``train/`` in W&B."""
        if not self.enabled:
            return
        _logger.info(format_train_line(epoch, done, num_batches, interval, running, lr))
        log = {f'train/{k}': v for k, v in interval.items()}
        log.update({'train/lr': lr, 'epoch': epoch})
        self._log_wandb(log, step)

    def epoch(self, row: Mapping[str, Any], step: int, line: str) -> None:
        """One epoch: its row in summary.csv and W&B (timm's keys: ``eval_top1``, ...) and its console line."""
        if not self.enabled:
            return
        write_summary(self.summary_path, row)
        self._log_wandb(row, step)
        _logger.info('%s', line)

    def close(self) -> None:
        """End the W&B run (the files need no closing)."""
        if self.wandb is not None:
            self.wandb.finish()

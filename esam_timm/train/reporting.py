"""Console lines, summary.csv and optional Weights & Biases logging for the trainer.

Step statistics stay on the device between log intervals (no host sync per step); they are read once
per interval. W&B is optional and never fatal: a missing package or a failing init/log is a warning.
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

__all__ = ['setup_logging', 'StepMeter', 'format_train_line', 'write_summary', 'WandbLogger', 'ProgressBar']

_logger = logging.getLogger(__name__)


def setup_logging(rank: Optional[int] = None, level: int = logging.INFO) -> None:
    """Log to stderr with timestamps; ranks other than 0 (default: torchrun's RANK) only show warnings."""
    if rank is None:
        rank = int(os.environ.get('RANK', '0'))
    root = logging.getLogger()
    if not any(getattr(h, '_esam_timm', False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s', '%H:%M:%S'))
        handler._esam_timm = True
        root.addHandler(handler)
    root.setLevel(level if rank == 0 else logging.WARNING)


class StepMeter:
    """Accumulates train_step statistics over one log interval without reading them to the host."""

    _SUMMED = ('loss', 'grad_norm', 'sharpness', 'perturb_norm', 'perturb_skipped')

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums: Dict[str, torch.Tensor] = {}
        self._counts: Dict[str, int] = {}
        self.selected = 0.0
        self.samples = 0
        self.steps = 0
        self.data_time = 0.0
        self.start = time.perf_counter()

    def update(self, stats: Mapping[str, Any], batch_size: int, data_time: float) -> None:
        """Add one step's statistics (tensors stay where they are)."""
        for key in self._SUMMED:
            value = stats.get(key)
            if value is None:
                continue
            value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
            self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()
            self._counts[key] = self._counts.get(key, 0) + 1
        self.selected += float(stats.get('selected_fraction', 1.0))
        self.samples += batch_size
        self.steps += 1
        self.data_time += data_time

    def read(self, world_size: int = 1) -> Dict[str, float]:
        """Interval averages as floats (one host sync); loss is averaged over ranks when distributed.

        ``perturb_skipped`` is the count of skipped ascents summed over all ranks; samples/s is global.
        """
        out: Dict[str, float] = {}
        for key, total in self._sums.items():
            if key in ('loss', 'perturb_skipped') and world_size > 1 and torch.distributed.is_initialized():
                total = total.clone()
                torch.distributed.all_reduce(total)
                if key == 'loss':
                    total = total / world_size
            value = total.item()
            out[key] = value if key == 'perturb_skipped' else value / self._counts[key]
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        steps = max(self.steps, 1)
        out['selected_share'] = self.selected / steps
        out['samples_per_sec'] = self.samples * world_size / elapsed
        out['data_time'] = self.data_time / steps
        out['step_time'] = elapsed / steps
        return out


def _fmt(value: Optional[float], spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '-'
    return format(value, spec)


def format_train_line(epoch: int, batch: int, num_batches: int, metrics: Mapping[str, float],
                      lr: float, skipped_total: int) -> str:
    """One console line: position, loss, lr, global samples/s, data time and the ESAM statistics."""
    pct = 100.0 * batch / max(num_batches, 1)
    parts = [
        f'Train: {epoch} [{batch:>5d}/{num_batches} ({pct:3.0f}%)]',
        f'loss {_fmt(metrics.get("loss"), ".4f")}',
        f'lr {lr:.3e}',
        f'{metrics["samples_per_sec"]:.1f} samples/s',
        f'data {metrics["data_time"] * 1000:.1f} ms/step',
    ]
    if 'sharpness' in metrics or 'perturb_norm' in metrics:
        parts += [
            f'sharpness {_fmt(metrics.get("sharpness"), ".4f")}',
            f'selected {metrics["selected_share"]:.2f}',
            f'skipped {skipped_total}',
        ]
    return '  '.join(parts)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f'{path}.tmp'
    with open(tmp, 'w', newline='') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    _atomic_write_text(path, buffer.getvalue())


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

    Elsewhere (logs, CI) it does nothing; the per-interval log lines show progress there.
    """

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self._bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
            except ImportError:
                self._bar = None

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

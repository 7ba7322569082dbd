"""The ESAM training loop behind ``train_esam.py``: the epoch loop, and the wiring of its parts.

:class:`Trainer` wires together the parts :mod:`.builders` makes from the flags (runtime, model and EMA,
optimizer from timm's factory: ``esam``, ``sam``, ``msam`` or any timm optimizer, scheduler), the data
seam's loaders (:mod:`.loaders`), :func:`esam_timm.train_step` for each update, the run folder and
checkpoint format of :mod:`.checkpoint`, the measurements of :mod:`.evaluation` and the sinks of
:class:`~.reporting.RunLog`. Setup builds everything that can fail on bad input (data, model,
optimizer, the resume checkpoint) before it creates the run folder, and reports such failures as one
:class:`SetupError`.

Reproducible resume: every batch runs under seeds derived from (seed, rank, epoch, batch), so the
random state of augmentation, mixup and dropout does not depend on what ran before. A run resumed
from a checkpoint replays the remaining batches exactly (on the CPU, bitwise): the checkpoint holds
model, optimizer (base optimizer + ESAM's SWP generator), GradScaler, EMA, scheduler, the position
(epoch, batch) and the epoch's statistics so far; the data loader is re-opened at that epoch and
fast-forwarded to the batch. A resumed run continues in its checkpoint's run folder.

Fail-safe: updates with a non-finite loss or gradient are skipped by the step's guard and
``--max-nonfinite`` of them in a row stop the run (:mod:`.divergence`); no checkpoint with non-finite
weights is written; SIGINT/SIGTERM stop after the current update with a recovery checkpoint
(:mod:`.signals`); a bad-data stop comes after the epoch's checkpoint.
"""
import argparse
import logging
import math
import os
import random
import signal
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import yaml

from esam_timm import create_per_sample_loss, find_sam, train_step
from esam_timm.console import ProgressBar
from esam_timm.data.backends import check_epoch_data
from esam_timm.fileio import atomic_write_text
from esam_timm.wandb_logger import WandbLogger

from .builders import (build_model, build_optimizer, build_scheduler, describe_data, describe_lr, describe_optimizer,
                       describe_placements, describe_precision, resolve_lr, run_location, setup_runtime, wrap_model)
from .checkpoint import (ARGS_NAME, BatchLayout, CheckpointManager, RunFolder, RunFolderBusy, TrainingState,
                         checkpoint_state, claim_run_folder, find_resume_checkpoint, resume_command, resume_from)
from .config import RESUME_AUTO, RESUME_FREE_FLAGS, args_to_yaml
from .demo import demo_summary
from .divergence import NonFiniteWatch, refuse_nonfinite
from .evaluation import FlatnessProbe, distribute_bn, validate
from .loaders import build_loaders, resolve_data
from .reporting import RunLog, StepMeter, format_epoch_line
from .signals import GracefulStop, TrainingStopped

__all__ = ['Trainer', 'train', 'SetupError']

_logger = logging.getLogger(__name__)

StepCallback = Callable[['Trainer', int, int], None]
Batch = Tuple[torch.Tensor, torch.Tensor]


class SetupError(ValueError):
    """A run that cannot start (missing or mismatched data, paths, checkpoint, busy run folder).

    ``train_esam.py`` prints its message as one line and exits with code 2, as for a bad flag.
    """


def _step_seed(seed: int, rank: int, epoch: int, batch: int) -> int:
    """A seed for one (rank, epoch, batch): independent of anything that ran before."""
    value = seed
    for part in (rank, epoch, batch + 1):
        value = (value * 1_000_003 + part) % (2 ** 31 - 1)
    return value


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


class Trainer:
    """One training run described by parsed ``train_esam.py`` arguments.

    ``Trainer(args).fit()`` builds everything, trains ``--epochs`` epochs and returns the final
    metrics. ``step_callbacks`` are called as ``callback(trainer, epoch, batches_done)`` after every
    update (after any recovery checkpoint), e.g. to stop a run or collect statistics. ``argv`` is the
    command line that started the run (``sys.argv``), repeated in the ``--resume`` command a stopped
    run prints; without it the command loads the run's ``args.yaml``.
    """

    def __init__(self, args: argparse.Namespace, args_text: Optional[str] = None,
                 step_callbacks: Sequence[StepCallback] = (), argv: Optional[Sequence[str]] = None) -> None:
        self.args = args
        self.args_text = args_text if args_text is not None else args_to_yaml(args)
        self.step_callbacks = list(step_callbacks)
        self.argv = list(argv) if argv is not None else None
        self.resume_path = ''
        self.last_checkpoint: Optional[str] = None  # the newest checkpoint of the run: written or resumed from
        self.start_epoch = 0
        self.start_batch = 0
        self.num_updates = 0
        self.output_dir: Optional[str] = None
        self.run_folder: Optional[RunFolder] = None
        self.checkpoints: Optional[CheckpointManager] = None
        self.log: Optional[RunLog] = None
        self.final_metrics: Dict[str, float] = {}
        self._resumed_meter: Optional[Dict[str, Any]] = None

    # ----------------------------------------------------------------------------------- setup
    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    def setup(self) -> None:
        """Build runtime, data, model, loaders, optimizer and scheduler, load ``--resume``, then (only
        once all of that worked) claim the run folder. Bad input raises :class:`SetupError`."""
        try:
            self._setup()
        except SetupError:
            raise
        except (ValueError, OSError, KeyError, RunFolderBusy) as e:
            raise SetupError(str(e).strip() or repr(e)) from e  # every line: advice often follows the first

    def _setup(self) -> None:
        args = self.args
        runtime = setup_runtime(args)
        self.runtime = runtime
        self.device, self.rank, self.world_size = runtime.device, runtime.rank, runtime.world_size
        self.distributed, self.amp_dtype = runtime.distributed, runtime.amp_dtype
        self.stop = GracefulStop(dist.new_group(backend='gloo') if self.distributed else None)
        self.nonfinite = NonFiniteWatch(args.max_nonfinite) if args.max_nonfinite else None
        self.location = run_location(args)
        torch.manual_seed(args.seed)
        self.data = resolve_data(args, self.world_size, self.is_primary, self._barrier)
        self.num_classes = self.data.num_classes
        self.model, self.data_config, self.model_ema = build_model(
            args, self.num_classes, self.device, distributed=self.distributed, verbose=self.is_primary)
        loaders = build_loaders(args, self.data, self.data_config, rank=self.rank, world_size=self.world_size,
                                device=self.device)
        self.train_loader, self.val_loader, self.mixup_fn = loaders.train, loaders.val, loaders.mixup_fn
        if args.sharpness_interval and self.val_loader is None:
            raise ValueError(f'--sharpness-interval {args.sharpness_interval} measures flatness on validation '
                             f'batches, but --val-split is empty: give a validation split or drop the flag')
        self.flatness = FlatnessProbe(self.val_loader, interval=args.sharpness_interval,
                                      num_batches=args.sharpness_batches, rho=args.sharpness_rho,
                                      iters=args.sharpness_iters, seed=args.seed, progress=not args.no_progress,
                                      rank=self.rank, world_size=self.world_size)
        self.batches_per_epoch = loaders.batches_per_epoch
        self.updates_per_epoch = math.ceil(self.batches_per_epoch / args.grad_accum_steps)
        self.lr = resolve_lr(args, self.world_size)
        self.optimizer = build_optimizer(args, self.model, self.lr, verbose=self.is_primary)
        self.sam = find_sam(self.optimizer)
        self.loss_fn = create_per_sample_loss(
            smoothing=args.smoothing, mixup_active=self.mixup_fn is not None, bce_loss=args.bce_loss,
            bce_target_thresh=args.bce_target_thresh, bce_sum=args.bce_sum, bce_pos_weight=args.bce_pos_weight)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.scheduler, self.num_epochs = build_scheduler(args, self.optimizer, self.updates_per_epoch)
        self.resume_path = self._resolve_resume()
        history = self._resume(self.resume_path) if self.resume_path else []
        if args.start_epoch is not None:
            self.start_epoch, self.start_batch = args.start_epoch, 0
        if self.scheduler is not None and self.start_epoch > 0 and self.start_batch == 0:
            self.scheduler.step(self.start_epoch)
        self.train_model, self.eval_model = wrap_model(args, self.model, self.sam, self.device, self.distributed)
        self._claim_output(history)
        wandb = None
        if self.is_primary:
            self._log_setup()
            config = dict(vars(args), lr_resolved=self.lr, world_size=self.world_size)
            wandb = WandbLogger(args.log_wandb, project=args.wandb_project, tags=args.wandb_tags, config=config,
                                output_dir=self.output_dir, resume_id=args.wandb_resume_id,
                                name=os.path.basename(self.output_dir))
        self.log = RunLog(self.output_dir, wandb, enabled=self.is_primary)

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _log_setup(self) -> None:
        """The block a run at scale is checked by: processes and devices, batches and lr, precision and
        compile, data path, epochs and output."""
        args = self.args
        backend = f' ({dist.get_backend()})' if self.distributed else ''
        _logger.info('Run: %d process%s%s on %s', self.world_size, 'es' if self.distributed else '', backend,
                     describe_placements(self.runtime.placements))
        _logger.info('  Optimizer %s, %s; global batch of %d (%d per process x %d processes x %d accumulated)',
                     describe_optimizer(self.optimizer), describe_lr(args, self.world_size, self.lr),
                     args.batch_size * self.world_size * args.grad_accum_steps, args.batch_size, self.world_size,
                     args.grad_accum_steps)
        _logger.info('  Precision %s', describe_precision(args, self.amp_dtype, self.device))
        _logger.info('  Data %s', describe_data(args, self.data.data_dir, self.device))
        _logger.info('  %d epochs of %d batches (%d updates); output in %s', self.num_epochs,
                     self.batches_per_epoch, self.updates_per_epoch, self.output_dir)

    def _resolve_resume(self) -> str:
        """The checkpoint to resume: ``--resume`` as given, or for ``auto`` the newest checkpoint of the
        experiment whose run had these settings ('' when there is none: a new run). Rank 0 decides."""
        if self.args.resume != RESUME_AUTO:
            return self.args.resume
        found: List[Optional[str]] = [None]
        if self.is_primary:
            root, name = self.location
            found[0] = find_resume_checkpoint(root, name, yaml.safe_load(self.args_text), RESUME_FREE_FLAGS)
            if found[0] is None:
                _logger.info('--resume auto: no checkpoint of experiment %r in %s from a run with these settings; '
                             'starting a new run', name, root)
            else:
                _logger.info('--resume auto: resuming %s', found[0])
        if self.distributed:
            dist.broadcast_object_list(found, src=0)
        return found[0] or ''

    def _claim_output(self, history: List[Tuple[float, int]]) -> None:
        """Create and lock the run folder (rank 0 decides, every rank learns the result), write args.yaml."""
        args = self.args
        root, name = self.location
        outcome: List[Optional[str]] = [None, None]  # [path, error]
        if self.is_primary:
            try:
                self.run_folder = claim_run_folder(root, name, resume=self.resume_path)
                outcome[0] = self.run_folder.path
            except (OSError, RunFolderBusy) as e:
                outcome[1] = str(e)
        if self.distributed:
            dist.broadcast_object_list(outcome, src=0)
        if outcome[1] is not None:
            raise SetupError(outcome[1])
        self.output_dir = outcome[0]
        if self.is_primary:
            atomic_write_text(os.path.join(self.output_dir, ARGS_NAME), self.args_text)
        self.checkpoints = CheckpointManager(self.output_dir, args.checkpoint_hist,
                                             decreasing=args.eval_metric == 'loss')
        self.checkpoints.history = history
        if self.resume_path:
            self.checkpoints.adopt_recovery(self.resume_path)
            self.last_checkpoint = self.resume_path

    # ------------------------------------------------------------------------------- checkpoints
    def _training_state(self) -> TrainingState:
        return TrainingState(model=self.model, optimizer=self.optimizer, scaler=self.scaler, model_ema=self.model_ema,
                             scheduler=self.scheduler)

    def state_dict(self, epoch: int, batches_done: int, metric: Optional[float] = None,
                   epoch_meter: Optional[StepMeter] = None) -> Dict[str, Any]:
        """Everything a resumed run needs to continue exactly from (epoch, batches_done)."""
        return checkpoint_state(self._training_state(), vars(self.args), epoch=epoch, batches_done=batches_done,
                                batches_per_epoch=self.batches_per_epoch, num_updates=self.num_updates,
                                world_size=self.world_size, metric=metric,
                                epoch_meter=None if epoch_meter is None else epoch_meter.state_dict(self.world_size))

    def _resume(self, path: str) -> List[Tuple[float, int]]:
        """Load a checkpoint of this trainer and set the position; returns its best-checkpoint history."""
        layout = BatchLayout(batch_size=self.args.batch_size, world_size=self.world_size,
                             grad_accum_steps=self.args.grad_accum_steps, batches_per_epoch=self.batches_per_epoch)
        point = resume_from(path, self._training_state(), model_name=self.args.model, num_classes=self.num_classes,
                            layout=layout, restore_optimizer=not self.args.no_resume_opt)
        self.start_epoch, self.start_batch, self.num_updates = point.epoch, point.batch, point.num_updates
        self._resumed_meter = point.epoch_meter
        if self.is_primary:
            _logger.info('Resumed %s: continuing at epoch %d, batch %d (%d updates done)', path,
                         self.start_epoch, self.start_batch, self.num_updates)
        return point.history

    def _save_recovery(self, epoch: int, done: int, whole: StepMeter) -> None:
        """Write ``recovery-<epoch>-<done>`` on rank 0 once every rank found the weights finite; every rank
        returns when it is on disk."""
        self._check_finite(f'epoch {epoch}, batch {done}')
        if self.is_primary:
            path = self.checkpoints.save_recovery(self.state_dict(epoch, done, epoch_meter=whole), epoch, done)
            _logger.info('Recovery checkpoint %s', path)
        self.stop.barrier()
        self.last_checkpoint = self.checkpoints.recovery_path(epoch, done)

    def _check_finite(self, where: str) -> None:
        """Before a checkpoint: stop on every rank if the model's or EMA's tensors are not all finite."""
        states = {'state_dict': self.model.state_dict()}
        if self.model_ema is not None:
            states['state_dict_ema'] = self.model_ema.module.state_dict()
        refuse_nonfinite(states, where, self.last_checkpoint, self.device)

    def _resume_command(self) -> str:
        return resume_command(self.last_checkpoint, self.argv, os.path.join(self.output_dir, ARGS_NAME))

    def _stop_message(self, signum: int, where: str) -> str:
        """The line a stopped run ends with: where it stopped and the exact command that resumes it."""
        return f'stopped by {signal.Signals(signum).name} {where}; resume with: {self._resume_command()}'

    # -------------------------------------------------------------------------------- training
    def fit(self) -> Dict[str, float]:
        """Set up (if not yet done) and train to the last epoch; return the final metrics.

        Raises :class:`TrainingStopped` after SIGINT/SIGTERM (once a checkpoint is written),
        :class:`DivergedError`, and ``BadDataError`` past ``--max-bad-fraction`` (once that epoch's
        checkpoint is written).
        """
        if not hasattr(self, 'optimizer'):
            self.setup()
        try:
            with self.stop:
                for epoch in range(self.start_epoch, self.num_epochs):
                    self._run_epoch(epoch)
        finally:
            if self.log is not None:
                self.log.close()
            if self.run_folder is not None:
                self.run_folder.release()
        if self.is_primary and self.final_metrics:
            m = self.final_metrics
            top1 = m.get('ema_eval_top1', m.get('eval_top1'))
            best = self.checkpoints.best
            _logger.info('Finished %d epochs: final top-1 %s, best %s, last epoch %.1f train samples/s; '
                         'output in %s', self.num_epochs, '-' if top1 is None else f'{top1:.2f}%',
                         '-' if best is None else f'{self.args.eval_metric} {best[0]:.3f} (epoch {best[1]})',
                         m['train_samples_per_sec'], self.output_dir)
            if self.args.demo:
                _logger.info(demo_summary(self.args, top1))
        return self.final_metrics

    def _run_epoch(self, epoch: int) -> None:
        """Train, validate and checkpoint one epoch; then stop if the data was bad or a signal came."""
        args = self.args
        start_batch = self.start_batch if epoch == self.start_epoch else 0
        t0 = time.perf_counter()
        train_metrics = self.train_one_epoch(epoch, start_batch)
        data_metrics, bad_data = self._data_check(self.train_loader, f'training epoch {epoch}')
        train_metrics.update(data_metrics)
        epoch_time = time.perf_counter() - t0
        train_metrics['lr'] = self._lr()
        self._distribute_bn()
        eval_metrics, ema_metrics = {}, {}
        if self.val_loader is not None and self._validates_after(epoch):
            eval_metrics = self.validate(self.eval_model)
            data_metrics, bad_val = self._data_check(self.val_loader, f'validation after epoch {epoch}')
            eval_metrics.update(data_metrics)
            bad_data = bad_data or bad_val
            if self.model_ema is not None and not args.model_ema_force_cpu:
                ema_metrics = self.validate(self.model_ema.module, tag='ema eval')
        flatness = self._measure_flatness(epoch)
        metric = (ema_metrics or eval_metrics).get(args.eval_metric)
        if self.scheduler is not None:
            self.scheduler.step(epoch + 1, metric)
        self._end_epoch(epoch, train_metrics, eval_metrics, ema_metrics, metric, epoch_time, flatness)
        if bad_data is not None:
            raise self._bad_data_stop(bad_data)
        signum = self.stop.requested_now()
        if signum and epoch + 1 < self.num_epochs:
            raise TrainingStopped(signum, self._stop_message(signum, f'after epoch {epoch}'))

    def train_one_epoch(self, epoch: int, start_batch: int = 0) -> Dict[str, float]:
        """Train one epoch from ``start_batch``; return epoch-average train metrics (all ranks)."""
        args = self.args
        n = self.batches_per_epoch
        if self.mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            self.mixup_fn.mixup_enabled = False
        _seed_everything(_step_seed(args.seed, self.rank, epoch, -1))
        self.train_loader.set_epoch(epoch)
        self.train_model.train()
        batches = iter(self.train_loader)
        if start_batch:
            _logger.info('Fast-forwarding %d batches of epoch %d to the checkpoint position', start_batch, epoch)
            for batch_idx in range(start_batch):
                _seed_everything(_step_seed(args.seed, self.rank, epoch, batch_idx))
                next(batches)
        interval, whole = StepMeter(), StepMeter()
        if start_batch and self._resumed_meter is not None:
            whole.load_state_dict(self._resumed_meter, self.device, self.world_size)  # the row covers the epoch
        self._resumed_meter = None
        bar = ProgressBar(n - start_batch, f'epoch {epoch}', enabled=self.is_primary and not args.no_progress)
        amp = dict(amp_dtype=self.amp_dtype, scaler=self.scaler, clip_grad=args.clip_grad,
                   clip_mode=args.clip_mode, bn_mode=args.esam_bn_mode, guard_nonfinite=self.nonfinite is not None)
        accum = args.grad_accum_steps
        try:
            for first in range(start_batch, n, accum):
                window = range(first, min(first + accum, n))  # the epoch's last update may have fewer batches
                t0 = time.perf_counter()
                inputs, targets = self._next_window(batches, epoch, window)
                data_time = time.perf_counter() - t0
                stats = train_step(self.train_model, self.optimizer, inputs, targets, self.loss_fn,
                                   accum_steps=len(window), **amp)
                self.num_updates += 1
                if self.model_ema is not None:
                    self.model_ema.update(self.model, step=self.num_updates)
                interval.update(stats, inputs.shape[0], data_time)
                whole.update(stats, inputs.shape[0], data_time)
                done, update = window.stop, first // accum + 1
                bar.update(len(window))
                if update % args.log_interval == 0 or done == n:
                    running = self._log_interval(epoch, done, interval, whole)
                    interval.reset()
                if self.nonfinite is not None and self.nonfinite.update(stats):
                    raise self.nonfinite.diverged(f'epoch {epoch}, batch {done} of {n}', self.last_checkpoint)
                if self.scheduler is not None:
                    self.scheduler.step_update(num_updates=self.num_updates)
                if args.recovery_interval and update % args.recovery_interval == 0 and done < n:
                    self._save_recovery(epoch, done, whole)
                for callback in self.step_callbacks:
                    callback(self, epoch, done)
                signum = self.stop.requested()
                if signum and done < n:
                    self._save_recovery(epoch, done, whole)
                    raise TrainingStopped(signum, self._stop_message(signum, f'at epoch {epoch}, batch {done} of {n}'))
        finally:
            bar.close()
        running.setdefault('skipped_ascents', 0.0)
        return running  # the epoch's averages, read once at its last update

    def _next_window(self, batches: Iterator[Batch], epoch: int, window: range) -> Batch:
        """The loader batches of one update, joined into one batch (``train_step`` splits it again).

        Each batch loads under its own seed, so a window's data does not depend on the windows before.
        """
        parts = []
        for batch_idx in window:
            _seed_everything(_step_seed(self.args.seed, self.rank, epoch, batch_idx))
            try:
                parts.append(next(batches))
            except StopIteration:
                raise RuntimeError(f'the training loader ended after {batch_idx} of its '
                                   f'{self.batches_per_epoch} batches in epoch {epoch}') from None
        if len(parts) == 1:
            return parts[0]
        inputs = torch.cat([inputs for inputs, _ in parts])
        if self.args.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs, torch.cat([targets for _, targets in parts])

    def _lr(self) -> float:
        groups = self.optimizer.param_groups
        return sum(g['lr'] for g in groups) / len(groups)

    def _log_interval(self, epoch: int, done: int, interval: StepMeter, whole: StepMeter) -> Dict[str, float]:
        """Log the interval and the epoch so far (reading them is a collective); returns the epoch's running
        averages."""
        metrics, running = interval.read(self.world_size), whole.read(self.world_size)
        self.log.interval(epoch, done, self.batches_per_epoch, metrics, running, self._lr(), step=self.num_updates)
        return running

    # ----------------------------------------------------------------------- between the epochs
    def validate(self, model: torch.nn.Module, tag: str = 'eval') -> Dict[str, float]:
        """Loss, top-1 and top-5 over the whole validation split, summed over all ranks."""
        return validate(model, self.val_loader, device=self.device, amp_dtype=self.amp_dtype, tag=tag,
                        log=self.is_primary)

    def _validates_after(self, epoch: int) -> bool:
        """``--val-interval N``: validate after every N-th epoch and after the last."""
        return (epoch + 1) % self.args.val_interval == 0 or epoch + 1 == self.num_epochs

    def _distribute_bn(self) -> None:
        """``--dist-bn`` under DDP without ``--sync-bn``: the model's (and the validated EMA's) BatchNorm
        statistics agree across ranks before they are evaluated or saved."""
        args = self.args
        if not (args.dist_bn and self.distributed and not args.sync_bn):
            return
        models = [self.model]
        if self.model_ema is not None and not args.model_ema_force_cpu:
            models.append(self.model_ema.module)
        distribute_bn(args.dist_bn, self.world_size, models)

    def _measure_flatness(self, epoch: int) -> Dict[str, float]:
        """``--sharpness-interval``: every rank measures its share of the batches (:class:`FlatnessProbe`)."""
        if not self.flatness.due(epoch, self.num_epochs):
            return {}
        return self.flatness.measure(self.model, epoch)

    def _data_check(self, loader: Any, what: str) -> Tuple[Dict[str, float], Optional[Exception]]:
        """The pass's bad-data metrics summed over ranks, and the ``BadDataError`` to stop with (after the
        epoch's checkpoint) when the share is past ``--max-bad-fraction``."""
        return check_epoch_data(loader, self.args.max_bad_fraction, what=what, device=self.device,
                                warn=self.is_primary)

    def _bad_data_stop(self, error: Any) -> Exception:
        """The bad-data error, told how to go on from the epoch's checkpoint with a higher threshold."""
        share = error.report.bad_fraction
        higher = min(1.0, math.ceil(share * 100 + 1e-9) / 100)
        return type(error)(f'{error} The epoch\'s checkpoint is saved: to accept this data and go on, resume with: '
                           f'{self._resume_command()} --max-bad-fraction {higher:g}', error.report, error.max_fraction)

    def _end_epoch(self, epoch: int, train_metrics: Dict[str, float], eval_metrics: Dict[str, float],
                   ema_metrics: Dict[str, float], metric: Optional[float], epoch_time: float,
                   flatness: Dict[str, float]) -> None:
        """Checkpoint the epoch (once every rank found the weights finite) and log its summary row."""
        row: Dict[str, Any] = {'epoch': epoch, 'lr': train_metrics.pop('lr'), 'epoch_time': epoch_time}
        row.update({f'train_{k}': v for k, v in train_metrics.items()})
        row.update({f'eval_{k}': v for k, v in eval_metrics.items()})
        row.update({f'ema_eval_{k}': v for k, v in ema_metrics.items()})
        row.update(flatness)
        self.final_metrics = dict(row)
        self._check_finite(f'epoch {epoch}')
        self.last_checkpoint = self.checkpoints.last_path
        if not self.is_primary:
            return
        self.checkpoints.save_epoch(self.state_dict(epoch, self.batches_per_epoch, metric), epoch, metric)
        best = self.checkpoints.best
        line = format_epoch_line(
            epoch, epoch_time, train_metrics, (ema_metrics or eval_metrics).get('top1'),
            f'best {self.args.eval_metric} {best[0]:.3f} at epoch {best[1]}' if best else None,
            fp16=self.scaler is not None)
        self.log.epoch(row, step=self.num_updates, line=line)  # summary.csv's keys, which are timm's (eval_top1, ...)


def train(args: argparse.Namespace, args_text: Optional[str] = None) -> Dict[str, float]:
    """Run a whole training described by ``args``; the entry point of ``train_esam.py`` (whose command
    line a stopped run repeats in its ``--resume`` command)."""
    trainer = Trainer(args, args_text, argv=sys.argv)
    try:
        metrics = trainer.fit()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return metrics

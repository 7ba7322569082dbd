"""The ESAM training loop behind ``train_esam.py``: build, train, validate, checkpoint, resume.

:class:`Trainer` wires the parts together: a timm model, an optimizer from timm's factory (``esam``,
``sam`` or any timm optimizer), :func:`esam_timm.train_step` for each update, a timm scheduler, an
optional EMA, the loaders of :mod:`esam_timm.train.loaders`, and the run folder of
:mod:`esam_timm.train.checkpoint`. Setup builds everything that can fail on bad input (data, model,
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
import inspect
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel

from esam_timm import create_per_sample_loss, find_sam, train_step
from esam_timm.distributed import all_reduce_sum
from esam_timm.fileio import atomic_write_text
from esam_timm.head import classifier_tap
from esam_timm.msam import find_msam
from esam_timm.registry import is_msam, is_sam_family, optimizer_kind

from .checkpoint import (ARGS_NAME, CheckpointManager, RunFolder, RunFolderBusy, claim_run_folder,
                         find_resume_checkpoint, resume_command, state_dict_mismatch)
from .config import RESUME_AUTO, RESUME_FREE_FLAGS, args_to_yaml
from .divergence import NonFiniteWatch, refuse_nonfinite
from .loaders import build_loaders, resolve_data
from .reporting import ProgressBar, StepMeter, WandbLogger, format_train_line, write_summary
from .signals import GracefulStop, TrainingStopped

__all__ = ['Trainer', 'train', 'CHECKPOINT_VERSION', 'SetupError', 'resolve_lr']

_logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
StepCallback = Callable[['Trainer', int, int], None]


class SetupError(ValueError):
    """A run that cannot start (missing or mismatched data, paths, checkpoint, busy run folder).

    ``train_esam.py`` prints its message as one line and exits with code 2, as for a bad flag.
    """


def resolve_lr(args: argparse.Namespace, world_size: int) -> float:
    """``--lr`` if given, else ``--lr-base`` scaled to the global batch as timm does (linear, or sqrt
    for ada*/lamb optimizers, unless ``--lr-base-scale`` says otherwise)."""
    if args.lr is not None:
        return args.lr
    global_batch = args.batch_size * world_size * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    opt = (args.base_opt if is_sam_family(args.opt) or is_msam(args.opt) else args.opt).lower()
    scale = args.lr_base_scale or ('sqrt' if ('ada' in opt or 'lamb' in opt) else 'linear')
    if scale == 'sqrt':
        ratio = math.sqrt(ratio)
    return args.lr_base * ratio


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


@dataclass
class Runtime:
    """Where this process runs: device, rank and world size, AMP dtype."""
    device: torch.device
    rank: int
    world_size: int
    amp_dtype: Optional[torch.dtype]

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(args: argparse.Namespace) -> Runtime:
    """Pick the device and join torchrun's process group (NCCL on GPUs, gloo on CPUs)."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    device = torch.device(args.device) if args.device else torch.device(
        'cuda' if torch.cuda.is_available() else 'cpu')
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', local_rank if world_size > 1 else 0)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    rank = 0
    if world_size > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
        rank = dist.get_rank()
        _logger.info('Process %d of %d on %s (%s)', rank, world_size, device, dist.get_backend())
    if args.sync_bn and world_size > 1 and device.type != 'cuda':
        raise ValueError('--sync-bn needs CUDA devices (torch SyncBatchNorm has no CPU kernel); '
                         'drop --sync-bn on the CPU')
    amp_dtype = {'bfloat16': torch.bfloat16, 'float16': torch.float16}[args.amp_dtype] if args.amp else None
    return Runtime(device=device, rank=rank, world_size=world_size, amp_dtype=amp_dtype)


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
        self.wandb: Optional[WandbLogger] = None
        self.final_metrics: Dict[str, float] = {}
        self._resumed_meter: Optional[Dict[str, Any]] = None
        self._sharpness_batches: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None

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
        self.device, self.rank, self.world_size = runtime.device, runtime.rank, runtime.world_size
        self.distributed, self.amp_dtype = runtime.distributed, runtime.amp_dtype
        self.stop = GracefulStop(dist.new_group(backend='gloo') if self.distributed else None)
        self.nonfinite = NonFiniteWatch(args.max_nonfinite) if args.max_nonfinite else None
        self.location = self._run_location()
        torch.manual_seed(args.seed)
        self.sources = resolve_data(args, self.world_size, self.is_primary, self._barrier)
        self.num_classes = self.sources.num_classes
        self.model, self.data_config, self.model_ema = self._build_model()
        self.loaders = build_loaders(args, self.sources, self.data_config, rank=self.rank,
                                     world_size=self.world_size, device=self.device)
        self.train_loader, self.train_raw, self.val_loader = self.loaders.train, self.loaders.train_raw, self.loaders.val
        if args.sharpness_interval and self.val_loader is None:
            raise ValueError(f'--sharpness-interval {args.sharpness_interval} measures flatness on validation '
                             f'batches, but --val-split is empty: give a validation split or drop the flag')
        self.mixup_fn = self.loaders.mixup_fn
        self.batches_per_epoch = self.loaders.batches_per_epoch
        self.updates_per_epoch = math.ceil(self.batches_per_epoch / args.grad_accum_steps)
        self.lr = resolve_lr(args, self.world_size)
        self.optimizer = self._build_optimizer()
        self.sam = find_sam(self.optimizer)
        self.loss_fn = create_per_sample_loss(
            smoothing=args.smoothing, mixup_active=self.mixup_fn is not None, bce_loss=args.bce_loss,
            bce_target_thresh=args.bce_target_thresh, bce_sum=args.bce_sum, bce_pos_weight=args.bce_pos_weight)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.scheduler, self.num_epochs = self._build_scheduler()
        self.resume_path = self._resolve_resume()
        history = self._resume(self.resume_path) if self.resume_path else []
        if args.start_epoch is not None:
            self.start_epoch, self.start_batch = args.start_epoch, 0
        if self.scheduler is not None and self.start_epoch > 0 and self.start_batch == 0:
            self.scheduler.step(self.start_epoch)
        self.train_model, self.eval_model = self._wrap_model()
        self._claim_output(history)
        if self.is_primary:
            self._log_setup()
            config = dict(vars(args), lr_resolved=self.lr, world_size=self.world_size)
            self.wandb = WandbLogger(args.log_wandb, project=args.wandb_project, tags=args.wandb_tags,
                                     config=config, output_dir=self.output_dir,
                                     resume_id=args.wandb_resume_id, name=os.path.basename(self.output_dir))

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _build_model(self) -> Tuple[nn.Module, Dict[str, Any], Optional[nn.Module]]:
        import timm
        from timm.data import resolve_data_config
        args = self.args
        kwargs: Dict[str, Any] = dict(args.model_kwargs)
        if args.pretrained:
            if not os.path.isfile(args.pretrained_path):
                raise FileNotFoundError(f'--pretrained-path {args.pretrained_path!r} is not a file')
            kwargs['pretrained_cfg_overlay'] = dict(file=args.pretrained_path)
        if args.drop_block is not None:
            kwargs['drop_block_rate'] = args.drop_block
        if args.fast_norm:
            from timm.layers import set_fast_norm
            set_fast_norm()
        in_chans = args.input_size[0] if args.input_size else args.in_chans
        model = timm.create_model(
            args.model, pretrained=args.pretrained, num_classes=self.num_classes, in_chans=in_chans,
            drop_rate=args.drop, drop_path_rate=args.drop_path, global_pool=args.gp,
            bn_momentum=args.bn_momentum, bn_eps=args.bn_eps, **kwargs)
        if args.head_init_scale is not None or args.head_init_bias is not None:
            self._init_head(model)
        if args.initial_checkpoint:
            from timm.models import load_checkpoint
            load_checkpoint(model, args.initial_checkpoint)
        if args.grad_checkpointing:
            try:
                model.set_grad_checkpointing(True)
            except (AssertionError, NotImplementedError, AttributeError) as e:
                raise ValueError(f'--grad-checkpointing: {args.model} does not support gradient checkpointing '
                                 f'({type(e).__name__}: {e})') from e
        data_config = resolve_data_config(vars(args), model=model, verbose=self.is_primary)
        if args.sync_bn and self.distributed:
            from timm.layers import convert_sync_batchnorm
            model = convert_sync_batchnorm(model)
        model.to(self.device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        model_ema = None
        if args.model_ema:
            from timm.utils import ModelEmaV3
            model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                                   device='cpu' if args.model_ema_force_cpu else None)
        if self.is_primary:
            n_params = sum(p.numel() for p in model.parameters())
            _logger.info('Model %s: %.2fM parameters, %d classes, input %s', args.model, n_params / 1e6,
                         self.num_classes, data_config['input_size'])
        return model, data_config, model_ema

    def _init_head(self, model: nn.Module) -> None:
        """timm's --head-init-scale / --head-init-bias on the classifier."""
        head = model.get_classifier()
        if not isinstance(head, nn.Linear):
            raise ValueError(f'--head-init-scale/--head-init-bias need a linear classifier; {self.args.model}\'s '
                             f'is {type(head).__name__}')
        with torch.no_grad():
            if self.args.head_init_scale is not None:
                head.weight.mul_(self.args.head_init_scale)
                if head.bias is not None:
                    head.bias.mul_(self.args.head_init_scale)
            if self.args.head_init_bias is not None and head.bias is not None:
                nn.init.constant_(head.bias, self.args.head_init_bias)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        from timm.optim import create_optimizer_v2
        args = self.args
        kwargs: Dict[str, Any] = {}
        if args.opt_eps is not None:
            kwargs['eps'] = args.opt_eps
        if args.opt_betas is not None:
            kwargs['betas'] = tuple(args.opt_betas)
        kind = optimizer_kind(args.opt)
        if is_sam_family(kind):
            kwargs.update(base_optimizer=args.base_opt, rho=args.rho, seed=args.seed)
            if kind == 'esam':
                kwargs.update(beta=args.esam_beta, gamma=args.esam_gamma, sds=args.esam_sds)
        elif is_msam(kind):
            kwargs.update(base_optimizer=args.base_opt, rho=args.rho)
        kwargs.update(args.opt_kwargs)
        return create_optimizer_v2(
            self.model, opt=args.opt, lr=self.lr, weight_decay=args.weight_decay, momentum=args.momentum,
            layer_decay=args.layer_decay, layer_decay_min_scale=args.layer_decay_min_scale,
            layer_decay_no_opt_scale=args.layer_decay_no_opt_scale, **kwargs)

    def _build_scheduler(self) -> Tuple[Optional[Any], int]:
        from timm.scheduler import create_scheduler_v2, scheduler_kwargs
        args = self.args
        if args.sched == 'none':
            return None, args.epochs
        return create_scheduler_v2(
            self.optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
            updates_per_epoch=self.updates_per_epoch)

    def _optimizer_description(self) -> str:
        msam = find_msam(self.optimizer)
        if self.sam is not None:
            inner = self.sam
            what = (f'{type(inner).__name__}(rho={inner.rho}, beta={inner.beta}, gamma={inner.gamma}, '
                    f'sds={inner.sds}, base={type(inner.base_optimizer).__name__})')
        elif msam is not None:
            inner = msam
            what = f'MSAM(rho={inner.rho}, base={type(inner.base_optimizer).__name__})'
        else:
            return type(self.optimizer).__name__
        return what if self.optimizer is inner else f'{type(self.optimizer).__name__}({what})'

    def _log_setup(self) -> None:
        args = self.args
        _logger.info('Optimizer %s, lr %.4g for a global batch of %d (%d per process x %d processes x %d '
                     'accumulated)', self._optimizer_description(), self.lr,
                     args.batch_size * self.world_size * args.grad_accum_steps, args.batch_size, self.world_size,
                     args.grad_accum_steps)
        _logger.info('%d epochs of %d batches (%d updates); output in %s', self.num_epochs,
                     self.batches_per_epoch, self.updates_per_epoch, self.output_dir)

    def _wrap_model(self) -> Tuple[nn.Module, nn.Module]:
        """torch.compile, then DDP around it (train_step finds DDP's no_sync on the outer module);
        returns the model to train and the one to evaluate."""
        args = self.args
        model = self.model
        if self.sam is not None and self.sam.sds_mode.signal == 'first-order':
            classifier_tap(model)  # checks the head now; a hook made before compiling is traced
        if args.torchcompile:
            model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)
        if self.distributed:
            # torch >= 2.10 renames broadcast_buffers (same meaning after the init-time sync).
            sync_name = 'forward_sync_buffers' if 'forward_sync_buffers' in inspect.signature(
                DistributedDataParallel.__init__).parameters else 'broadcast_buffers'
            model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == 'cuda' else None,
                **{sync_name: not args.no_ddp_bb})
        return model, (model.module if isinstance(model, DistributedDataParallel) else model)

    def _run_location(self) -> Tuple[str, str]:
        """(output root, experiment name) of a new run: ``--output`` and ``--experiment`` or date-model-size."""
        args = self.args
        root = args.output or os.path.join('.', 'output', 'train')
        name = args.experiment or '-'.join([
            datetime.now().strftime('%Y%m%d-%H%M%S'), args.model.replace('/', '_'),
            str(args.input_size[-1] if args.input_size else (args.img_size or 'default'))])
        return root, name

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
    def state_dict(self, epoch: int, batches_done: int, metric: Optional[float] = None,
                   epoch_meter: Optional[StepMeter] = None) -> Dict[str, Any]:
        """Everything a resumed run needs to continue exactly from (epoch, batches_done)."""
        state: Dict[str, Any] = {
            'version': CHECKPOINT_VERSION,
            'arch': self.args.model,
            'epoch': epoch,
            'batches_done': batches_done,
            'batches_per_epoch': self.batches_per_epoch,
            'num_updates': self.num_updates,
            'state_dict': self.model.state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'args': {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self.args).items()},
            'metric': metric,
        }
        if epoch_meter is not None:
            state['epoch_meter'] = epoch_meter.state_dict()
        if self.scaler is not None:
            state['scaler'] = self.scaler.state_dict()
        if self.model_ema is not None:
            state['state_dict_ema'] = self.model_ema.module.state_dict()
        if self.scheduler is not None and hasattr(self.scheduler, 'lr_scheduler'):
            state['scheduler'] = self.scheduler.lr_scheduler.state_dict()  # plateau: the only stateful one
        return state

    def _resume(self, path: str) -> List[Tuple[float, int]]:
        """Load a checkpoint of this trainer and set the position; returns its best-checkpoint history."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f'--resume {path!r} is not a file')
        try:
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:  # pickle, zip and torch errors: none of them has a useful type
            raise ValueError(f'--resume {path!r} could not be read as a checkpoint ({type(e).__name__})') from e
        if not isinstance(ckpt, dict) or 'state_dict' not in ckpt or 'batches_done' not in ckpt:
            raise ValueError(f'--resume {path!r} is not a checkpoint written by this trainer '
                             f'(use --initial-checkpoint for plain weights)')
        mismatch = state_dict_mismatch(self.model.state_dict(), ckpt['state_dict'])
        if mismatch:
            raise ValueError(f'--resume {path!r} does not fit --model {self.args.model} with {self.num_classes} '
                             f'classes: {mismatch}; it was written for --model {ckpt.get("arch")!r}')
        self.model.load_state_dict(ckpt['state_dict'])
        if self.model_ema is not None:
            self.model_ema.module.load_state_dict(ckpt.get('state_dict_ema', ckpt['state_dict']))
        if not self.args.no_resume_opt:
            self.optimizer.load_state_dict(ckpt['optimizer'])
            if self.scaler is not None and 'scaler' in ckpt:
                self.scaler.load_state_dict(ckpt['scaler'])
            if 'scheduler' in ckpt and self.scheduler is not None and hasattr(self.scheduler, 'lr_scheduler'):
                self.scheduler.lr_scheduler.load_state_dict(ckpt['scheduler'])
        self.num_updates = int(ckpt['num_updates'])
        epoch, done = int(ckpt['epoch']), int(ckpt['batches_done'])
        if ckpt.get('batches_per_epoch') not in (None, self.batches_per_epoch):
            _logger.warning('Checkpoint had %s batches per epoch, this run has %d (batch size or world size '
                            'changed): the resumed run will not match an uninterrupted one',
                            ckpt['batches_per_epoch'], self.batches_per_epoch)
        accum, saved_accum = self.args.grad_accum_steps, ckpt.get('args', {}).get('grad_accum_steps', 1)
        if done >= self.batches_per_epoch:
            self.start_epoch, self.start_batch = epoch + 1, 0
        elif done % accum:
            raise ValueError(
                f'--resume {path!r} stopped after batch {done} of epoch {epoch}, inside an update of '
                f'--grad-accum-steps {accum} (updates start at multiples of {accum}); resume with the '
                f'--grad-accum-steps it was written with ({saved_accum}) or another value that divides {done}')
        else:
            self.start_epoch, self.start_batch = epoch, done
            self._resumed_meter = ckpt.get('epoch_meter')
        if saved_accum != accum:
            _logger.warning('Checkpoint was written with --grad-accum-steps %s, this run uses %d: the global '
                            'batch changed, so the resumed run will not match an uninterrupted one',
                            saved_accum, accum)
        if self.is_primary:
            _logger.info('Resumed %s: continuing at epoch %d, batch %d (%d updates done)', path,
                         self.start_epoch, self.start_batch, self.num_updates)
        return [(float(m), int(e)) for m, e in ckpt.get('checkpoint_history', [])]

    # -------------------------------------------------------------------------------- training
    def _lr(self) -> float:
        groups = self.optimizer.param_groups
        return sum(g['lr'] for g in groups) / len(groups)

    def train_one_epoch(self, epoch: int, start_batch: int = 0) -> Dict[str, float]:
        """Train one epoch from ``start_batch``; return epoch-average train metrics (all ranks)."""
        args = self.args
        n = self.batches_per_epoch
        if self.mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            self.mixup_fn.mixup_enabled = False
        _seed_everything(_step_seed(args.seed, self.rank, epoch, -1))
        self.train_raw.set_epoch(epoch)
        self.train_model.train()
        batches = iter(self.train_loader)
        if start_batch:
            _logger.info('Fast-forwarding %d batches of epoch %d to the checkpoint position', start_batch, epoch)
            for batch_idx in range(start_batch):
                _seed_everything(_step_seed(args.seed, self.rank, epoch, batch_idx))
                next(batches)
        interval, whole = StepMeter(), StepMeter()
        if start_batch and self._resumed_meter is not None:
            whole.load_state_dict(self._resumed_meter, self.device)  # the summary row covers the whole epoch
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

    def _next_window(self, batches: Iterator[Tuple[torch.Tensor, torch.Tensor]], epoch: int,
                     window: range) -> Tuple[torch.Tensor, torch.Tensor]:
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

    def _log_interval(self, epoch: int, done: int, interval: StepMeter, whole: StepMeter) -> Dict[str, float]:
        """Log the interval and the epoch so far; returns the epoch's running averages."""
        metrics, running = interval.read(self.world_size), whole.read(self.world_size)
        lr = self._lr()
        if not self.is_primary:
            return running
        _logger.info(format_train_line(epoch, done, self.batches_per_epoch, metrics, running, lr))
        if self.wandb is not None and self.wandb.active:
            log = {f'train/{k}': v for k, v in metrics.items()}
            log.update({'train/lr': lr, 'epoch': epoch})
            self.wandb.log(log, step=self.num_updates)
        return running

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

    def _stop_message(self, signum: int, where: str) -> str:
        """The line a stopped run ends with: where it stopped and the exact command that resumes it."""
        command = resume_command(self.last_checkpoint, self.argv, os.path.join(self.output_dir, ARGS_NAME))
        return f'stopped by {signal.Signals(signum).name} {where}; resume with: {command}'

    @torch.no_grad()
    def validate(self, model: nn.Module, tag: str = 'eval') -> Dict[str, float]:
        """Loss, top-1 and top-5 over the whole validation split, summed over all ranks."""
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        for inputs, targets in self.val_loader:
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                logits = model(inputs)
            logits = logits.float()
            k = min(5, logits.shape[1])
            correct = logits.topk(k, dim=1).indices.eq(targets[:, None])
            sums += torch.stack([
                F.cross_entropy(logits, targets, reduction='sum').double(),
                correct[:, 0].sum().double(), correct.any(dim=1).sum().double(),
                torch.tensor(float(targets.shape[0]), dtype=torch.float64, device=self.device)])
        loss, top1, top5, count = all_reduce_sum(sums).tolist()
        if count == 0:
            raise RuntimeError('the validation split yielded no samples')
        metrics = {'loss': loss / count, 'top1': 100.0 * top1 / count, 'top5': 100.0 * top5 / count}
        if self.is_primary:
            _logger.info('%s: loss %.4f  top-1 %.3f%%  top-5 %.3f%%  (%d images)', tag.capitalize(),
                         metrics['loss'], metrics['top1'], metrics['top5'], int(count))
        return metrics

    def fit(self) -> Dict[str, float]:
        """Set up (if not yet done) and train to the last epoch; return the final metrics.

        Raises :class:`TrainingStopped` after SIGINT/SIGTERM (once a checkpoint is written),
        :class:`DivergedError`, and ``BadDataError`` past ``--max-bad-fraction`` (once that epoch's
        checkpoint is written).
        """
        if not hasattr(self, 'optimizer'):
            self.setup()
        args = self.args
        try:
            with self.stop:
                for epoch in range(self.start_epoch, self.num_epochs):
                    self._run_epoch(epoch)
        finally:
            if self.wandb is not None:
                self.wandb.finish()
            if self.run_folder is not None:
                self.run_folder.release()
        if self.is_primary and self.final_metrics:
            m = self.final_metrics
            top1 = m.get('ema_eval_top1', m.get('eval_top1'))
            best = self.checkpoints.best
            _logger.info('Finished %d epochs: final top-1 %s, best %s, last epoch %.1f train samples/s; '
                         'output in %s', self.num_epochs, '-' if top1 is None else f'{top1:.2f}%',
                         '-' if best is None else f'{args.eval_metric} {best[0]:.3f} (epoch {best[1]})',
                         m['train_samples_per_sec'], self.output_dir)
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
        flatness = self._measure_sharpness(epoch)
        ranked = ema_metrics or eval_metrics
        metric = ranked.get(args.eval_metric)
        if self.scheduler is not None:
            self.scheduler.step(epoch + 1, metric)
        self._end_epoch(epoch, train_metrics, eval_metrics, ema_metrics, metric, epoch_time, flatness)
        if bad_data is not None:
            raise self._bad_data_stop(bad_data)
        signum = self.stop.requested_now()
        if signum and epoch + 1 < self.num_epochs:
            raise TrainingStopped(signum, self._stop_message(signum, f'after epoch {epoch}'))

    def _bad_data_stop(self, error: Any) -> Exception:
        """The bad-data error, told how to go on from the epoch's checkpoint with a higher threshold."""
        share = error.report.bad_fraction
        higher = min(1.0, math.ceil(share * 100 + 1e-9) / 100)
        command = resume_command(self.last_checkpoint, self.argv, os.path.join(self.output_dir, ARGS_NAME))
        return type(error)(f'{error} The epoch\'s checkpoint is saved: to accept this data and go on, resume with: '
                           f'{command} --max-bad-fraction {higher:g}', error.report, error.max_fraction)

    def _measure_sharpness(self, epoch: int) -> Dict[str, float]:
        """``--sharpness-interval``: the top Hessian eigenvalue and m-sharpness of the model on the same
        validation batches every time, measured on rank 0 in fp32 (the other ranks wait)."""
        args = self.args
        if not args.sharpness_interval or not (
                (epoch + 1) % args.sharpness_interval == 0 or epoch + 1 == self.num_epochs):
            return {}
        metrics: Dict[str, float] = {}
        if self.is_primary:
            from esam_timm.sharpness import measure_sharpness
            if self._sharpness_batches is None:
                batches = iter(self.val_loader)
                self._sharpness_batches = [next(batches) for _ in range(min(args.sharpness_batches,
                                                                                len(self.val_loader)))]
            t0 = time.perf_counter()
            report = measure_sharpness(self.model, self._sharpness_batches, F.cross_entropy, rho=args.sharpness_rho,
                                       eig_iters=args.sharpness_iters, seed=args.seed,
                                       progress=not args.no_progress)
            metrics = {f'sharpness_{k}': v for k, v in report.to_dict().items()}
            _logger.info('Flatness after epoch %d: top Hessian eigenvalue %.4g (%s after %d iterations), '
                         'm-sharpness %.4g (rho %g) on %d validation batches, in %.1fs', epoch,
                         report.top_eigenvalue, 'converged' if report.eig_converged else 'not converged',
                         report.eig_iterations, report.m_sharpness, args.sharpness_rho,
                         len(self._sharpness_batches), time.perf_counter() - t0)
        self._barrier()
        return metrics

    def _validates_after(self, epoch: int) -> bool:
        """``--val-interval N``: validate after every N-th epoch and after the last."""
        return (epoch + 1) % self.args.val_interval == 0 or epoch + 1 == self.num_epochs

    def _distribute_bn(self) -> None:
        """``--dist-bn``: make BatchNorm running statistics agree across ranks before they are evaluated or saved
        (each rank's statistics saw only its own batches); not needed with ``--sync-bn``."""
        mode = self.args.dist_bn
        if not (mode and self.distributed and not self.args.sync_bn):
            return
        from timm.utils import distribute_bn
        distribute_bn(self.model, self.world_size, reduce=mode == 'reduce')
        if self.model_ema is not None and not self.args.model_ema_force_cpu:
            distribute_bn(self.model_ema.module, self.world_size, reduce=mode == 'reduce')

    def _data_check(self, loader: Any, what: str) -> Tuple[Dict[str, float], Optional[Exception]]:
        """The pass's bad-data metrics summed over ranks, and the ``BadDataError`` to stop with (after the
        epoch's checkpoint) when the share is past ``--max-bad-fraction``."""
        report_fn = getattr(loader, 'data_report', None)
        report = report_fn() if report_fn is not None else None
        if report is None:
            return {}, None
        from esam_timm.data import BadDataError, check_bad_fraction, reduce_data_report
        report = reduce_data_report(report, self.device)
        error = None
        try:
            check_bad_fraction(report, self.args.max_bad_fraction, what=what, warn=self.is_primary)
        except BadDataError as e:
            error = e
        metrics = report.metrics()
        return {'samples_read' if key == 'samples' else key: value for key, value in metrics.items()}, error

    def _end_epoch(self, epoch: int, train_metrics: Dict[str, float], eval_metrics: Dict[str, float],
                   ema_metrics: Dict[str, float], metric: Optional[float], epoch_time: float,
                   flatness: Dict[str, float]) -> None:
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
        write_summary(os.path.join(self.output_dir, 'summary.csv'), row)
        if self.wandb is not None and self.wandb.active:
            self.wandb.log(row, step=self.num_updates)  # summary.csv's keys, which are timm's (eval_top1, ...)
        best = self.checkpoints.best
        best_text = f'  (best {self.args.eval_metric} {best[0]:.3f} at epoch {best[1]})' if best else ''
        top1 = (ema_metrics or eval_metrics).get('top1')
        notes = ''
        if 'skipped_nonfinite' in train_metrics:
            notes += f', skipped updates: {int(train_metrics["skipped_nonfinite"])} non-finite'
            if self.scaler is not None:
                notes += f', {int(train_metrics["skipped_overflow"])} fp16 overflow'
        if train_metrics.get('bad_samples') or train_metrics.get('bad_shards'):
            bad = int(train_metrics['bad_samples'])
            notes += (f', unreadable data: {bad} of {bad + int(train_metrics["samples_read"])} samples read '
                      f'({train_metrics["bad_fraction"]:.2%}), {int(train_metrics["bad_shards"])} broken shards')
        _logger.info('Epoch %d done in %.1fs: train loss %.4f, %.1f samples/s%s%s%s', epoch, epoch_time,
                     train_metrics.get('loss', float('nan')), train_metrics['samples_per_sec'],
                     f', top-1 {top1:.2f}%' if top1 is not None else '', notes, best_text)


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

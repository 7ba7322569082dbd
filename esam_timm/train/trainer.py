"""The ESAM training loop behind ``train_esam.py``: build, train, validate, checkpoint, resume.

:class:`Trainer` wires the parts together: a timm model, an optimizer from timm's factory (``esam``,
``sam`` or any timm optimizer), :func:`esam_timm.train_step` for each update, a timm scheduler, an
optional EMA, the WebDataset loaders of :mod:`esam_timm.data` (or timm's folder datasets), and the
output folder (``args.yaml``, ``summary.csv``, ``last.pth.tar``, best-k checkpoints, recovery
checkpoints).

Reproducible resume: every batch runs under seeds derived from (seed, rank, epoch, batch), so the
random state of augmentation, mixup and dropout does not depend on what ran before. A run resumed
from a checkpoint replays the remaining batches exactly (on the CPU, bitwise): the checkpoint holds
model, optimizer (base optimizer + ESAM's SWP generator), GradScaler, EMA, scheduler and the position
(epoch, batch); the data loader is re-opened at that epoch and fast-forwarded to the batch.
"""
import argparse
import inspect
import json
import logging
import math
import os
import random
import shutil
import time
from datetime import datetime
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from esam_timm import create_per_sample_loss, find_sam, train_step
from esam_timm.head import classifier_tap
from esam_timm.registry import is_sam_family, optimizer_kind

from .config import args_to_yaml
from .logging import StepMeter, ProgressBar, WandbLogger, format_train_line, write_summary

__all__ = ['Trainer', 'train', 'CHECKPOINT_VERSION', 'resolve_lr']

_logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
StepCallback = Callable[['Trainer', int, int], None]


def resolve_lr(args: argparse.Namespace, world_size: int) -> float:
    """``--lr`` if given, else ``--lr-base`` scaled to the global batch as timm does (linear, or sqrt
    for ada*/lamb optimizers, unless ``--lr-base-scale`` says otherwise)."""
    if args.lr is not None:
        return args.lr
    global_batch = args.batch_size * world_size * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    opt = (args.base_opt if is_sam_family(args.opt) else args.opt).lower()
    scale = args.lr_base_scale or ('sqrt' if ('ada' in opt or 'lamb' in opt) else 'linear')
    if scale == 'sqrt':
        ratio = math.sqrt(ratio)
    return args.lr_base * ratio


def _atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = f'{path}.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_link(src: str, dst: str) -> None:
    """Make ``dst`` a copy of ``src`` (hard link when possible), atomically."""
    tmp = f'{dst}.tmp'
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


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
        _atomic_torch_save(state, last)
        self.history = history
        if keep:
            _atomic_link(last, self._path(f'checkpoint-{epoch}.pth.tar'))
            if self.history[0][1] == epoch:
                _atomic_link(last, self._path('model_best.pth.tar'))
        for _, old_epoch in dropped:
            if old_epoch != epoch:
                _remove_if_exists(self._path(f'checkpoint-{old_epoch}.pth.tar'))
        self.remove_recovery()

    def save_recovery(self, state: Dict[str, Any], epoch: int, batches_done: int) -> str:
        """Write a mid-epoch recovery checkpoint; the previous one is removed once this one exists."""
        state['checkpoint_history'] = [list(h) for h in self.history]
        path = self._path(f'recovery-{epoch}-{batches_done}.pth.tar')
        _atomic_torch_save(state, path)
        previous, self.last_recovery = self.last_recovery, path
        if previous and previous != path:
            _remove_if_exists(previous)
        return path

    def remove_recovery(self) -> None:
        if self.last_recovery:
            _remove_if_exists(self.last_recovery)
            self.last_recovery = None


def _remove_if_exists(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


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


class _TimmFolderLoader:
    """timm's ``create_loader`` output with the interface of the WebDataset loaders
    (``len``, ``set_epoch``, device batches); mixup is applied here since timm's prefetcher has none."""

    def __init__(self, loader: Any, mixup_fn: Optional[Callable], channels_last: bool) -> None:
        self.loader = loader
        self.mixup_fn = mixup_fn
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        sampler = getattr(self.loader, 'sampler', None)
        if hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for inputs, targets in self.loader:
            if self.mixup_fn is not None:
                inputs, targets = self.mixup_fn(inputs, targets)
            if self.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            yield inputs, targets


class Trainer:
    """One training run described by parsed ``train_esam.py`` arguments.

    ``Trainer(args).fit()`` builds everything, trains ``--epochs`` epochs and returns the final
    metrics. ``step_callbacks`` are called as ``callback(trainer, epoch, batches_done)`` after every
    update (after any recovery checkpoint), e.g. to stop a run or collect statistics.
    """

    def __init__(self, args: argparse.Namespace, args_text: Optional[str] = None,
                 step_callbacks: Sequence[StepCallback] = ()) -> None:
        self.args = args
        self.args_text = args_text if args_text is not None else args_to_yaml(args)
        self.step_callbacks = list(step_callbacks)
        self.start_epoch = 0
        self.start_batch = 0
        self.num_updates = 0
        self.skipped_total = 0
        self.output_dir: Optional[str] = None
        self.checkpoints: Optional[CheckpointManager] = None
        self.wandb: Optional[WandbLogger] = None
        self.final_metrics: Dict[str, float] = {}

    # ----------------------------------------------------------------------------------- setup
    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    def setup(self) -> None:
        """Build device/distributed, output folder, data, model, optimizer, scheduler; resume."""
        args = self.args
        self._setup_distributed()
        self._setup_output()
        torch.manual_seed(args.seed)
        self._setup_data_sources()
        self._setup_model()
        self._setup_loaders()
        self._setup_optimizer()
        if args.resume:
            self._resume(args.resume)
        if args.start_epoch is not None:
            self.start_epoch, self.start_batch = args.start_epoch, 0
        if self.scheduler is not None and self.start_epoch > 0 and self.start_batch == 0:
            self.scheduler.step(self.start_epoch)
        self._wrap_model()
        if self.is_primary:
            config = dict(vars(args), lr_resolved=self.lr, world_size=self.world_size)
            self.wandb = WandbLogger(args.log_wandb, project=args.wandb_project, tags=args.wandb_tags,
                                     config=config, output_dir=self.output_dir,
                                     resume_id=args.wandb_resume_id, name=os.path.basename(self.output_dir))

    def _setup_distributed(self) -> None:
        args = self.args
        self.world_size = int(os.environ.get('WORLD_SIZE', '1'))
        self.local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        if args.device:
            device = torch.device(args.device)
        else:
            device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
        if device.type == 'cuda' and device.index is None:
            device = torch.device('cuda', self.local_rank if self.world_size > 1 else 0)
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        self.device = device
        self.distributed = self.world_size > 1
        if self.distributed:
            if not dist.is_initialized():
                dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
            self.rank = dist.get_rank()
            _logger.info('Process %d of %d on %s (%s)', self.rank, self.world_size, device,
                         dist.get_backend())
        else:
            self.rank = 0
        if args.sync_bn and self.distributed and device.type != 'cuda':
            raise ValueError('--sync-bn needs CUDA devices (torch SyncBatchNorm has no CPU kernel); '
                             'drop --sync-bn on the CPU')
        self.amp_dtype = {'bfloat16': torch.bfloat16, 'float16': torch.float16}[args.amp_dtype] \
            if args.amp else None

    def _setup_output(self) -> None:
        args = self.args
        root = args.output or os.path.join('.', 'output', 'train')
        name = args.experiment or '-'.join([
            datetime.now().strftime('%Y%m%d-%H%M%S'), args.model.replace('/', '_'),
            str(args.input_size[-1] if args.input_size else (args.img_size or 'default'))])
        self.output_dir = os.path.join(root, name)
        if self.is_primary:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, 'args.yaml.tmp'), 'w') as f:
                f.write(self.args_text)
            os.replace(os.path.join(self.output_dir, 'args.yaml.tmp'), os.path.join(self.output_dir, 'args.yaml'))
        self.checkpoints = CheckpointManager(self.output_dir, args.checkpoint_hist,
                                             decreasing=args.eval_metric == 'loss')

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _setup_data_sources(self) -> None:
        """Resolve the train/validation data (building the demo shards if asked) and the class count."""
        args = self.args
        self.is_wds = args.dataset.startswith('wds/')
        data_dir = args.data_dir
        if args.demo:
            from esam_timm.data import make_demo_dataset
            data_dir = data_dir or os.path.join(args.output or os.path.join('.', 'output', 'train'), 'demo-data')
            if self.is_primary and not os.path.isfile(os.path.join(data_dir, '_info.json')):
                _logger.info('Building the demo dataset in %s', data_dir)
                make_demo_dataset(data_dir)
            self._barrier()
        self.data_dir = data_dir
        self.num_classes = args.num_classes
        if self.is_wds:
            from esam_timm.data import resolve_source
            self.train_source = resolve_source(data_dir, args.train_split, args.train_num_samples)
            self.val_source = resolve_source(data_dir, args.val_split, args.val_num_samples) \
                if args.val_split else None
            if self.num_classes is None:
                self.num_classes = _num_classes_from_info(data_dir)
        else:
            from timm.data import create_dataset
            self.train_source = create_dataset(
                args.dataset, root=data_dir, split=args.train_split, is_training=True,
                download=args.dataset_download, batch_size=args.batch_size, seed=args.seed)
            self.val_source = create_dataset(
                args.dataset, root=data_dir, split=args.val_split, is_training=False,
                download=args.dataset_download, batch_size=args.batch_size) if args.val_split else None
            if self.num_classes is None:
                reader = getattr(self.train_source, 'reader', None)
                classes = getattr(reader, 'class_to_idx', None) or getattr(self.train_source, 'classes', None)
                self.num_classes = len(classes) if classes else None
        if self.num_classes is None:
            raise ValueError(f'cannot tell the number of classes of {data_dir!r}: pass --num-classes')

    def _setup_model(self) -> None:
        import timm
        from timm.data import resolve_data_config
        args = self.args
        kwargs: Dict[str, Any] = dict(args.model_kwargs)
        if args.pretrained:
            if not os.path.isfile(args.pretrained_path):
                raise FileNotFoundError(f'--pretrained-path {args.pretrained_path!r} is not a file')
            kwargs['pretrained_cfg_overlay'] = dict(file=args.pretrained_path)
        in_chans = args.input_size[0] if args.input_size else args.in_chans
        model = timm.create_model(
            args.model, pretrained=args.pretrained, num_classes=self.num_classes, in_chans=in_chans,
            drop_rate=args.drop, drop_path_rate=args.drop_path, global_pool=args.gp,
            bn_momentum=args.bn_momentum, bn_eps=args.bn_eps, **kwargs)
        if args.initial_checkpoint:
            from timm.models import load_checkpoint
            load_checkpoint(model, args.initial_checkpoint)
        self.data_config = resolve_data_config(vars(args), model=model, verbose=self.is_primary)
        if args.sync_bn and self.distributed:
            from timm.layers import convert_sync_batchnorm
            model = convert_sync_batchnorm(model)
        model.to(self.device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.model_ema = None
        if args.model_ema:
            from timm.utils import ModelEmaV3
            self.model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
        if self.is_primary:
            n_params = sum(p.numel() for p in model.parameters())
            _logger.info('Model %s: %.2fM parameters, %d classes, input %s', args.model, n_params / 1e6,
                         self.num_classes, self.data_config['input_size'])

    def _mixup(self) -> Optional[Callable]:
        args = self.args
        self.mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
        if not self.mixup_active:
            return None
        from timm.data import Mixup
        return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                     prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                     label_smoothing=args.smoothing, num_classes=self.num_classes)

    def _setup_loaders(self) -> None:
        args = self.args
        cfg = self.data_config
        self.mixup_fn = self._mixup()
        val_batch = args.validation_batch_size or args.batch_size
        train_interp = args.train_interpolation
        if train_interp in ('', 'random') and self.is_wds:
            train_interp = train_interp or cfg['interpolation']
        if self.is_wds:
            from esam_timm.data import DevicePrefetcher, create_train_loader, create_val_loader
            if args.no_aug:
                aug = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0., vflip=0., color_jitter=None,
                           auto_augment=None, re_prob=0.)
            else:
                aug = dict(scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip, vflip=args.vflip,
                           color_jitter=args.color_jitter or None, auto_augment=args.aa, re_prob=args.reprob)
            # Fresh workers every epoch: opening a DataLoader iterator draws its base seed from the
            # global RNG, persistent workers skip that draw, and a resumed run could then not replay
            # the random state of an uninterrupted one. Worker start-up costs seconds per epoch.
            raw_train = create_train_loader(
                self.train_source, batch_size=args.batch_size, img_size=cfg['input_size'][1:],
                num_workers=args.workers, seed=args.seed, rank=self.rank, world_size=self.world_size,
                interpolation=train_interp, re_mode=args.remode, re_count=args.recount,
                mean=cfg['mean'], std=cfg['std'], pin_memory=args.pin_mem, persistent_workers=False, **aug)
            self.train_raw = raw_train
            self.train_loader = DevicePrefetcher(raw_train, self.device, mean=cfg['mean'], std=cfg['std'],
                                                 channels_last=args.channels_last, mixup_fn=self.mixup_fn)
            self.val_loader = None
            if self.val_source is not None:
                raw_val = create_val_loader(
                    self.val_source, batch_size=val_batch, img_size=cfg['input_size'][1:],
                    crop_pct=cfg['crop_pct'], num_workers=args.workers, rank=self.rank,
                    world_size=self.world_size, interpolation=cfg['interpolation'],
                    mean=cfg['mean'], std=cfg['std'], pin_memory=args.pin_mem)
                self.val_loader = DevicePrefetcher(raw_val, self.device, mean=cfg['mean'], std=cfg['std'],
                                                   channels_last=args.channels_last)
        else:
            from timm.data import create_loader
            common = dict(mean=cfg['mean'], std=cfg['std'], num_workers=args.workers,
                          distributed=self.distributed, pin_memory=args.pin_mem, device=self.device,
                          use_prefetcher=True, persistent_workers=False)
            loader = create_loader(
                self.train_source, input_size=cfg['input_size'], batch_size=args.batch_size, is_training=True,
                no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
                scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
                color_jitter=args.color_jitter, auto_augment=args.aa, interpolation=train_interp,
                **common)
            self.train_loader = _TimmFolderLoader(loader, self.mixup_fn, args.channels_last)
            self.train_raw = self.train_loader
            self.val_loader = None
            if self.val_source is not None:
                vloader = create_loader(self.val_source, input_size=cfg['input_size'], batch_size=val_batch,
                                        is_training=False, interpolation=cfg['interpolation'],
                                        crop_pct=cfg['crop_pct'], **common)
                self.val_loader = _TimmFolderLoader(vloader, None, args.channels_last)
        self.batches_per_epoch = len(self.train_raw)
        if self.batches_per_epoch < 1:
            raise ValueError(f'the training split yields no full batch of {args.batch_size} per process; '
                             f'lower --batch-size')
        self.updates_per_epoch = math.ceil(self.batches_per_epoch / args.grad_accum_steps)

    def _setup_optimizer(self) -> None:
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2, scheduler_kwargs
        args = self.args
        self.lr = resolve_lr(args, self.world_size)
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
        kwargs.update(args.opt_kwargs)
        self.optimizer = create_optimizer_v2(
            self.model, opt=args.opt, lr=self.lr, weight_decay=args.weight_decay, momentum=args.momentum,
            layer_decay=args.layer_decay, **kwargs)
        self.sam = find_sam(self.optimizer)
        self.loss_fn = create_per_sample_loss(
            smoothing=args.smoothing, mixup_active=self.mixup_active, bce_loss=args.bce_loss,
            bce_target_thresh=args.bce_target_thresh, bce_sum=args.bce_sum, bce_pos_weight=args.bce_pos_weight)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.scheduler, self.num_epochs = None, args.epochs
        if args.sched != 'none':
            self.scheduler, self.num_epochs = create_scheduler_v2(
                self.optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
                updates_per_epoch=self.updates_per_epoch)
        if self.is_primary:
            what = (f'{type(self.sam).__name__}(rho={self.sam.rho}, beta={self.sam.beta}, gamma={self.sam.gamma}, '
                    f'sds={self.sam.sds}, base={type(self.sam.base_optimizer).__name__})' if self.sam is not None
                    else type(self.optimizer).__name__)
            _logger.info('Optimizer %s, lr %.4g for a global batch of %d (%d per process x %d processes x %d '
                         'accumulated)', what, self.lr, args.batch_size * self.world_size * args.grad_accum_steps,
                         args.batch_size, self.world_size, args.grad_accum_steps)
            _logger.info('%d epochs of %d batches (%d updates); output in %s', self.num_epochs,
                         self.batches_per_epoch, self.updates_per_epoch, self.output_dir)

    def _wrap_model(self) -> None:
        """torch.compile, then DDP around it (train_step finds DDP's no_sync on the outer module)."""
        args = self.args
        model = self.model
        if self.sam is not None and self.sam.sds_mode.signal == 'first-order':
            classifier_tap(model)  # checks the head now; a hook made before compiling is traced
        if args.torchcompile:
            model = torch.compile(model, backend=args.torchcompile)
        if self.distributed:
            # torch >= 2.10 renames broadcast_buffers (same meaning after the init-time sync).
            sync_name = 'forward_sync_buffers' if 'forward_sync_buffers' in inspect.signature(
                DistributedDataParallel.__init__).parameters else 'broadcast_buffers'
            model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == 'cuda' else None,
                **{sync_name: not args.no_ddp_bb})
        self.train_model = model
        self.eval_model = model.module if isinstance(model, DistributedDataParallel) else model

    # ------------------------------------------------------------------------------- checkpoints
    def state_dict(self, epoch: int, batches_done: int, metric: Optional[float] = None) -> Dict[str, Any]:
        """Everything a resumed run needs to continue exactly from (epoch, batches_done)."""
        state: Dict[str, Any] = {
            'version': CHECKPOINT_VERSION,
            'arch': self.args.model,
            'epoch': epoch,
            'batches_done': batches_done,
            'batches_per_epoch': self.batches_per_epoch,
            'num_updates': self.num_updates,
            'skipped_total': self.skipped_total,
            'state_dict': self.model.state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'args': {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self.args).items()},
            'metric': metric,
        }
        if self.scaler is not None:
            state['scaler'] = self.scaler.state_dict()
        if self.model_ema is not None:
            state['state_dict_ema'] = self.model_ema.module.state_dict()
        if self.scheduler is not None and hasattr(self.scheduler, 'lr_scheduler'):
            state['scheduler'] = self.scheduler.lr_scheduler.state_dict()  # plateau: the only stateful one
        return state

    def _resume(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f'--resume {path!r} is not a file')
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        if not isinstance(ckpt, dict) or 'state_dict' not in ckpt or 'batches_done' not in ckpt:
            raise ValueError(f'--resume {path!r} is not a checkpoint written by this trainer '
                             f'(use --initial-checkpoint for plain weights)')
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
        self.skipped_total = int(ckpt.get('skipped_total', 0))
        self.checkpoints.history = [(float(m), int(e)) for m, e in ckpt.get('checkpoint_history', [])]
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
        if saved_accum != accum:
            _logger.warning('Checkpoint was written with --grad-accum-steps %s, this run uses %d: the global '
                            'batch changed, so the resumed run will not match an uninterrupted one',
                            saved_accum, accum)
        if self.is_primary:
            _logger.info('Resumed %s: continuing at epoch %d, batch %d (%d updates done)', path,
                         self.start_epoch, self.start_batch, self.num_updates)

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
        bar = ProgressBar(n - start_batch, f'epoch {epoch}', enabled=self.is_primary and not args.no_progress)
        amp = dict(amp_dtype=self.amp_dtype, scaler=self.scaler, clip_grad=args.clip_grad,
                   clip_mode=args.clip_mode, bn_mode=args.esam_bn_mode)
        accum = args.grad_accum_steps
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
                self._log_interval(epoch, done, interval)
                interval.reset()
            if self.scheduler is not None:
                self.scheduler.step_update(num_updates=self.num_updates)
            if args.recovery_interval and update % args.recovery_interval == 0 and done < n:
                self._save_recovery(epoch, done)
            for callback in self.step_callbacks:
                callback(self, epoch, done)
        bar.close()
        metrics = whole.read(self.world_size)
        metrics['skipped_steps'] = metrics.pop('perturb_skipped', 0.0)
        return metrics

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

    def _log_interval(self, epoch: int, done: int, meter: StepMeter) -> None:
        metrics = meter.read(self.world_size)
        self.skipped_total += int(metrics.get('perturb_skipped', 0))
        lr = self._lr()
        if not self.is_primary:
            return
        _logger.info(format_train_line(epoch, done, self.batches_per_epoch, metrics, lr, self.skipped_total))
        if self.wandb is not None and self.wandb.active:
            log = {f'train/{k}': v for k, v in metrics.items() if k != 'perturb_skipped'}
            log.update({'train/lr': lr, 'train/skipped_steps': self.skipped_total, 'epoch': epoch})
            self.wandb.log(log, step=self.num_updates)

    def _save_recovery(self, epoch: int, done: int) -> None:
        if self.is_primary:
            path = self.checkpoints.save_recovery(self.state_dict(epoch, done), epoch, done)
            _logger.info('Recovery checkpoint %s', path)

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
        if self.distributed:
            dist.all_reduce(sums)
        loss, top1, top5, count = sums.tolist()
        if count == 0:
            raise RuntimeError('the validation split yielded no samples')
        metrics = {'loss': loss / count, 'top1': 100.0 * top1 / count, 'top5': 100.0 * top5 / count}
        if self.is_primary:
            _logger.info('%s: loss %.4f  top-1 %.3f%%  top-5 %.3f%%  (%d images)', tag.capitalize(),
                         metrics['loss'], metrics['top1'], metrics['top5'], int(count))
        return metrics

    def fit(self) -> Dict[str, float]:
        """Set up (if not yet done) and train to the last epoch; return the final metrics."""
        if not hasattr(self, 'optimizer'):
            self.setup()
        args = self.args
        try:
            for epoch in range(self.start_epoch, self.num_epochs):
                start_batch = self.start_batch if epoch == self.start_epoch else 0
                t0 = time.perf_counter()
                train_metrics = self.train_one_epoch(epoch, start_batch)
                epoch_time = time.perf_counter() - t0
                train_metrics['lr'] = self._lr()
                eval_metrics, ema_metrics = {}, {}
                if self.val_loader is not None:
                    eval_metrics = self.validate(self.eval_model)
                    if self.model_ema is not None:
                        ema_metrics = self.validate(self.model_ema.module, tag='ema eval')
                ranked = ema_metrics or eval_metrics
                metric = ranked.get(args.eval_metric)
                if self.scheduler is not None:
                    self.scheduler.step(epoch + 1, metric)
                self._end_epoch(epoch, train_metrics, eval_metrics, ema_metrics, metric, epoch_time)
        finally:
            if self.wandb is not None:
                self.wandb.finish()
        if self.is_primary and self.final_metrics:
            m = self.final_metrics
            top1 = m.get('ema_eval_top1', m.get('eval_top1'))
            best = self.checkpoints.best
            _logger.info('Finished %d epochs: final top-1 %s, best %s, last epoch %.1f train samples/s; '
                         'output in %s', self.num_epochs, '-' if top1 is None else f'{top1:.2f}%',
                         '-' if best is None else f'{args.eval_metric} {best[0]:.3f} (epoch {best[1]})',
                         m['train_samples_per_sec'], self.output_dir)
        return self.final_metrics

    def _end_epoch(self, epoch: int, train_metrics: Dict[str, float], eval_metrics: Dict[str, float],
                   ema_metrics: Dict[str, float], metric: Optional[float], epoch_time: float) -> None:
        row: Dict[str, Any] = {'epoch': epoch, 'lr': train_metrics.pop('lr'), 'epoch_time': epoch_time}
        row.update({f'train_{k}': v for k, v in train_metrics.items()})
        row.update({f'eval_{k}': v for k, v in eval_metrics.items()})
        row.update({f'ema_eval_{k}': v for k, v in ema_metrics.items()})
        self.final_metrics = dict(row)
        if not self.is_primary:
            return
        self.checkpoints.save_epoch(self.state_dict(epoch, self.batches_per_epoch, metric), epoch, metric)
        write_summary(os.path.join(self.output_dir, 'summary.csv'), row)
        if self.wandb is not None and self.wandb.active:
            log = {f'eval/{k}': v for k, v in eval_metrics.items()}
            log.update({f'ema_eval/{k}': v for k, v in ema_metrics.items()})
            log.update({'epoch': epoch, 'train/epoch_loss': train_metrics.get('loss'),
                        'train/epoch_samples_per_sec': train_metrics.get('samples_per_sec')})
            self.wandb.log(log, step=self.num_updates)
        best = self.checkpoints.best
        best_text = f'  (best {self.args.eval_metric} {best[0]:.3f} at epoch {best[1]})' if best else ''
        top1 = (ema_metrics or eval_metrics).get('top1')
        _logger.info('Epoch %d done in %.1fs: train loss %.4f, %.1f samples/s%s%s', epoch, epoch_time,
                     train_metrics.get('loss', float('nan')), train_metrics['samples_per_sec'],
                     f', top-1 {top1:.2f}%' if top1 is not None else '', best_text)


def _num_classes_from_info(data_dir: str) -> Optional[int]:
    """Class count of a shard folder: ``_info.json`` (features.label.num_classes or names, as in HF's
    timm datasets, or num_classes), else the lines of a ``class_map.txt`` beside it; None if unknown."""
    path = os.path.join(data_dir, '_info.json')
    if os.path.isfile(path):
        with open(path) as f:
            info = json.load(f)
        label = (info.get('features') or {}).get('label') or {}
        if 'num_classes' in label:
            return int(label['num_classes'])
        if 'names' in label:
            return len(label['names'])
        if 'num_classes' in info:
            return int(info['num_classes'])
    class_map = os.path.join(data_dir, 'class_map.txt')
    if os.path.isfile(class_map):
        with open(class_map) as f:
            return sum(1 for line in f if line.strip())
    return None


def train(args: argparse.Namespace, args_text: Optional[str] = None) -> Dict[str, float]:
    """Run a whole training described by ``args``; the entry point of ``train_esam.py``."""
    trainer = Trainer(args, args_text)
    try:
        metrics = trainer.fit()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return metrics

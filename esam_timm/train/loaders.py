"""The trainer's data: its flags turned into the data seam's terms (:mod:`esam_timm.data.backends`).

Which backend reads ``--dataset``, its splits, class count and loaders are the seam's; here live only
what the trainer adds: the demo dataset (``--demo``), ``--num-classes`` agreeing with the data, mixup,
and the loader settings from the flags and the model's data config.
"""
import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch

from esam_timm.data.backends import (Augmentation, DataBackend, ImageConfig, Loader, LoaderConfig, Split,
                                     open_data, warn_if_samples_repeat)

from .builders import resolve_pin_memory

__all__ = ['RunData', 'Loaders', 'resolve_data', 'build_loaders', 'build_mixup']

_logger = logging.getLogger(__name__)


@dataclass
class RunData:
    """The run's backend, its resolved training and validation splits, and the class count."""
    data_dir: str
    backend: DataBackend
    train: Split
    val: Optional[Split]
    num_classes: int


@dataclass
class Loaders:
    """The run's loaders (:class:`~esam_timm.data.backends.Loader`: device batches, mixup applied)."""
    train: Loader
    val: Optional[Loader]
    mixup_fn: Optional[Callable]
    batches_per_epoch: int


def _demo_data_dir(args: argparse.Namespace) -> str:
    return args.data_dir or os.path.join(args.output or os.path.join('.', 'output', 'train'), 'demo-data')


def resolve_data(args: argparse.Namespace, world_size: int, is_primary: bool,
                 barrier: Callable[[], None]) -> RunData:
    """Open ``--dataset`` on ``--data-dir`` (building the demo shards first with ``--demo``), resolve the
    splits and the class count; ``--num-classes`` must agree with the data when the data says how many."""
    data_dir = args.data_dir
    if args.demo:
        from esam_timm.data import has_info, make_demo_dataset, read_info
        from .demo import DEMO_DATASET
        data_dir = _demo_data_dir(args)
        if is_primary and (not has_info(data_dir) or 'demo' in read_info(data_dir)):  # never over real data
            _logger.info('Demo dataset in %s', data_dir)
            make_demo_dataset(data_dir, **DEMO_DATASET)  # reuses a complete one; rebuilds an older demo's
        barrier()
    backend = open_data(args.dataset, data_dir, class_map=args.class_map, download=args.dataset_download,
                        seed=args.seed, batch_size=args.batch_size)
    train = backend.split(args.train_split, training=True, num_samples=args.train_num_samples)
    val = backend.split(args.val_split, training=False, num_samples=args.val_num_samples) if args.val_split else None
    num_classes = args.num_classes if args.num_classes is not None else train.num_classes
    if num_classes is None:
        raise ValueError(f'cannot tell the number of classes of {data_dir!r} (no _info.json class count, '
                         f'no class_map.txt): pass --num-classes')
    if train.num_classes is not None and num_classes != train.num_classes:
        raise ValueError(f'--num-classes {num_classes} disagrees with the data in {data_dir!r}, which has '
                         f'{train.num_classes} classes: pass --num-classes {train.num_classes} (or leave it out)')
    warn_if_samples_repeat(args.batch_size * world_size, train)
    return RunData(data_dir=data_dir, backend=backend, train=train, val=val, num_classes=num_classes)


def build_mixup(args: argparse.Namespace, num_classes: int) -> Optional[Callable]:
    """timm's Mixup/CutMix (with label smoothing folded into its soft targets), or None when off."""
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=num_classes)


def build_loaders(args: argparse.Namespace, data: RunData, data_config: Dict[str, Any], *, rank: int,
                  world_size: int, device: torch.device) -> Loaders:
    """The training and validation loaders of ``data`` for the model's ``data_config``.

    Training loaders start fresh workers every epoch: opening a DataLoader iterator draws its base seed
    from the global RNG, persistent workers skip that draw, and a resumed run could then not replay the
    random state of an uninterrupted one (worker start-up costs seconds per epoch).
    """
    mixup_fn = build_mixup(args, data.num_classes)
    common: Dict[str, Any] = dict(image=ImageConfig.from_timm(data_config), device=device, rank=rank,
                                  world_size=world_size, workers=args.workers,
                                  pin_memory=resolve_pin_memory(args.pin_mem, device),
                                  channels_last=args.channels_last, num_classes=data.num_classes)
    augment = Augmentation(
        no_aug=args.no_aug, scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, auto_augment=args.aa, interpolation=args.train_interpolation,
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
    train = data.backend.train_loader(
        data.train, LoaderConfig(batch_size=args.batch_size, persistent_workers=False,
                                 batches_per_update=args.grad_accum_steps, **common), augment,
        seed=args.seed, decode=args.decode, mixup_fn=mixup_fn)
    batches_per_epoch = len(train)
    if batches_per_epoch < 1:
        raise ValueError(f'the training split yields no full batch of {args.batch_size} per process; '
                         f'lower --batch-size')
    val = None
    if data.val is not None:
        val_batch = args.validation_batch_size or args.batch_size
        val = data.backend.eval_loader(data.val, LoaderConfig(batch_size=val_batch, persistent_workers=True,
                                                               **common))
    return Loaders(train=train, val=val, mixup_fn=mixup_fn, batches_per_epoch=batches_per_epoch)

"""The trainer's data: which splits it reads and the loaders over them, for both backends.

``--dataset wds/<name>`` reads WebDataset shards through :mod:`esam_timm.data` (device-side prefetch,
normalisation, mixup); anything else goes through timm's ``create_dataset`` / ``create_loader``
(ImageFolder, ``torch/cifar10``, ...). Both give the trainer the same interface: ``len()`` batches per
epoch, ``set_epoch``, device batches with mixup already applied.
"""
import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch

__all__ = ['DataSources', 'Loaders', 'resolve_data', 'build_loaders', 'build_mixup', 'dataset_num_classes']

_logger = logging.getLogger(__name__)


@dataclass
class DataSources:
    """The resolved training and validation splits and the class count."""
    data_dir: str
    is_wds: bool
    train: Any  # esam_timm.data.ShardSource or a timm dataset
    val: Optional[Any]
    num_classes: int


@dataclass
class Loaders:
    """Loaders of one run: ``train_raw`` is the host-side loader (``len``, ``set_epoch``), ``train`` the
    device-side iterable over it."""
    train: Any
    train_raw: Any
    val: Optional[Any]
    mixup_fn: Optional[Callable]
    batches_per_epoch: int


def _demo_data_dir(args: argparse.Namespace) -> str:
    return args.data_dir or os.path.join(args.output or os.path.join('.', 'output', 'train'), 'demo-data')


def resolve_data(args: argparse.Namespace, world_size: int, is_primary: bool,
                 barrier: Callable[[], None]) -> DataSources:
    """Resolve the train/validation splits (building the demo shards first with ``--demo``) and the
    number of classes; ``--num-classes`` must agree with the data when the data says how many."""
    is_wds = args.dataset.startswith('wds/')
    data_dir = args.data_dir
    if args.demo:
        from esam_timm.data import has_info, make_demo_dataset
        data_dir = _demo_data_dir(args)
        if is_primary and not has_info(data_dir):
            _logger.info('Building the demo dataset in %s', data_dir)
            make_demo_dataset(data_dir)
        barrier()
    if is_wds:
        if args.class_map:
            raise ValueError(f'--class-map {args.class_map!r} applies to folder datasets (--dataset \'\'); '
                             f'WebDataset shards carry integer labels: give the class map to make_shards '
                             f'(--class-map) when writing them')
        from esam_timm.data import has_info, num_classes_from_info, resolve_source
        if data_dir and not has_info(data_dir) and os.path.isdir(os.path.join(data_dir, args.train_split)):
            raise ValueError(f'{data_dir!r} holds a {args.train_split!r} folder but no _info.json: an ImageFolder '
                             f'tree, not WebDataset shards. Read it with --dataset \'\', or write shards with '
                             f'python -m esam_timm.data.make_shards {data_dir} OUT')
        train = resolve_source(data_dir, args.train_split, args.train_num_samples)
        val = resolve_source(data_dir, args.val_split, args.val_num_samples) if args.val_split else None
        data_classes = num_classes_from_info(data_dir)
    else:
        from timm.data import create_dataset
        class_map = _find_class_map(args.class_map, data_dir)
        train = create_dataset(args.dataset, root=data_dir, split=args.train_split, is_training=True,
                               class_map=class_map, download=args.dataset_download, batch_size=args.batch_size,
                               seed=args.seed)
        val = create_dataset(args.dataset, root=data_dir, split=args.val_split, is_training=False,
                             class_map=class_map, download=args.dataset_download,
                             batch_size=args.batch_size) if args.val_split else None
        data_classes = dataset_num_classes(train)
    num_classes = args.num_classes if args.num_classes is not None else data_classes
    if num_classes is None:
        raise ValueError(f'cannot tell the number of classes of {data_dir!r} (no _info.json class count, '
                         f'no class_map.txt): pass --num-classes')
    if data_classes is not None and num_classes != data_classes:
        raise ValueError(f'--num-classes {num_classes} disagrees with the data in {data_dir!r}, which has '
                         f'{data_classes} classes: pass --num-classes {data_classes} (or leave it out)')
    _warn_if_samples_repeat(args.batch_size * world_size, train)
    return DataSources(data_dir=data_dir, is_wds=is_wds, train=train, val=val, num_classes=num_classes)


def dataset_num_classes(dataset: Any) -> Optional[int]:
    """The class count a timm dataset declares (its reader's ``class_to_idx`` or ``classes``), else None."""
    dataset = getattr(dataset, 'dataset', dataset)  # a subset wrapper
    reader = getattr(dataset, 'reader', None)
    classes = getattr(reader, 'class_to_idx', None) or getattr(dataset, 'classes', None)
    return len(classes) if classes else None


def _find_class_map(class_map: str, data_dir: str) -> str:
    """``--class-map`` as given, else under ``--data-dir`` (as timm looks for it); '' when not set."""
    if not class_map or os.path.isfile(class_map):
        return class_map
    return os.path.join(data_dir, class_map)


def _warn_if_samples_repeat(global_batch: int, train: Any) -> None:
    num_samples = getattr(train, 'num_samples', None)
    if num_samples is None and hasattr(train, '__len__'):
        num_samples = len(train)
    if num_samples is not None and global_batch > num_samples:
        _logger.warning('The global batch of %d (-b x processes) is larger than the training split (%d samples): '
                        'samples repeat within every batch', global_batch, num_samples)


def build_mixup(args: argparse.Namespace, num_classes: int) -> Optional[Callable]:
    """timm's Mixup/CutMix (with label smoothing folded into its soft targets), or None when off."""
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=num_classes)


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


def build_loaders(args: argparse.Namespace, sources: DataSources, data_config: Dict[str, Any], *,
                  rank: int, world_size: int, device: torch.device) -> Loaders:
    """The training and validation loaders for ``sources`` with the model's ``data_config``."""
    mixup_fn = build_mixup(args, sources.num_classes)
    val_batch = args.validation_batch_size or args.batch_size
    train_interp = args.train_interpolation
    if sources.is_wds:
        from esam_timm.data import DevicePrefetcher, create_train_loader, create_val_loader
        train_interp = train_interp or data_config['interpolation']
        if args.no_aug:
            aug = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0., vflip=0., color_jitter=None,
                       auto_augment=None, re_prob=0.)
        else:
            aug = dict(scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip, vflip=args.vflip,
                       color_jitter=args.color_jitter or None, auto_augment=args.aa, re_prob=args.reprob)
        # Fresh workers every epoch: opening a DataLoader iterator draws its base seed from the global
        # RNG, persistent workers skip that draw, and a resumed run could then not replay the random
        # state of an uninterrupted one. Worker start-up costs seconds per epoch.
        train_raw = create_train_loader(
            sources.train, batch_size=args.batch_size, img_size=data_config['input_size'][1:],
            num_workers=args.workers, seed=args.seed, rank=rank, world_size=world_size,
            interpolation=train_interp, re_mode=args.remode, re_count=args.recount,
            mean=data_config['mean'], std=data_config['std'], pin_memory=args.pin_mem, persistent_workers=False,
            num_classes=sources.num_classes, **aug)
        train = DevicePrefetcher(train_raw, device, mean=data_config['mean'], std=data_config['std'],
                                 channels_last=args.channels_last, mixup_fn=mixup_fn, num_classes=sources.num_classes)
        val = None
        if sources.val is not None:
            raw_val = create_val_loader(
                sources.val, batch_size=val_batch, img_size=data_config['input_size'][1:],
                crop_pct=data_config['crop_pct'], num_workers=args.workers, rank=rank, world_size=world_size,
                interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
                pin_memory=args.pin_mem, num_classes=sources.num_classes)
            val = DevicePrefetcher(raw_val, device, mean=data_config['mean'], std=data_config['std'],
                                   channels_last=args.channels_last, num_classes=sources.num_classes)
    else:
        from timm.data import create_loader
        common = dict(mean=data_config['mean'], std=data_config['std'], num_workers=args.workers,
                      distributed=world_size > 1, pin_memory=args.pin_mem, device=device,
                      use_prefetcher=True, persistent_workers=False)
        loader = create_loader(
            sources.train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
            no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
            scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
            color_jitter=args.color_jitter, auto_augment=args.aa, interpolation=train_interp, **common)
        train = train_raw = _TimmFolderLoader(loader, mixup_fn, args.channels_last)
        val = None
        if sources.val is not None:
            vloader = create_loader(sources.val, input_size=data_config['input_size'], batch_size=val_batch,
                                    is_training=False, interpolation=data_config['interpolation'],
                                    crop_pct=data_config['crop_pct'], **common)
            val = _TimmFolderLoader(vloader, None, args.channels_last)
    batches_per_epoch = len(train_raw)
    if batches_per_epoch < 1:
        raise ValueError(f'the training split yields no full batch of {args.batch_size} per process; '
                         f'lower --batch-size')
    return Loaders(train=train, train_raw=train_raw, val=val, mixup_fn=mixup_fn,
                   batches_per_epoch=batches_per_epoch)

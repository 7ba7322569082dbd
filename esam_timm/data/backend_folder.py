"""The folder backend: every ``--dataset`` no other backend claims, read through timm's own
``create_dataset`` / ``create_loader``: ImageFolder trees (``--dataset ''``: ``<root>/<split>/<class>/*.jpg``)
and timm's dataset names (``torch/cifar10``, ``hfds/...``, ...).

timm's loader decodes with PIL in its workers and normalises on the device (its prefetcher); this
backend adds mixup and channels-last, which timm's prefetcher does not do, and keeps no bad-data report
(timm's datasets stop on an unreadable file rather than count it).
"""
import logging
import os
from typing import Any, Dict, Iterator, List, Optional

import torch

from .backends import Augmentation, Batch, DataBackend, Loader, LoaderConfig, MixupFn, Split
from .bad_data import DataReport
from .workers import leave_stop_signals_to_the_trainer

__all__ = ['FolderBackend', 'FixedSubset', 'dataset_num_classes']

_logger = logging.getLogger(__name__)


def dataset_num_classes(dataset: Any) -> Optional[int]:
    """The class count a timm dataset declares (its reader's ``class_to_idx`` or ``classes``), else None."""
    dataset = getattr(dataset, 'dataset', dataset)  # a subset wrapper
    reader = getattr(dataset, 'reader', None)
    classes = getattr(reader, 'class_to_idx', None) or getattr(dataset, 'classes', None)
    return len(classes) if classes else None


class FixedSubset(torch.utils.data.Dataset):
    """A fixed subset of a map-style dataset (the first images of a folder sorted by class would hold one
    class). ``transform`` is the wrapped dataset's, which timm's ``create_loader`` sets."""

    def __init__(self, dataset: Any, indices: List[int]) -> None:
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]

    @property
    def transform(self) -> Any:
        return self.dataset.transform

    @transform.setter
    def transform(self, value: Any) -> None:
        self.dataset.transform = value


class _TimmLoader:
    """timm's ``create_loader`` output under the :class:`~esam_timm.data.backends.Loader` contract: mixup
    and channels-last applied here, the epoch passed to its distributed sampler, no bad-data report."""

    def __init__(self, loader: Any, mixup_fn: Optional[MixupFn], channels_last: bool) -> None:
        leave_stop_signals_to_the_trainer(loader)
        self.loader = loader
        self.mixup_fn = mixup_fn
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        sampler = getattr(self.loader, 'sampler', None)
        if hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(epoch)

    def data_report(self) -> Optional[DataReport]:
        return None

    def __iter__(self) -> Iterator[Batch]:
        for inputs, targets in self.loader:
            if self.mixup_fn is not None:
                inputs, targets = self.mixup_fn(inputs, targets)
            if self.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            yield inputs, targets


class FolderBackend(DataBackend):
    """ImageFolder trees and timm's datasets; ``--class-map`` is looked for as given, then under ``root``."""

    name = 'folders and timm datasets'

    def _class_map(self) -> str:
        if not self.class_map or os.path.isfile(self.class_map):
            return self.class_map
        return os.path.join(self.root, self.class_map)

    def _dataset(self, name: str, training: bool) -> Any:
        from timm.data import create_dataset
        kwargs = dict(seed=self.seed) if training else {}
        return create_dataset(self.dataset, root=self.root, split=name, is_training=training,
                              class_map=self._class_map(), download=self.download, batch_size=self.batch_size,
                              **kwargs)

    def split(self, name: str, *, training: bool, num_samples: Optional[int] = None) -> Split:
        """The split as a timm dataset, read whole: ``num_samples`` sizes only WebDataset epochs (a warning
        says so when it is given)."""
        if num_samples is not None:
            _logger.warning('--dataset %r reads whole splits: the sample count %d given for split %r is ignored '
                            '(--train-num-samples and --val-num-samples size WebDataset epochs)', self.dataset,
                            num_samples, name)
        dataset = self._dataset(name, training)
        size = len(dataset) if hasattr(dataset, '__len__') else None
        return Split(name, dataset, size, dataset_num_classes(dataset))

    def subset(self, name: str, size: int, seed: int) -> Split:
        """A fixed random ``size`` samples (drawn with ``seed``) of a map-style dataset read with the
        evaluation settings; an iterable dataset or a smaller one whole."""
        dataset = self._dataset(name, training=False)
        classes = dataset_num_classes(dataset)
        if isinstance(dataset, torch.utils.data.IterableDataset) or len(dataset) <= size:
            count = None if isinstance(dataset, torch.utils.data.IterableDataset) else len(dataset)
            return Split(name, dataset, count, classes)
        chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
        return Split(name, FixedSubset(dataset, sorted(chosen.tolist())), size, classes)

    def _loader_kwargs(self, config: LoaderConfig) -> Dict[str, Any]:
        image = config.image
        return dict(input_size=image.input_size, batch_size=config.batch_size, mean=image.mean, std=image.std,
                    num_workers=config.workers, distributed=config.world_size > 1, pin_memory=config.pin_memory,
                    device=config.device, use_prefetcher=True, persistent_workers=config.persistent_workers)

    def train_loader(self, split: Split, config: LoaderConfig, augment: Augmentation, *, seed: int,
                     decode: str = 'pil', mixup_fn: Optional[MixupFn] = None) -> Loader:
        """timm's training loader; ``seed`` went into the dataset (:meth:`split`), its sampler shuffles
        with the global RNG, which the trainer seeds per epoch."""
        from timm.data import create_loader
        if decode not in self.decodes:
            raise ValueError(f'decode must be one of {list(self.decodes)}, got {decode!r}')
        loader = create_loader(
            split.data, is_training=True, no_aug=augment.no_aug, re_prob=augment.re_prob, re_mode=augment.re_mode,
            re_count=augment.re_count, scale=augment.scale, ratio=augment.ratio, hflip=augment.hflip,
            vflip=augment.vflip, color_jitter=augment.color_jitter, auto_augment=augment.auto_augment,
            interpolation=augment.interpolation, **self._loader_kwargs(config))
        return _TimmLoader(loader, mixup_fn, config.channels_last)

    def eval_loader(self, split: Split, config: LoaderConfig) -> Loader:
        from timm.data import create_loader
        loader = create_loader(split.data, is_training=False, interpolation=config.image.interpolation,
                               crop_pct=config.image.crop_pct, **self._loader_kwargs(config))
        return _TimmLoader(loader, None, config.channels_last)

"""The ``wds/<name>`` backend: WebDataset shards with timm's ``_info.json`` (or a shard pattern).

Splits come from :mod:`esam_timm.data.sources`, batches from :mod:`esam_timm.data.wds` (uint8 on the
host, bad data counted per epoch) and are finished on the device by
:class:`~esam_timm.data.prefetch.DevicePrefetcher` (normalisation, channels-last, random erasing,
mixup). Training images are decoded one of three ways, the same crops drawn from the same RNG:

- ``pil``: timm's training transform in the loader workers (auto-augment and all);
- ``fast``: :mod:`esam_timm.data.decode` in the workers (TorchCodec, or a reduced-size JPEG decode where
  the crop allows); training on a GPU, the colour jitter moves from the workers to the batch on the
  device (``DevicePrefetcher(augment=...)``, on its side stream), where it costs the workers nothing;
- ``gpu``: the workers only parse headers and draw crops; :mod:`esam_timm.data.gpu_decode` decodes the
  batch on the CUDA device (TorchCodec's nvJPEG), a batch ahead, on a side stream.

Every path yields ``len()`` full batches per epoch on every rank, also when some images cannot be
decoded: the stream refills the batch (the sample is counted as bad), so mixup, gradient accumulation
and DDP always get full, equal batches.

GPU decode is a decode mode of this backend, not a backend of its own: it reads the same shards,
splits, class count and bad-data rules, and evaluation stays on the CPU path; only where the training
JPEGs are decoded differs.
"""
import os
from typing import Optional

from .backends import Augmentation, DataBackend, Loader, LoaderConfig, MixupFn, Split
from .batch_aug import BatchAugment, jitter_ranges
from .decode import jpeg_decoder
from .gpu_decode import check_cuda_device, create_gpu_train_loader
from .prefetch import DevicePrefetcher
from .sources import has_info, num_classes_from_info, resolve_source
from .wds import create_train_loader, create_val_loader

__all__ = ['WdsBackend']


def _batch_jitter_can_do(color_jitter: object) -> bool:
    """True for a colour jitter that the batch jitter on the device does as timm does (no hue)."""
    try:
        return jitter_ranges(color_jitter) is not None
    except ValueError:
        return False


class WdsBackend(DataBackend):
    """WebDataset shards: ``root`` is a folder (or URL) with ``_info.json``, or a shard pattern."""

    name = 'WebDataset shards'
    decodes = ('pil', 'fast', 'gpu')

    def __init__(self, dataset: str, root: str, **kwargs: object) -> None:
        super().__init__(dataset, root, **kwargs)
        if self.class_map:
            raise ValueError(f'--class-map {self.class_map!r} applies to folder datasets (--dataset \'\'); '
                             f'WebDataset shards carry integer labels: give the class map to make_shards '
                             f'(--class-map) when writing them')

    @classmethod
    def check_decode(cls, decode: str, device: str, auto_augment: Optional[str]) -> None:
        """Fast and GPU decode draw timm's crops and flips but not auto-augment, and need TorchCodec; GPU
        decode needs CUDA."""
        if decode != 'pil' and auto_augment:
            raise ValueError(f'--decode {decode} does not do auto-augment (--aa {auto_augment}): use --decode pil '
                             f'for it')
        if decode == 'gpu':
            check_cuda_device(device)
        if decode != 'pil':
            jpeg_decoder()

    def _check_not_a_folder_tree(self, name: str) -> None:
        if self.root and not has_info(self.root) and os.path.isdir(os.path.join(self.root, name)):
            raise ValueError(f'{self.root!r} holds a {name!r} folder but no _info.json: an ImageFolder tree, not '
                             f'WebDataset shards. Read it with --dataset \'\', or write shards with '
                             f'python -m esam_timm.data.make_shards {self.root} OUT')

    def split(self, name: str, *, training: bool, num_samples: Optional[int] = None) -> Split:
        """The split's shards (the same for training and evaluation); ``num_samples`` overrides the
        count of ``_info.json``: an epoch's length for training, the first samples for evaluation."""
        self._check_not_a_folder_tree(name)
        source = resolve_source(self.root, name, num_samples)
        return Split(name, source, source.num_samples, num_classes_from_info(self.root))

    def subset(self, name: str, size: int, seed: int) -> Split:
        """The split's first ``size`` samples in shard order (shards are shuffled when written, so these
        are a fixed random sample); ``seed`` plays no part."""
        whole = self.split(name, training=False)
        return whole if whole.num_samples <= size else self.split(name, training=False, num_samples=size)

    def train_loader(self, split: Split, config: LoaderConfig, augment: Augmentation, *, seed: int,
                     decode: str = 'pil', mixup_fn: Optional[MixupFn] = None) -> Loader:
        if decode not in self.decodes:
            raise ValueError(f'decode must be one of {list(self.decodes)}, got {decode!r}')
        image = config.image
        if augment.no_aug:
            aug = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0., vflip=0., color_jitter=None, auto_augment=None,
                       re_prob=0.)
        else:
            aug = dict(scale=tuple(augment.scale), ratio=tuple(augment.ratio), hflip=augment.hflip,
                       vflip=augment.vflip, color_jitter=augment.color_jitter or None,
                       auto_augment=augment.auto_augment, re_prob=augment.re_prob)
        common = dict(batch_size=config.batch_size, img_size=image.input_size[1:], num_workers=config.workers,
                      seed=seed, rank=config.rank, world_size=config.world_size,
                      interpolation=augment.interpolation or image.interpolation, re_mode=augment.re_mode,
                      re_count=augment.re_count, mean=image.mean, std=image.std, pin_memory=config.pin_memory,
                      persistent_workers=config.persistent_workers, num_classes=config.num_classes)
        device_augment = None
        if decode == 'gpu':
            host = create_gpu_train_loader(split.data, device=config.device,
                                           batches_per_update=config.batches_per_update, **common, **aug)
        else:
            if decode == 'fast' and config.device.type == 'cuda' and _batch_jitter_can_do(aug['color_jitter']):
                # The jitter is the workers' costliest step (~1 ms an image in PIL); flips stay in the workers.
                device_augment = BatchAugment(hflip=0., vflip=0., color_jitter=aug['color_jitter'])
                aug['color_jitter'] = None
            host = create_train_loader(split.data, decode=decode, batches_per_update=config.batches_per_update,
                                       **common, **aug)
        return DevicePrefetcher(host, config.device, mean=image.mean, std=image.std,
                                channels_last=config.channels_last, mixup_fn=mixup_fn, num_classes=config.num_classes,
                                augment=device_augment, seed=seed, rank=config.rank)

    def eval_loader(self, split: Split, config: LoaderConfig) -> Loader:
        image = config.image
        host = create_val_loader(
            split.data, batch_size=config.batch_size, img_size=image.input_size[1:], crop_pct=image.crop_pct,
            num_workers=config.workers, rank=config.rank, world_size=config.world_size,
            interpolation=image.interpolation, mean=image.mean, std=image.std, pin_memory=config.pin_memory,
            persistent_workers=config.persistent_workers, num_classes=config.num_classes)
        return DevicePrefetcher(host, config.device, mean=image.mean, std=image.std,
                                channels_last=config.channels_last, num_classes=config.num_classes)

"""The data-backend seam: which backend reads a ``--dataset``, its splits and class count, its loaders,
and what their epochs lost. The trainer and the sharpness CLI ask here; nothing else branches on the
kind of data.

A backend is one module holding a :class:`DataBackend` subclass, plus one line in :data:`BACKENDS`
(the ``--dataset`` prefix it answers to -> ``'module:Class'``; the longest matching prefix wins and
``''`` takes every name no other prefix claims). Built in:

- ``wds/<name>``: WebDataset shards with timm's ``_info.json`` (:mod:`esam_timm.data.backend_wds`);
  decodes training images with PIL, the fast CPU path or on the GPU (``--decode pil|fast|gpu``).
- anything else: ImageFolder trees (``''``) and timm's own datasets (``torch/cifar10``, ...) through
  timm's loaders (:mod:`esam_timm.data.backend_folder`); PIL only.

The contract a backend keeps (tested with a toy backend in ``tests/test_data_backends.py``):

- :meth:`DataBackend.split` resolves a split into a :class:`Split`: the backend's own handle, its
  sample count and the class count the data declares (None when it does not say);
  :meth:`DataBackend.subset` gives the same ``size`` samples of a split every time (measurements).
- :meth:`DataBackend.train_loader` and :meth:`DataBackend.eval_loader` return a :class:`Loader`:
  ``len()`` batches per epoch on this rank (a training loader yields exactly that many, the same on
  every rank, or DDP hangs at the epoch's end; an evaluation loader reads each sample once over all
  ranks and may differ per rank), ``iter()`` yields ``(float images, targets)`` on the device,
  normalised, channels-last when asked, mixup applied; ``set_epoch(epoch)`` fixes the epoch's shuffle;
  ``data_report()`` is this rank's :class:`~esam_timm.data.bad_data.DataReport` of the current epoch
  (None when the backend counts nothing), complete once the epoch's last batch was handed out.
- :attr:`DataBackend.decodes` lists the ``--decode`` values it can do (:func:`check_decode` refuses the
  others at parse time, and asks :meth:`DataBackend.check_decode` for the backend's own rules).
"""
import importlib
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import (Any, Callable, ClassVar, Dict, Iterator, Mapping, Optional, Protocol, Tuple, Type, Union,
                    runtime_checkable)

import torch

from .bad_data import BadDataError, DataReport, check_bad_fraction, reduce_data_report

__all__ = ['BACKENDS', 'DECODES', 'Augmentation', 'DataBackend', 'ImageConfig', 'Loader', 'LoaderConfig', 'Split',
           'backend_for', 'check_decode', 'check_epoch_data', 'open_data', 'warn_if_samples_repeat']

_logger = logging.getLogger(__name__)

# How training images are decoded (--decode): PIL in the loader workers (timm's transform), the fast CPU
# path (same draws, cheaper decode: esam_timm.data.decode) or on the GPU (esam_timm.data.gpu_decode).
DECODES = ('pil', 'fast', 'gpu')

Batch = Tuple[torch.Tensor, torch.Tensor]
MixupFn = Callable[[torch.Tensor, torch.Tensor], Batch]

# --dataset prefix -> the backend class ('module:Class', imported when first asked for).
BACKENDS: Dict[str, Union[str, Type['DataBackend']]] = {
    'wds/': 'esam_timm.data.backend_wds:WdsBackend',
    '': 'esam_timm.data.backend_folder:FolderBackend',
}


@runtime_checkable
class Loader(Protocol):
    """What the trainer and the sharpness CLI iterate (see the module docstring for the contract)."""

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""

    def __iter__(self) -> Iterator[Batch]:
        """One epoch of ``(float images, targets)`` on the device, ready for the model."""

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next iteration (its shuffle and augmentation draws)."""

    def data_report(self) -> Optional[DataReport]:
        """This rank's bad-data counts of the current epoch; None when the backend keeps none."""


@dataclass(frozen=True)
class Split:
    """One resolved split: ``data`` is the backend's own handle (shards, a timm dataset, ...)."""
    name: str
    data: Any
    num_samples: Optional[int]
    num_classes: Optional[int]


@dataclass(frozen=True)
class ImageConfig:
    """The model's input, as timm's ``resolve_data_config`` gives it: size ``(C, H, W)``, resize filter,
    normalisation (0..1 units) and the evaluation centre-crop fraction."""
    input_size: Tuple[int, int, int]
    interpolation: str
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    crop_pct: float

    @classmethod
    def from_timm(cls, data_config: Mapping[str, Any]) -> 'ImageConfig':
        return cls(input_size=tuple(data_config['input_size']), interpolation=data_config['interpolation'],
                   mean=tuple(data_config['mean']), std=tuple(data_config['std']), crop_pct=data_config['crop_pct'])


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation with timm's flag meanings; ``no_aug`` keeps only the resize and crop, and an
    empty ``interpolation`` means the model's."""
    no_aug: bool = False
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3. / 4., 4. / 3.)
    hflip: float = 0.5
    vflip: float = 0.
    color_jitter: float = 0.4
    auto_augment: Optional[str] = None
    interpolation: str = 'random'
    re_prob: float = 0.
    re_mode: str = 'pixel'
    re_count: int = 1


@dataclass(frozen=True)
class LoaderConfig:
    """How one loader batches and where its batches go."""
    batch_size: int
    image: ImageConfig
    device: torch.device
    rank: int = 0
    world_size: int = 1
    workers: int = 4
    pin_memory: bool = False
    persistent_workers: bool = False
    channels_last: bool = False
    num_classes: Optional[int] = None  # labels outside [0, num_classes) stop the loader, naming the sample
    # Training: batches per update (the trainer's --grad-accum-steps). A backend that sizes its epochs makes
    # them a whole number of updates of full batches, so the epoch's updates and samples depend on the global
    # batch only, not on how processes and accumulation split it (a run resumes on another world size).
    batches_per_update: int = 1


class DataBackend(ABC):
    """One kind of data behind ``--dataset`` (see the module docstring for what each method promises).

    Args:
        dataset: the ``--dataset`` value (e.g. ``wds/imagenet`` or ``torch/cifar10``).
        root: ``--data-dir``.
        class_map: a class name -> index map file (folder datasets), '' for none.
        download: let the backend fetch a dataset that is not on disk (``--dataset-download``).
        seed, batch_size: for datasets whose reader shuffles or batches itself (timm's iterable readers).
    """

    name: ClassVar[str]  # what it reads, for messages: 'WebDataset shards', ...
    decodes: ClassVar[Tuple[str, ...]] = ('pil',)  # the --decode values it can do, the default first

    def __init__(self, dataset: str, root: str, *, class_map: str = '', download: bool = False, seed: int = 0,
                 batch_size: int = 1) -> None:
        self.dataset = dataset
        self.root = root
        self.class_map = class_map
        self.download = download
        self.seed = seed
        self.batch_size = batch_size

    @classmethod
    def check_decode(cls, decode: str, device: str, auto_augment: Optional[str]) -> None:
        """Backend rules for ``--decode`` beyond being one of :attr:`decodes` (e.g. a CUDA device for GPU
        decode): raise ValueError naming the flag and what would work. Nothing by default."""

    @abstractmethod
    def split(self, name: str, *, training: bool, num_samples: Optional[int] = None) -> Split:
        """Resolve split ``name`` for training or evaluation; ``num_samples`` overrides its sample count
        where the backend sizes its epochs (``--train-num-samples``, ``--val-num-samples``)."""

    @abstractmethod
    def subset(self, name: str, size: int, seed: int) -> Split:
        """At most ``size`` samples of split ``name``, the same ones for the same ``seed``."""

    @abstractmethod
    def train_loader(self, split: Split, config: LoaderConfig, augment: Augmentation, *, seed: int,
                     decode: str = 'pil', mixup_fn: Optional[MixupFn] = None) -> Loader:
        """The training loader: full batches, ``augment`` with draws fixed by ``seed`` and the epoch."""

    @abstractmethod
    def eval_loader(self, split: Split, config: LoaderConfig) -> Loader:
        """The evaluation loader: timm's eval transform (resize, centre crop), every sample once."""


def backend_for(dataset: str) -> Type[DataBackend]:
    """The backend class whose :data:`BACKENDS` prefix is the longest one ``dataset`` starts with."""
    prefix = max((p for p in BACKENDS if dataset.startswith(p)), key=len, default=None)
    if prefix is None:
        raise ValueError(f'--dataset {dataset!r} matches no data backend; known prefixes: {sorted(BACKENDS)}')
    entry = BACKENDS[prefix]
    if isinstance(entry, str):
        module, _, name = entry.partition(':')
        entry = getattr(importlib.import_module(module), name)
    return entry


def open_data(dataset: str, root: str, **kwargs: Any) -> DataBackend:
    """The backend for ``dataset`` opened on ``root`` (keyword arguments: :class:`DataBackend`'s)."""
    return backend_for(dataset)(dataset, root, **kwargs)


def check_decode(dataset: str, decode: str, device: str, auto_augment: Optional[str] = None) -> None:
    """Refuse a ``--decode`` that the backend of ``dataset`` cannot do on ``device`` (with ``--aa
    auto_augment``): ValueError in one line naming what would work. The trainer asks at parse time."""
    backend = backend_for(dataset)
    if decode not in backend.decodes:
        others = [prefix for prefix in BACKENDS if prefix and decode in backend_for(prefix).decodes]
        elsewhere = f'; --decode {decode} works with --dataset {" or ".join(p + "<name>" for p in others)}' \
            if others else ''
        raise ValueError(f'--decode {decode} is not available for {backend.name} (--dataset {dataset!r}), which '
                         f'decode with {" or ".join(backend.decodes)}: use --decode {backend.decodes[0]}{elsewhere}')
    backend.check_decode(decode, device, auto_augment)


def warn_if_samples_repeat(global_batch: int, split: Split) -> None:
    """Warn when one global batch is larger than the whole split (every batch then repeats samples)."""
    if split.num_samples is not None and global_batch > split.num_samples:
        _logger.warning('The global batch of %d (-b x processes) is larger than the training split (%d samples): '
                        'samples repeat within every batch', global_batch, split.num_samples)


def check_epoch_data(loader: Loader, max_bad_fraction: float, *, what: str,
                     device: Optional[torch.device] = None,
                     warn: bool = True) -> Tuple[Dict[str, float], Optional[BadDataError]]:
    """What an epoch of ``loader`` lost, summed over the ranks (a collective: call it on every rank).

    Returns the metrics for the logs (``samples_read``, ``bad_samples``, ``bad_shards``, ``bad_fraction``;
    empty when the loader counts nothing) and the :class:`BadDataError` to stop with when the share is
    above ``max_bad_fraction`` (returned, not raised, so the caller can first save the epoch).
    """
    report = loader.data_report()
    if report is None:
        return {}, None
    report = reduce_data_report(report, device)
    error = None
    try:
        check_bad_fraction(report, max_bad_fraction, what=what, warn=warn)
    except BadDataError as e:
        error = e
    metrics = report.metrics()
    return {'samples_read' if key == 'samples' else key: value for key, value in metrics.items()}, error

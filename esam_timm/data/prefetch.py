"""Device-side batch preparation: copy uint8 batches to the device and finish them there.

Workers hand over uint8 images (4x less to copy than float32), or a loader hands over uint8 images
already on the device (GPU decode). :class:`DevicePrefetcher` copies
them from pinned memory with non-blocking transfers, optionally flips and colour-jitters the uint8
batch (:class:`~esam_timm.data.batch_aug.BatchAugment`: the fast CPU path's jitter on a GPU), converts
to float, normalises, optionally applies timm's random erasing and Mixup/CutMix on the device, and
returns channels-last tensors. On CUDA the next batch is prepared on a side stream while the caller
computes on the current one (the caller's stream waits for it on the device and the batch's memory is
marked as used there: no host sync); on the CPU the same steps run synchronously, so the class works
everywhere.
"""
import contextlib
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing

from .bad_data import DataReport
from .batch_aug import BatchAugment

Batch = Tuple[torch.Tensor, torch.Tensor]


class LabelRangeError(ValueError):
    """A batch holds a label the model has no class for (``--num-classes`` smaller than the data's)."""


class DevicePrefetcher:
    """Iterate ``(float images on device, targets on device)`` from a loader of uint8 batches.

    Args:
        loader: iterable of ``(uint8 images [B, C, H, W], int64 labels [B])``, e.g. a
            :class:`~esam_timm.data.wds.WdsLoader`. ``len()``, ``set_epoch`` and ``data_report`` are
            passed through when the loader has them.
        device: where the batches go.
        mean, std: per-channel normalisation in 0..1 units (timm's convention); default the
            loader's ``mean``/``std`` attributes, else ImageNet's.
        channels_last: return images in ``torch.channels_last`` memory format.
        mixup_fn: a ``timm.data.Mixup`` (or any ``f(x, y) -> (x, y)``) applied on the device;
            targets then become soft ``[B, num_classes]`` tensors.
        re_prob, re_mode, re_count: timm random erasing on the device after normalisation; ``None``
            takes the loader's settings (``re_prob`` etc. attributes), else no erasing.
        re_num_splits: leave the first ``B // re_num_splits`` samples un-erased (augmix splits).
        dtype: floating dtype of the returned images.
        num_classes: when given, a label outside ``[0, num_classes)`` raises :class:`LabelRangeError`
            naming both numbers (checked on the host copy: no device sync).
        augment: flips and colour jitter of the uint8 batch on the device, before normalisation; its
            generator is reseeded every epoch from ``seed``, ``rank`` and the epoch.
        seed, rank: for ``augment``'s draws.
    """

    def __init__(
            self,
            loader: Iterable[Batch],
            device: Union[str, torch.device],
            *,
            mean: Optional[Sequence[float]] = None,
            std: Optional[Sequence[float]] = None,
            channels_last: bool = True,
            mixup_fn: Optional[Callable[[torch.Tensor, torch.Tensor], Batch]] = None,
            re_prob: Optional[float] = None,
            re_mode: Optional[str] = None,
            re_count: Optional[int] = None,
            re_num_splits: int = 0,
            dtype: torch.dtype = torch.float32,
            num_classes: Optional[int] = None,
            augment: Optional[BatchAugment] = None,
            seed: int = 0,
            rank: int = 0,
    ) -> None:
        self.loader = loader
        self.augment = augment if augment is not None and augment.active else None
        self.seed, self.rank = seed, rank
        self.epoch, self._epoch_set, self._iterated = 0, False, False
        self.num_classes = num_classes
        self.device = torch.device(device)
        if self.device.type == 'cuda' and self.device.index is None:
            self.device = torch.device('cuda', torch.cuda.current_device())
        mean = tuple(mean if mean is not None else getattr(loader, 'mean', IMAGENET_DEFAULT_MEAN))
        std = tuple(std if std is not None else getattr(loader, 'std', IMAGENET_DEFAULT_STD))
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f'mean {mean} and std {std} need the same length and std > 0')
        shape = (1, len(mean), 1, 1)
        self.mean = torch.tensor([m * 255 for m in mean], device=self.device, dtype=dtype).view(shape)
        self.std = torch.tensor([s * 255 for s in std], device=self.device, dtype=dtype).view(shape)
        self.channels_last = channels_last
        self.mixup_fn = mixup_fn
        self.dtype = dtype
        re_prob = re_prob if re_prob is not None else getattr(loader, 're_prob', 0.)
        if not 0. <= re_prob <= 1.:
            raise ValueError(f're_prob must be in [0, 1], got {re_prob}')
        self.random_erasing = None
        if re_prob > 0.:
            self.random_erasing = RandomErasing(
                probability=re_prob,
                mode=re_mode if re_mode is not None else getattr(loader, 're_mode', 'const'),
                max_count=re_count if re_count is not None else getattr(loader, 're_count', 1),
                num_splits=re_num_splits,
                device=self.device)
        self.stream = torch.cuda.Stream(device=self.device) if self.device.type == 'cuda' else None
        self.data_wait_s = 0.0

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def data_report(self) -> Optional[DataReport]:
        """The loader's bad-data report of the current epoch (see ``WdsLoader.data_report``); None when
        the loader keeps none. Complete once the prefetcher has handed out the epoch's last batch."""
        data_report = getattr(self.loader, 'data_report', None)
        return data_report() if data_report is not None else None

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next iteration (``augment``'s draws); forwarded to the loader (it reshuffles)."""
        self.epoch, self._epoch_set = epoch, True
        set_epoch = getattr(self.loader, 'set_epoch', None)
        if set_epoch is not None:
            set_epoch(epoch)

    def _prepare(self, images: torch.Tensor, targets: torch.Tensor) -> Batch:
        """Copy one host batch to the device and turn it into normalised float images (+ mixed targets)."""
        if self.num_classes is not None and targets.device.type == 'cpu' and targets.numel() and not (
                0 <= int(targets.min()) and int(targets.max()) < self.num_classes):
            bad = int(targets.max()) if int(targets.max()) >= self.num_classes else int(targets.min())
            raise LabelRangeError(f'the data holds label {bad}, outside the {self.num_classes} classes of the model '
                                  f'(labels must be in [0, {self.num_classes})): pass the --num-classes the data '
                                  f'has, or fix the labels')
        on_cuda = self.stream is not None
        if on_cuda and images.device.type == 'cpu' and not images.is_pinned():
            images = images.pin_memory()
        if on_cuda and targets.device.type == 'cpu' and not targets.is_pinned():
            targets = targets.pin_memory()
        images = images.to(self.device, non_blocking=on_cuda)
        targets = targets.to(self.device, non_blocking=on_cuda)
        if self.augment is not None:
            images = self.augment(images)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(dtype=self.dtype, memory_format=fmt).sub_(self.mean).div_(self.std)
        if self.random_erasing is not None:
            images = self.random_erasing(images)
        if self.mixup_fn is not None:
            images, targets = self.mixup_fn(images, targets)
        return images, targets

    def _next(self, it: Iterator[Any]) -> Optional[Batch]:
        """Fetch the next host batch (timing the wait) and start its preparation; None at the end.

        On CUDA both run on the side stream. A loader that decodes on the device
        (:class:`~esam_timm.data.gpu_decode.GpuDecodeLoader`) has decoded the batch on its own stream and
        thread already; taking it only makes this side stream wait for it, on the device.
        """
        start = time.perf_counter()
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            try:
                images, targets = next(it)[:2]
            except StopIteration:
                return None
            finally:
                self.data_wait_s += time.perf_counter() - start
            return self._prepare(images, targets)

    def __iter__(self) -> Iterator[Batch]:
        """Yield device batches; ``data_wait_s`` sums the host time spent waiting for the loader."""
        self.data_wait_s = 0.0
        if self._iterated and not self._epoch_set:
            self.epoch += 1
        self._iterated, self._epoch_set = True, False
        if self.augment is not None:
            self.augment.reseed('device-augment', self.seed, self.rank, self.epoch)
        it = iter(self.loader)
        batch = self._next(it)
        while batch is not None:
            if self.stream is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_stream(self.stream)
                for t in batch:
                    t.record_stream(current)
            upcoming = self._next(it)
            yield batch
            batch = upcoming

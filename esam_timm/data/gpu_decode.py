"""GPU decode backend: JPEG bytes go to the device and are decoded, cropped, flipped and jittered there.

DataLoader workers only read shards, parse each JPEG header and draw timm's random-resized crop
(:class:`~esam_timm.data.decode.EncodedCrop`), shipping one byte tensor per batch
(:func:`~esam_timm.data.decode.pack_encoded`). :class:`GpuDecodeLoader` then, per batch:

1. decodes all images in one batched nvJPEG call (torchvision's ``decode_jpeg(list, device=...)``);
   if that call fails, each image is decoded alone, non-JPEG data (PNG, WebP) on the CPU, and what
   cannot be decoded at all is dropped and counted as a bad sample of its shard (the batch is then
   shorter), as the CPU path counts what PIL cannot read;
2. resizes each crop with torch's antialiased bilinear/bicubic filter (the decoded images differ in
   size, and no batched torch op resizes a ragged batch: this is the one per-image loop, a slice, a
   cast and an interpolate per image, all queued without a host sync);
3. flips and colour-jitters the uint8 batch with :class:`~esam_timm.data.batch_aug.BatchAugment`.

It yields uint8 ``[B, 3, H, W]`` device batches and labels, the contract of the CPU loaders, so
:class:`~esam_timm.data.prefetch.DevicePrefetcher` does the rest as for them (normalise,
channels-last, random erasing, mixup), on its side stream, one batch ahead. On the CPU the same code
runs with ``device='cpu'`` (what the tests use); :func:`create_gpu_train_loader` refuses without CUDA.
"""
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from .batch_aug import BatchAugment
from .decode import INTERPOLATIONS, EncodedBatch
from .bad_data import DataReport
from .sources import ShardSource
from .wds import BadDataTally, create_train_loader

__all__ = ['GpuDecodeLoader', 'check_cuda_device', 'create_gpu_train_loader']


Batch = Tuple[torch.Tensor, torch.Tensor]


def check_cuda_device(device: Union[str, torch.device]) -> torch.device:
    """``device`` as a CUDA device, or ValueError in one line naming the CPU alternative (a bad setting,
    so ``train_esam.py`` reports it as one: exit code 2)."""
    device = torch.device(device)
    if device.type != 'cuda' or not torch.cuda.is_available():
        raise ValueError(f'GPU decode needs a CUDA device (got {str(device)!r}, torch.cuda.is_available() is '
                           f'{torch.cuda.is_available()}): decode on the CPU workers instead with --decode fast')
    return device


class GpuDecodeLoader:
    """Decode a loader's :class:`~esam_timm.data.decode.EncodedBatch` batches on ``device``.

    Args:
        loader: yields ``(EncodedBatch, int64 labels [B])``, e.g. ``create_train_loader(...,
            decode='encoded')``; ``len``, ``set_epoch``, ``data_report`` and the ``mean``, ``std``,
            ``re_*`` attributes that :class:`~esam_timm.data.prefetch.DevicePrefetcher` reads are passed through.
        device: where to decode (CUDA; 'cpu' runs the same code, for tests).
        size: output (height, width) or one int.
        augment: flips and colour jitter applied on the device after the resize.
    Iterating yields ``(uint8 images [B', 3, H, W] on device, int64 labels [B'] on the host)``,
    ``B' < B`` only when some image could not be decoded.
    """

    def __init__(self, loader: Any, device: Union[str, torch.device], size: Union[int, Sequence[int]],
                 augment: Optional[BatchAugment] = None) -> None:
        self.loader = loader
        self.device = torch.device(device)
        self.size = (size, size) if isinstance(size, int) else (int(size[-2]), int(size[-1]))
        self.augment = augment if augment is not None and augment.active else None
        self._reset_bad_data()
        for name in ('mean', 'std', 're_prob', 're_mode', 're_count'):
            if hasattr(loader, name):
                setattr(self, name, getattr(loader, name))

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the host loader (it reshuffles per epoch)."""
        set_epoch = getattr(self.loader, 'set_epoch', None)
        if set_epoch is not None:
            set_epoch(epoch)

    def _reset_bad_data(self) -> None:
        """Start an epoch's count of the images that fail to decode here (``_report``: merged so far)."""
        self._report, self._tally = DataReport(), BadDataTally('undecodable on the device')

    def data_report(self) -> DataReport:
        """The host loader's report with the images that failed to decode here moved from good to bad."""
        pending = self._tally.pop()
        if pending is not None:
            self._report.merge(pending)
        report = self.loader.data_report() if hasattr(self.loader, 'data_report') else DataReport()
        report.samples -= self._report.bad_samples
        report.merge(self._report)
        return report

    def __iter__(self) -> Iterator[Batch]:
        self._reset_bad_data()
        for encoded, labels in self.loader:
            images, kept = self.decode_batch(encoded)
            if images is None:
                continue
            yield images, labels if len(kept) == len(labels) else labels[kept]

    def decode_batch(self, encoded: EncodedBatch) -> Tuple[Optional[torch.Tensor], List[int]]:
        """Decode, crop, resize and augment one batch; (uint8 images or None when none decoded, kept indices)."""
        decoded = self._decode(encoded)
        kept = [k for k, image in enumerate(decoded) if image is not None]
        if not kept:
            return None, kept
        out = torch.empty((len(kept), 3, *self.size), dtype=torch.uint8, device=self.device)
        boxes = encoded.boxes.tolist()
        for row, k in enumerate(kept):
            top, left, height, width, interp = boxes[k]
            crop = decoded[k][:, top:top + height, left:left + width]
            resized = F.interpolate(crop[None].float(), size=self.size, mode=INTERPOLATIONS[interp],
                                    antialias=True, align_corners=False)
            out[row] = resized[0].round_().clamp_(0, 255)
        if self.augment is not None:
            out = self.augment(out)
        return out, kept

    def _decode(self, encoded: EncodedBatch) -> List[Optional[torch.Tensor]]:
        """Each image as uint8 [3, H, W] on the device, None where it cannot be decoded (counted)."""
        datas = encoded.images()
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            pass
        out: List[Optional[torch.Tensor]] = []
        for k, data in enumerate(datas):
            try:
                image = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:
                try:  # not a JPEG nvJPEG reads (PNG, WebP, ...): the CPU decoder, then the device
                    image = decode_image(data, mode=ImageReadMode.RGB).to(self.device)
                except RuntimeError as exc:
                    self._tally.bad_sample(encoded.keys[k], encoded.urls[k], exc)
                    image = None
            out.append(image)
        return out


def create_gpu_train_loader(source: ShardSource, *, device: Union[str, torch.device], batch_size: int,
                            img_size: Union[int, Sequence[int]], hflip: float = 0.5, vflip: float = 0.,
                            color_jitter: Union[float, Sequence[float], None] = 0.4,
                            **kwargs: Any) -> GpuDecodeLoader:
    """The training loader with GPU decode: :func:`~esam_timm.data.wds.create_train_loader` with
    ``decode='encoded'`` (its other arguments pass through) wrapped in a :class:`GpuDecodeLoader`.

    Raises ValueError (one line, naming ``--decode fast``) when ``device`` is not an available CUDA device.
    """
    device = check_cuda_device(device)
    host = create_train_loader(source, batch_size=batch_size, img_size=img_size, hflip=0., vflip=0.,
                               color_jitter=None, decode='encoded', **kwargs)
    return GpuDecodeLoader(host, device, img_size, BatchAugment(hflip, vflip, color_jitter))

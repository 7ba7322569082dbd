"""GPU decode: JPEG bytes go to the device and are decoded, cropped, flipped and jittered there, on a side
stream, while the step of the previous batch runs.

DataLoader workers only read shards, parse each JPEG header and draw timm's random-resized crop
(:class:`~esam_timm.data.decode.EncodedCrop`), shipping one byte tensor per batch
(:func:`~esam_timm.data.decode.pack_encoded`); their stream does not end after an epoch's batches
(``create_train_loader(decode='encoded')``). :class:`GpuDecodeLoader` runs a producer thread that, per
output batch:

1. decodes the images of an encoded batch in one batched TorchCodec call
   (``torchcodec.decoders.decode_jpeg(list, device=...)``: nvJPEG); images the workers marked for the
   host (PNG, WebP, CMYK JPEGs: :func:`~esam_timm.data.decode.needs_host_decode`) are decoded by PIL
   on the host and copied over;
2. resizes each crop with torch's antialiased bilinear/bicubic filter (the decoded images differ in
   size, and no batched torch op resizes a ragged batch: this is the one per-image loop);
3. keeps every batch full: an image that cannot be decoded is counted as a bad sample of its shard and
   its place is taken by the next images of the stream (the rest start the next batch), so each batch
   has exactly ``batch_size`` images and each epoch ``len()`` batches on every rank: timm's Mixup,
   gradient accumulation and DDP never see a short or missing batch;
4. flips and colour-jitters the full uint8 batch with :class:`~esam_timm.data.batch_aug.BatchAugment`,
   drawing from its own generator, seeded per (seed, rank, epoch): the trainer's global RNG is never
   touched from the thread;
5. records a CUDA event on the side stream after its last write and queues the batch (depth 1).

The caller's thread (:class:`~esam_timm.data.prefetch.DevicePrefetcher` one batch ahead of the step)
only takes batches from the queue: no decode and no host sync on its side. The stream rules, kept in
:class:`StreamHandoff`: the producer allocates every tensor it writes while its side stream is current
(TorchCodec decodes and allocates on the current stream, as torch ops do), so the caching allocator
ties the memory to that stream; TorchCodec synchronises the side stream before it returns, which blocks
the producer thread, not the step; the consumer makes its current stream wait for the batch's event and
``record_stream``s the images on it, so their memory is not reused before that stream is done with them.

Only the data can be bad: out of memory, a CUDA fault, or a device that fails on images the host
decodes stop the run with one :class:`~esam_timm.data.bad_data.DataPipelineError` line
(:func:`~esam_timm.data.bad_data.is_resource_failure`); an image the device rejects is decoded by
TorchCodec on the host, and counts as bad data only when the host cannot decode it either.

It yields uint8 ``[B, 3, H, W]`` device batches and host labels, the contract of the CPU loaders, so
DevicePrefetcher does the rest (normalise, channels-last, random erasing, mixup). On the CPU the same
code runs with ``device='cpu'`` (what the tests use); :func:`create_gpu_train_loader` refuses without CUDA.
"""
import contextlib
import functools
import io
import logging
import queue
import threading
from typing import Any, ContextManager, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .bad_data import DataPipelineError, DataReport, is_resource_failure
from .batch_aug import BatchAugment
from .decode import INTERPOLATIONS, EncodedBatch, jpeg_decoder
from .sources import ShardSource
from .wds import BadDataTally, create_train_loader

__all__ = ['GpuDecodeLoader', 'StreamHandoff', 'check_cuda_device', 'check_device_decode', 'create_gpu_train_loader']

_logger = logging.getLogger(__name__)

Batch = Tuple[torch.Tensor, torch.Tensor]
# Log the first images the device rejects but the host decodes, then every Nth (the count is in the log line).
_LOG_FIRST_HOST_FALLBACK, _LOG_EVERY_HOST_FALLBACK = 10, 100
# How often a producer blocked on a full queue looks whether the consumer has gone.
_PUT_POLL_S = 0.1


def check_cuda_device(device: Union[str, torch.device]) -> torch.device:
    """``device`` as a CUDA device, or ValueError in one line naming the CPU alternative (a bad setting,
    so ``train_esam.py`` reports it as one: exit code 2)."""
    device = torch.device(device)
    if device.type != 'cuda' or not torch.cuda.is_available():
        raise ValueError(f'GPU decode needs a CUDA device (got {str(device)!r}, torch.cuda.is_available() is '
                         f'{torch.cuda.is_available()}): decode on the CPU workers instead with --decode fast')
    return device


def _tiny_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new('RGB', (16, 16), (200, 30, 90)).save(buf, format='JPEG')
    return buf.getvalue()


def check_device_decode(device: Union[str, torch.device]) -> None:
    """Decode a small JPEG with TorchCodec on ``device`` once, so that a missing or broken decoder (no
    TorchCodec, a TorchCodec built without nvJPEG, a CUDA library that does not load) stops the run at
    start: ValueError in one line naming what would work."""
    decode = jpeg_decoder()
    try:
        decode([torch.frombuffer(bytearray(_tiny_jpeg()), dtype=torch.uint8)], mode='RGB', device=device)
    except Exception as exc:  # TorchCodec raises RuntimeError; anything else is as fatal here
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f'GPU decode: TorchCodec cannot decode JPEGs on {device} ({type(exc).__name__}: '
                         f'{first_line}); check the TorchCodec install for this torch and CUDA, or decode on the '
                         f'CPU workers with --decode fast') from None


def _first_line(exc: BaseException) -> str:
    return f'{type(exc).__name__}: {(str(exc).strip().splitlines() or [""])[0]}'


class StreamHandoff:
    """The CUDA stream rules between the decode thread (producer) and the thread that takes its batches.

    On a CPU device every method does nothing but is still called in the same order, so a test can
    record the order (see ``tests/test_gpu_decode.py``).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device) if device.type == 'cuda' else None

    def producing(self) -> ContextManager[Any]:
        """The producer thread's context: its device and its side stream current, so that every tensor
        it allocates and writes belongs to the side stream."""
        if self.stream is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self.device))
        stack.enter_context(torch.cuda.stream(self.stream))
        return stack

    def publish(self) -> Optional[torch.cuda.Event]:
        """After the producer's last write of a batch: an event on the side stream (no host sync)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def receive(self, event: Optional[torch.cuda.Event], tensors: Sequence[torch.Tensor]) -> None:
        """On the consumer: its current stream waits for ``event`` (on the device, not the host) and each
        tensor is marked as used by that stream, so the allocator keeps its memory until the stream is done."""
        if event is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for tensor in tensors:
            tensor.record_stream(current)


class _Ready(NamedTuple):
    """One batch from the producer: full, augmented, with the bad data met since the previous one."""
    images: torch.Tensor
    labels: torch.Tensor
    device_bad: Optional[DataReport]
    host_report: Optional[DataReport]
    event: Optional[torch.cuda.Event]


class _Failed(NamedTuple):
    error: BaseException


class _Producer:
    """The decode thread of one epoch and the queue it fills; :meth:`get` re-raises its error here."""

    def __init__(self, target: Any, depth: int = 1) -> None:
        self.queue: 'queue.Queue[Union[_Ready, _Failed]]' = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(target,), name='esam-gpu-decode', daemon=True)
        self.thread.start()

    def _run(self, target: Any) -> None:
        try:
            for item in target(self.stop):
                if not self.put(item):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            self.put(_Failed(exc))

    def put(self, item: Union[_Ready, _Failed]) -> bool:
        """Queue ``item``; False when the consumer has gone (then the producer ends)."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=_PUT_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> _Ready:
        item = self.queue.get()
        if isinstance(item, _Failed):
            raise item.error
        return item

    def close(self) -> None:
        """Stop the producer (it ends at its next step) and drop what it queued."""
        self.stop.set()
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.thread.join(timeout=10)


class GpuDecodeLoader:
    """Decode a loader's :class:`~esam_timm.data.decode.EncodedBatch` batches on ``device``, a batch ahead.

    Args:
        loader: yields ``(EncodedBatch, int64 labels [B])`` without end, e.g. ``create_train_loader(...,
            decode='encoded')``; its ``len`` is this loader's, and ``set_epoch``, ``data_report`` and the
            ``mean``, ``std``, ``re_*`` attributes that :class:`~esam_timm.data.prefetch.DevicePrefetcher`
            reads are passed through.
        device: where to decode (CUDA; 'cpu' runs the same code, for tests).
        size: output (height, width) or one int.
        batch_size: images per output batch (the encoded batches' size).
        augment: flips and colour jitter applied on the device to each full batch; its generator is
            reseeded every epoch from ``seed``, ``rank`` and the epoch.
        handoff: the stream rules (default :class:`StreamHandoff` on ``device``).
    Iterating yields exactly ``len(loader)`` batches of ``(uint8 images [batch_size, 3, H, W] on device,
    int64 labels [batch_size] on the host)``. Raises RuntimeError when ``loader`` ends before that.
    """

    def __init__(self, loader: Any, device: Union[str, torch.device], size: Union[int, Sequence[int]],
                 augment: Optional[BatchAugment] = None, *, batch_size: int, seed: int = 0, rank: int = 0,
                 handoff: Optional[StreamHandoff] = None) -> None:
        if batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {batch_size}')
        self.loader = loader
        self.device = torch.device(device)
        if self.device.type == 'cuda' and self.device.index is None:  # the thread would default to cuda:0
            self.device = torch.device('cuda', torch.cuda.current_device())
        self.size = (size, size) if isinstance(size, int) else (int(size[-2]), int(size[-1]))
        self.batch_size = batch_size
        self.augment = augment if augment is not None and augment.active else None
        self.seed, self.rank = seed, rank
        self.handoff = handoff if handoff is not None else StreamHandoff(self.device)
        self.epoch, self._epoch_set, self._iterated = 0, False, False
        self._delivered = 0
        self._device_bad = DataReport()
        self._host_report: Optional[DataReport] = None
        self._host_fallbacks = 0
        for name in ('mean', 'std', 're_prob', 're_mode', 're_count'):
            if hasattr(loader, name):
                setattr(self, name, getattr(loader, name))

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next iteration: the host loader's shuffle and this loader's augmentation draws."""
        self.epoch, self._epoch_set = epoch, True
        set_epoch = getattr(self.loader, 'set_epoch', None)
        if set_epoch is not None:
            set_epoch(epoch)

    def data_report(self) -> DataReport:
        """This epoch so far: the samples delivered in batches, the host's bad data (of the encoded batches
        taken) and the images that could not be decoded here. Complete once the last batch was handed out."""
        report = self._host_report.copy() if self._host_report is not None else DataReport()
        report.samples = self._delivered
        report.merge(self._device_bad)
        return report

    def __iter__(self) -> Iterator[Batch]:
        if self._iterated and not self._epoch_set:
            self.epoch += 1
        self._iterated, self._epoch_set = True, False
        self._delivered, self._device_bad, self._host_report = 0, DataReport(), None
        if self.augment is not None:
            self.augment.reseed('gpu-decode', self.seed, self.rank, self.epoch)
        # The host iterator is opened here, not in the thread: a DataLoader draws its base seed from the global RNG.
        host = iter(self.loader)
        return self._consume(_Producer(functools.partial(self._produce, host)), host)

    def _consume(self, producer: _Producer, host: Iterator[Any]) -> Iterator[Batch]:
        """Hand out the producer's batches; at the end stop it and close the host iterator here, in the thread
        that opened it (its DataLoader workers stop now, not whenever the last reference goes)."""
        try:
            for _ in range(len(self)):
                ready = producer.get()
                if ready.device_bad is not None:
                    self._device_bad.merge(ready.device_bad)
                if ready.host_report is not None:
                    self._host_report = ready.host_report
                self._delivered += len(ready.labels)
                self.handoff.receive(ready.event, (ready.images,))
                yield ready.images, ready.labels
        finally:
            producer.close()
            close = getattr(host, 'close', None)  # a generator (WdsLoader's) closes its DataLoader iterator
            if close is not None and not producer.thread.is_alive():
                close()

    def _produce(self, host: Iterator[Any], stop: threading.Event) -> Iterator[_Ready]:
        """The producer thread's work: ``len(self)`` full, augmented batches, refilled after bad images."""
        tally = BadDataTally('undecodable on the device')
        host_report = getattr(self.loader, 'data_report', None)
        images_parts: List[torch.Tensor] = []
        label_parts: List[torch.Tensor] = []
        pending, taken = 0, 0
        with self.handoff.producing():
            for _ in range(len(self)):
                while pending < self.batch_size:
                    if stop.is_set():
                        return
                    try:
                        encoded, labels = next(host)
                    except StopIteration:
                        raise RuntimeError(f'the encoded-batch loader ended after {taken} batches, before '
                                           f'{len(self)} full batches were decoded: GPU decode needs a stream that '
                                           f'does not end (create_train_loader(decode="encoded"))') from None
                    taken += 1
                    images, kept = self.decode_batch(encoded, tally)
                    if images is not None:
                        images_parts.append(images)
                        label_parts.append(labels if len(kept) == len(labels) else labels[kept])
                        pending += len(kept)
                images, labels = _take(images_parts, label_parts, self.batch_size)
                pending -= self.batch_size
                if self.augment is not None:
                    images = self.augment(images)
                event = self.handoff.publish()
                yield _Ready(images, labels, tally.pop(), host_report() if host_report is not None else None, event)

    def decode_batch(self, encoded: EncodedBatch,
                     tally: Optional[BadDataTally] = None) -> Tuple[Optional[torch.Tensor], List[int]]:
        """Decode, crop and resize one encoded batch: (uint8 images [k, 3, H, W] or None when none decoded,
        the indices of the k decoded images). Undecodable images go to ``tally``."""
        tally = tally if tally is not None else BadDataTally('undecodable on the device')
        decoded = self._decode(encoded, tally)
        kept = [k for k, image in enumerate(decoded) if image is not None]
        if not kept:
            return None, kept
        out = torch.empty((len(kept), 3, *self.size), dtype=torch.float32, device=self.device)
        boxes = encoded.boxes.tolist()
        for row, k in enumerate(kept):
            top, left, height, width, interp = boxes[k][:5]
            crop = decoded[k][:, top:top + height, left:left + width]
            out[row] = F.interpolate(crop[None].float(), size=self.size, mode=INTERPOLATIONS[interp],
                                     antialias=True, align_corners=False)[0]
        return out.round_().clamp_(0, 255).to(torch.uint8), kept

    def _decode(self, encoded: EncodedBatch, tally: BadDataTally) -> List[Optional[torch.Tensor]]:
        """Each image as uint8 [3, H, W] on the device, None where it cannot be decoded (counted)."""
        datas = encoded.images()
        host = encoded.boxes[:, 5].tolist() if encoded.boxes.shape[1] > 5 else [0] * len(datas)
        out: List[Optional[torch.Tensor]] = [None] * len(datas)
        on_device = [k for k in range(len(datas)) if not host[k]]
        if on_device:
            for k, image in zip(on_device, self._decode_on_device([datas[k] for k in on_device],
                                                                  [encoded.keys[k] for k in on_device],
                                                                  [encoded.urls[k] for k in on_device], tally)):
                out[k] = image
        for k in range(len(datas)):
            if host[k]:
                out[k] = self._decode_with_pil(datas[k], encoded.keys[k], encoded.urls[k], tally)
        return out

    def _pipeline_error(self, exc: BaseException, what: str) -> DataPipelineError:
        advice = ('lower -b or leave more memory to the decoder' if 'memory' in str(exc).lower()
                  or isinstance(exc, MemoryError) else 'check the GPU and the TorchCodec install, or decode on '
                  'the CPU workers with --decode fast')
        return DataPipelineError(f'GPU decode on {self.device} failed on {what} ({_first_line(exc)}): the device or '
                                 f'its decoder failed, not the data, so nothing is counted as bad; {advice}')

    def _decode_on_device(self, datas: List[torch.Tensor], keys: List[str], urls: List[str],
                          tally: BadDataTally) -> List[Optional[torch.Tensor]]:
        """One batched TorchCodec call; when it fails on the data, each image alone, and the host's decoder
        decides what is bad: an image it decodes too is not bad data (it is decoded there)."""
        decode = jpeg_decoder()
        try:
            return list(decode(datas, mode='RGB', device=self.device))
        except Exception as exc:
            if is_resource_failure(exc):
                raise self._pipeline_error(exc, f'a batch of {len(datas)} images') from exc
        out: List[Optional[torch.Tensor]] = []
        rejected: List[Tuple[int, BaseException]] = []
        for k, data in enumerate(datas):
            try:
                out.append(decode(data, mode='RGB', device=self.device))
            except Exception as exc:
                if is_resource_failure(exc):
                    raise self._pipeline_error(exc, f'sample {keys[k]!r} of {urls[k]}') from exc
                out.append(None)
                rejected.append((k, exc))
        decoded_on_host = 0
        for k, device_error in rejected:
            try:
                image = decode(datas[k], mode='RGB')
            except Exception as exc:
                if is_resource_failure(exc):
                    raise self._pipeline_error(exc, f'sample {keys[k]!r} of {urls[k]} on the host') from exc
                tally.bad_sample(keys[k], urls[k], exc)
                continue
            out[k] = image.to(self.device)
            decoded_on_host += 1
            self._host_fallbacks += 1
            n = self._host_fallbacks
            if n <= _LOG_FIRST_HOST_FALLBACK or n % _LOG_EVERY_HOST_FALLBACK == 0:
                _logger.warning('the device could not decode sample %r of %s (%s), which the host decodes: decoded '
                                'on the host (%d so far)', keys[k], urls[k], _first_line(device_error), n)
        if len(datas) > 1 and decoded_on_host == len(datas):
            raise self._pipeline_error(rejected[0][1], f'every image of a batch of {len(datas)} that the host '
                                                       f'decodes')
        return out

    def _decode_with_pil(self, data: torch.Tensor, key: str, url: str,
                         tally: BadDataTally) -> Optional[torch.Tensor]:
        """An image the workers marked for the host (not an RGB or greyscale JPEG): PIL, as timm decodes it."""
        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
                pixels = np.array(img.convert('RGB'))
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError...
            if is_resource_failure(exc):
                raise self._pipeline_error(exc, f'sample {key!r} of {url} on the host') from exc
            tally.bad_sample(key, url, exc)
            return None
        return torch.from_numpy(pixels).permute(2, 0, 1).to(self.device)


def _take(images: List[torch.Tensor], labels: List[torch.Tensor], count: int) -> Batch:
    """The first ``count`` pending images and labels; the rest stay pending (lists changed in place)."""
    if len(images) == 1 and images[0].shape[0] == count:
        return images.pop(), labels.pop()
    all_images, all_labels = torch.cat(images), torch.cat(labels)
    images[:] = [all_images[count:]] if all_images.shape[0] > count else []
    labels[:] = [all_labels[count:]] if all_labels.shape[0] > count else []
    return all_images[:count], all_labels[:count]


def create_gpu_train_loader(source: ShardSource, *, device: Union[str, torch.device], batch_size: int,
                            img_size: Union[int, Sequence[int]], hflip: float = 0.5, vflip: float = 0.,
                            color_jitter: Union[float, Sequence[float], None] = 0.4, seed: int = 42, rank: int = 0,
                            **kwargs: Any) -> GpuDecodeLoader:
    """The training loader with GPU decode: :func:`~esam_timm.data.wds.create_train_loader` with
    ``decode='encoded'`` (its other arguments pass through) wrapped in a :class:`GpuDecodeLoader`.

    Raises ValueError (one line, naming ``--decode fast``) when ``device`` is not an available CUDA device,
    or when TorchCodec cannot decode a JPEG there.
    """
    device = check_cuda_device(device)
    check_device_decode(device)
    host = create_train_loader(source, batch_size=batch_size, img_size=img_size, hflip=0., vflip=0.,
                               color_jitter=None, decode='encoded', seed=seed, rank=rank, **kwargs)
    return GpuDecodeLoader(host, device, img_size, BatchAugment(hflip, vflip, color_jitter), batch_size=batch_size,
                           seed=seed, rank=rank)

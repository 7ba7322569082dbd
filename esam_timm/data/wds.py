"""Training and validation pipelines over WebDataset shards, with per-epoch bad-data accounting.

Sources come from :mod:`esam_timm.data.sources`, shard bytes from :mod:`esam_timm.data.tar`.

Training streams are infinite (each (rank, worker) stream walks its share of an epoch-seeded shard
permutation, then resamples shards) and cut after a fixed batch count, so every rank yields exactly
``ceil(num_samples / (batch_size * world_size))`` batches per epoch whatever the shard sizes: no DDP
hang at an epoch end. Validation reads every sample exactly once across all ranks and workers, also
with uneven shards or fewer shards than streams; its per-rank batch counts may differ, so the caller
sums its metrics once at the end with :func:`esam_timm.distributed.all_reduce_sum`.

Batches are ``(uint8 images [B, 3, H, W], int64 labels [B])``; normalisation, random erasing and
mixup happen on the device (see :mod:`esam_timm.data.prefetch`). ``create_train_loader(decode=...)``
picks how training images are decoded: ``'pil'`` (timm's transform), ``'fast'`` (the same draws,
decoded by :mod:`esam_timm.data.decode`) or ``'encoded'`` (header and crop only, for
:mod:`esam_timm.data.gpu_decode`). Bad data (an undecodable image, a
sample without a label, an unreadable or truncated shard) is skipped without sleeping and counted, and
the stream refills the batch, so training batches are always full:
each worker sends the counts it gathered since its last batch along with the next one (nothing is
shared between processes, no per-sample round trip), and :meth:`WdsLoader.data_report` sums them
into the epoch's :class:`~esam_timm.data.bad_data.DataReport` (rules in :mod:`esam_timm.data.bad_data`).
Per-sample warnings are rate-limited; the report's totals are exact. A failure that is not the data's
(out of memory, a decoder that cannot run: :func:`~esam_timm.data.bad_data.is_resource_failure`) stops
the iteration with one :class:`~esam_timm.data.bad_data.DataPipelineError` naming the sample.
"""
import io
import json
import logging
import math
import multiprocessing as mp
import random
from itertools import islice
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .bad_data import DataPipelineError, DataReport, is_resource_failure
from .decode import EncodedCrop, FastTrainTransform, image_member, jpeg_decoder, pack_encoded
from .prefetch import LabelRangeError
from .sources import INFO_NAME, ShardSource
from .tar import ShardReadError, describe_error, read_shard
from .workers import ignore_stop_signals, signals_held_context

__all__ = ['DECODE_MODES', 'DEFAULT_IMAGE_KEY', 'DEFAULT_LABEL_KEY', 'WdsLoader', 'WdsTrainDataset', 'WdsValDataset', 'collate',
           'create_train_loader', 'create_val_loader']

_logger = logging.getLogger(__name__)

DEFAULT_IMAGE_KEY = 'jpg;jpeg;png;webp'
DEFAULT_LABEL_KEY = 'cls'
# How the training pipeline decodes: timm's PIL transform, the fast CPU path, or header-only for GPU decode.
DECODE_MODES = ('pil', 'fast', 'encoded')
# Log a worker's first bad samples of an epoch one by one, then every Nth, so a broken dataset cannot
# flood the log; the epoch's DataReport has the exact count.
_LOG_FIRST_BAD, _LOG_EVERY_BAD = 10, 100
# A stream with this many failures in a row is not "some bad data" but a broken source or config.
_MAX_CONSECUTIVE_BAD_SAMPLES = 1000

Batch = Tuple[torch.Tensor, torch.Tensor]
# What a dataset hands to the DataLoader: (images, labels, bad data since the last item or None, a fatal
# error or None); images and labels are None in the item that closes a worker's stream. A label outside
# the model's classes and a failure of the machine are fatal errors: they travel as exceptions of their own
# type, so the trainer gets one message naming the sample and its shard instead of a worker's traceback.
_FatalError = Union[LabelRangeError, DataPipelineError]
_Item = Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[DataReport], Optional[_FatalError]]


class BadDataTally:
    """The bad data one stream met since its last batch, and that stream's rate-limited log.

    ``where`` names the stream in the log line (a loader worker; the GPU decoder on the device).
    """

    def __init__(self, where: str = 'in this worker') -> None:
        self.where = where
        self._pending = DataReport()
        self._bad_samples_seen = 0
        self._shards_logged: Set[str] = set()

    def bad_sample(self, key: str, url: str, exc: BaseException) -> None:
        """Count one unusable sample of shard ``url`` and log it (the first few, then every Nth)."""
        self._pending.add_bad_samples(url)
        self._bad_samples_seen += 1
        n = self._bad_samples_seen
        if n <= _LOG_FIRST_BAD or n % _LOG_EVERY_BAD == 0:
            _logger.warning('skipped bad sample %r of %s: %s (%d %s this epoch; the epoch report has the total)',
                            key, url, describe_error(exc), n, self.where)

    def bad_shard(self, url: str, error: str, missing: int) -> None:
        """Record a shard that failed or ended short, with the samples it did not deliver; log it once."""
        self._pending.add_bad_shard(url, error)
        self._pending.add_bad_samples(url, missing)
        if url not in self._shards_logged:
            self._shards_logged.add(url)
            _logger.warning('could not read shard %s in full: %s (%d samples lost)', url, error, missing)

    def pop(self) -> Optional[DataReport]:
        """The bad data gathered since the last call, or None when there was none."""
        if not self._pending.has_bad_data():
            return None
        delta, self._pending = self._pending, DataReport()
        return delta


def _read_counted(url: str, tally: BadDataTally, length: Optional[int], stride: int = 1,
                  offset: int = 0, limit: Optional[int] = None) -> Iterator[Dict[str, Any]]:
    """Samples ``offset::stride`` of one shard; a shard that fails, or ends short of ``length``, goes to ``tally``.

    The samples it did not deliver (of this stream's slice) count as bad: all the missing ones when
    ``length`` is known, else only the one a break cut in two. With ``limit`` only the shard's first
    ``limit`` samples are read (a validation subset).
    """
    if limit is not None:
        length = limit if length is None else min(length, limit)
    count, error, partial_sample = 0, None, False
    try:
        for sample in read_shard(url):
            if limit is not None and count >= limit:
                break
            if count % stride == offset:
                yield sample
            count += 1
    except ShardReadError as exc:
        error, partial_sample = describe_error(exc.cause), exc.partial
    if length is not None and count < length:
        missing = len(range(offset, length, stride)) - len(range(offset, count, stride))
        error = error or f'ended after {count} of the {length} samples listed in {INFO_NAME}'
    else:
        missing = int(partial_sample and count % stride == offset)
    if error is not None:
        tally.bad_shard(url, error, missing)


def _parse_label(sample: Dict[str, Any], label_key: str) -> int:
    """Read the label: ``member`` holds an integer as text; ``member:field`` is a field of a JSON member."""
    member, _, field_name = label_key.partition(':')
    if member not in sample:
        raise KeyError(f'no {member!r} member for the label')
    raw = sample[member]
    if field_name:
        meta = json.loads(raw)
        if field_name not in meta:
            raise KeyError(f'no field {field_name!r} in the {member!r} member')
        return int(meta[field_name])
    return int(raw.decode('utf-8').strip())


def _decode_image(sample: Dict[str, Any], image_keys: Sequence[str]) -> Image.Image:
    for key in image_keys:
        if key in sample:
            data = sample[key]
            try:
                with Image.open(io.BytesIO(data)) as img:
                    return img.convert('RGB')
            except UnidentifiedImageError:  # its own message names only the in-memory buffer
                raise UnidentifiedImageError(f'the {key!r} member ({len(data)} bytes, starting {data[:8]!r}) is not '
                                             f'an image format PIL can read') from None
    raise KeyError(f'no image member among {list(image_keys)}')


def _decode_samples(
        samples: Iterable[Dict[str, Any]],
        *,
        transform: Optional[Callable[[Any], Any]],
        image_keys: Sequence[str],
        label_key: str,
        tally: BadDataTally,
        num_classes: Optional[int] = None,
        reader: Callable[[Dict[str, Any], Sequence[str]], Any] = _decode_image,
) -> Iterator[Tuple[Any, int]]:
    """Decode, label and transform raw samples, skipping (and counting in ``tally``) the ones that fail.

    ``reader(sample, image_keys)`` gets the image (a PIL image by default); ``transform``, when not None,
    makes the batch item of it.

    Raises :class:`~esam_timm.data.bad_data.DataPipelineError` after many failures in a row (a broken
    source or configuration, not some bad data) and when the machine, not the sample, failed; and
    :class:`LabelRangeError` for a label outside ``[0, num_classes)``, naming the sample and its shard.
    """
    failures = 0
    for sample in samples:
        try:
            label = _parse_label(sample, label_key)
            image = reader(sample, image_keys)
            if transform is not None:
                image = transform(image)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            if is_resource_failure(exc):
                first_line = (str(exc).strip().splitlines() or [''])[0]
                raise DataPipelineError(
                    f'a loader worker failed on sample {sample.get("__key__")!r} of {sample.get("__url__")} '
                    f'({type(exc).__name__}: {first_line}): the machine or the decoder failed, not the data, so '
                    f'nothing is counted as bad; give the workers more memory (fewer --workers, a smaller batch) '
                    f'or fix the decoder install') from exc
            tally.bad_sample(sample.get('__key__', '?'), sample.get('__url__', '?'), exc)
            failures += 1
            if failures >= _MAX_CONSECUTIVE_BAD_SAMPLES:
                raise DataPipelineError(
                    f'{failures} bad samples in a row (last: {sample.get("__key__")!r} of '
                    f'{sample.get("__url__")}: {exc!r}): a broken source or configuration, not some bad data; '
                    f'check image_key={list(image_keys)} and label_key={label_key!r}') from exc
            continue
        if num_classes is not None and not 0 <= label < num_classes:
            raise LabelRangeError(
                f'sample {sample.get("__key__")!r} of shard {sample.get("__url__")} has label {label}, outside the '
                f'{num_classes} classes of the model (labels must be in [0, {num_classes})): pass the --num-classes '
                f'the data has, or fix the labels')
        failures = 0
        yield image, label


def collate(samples: Sequence[Tuple[torch.Tensor, int]]) -> Batch:
    """Stack (uint8 CHW image, label) pairs into uint8 images [B, C, H, W] and int64 labels [B].

    timm's ``MaybePILToTensor`` returns CHW views of HWC memory; stacking them as HWC is a plain
    copy, and the batch comes out in channels-last layout, which the device path keeps. Inside a
    worker the batch is built in shared memory, saving the DataLoader's copy into it.
    """
    hwc = [s[0].permute(1, 2, 0) for s in samples]
    shape = (len(hwc), *hwc[0].shape)
    out = None
    if get_worker_info() is not None:  # as torch's default_collate does
        out = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(math.prod(shape))).view(shape)
    images = torch.stack(hwc, out=out).permute(0, 3, 1, 2)
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    return images, labels


def _worker_info() -> Tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _image_keys(image_key: Union[str, Sequence[str]]) -> List[str]:
    keys = image_key.split(';') if isinstance(image_key, str) else list(image_key)
    keys = [k.strip().lower() for k in keys if k.strip()]
    if not keys:
        raise ValueError(f'image_key {image_key!r} names no member; e.g. "jpg" or "jpg;png"')
    return keys


def _check_label_key(label_key: str) -> str:
    member, sep, field_name = label_key.partition(':')
    if not member or (sep and not field_name):
        raise ValueError(f'label_key {label_key!r} is invalid; use a member such as "cls" or "json:label"')
    return label_key


def _shard_stream(urls: Sequence[str], seed: int, epoch: int, stream: int, num_streams: int,
                  rng: random.Random) -> Iterator[str]:
    """This stream's share of an epoch-seeded shard permutation, then shards resampled forever.

    The permutation is the same on all ranks (seeded by seed and epoch only) and dealt round-robin,
    so an epoch covers the shards about evenly; resampling keeps every stream from running dry.
    """
    order = list(range(len(urls)))
    random.Random(f'shards/{seed}/{epoch}').shuffle(order)
    for i in order[stream::num_streams]:
        yield urls[i]
    while True:
        yield urls[rng.randrange(len(urls))]


def _samples_from_shards(urls: Iterable[str], tally: BadDataTally, lengths: Dict[str, int],
                         max_empty: int) -> Iterator[Dict[str, Any]]:
    """Samples of the given shards in order; raises :class:`~esam_timm.data.bad_data.DataPipelineError`
    after ``max_empty`` empty shards in a row (a broken source, not some bad data)."""
    empty = 0
    for url in urls:
        count = 0
        for sample in _read_counted(url, tally, lengths.get(url)):
            count += 1
            yield sample
        empty = 0 if count else empty + 1
        if empty >= max_empty:
            raise DataPipelineError(f'{empty} shards in a row gave no samples (last: {url}); check the data source')


class _WdsDataset(IterableDataset):
    """What both pipelines share: the shards, decoding, batching, and the bad-data counts that go with the batches.

    Each DataLoader worker (or the calling process) yields ``(images, labels, DataReport or None)``:
    the report holds the bad data met since the previous batch, and a last ``(None, None, report)``
    item carries what came after the last batch. :class:`WdsLoader` folds them into the epoch report.
    """

    def __init__(self, source: ShardSource, *, batch_size: int, transform: Optional[Callable[[Any], Any]],
                 rank: int, world_size: int, image_keys: Sequence[str], label_key: str,
                 num_classes: Optional[int] = None,
                 reader: Callable[[Dict[str, Any], Sequence[str]], Any] = _decode_image,
                 collate_fn: Callable[[Sequence[Tuple[Any, int]]], Any] = collate) -> None:
        super().__init__()
        self.urls = list(source.urls)
        self.lengths: Dict[str, int] = dict(zip(self.urls, source.shard_lengths or ()))
        self.batch_size = batch_size
        self.transform = transform
        self.rank = rank
        self.world_size = world_size
        self.image_keys = list(image_keys)
        self.label_key = label_key
        self.num_classes = num_classes
        self.reader = reader
        self.collate_fn = collate_fn

    def _batches(self, samples: Iterable[Dict[str, Any]], tally: BadDataTally, partial_batch: bool) -> Iterator[Batch]:
        decoded = _decode_samples(samples, transform=self.transform, image_keys=self.image_keys,
                                  label_key=self.label_key, tally=tally, num_classes=self.num_classes,
                                  reader=self.reader)
        return wds.batched(self.batch_size, collation_fn=self.collate_fn, partial=partial_batch)(decoded)

    @staticmethod
    def _with_reports(batches: Iterable[Batch], tally: BadDataTally) -> Iterator[_Item]:
        try:
            for images, labels in batches:
                yield images, labels, tally.pop(), None
        except (LabelRangeError, DataPipelineError) as exc:
            yield None, None, tally.pop(), type(exc)(str(exc))  # the message alone crosses the process boundary
            return
        tail = tally.pop()
        if tail is not None:
            yield None, None, tail, None


class WdsTrainDataset(_WdsDataset):
    """Per-worker training pipeline: shards -> shuffle buffer -> decode/transform -> batches.

    Each DataLoader worker yields its share of ``batches_per_rank`` full batches per epoch, or, when
    ``endless``, batches for as long as it is asked (GPU decode takes a few more to refill the batches
    that lost an undecodable image). All randomness (shard order, shuffle buffer and, inside worker
    processes, the augmentations) is seeded from (seed, epoch, rank, worker): runs reproduce and every
    epoch reshuffles. A reader with its own RNG (``reseed``, GPU decode's crop draws) is seeded from the
    same, in the calling process too.
    """

    def __init__(self, source: ShardSource, *, batches_per_rank: int, seed: int, shuffle_buffer: int,
                 shuffle_initial: int, endless: bool = False, **common: Any) -> None:
        super().__init__(source, **common)
        self.batches_per_rank = batches_per_rank
        self.endless = endless
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_initial = shuffle_initial
        self._epoch = mp.Value('q', 0)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle the next iteration uses (also seen by persistent workers)."""
        self._epoch.value = epoch

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def __iter__(self) -> Iterator[_Item]:
        worker, num_workers = _worker_info()
        num_batches = None if self.endless else len(range(worker, self.batches_per_rank, num_workers))
        if num_batches == 0:
            return iter(())
        epoch = self.epoch
        stream = self.rank * num_workers + worker
        num_streams = self.world_size * num_workers
        rng = random.Random(f'stream/{self.seed}/{epoch}/{stream}/{num_streams}')
        reseed = getattr(self.reader, 'reseed', None)
        if reseed is not None:
            reseed(random.Random(f'reader/{self.seed}/{epoch}/{stream}/{num_streams}').getrandbits(64))
        if get_worker_info() is not None:
            # Augmentations draw from the global RNGs; in a worker process those are ours to seed.
            aug_seed = rng.getrandbits(32)
            random.seed(aug_seed)
            np.random.seed(aug_seed)
            torch.manual_seed(aug_seed)
        tally = BadDataTally()
        shards = _shard_stream(self.urls, self.seed, epoch, stream, num_streams, rng)
        samples = _samples_from_shards(shards, tally, self.lengths, max_empty=max(10, 2 * len(self.urls)))
        shuffled = wds.shuffle(self.shuffle_buffer, self.shuffle_initial, rng=rng)(samples)
        return self._with_reports(islice(self._batches(shuffled, tally, partial_batch=False), num_batches), tally)


def _val_assignment(num_shards: int, stream: int, num_streams: int) -> List[Tuple[int, int, int]]:
    """(shard index, stride, offset) triples: this stream reads samples ``offset::stride`` of each shard.

    With at least as many shards as streams, shards are dealt round-robin (stride 1). With fewer,
    each shard is shared by the streams congruent to it modulo ``num_shards``, which interleave
    its samples; either way every sample belongs to exactly one stream.
    """
    if num_shards >= num_streams:
        return [(i, 1, 0) for i in range(stream, num_shards, num_streams)]
    shard = stream % num_shards
    return [(shard, len(range(shard, num_streams, num_shards)), stream // num_shards)]


class WdsValDataset(_WdsDataset):
    """Per-worker validation pipeline: this stream's samples, in shard order, decoded and batched.

    A source whose ``num_samples`` is below the sum of its shard lengths is read as that many samples:
    the first shards in order, the last one cut (``--val-num-samples``).
    """

    def __init__(self, source: ShardSource, **kwargs: Any) -> None:
        source, self.limits = _leading_subset(source)
        super().__init__(source, **kwargs)

    def __iter__(self) -> Iterator[_Item]:
        worker, num_workers = _worker_info()
        parts = _val_assignment(len(self.urls), self.rank * num_workers + worker, self.world_size * num_workers)
        tally = BadDataTally()
        samples = (sample for shard, stride, offset in parts
                   for sample in _read_counted(self.urls[shard], tally, self.lengths.get(self.urls[shard]),
                                               stride, offset, self.limits.get(self.urls[shard])))
        return self._with_reports(self._batches(samples, tally, partial_batch=True), tally)


def _leading_subset(source: ShardSource) -> Tuple[ShardSource, Dict[str, int]]:
    """The first ``source.num_samples`` samples of a source with known shard lengths, as a source over the
    shards they lie in (the last one's length cut) and that shard's read limit; other sources unchanged."""
    lengths = source.shard_lengths
    if lengths is None or source.num_samples >= sum(lengths):
        return source, {}
    kept, remaining = [], source.num_samples
    for url, length in zip(source.urls, lengths):
        if remaining <= 0:
            break
        kept.append((url, min(length, remaining)))
        remaining -= length
    urls, cut = [u for u, _ in kept], [n for _, n in kept]
    limits = {urls[-1]: cut[-1]} if cut[-1] < lengths[len(cut) - 1] else {}
    return ShardSource(urls, source.num_samples, cut, source.name), limits


def _val_batches_per_rank(source: ShardSource, batch_size: int, rank: int, world_size: int,
                          num_workers: int) -> int:
    """Exact batch count of this rank when shard lengths are known, else an even-split estimate."""
    source, _ = _leading_subset(source)
    if source.shard_lengths is None:
        return math.ceil(source.num_samples / world_size / batch_size)
    workers = max(1, num_workers)
    total = 0
    for worker in range(workers):
        parts = _val_assignment(len(source.urls), rank * workers + worker, world_size * workers)
        count = sum(len(range(offset, source.shard_lengths[shard], stride)) for shard, stride, offset in parts)
        total += math.ceil(count / batch_size)
    return total


class WdsLoader:
    """A DataLoader over a WebDataset pipeline with a fixed ``len()``, epoch control and a bad-data report.

    Iterating yields ``(uint8 images [B, 3, H, W], int64 labels [B])``. Training loaders yield
    exactly ``len(self)`` batches per epoch on every rank; validation loaders yield each of their
    samples once (``len`` is exact when shard lengths are known, an estimate otherwise).
    :meth:`data_report` tells what the current epoch read and lost. Attributes ``mean``, ``std`` and
    the random-erasing settings ``re_prob``, ``re_mode``, ``re_count`` are read by
    :class:`~esam_timm.data.prefetch.DevicePrefetcher`.
    """

    def __init__(self, dataset: Union[WdsTrainDataset, WdsValDataset], *, num_batches: int, num_workers: int,
                 pin_memory: bool, prefetch_factor: Optional[int], persistent_workers: bool,
                 mean: Sequence[float], std: Sequence[float], re_prob: float = 0., re_mode: str = 'const',
                 re_count: int = 1) -> None:
        self.dataset = dataset
        self.num_batches = num_batches
        self.mean, self.std = tuple(mean), tuple(std)
        self.re_prob, self.re_mode, self.re_count = re_prob, re_mode, re_count
        self._epoch_set = False
        self._iterated = False
        self._report = DataReport()
        self.loader = DataLoader(
            dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            persistent_workers=persistent_workers and num_workers > 0,
            worker_init_fn=ignore_stop_signals,  # the trainer alone answers SIGINT/SIGTERM (see .workers)
            multiprocessing_context=signals_held_context() if num_workers > 0 else None)

    def __len__(self) -> int:
        return self.num_batches

    def data_report(self) -> DataReport:
        """This rank's :class:`~esam_timm.data.bad_data.DataReport` of the current epoch, summed over its workers.

        Each iteration (epoch) starts an empty report. A training report is complete when the
        epoch's last batch has been handed out; a validation report when the iteration has ended
        (a worker may meet bad data after its last batch; ``DevicePrefetcher`` reads one batch
        ahead, so through it both are complete with the last batch). Returns a copy; merge the
        ranks' reports with :func:`~esam_timm.data.bad_data.reduce_data_report`.
        """
        return self._report.copy()

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the next iteration (training); without a call, each iteration advances it."""
        if isinstance(self.dataset, WdsTrainDataset):
            self.dataset.set_epoch(epoch)
            self._epoch_set = True

    def __iter__(self) -> Iterator[Batch]:
        if isinstance(self.dataset, WdsTrainDataset):
            if self._iterated and not self._epoch_set:
                self.dataset.set_epoch(self.dataset.epoch + 1)
            self._epoch_set = False
            self._iterated = True
        self._report = DataReport()
        return self._batches(iter(self.loader), self._report)

    def _batches(self, items: Iterator[_Item], report: DataReport) -> Iterator[Batch]:
        """Strip the reports off the workers' items into ``report``; count the good samples; raise a
        worker's :class:`~esam_timm.data.prefetch.LabelRangeError` or
        :class:`~esam_timm.data.bad_data.DataPipelineError` here."""
        for images, labels, delta, error in items:
            if delta is not None:
                report.merge(delta)
            if error is not None:
                del items  # the DataLoader's workers stop now, not when the error's traceback goes
                raise error
            if images is not None and labels is not None:
                report.samples += len(labels)
                yield images, labels


def _check_loader_args(batch_size: int, num_workers: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    if num_workers < 0:
        raise ValueError(f'num_workers must be >= 0, got {num_workers}')
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f'rank must be in [0, world_size), got rank={rank}, world_size={world_size}')


def create_train_loader(
        source: ShardSource,
        *,
        batch_size: int,
        img_size: Union[int, Tuple[int, int]],
        num_workers: int = 4,
        seed: int = 42,
        rank: int = 0,
        world_size: int = 1,
        scale: Optional[Tuple[float, float]] = None,
        ratio: Optional[Tuple[float, float]] = None,
        hflip: float = 0.5,
        vflip: float = 0.,
        color_jitter: Union[float, Tuple[float, ...], None] = 0.4,
        auto_augment: Optional[str] = None,
        interpolation: str = 'bilinear',
        re_prob: float = 0.,
        re_mode: str = 'const',
        re_count: int = 1,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        train_crop_mode: Optional[str] = None,
        shuffle_buffer: int = 2000,
        shuffle_initial: Optional[int] = None,
        image_key: Union[str, Sequence[str]] = DEFAULT_IMAGE_KEY,
        label_key: str = DEFAULT_LABEL_KEY,
        num_classes: Optional[int] = None,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        persistent_workers: bool = True,
        decode: str = 'pil',
        batches_per_update: int = 1,
) -> WdsLoader:
    """Build the training loader: ``len()`` = ``ceil(num_samples / (batch_size * world_size *
    batches_per_update)) * batches_per_update`` on every rank.

    ``data_report()`` of the returned loader counts the epoch's good and bad samples and broken shards.

    Args:
        source: shards and sample count (:func:`~esam_timm.data.sources.resolve_source`).
        batch_size: batch size per rank (batches are always full).
        img_size: output size of timm's training transform.
        num_workers: DataLoader worker processes (0 = decode in the calling process).
        seed: base seed; with ``set_epoch`` it fixes shard order, shuffle and (with workers) augmentation.
        rank, world_size: this process's place in the distributed job.
        scale, ratio, hflip, vflip, color_jitter, auto_augment, interpolation, mean, std,
            train_crop_mode: passed to ``timm.data.create_transform`` (``is_training=True``); mean and
            std also set the fill of auto-augment and the device normalisation.
        re_prob, re_mode, re_count: random erasing, applied on the device by ``DevicePrefetcher``
            (images stay uint8 on the host).
        shuffle_buffer, shuffle_initial: sample shuffle buffer size and fill before the first
            sample (default a quarter of the buffer); memory is about buffer x average JPEG size
            per worker.
        image_key: image member name(s), ``;``-separated alternatives, e.g. ``"jpg;png"``.
        label_key: label member holding an integer as text (``"cls"``), or ``"json:field"``.
        num_classes: when given, a label outside ``[0, num_classes)`` stops the iteration with
            :class:`~esam_timm.data.prefetch.LabelRangeError` naming the sample and its shard.
        pin_memory, prefetch_factor, persistent_workers: passed to ``torch.utils.data.DataLoader``.
        decode: ``'pil'``: timm's transform on PIL images. ``'fast'``: the same draws, decoded by
            :class:`~esam_timm.data.decode.FastTrainTransform` (no auto-augment or crop modes).
            ``'encoded'``: batches of :class:`~esam_timm.data.decode.EncodedBatch` (JPEG bytes and
            crop boxes; flips and jitter are left to the device) for
            :class:`~esam_timm.data.gpu_decode.GpuDecodeLoader`; this stream does not stop after
            ``len()`` batches: the device decoder takes what it needs to refill the batches that lost
            an undecodable image, and stops. ``'fast'`` and ``'encoded'`` need TorchCodec (ValueError
            naming what to install when it is missing).
        batches_per_update: the trainer's gradient accumulation: the epoch is a whole number of updates
            of this many full batches, so an epoch has ``ceil(num_samples / global batch)`` updates and
            every update sees a full global batch, whatever the split between processes and
            accumulation (2 processes x b, or 1 process x b x 2: the same updates).
    """
    _check_loader_args(batch_size, num_workers, rank, world_size)
    if batches_per_update < 1:
        raise ValueError(f'batches_per_update must be >= 1, got {batches_per_update}')
    if decode not in DECODE_MODES:
        raise ValueError(f'decode must be one of {list(DECODE_MODES)}, got {decode!r}')
    if decode != 'pil' and (auto_augment or train_crop_mode):
        raise ValueError(f'decode={decode!r} does not do auto_augment={auto_augment!r} or '
                         f'train_crop_mode={train_crop_mode!r}: use decode="pil" for them')
    if shuffle_buffer < 1:
        raise ValueError(f'shuffle_buffer must be >= 1, got {shuffle_buffer}')
    if color_jitter is not None and not any(np.atleast_1d(color_jitter)):
        color_jitter = None  # timm would add a ColorJitter that does nothing but still costs time
    pipeline: Dict[str, Any] = {}
    if decode == 'pil':
        transform = create_transform(
            img_size, is_training=True, scale=scale, ratio=ratio, hflip=hflip, vflip=vflip,
            color_jitter=color_jitter, auto_augment=auto_augment, interpolation=interpolation,
            mean=tuple(mean), std=tuple(std), train_crop_mode=train_crop_mode, use_prefetcher=True)
    else:
        jpeg_decoder()  # TorchCodec missing or broken: one line now, not a failure in every worker later
        crop_args = (img_size, tuple(scale or (0.08, 1.0)), tuple(ratio or (3. / 4., 4. / 3.)), interpolation)
        if decode == 'fast':
            transform = FastTrainTransform(*crop_args, hflip=hflip, vflip=vflip, color_jitter=color_jitter)
            pipeline = dict(reader=image_member)
        else:
            transform = None
            pipeline = dict(reader=EncodedCrop(*crop_args), collate_fn=pack_encoded, endless=True)
    num_updates = math.ceil(source.num_samples / (batch_size * world_size * batches_per_update))
    num_batches = num_updates * batches_per_update
    dataset = WdsTrainDataset(
        source, batches_per_rank=num_batches, batch_size=batch_size, transform=transform, seed=seed,
        rank=rank, world_size=world_size, shuffle_buffer=shuffle_buffer,
        shuffle_initial=shuffle_initial if shuffle_initial is not None else max(1, shuffle_buffer // 4),
        image_keys=_image_keys(image_key), label_key=_check_label_key(label_key), num_classes=num_classes,
        **pipeline)
    _logger.info('train loader %r: %d shards, %d samples, %d batches of %d per rank x %d ranks',
                 source.name, len(source.urls), source.num_samples, num_batches, batch_size, world_size)
    return WdsLoader(dataset, num_batches=num_batches, num_workers=num_workers, pin_memory=pin_memory,
                     prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
                     mean=mean, std=std, re_prob=re_prob, re_mode=re_mode, re_count=re_count)


def create_val_loader(
        source: ShardSource,
        *,
        batch_size: int,
        img_size: Union[int, Tuple[int, int]],
        crop_pct: Optional[float] = None,
        num_workers: int = 4,
        rank: int = 0,
        world_size: int = 1,
        interpolation: str = 'bilinear',
        crop_mode: Optional[str] = None,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        image_key: Union[str, Sequence[str]] = DEFAULT_IMAGE_KEY,
        label_key: str = DEFAULT_LABEL_KEY,
        num_classes: Optional[int] = None,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        persistent_workers: bool = True,
) -> WdsLoader:
    """Build the validation loader: every sample exactly once across ranks x workers, no resampling.

    Ranks may get different batch counts (the last batch of each worker can be partial): run no
    collective per batch; sum the metrics once at the end with
    :func:`esam_timm.distributed.all_reduce_sum`. ``data_report()`` counts what the pass lost. ``crop_pct``,
    ``crop_mode``, ``interpolation``, ``mean``, ``std`` go to timm's eval transform; the other
    arguments (``num_classes`` too) mean what they mean in :func:`create_train_loader`.
    """
    _check_loader_args(batch_size, num_workers, rank, world_size)
    transform = create_transform(
        img_size, is_training=False, crop_pct=crop_pct, crop_mode=crop_mode, interpolation=interpolation,
        mean=tuple(mean), std=tuple(std), use_prefetcher=True)
    dataset = WdsValDataset(
        source, batch_size=batch_size, transform=transform, rank=rank, world_size=world_size,
        image_keys=_image_keys(image_key), label_key=_check_label_key(label_key), num_classes=num_classes)
    num_batches = _val_batches_per_rank(source, batch_size, rank, world_size, num_workers)
    return WdsLoader(dataset, num_batches=num_batches, num_workers=num_workers, pin_memory=pin_memory,
                     prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
                     mean=mean, std=std)

"""WebDataset sources and the training / validation pipelines that read them.

A source is a folder (or URL) holding timm's ``_info.json`` plus shards, or a brace pattern of shard
URLs with a sample count. Shards are opened with ``webdataset.gopen``, so local paths, ``file:``,
``pipe:`` and http(s) URLs all work.

Training streams are infinite (each (rank, worker) stream walks its share of an epoch-seeded shard
permutation, then resamples shards) and cut with ``with_epoch``, so every rank yields exactly
``ceil(num_samples / (batch_size * world_size))`` batches per epoch whatever the shard sizes: no DDP
hang at an epoch end. Validation reads every sample exactly once across all ranks and workers, also
with uneven shards or fewer shards than streams; its per-rank batch counts may differ, so the caller
sums its metrics once at the end with :func:`all_reduce_sums`.

Batches are ``(uint8 images [B, 3, H, W], int64 labels [B])``; normalisation, random erasing and
mixup happen on the device (see :mod:`esam_timm.data.loader`). Bad data (an undecodable image, a
sample without a label, an unreadable or truncated shard) is skipped, counted and logged without
sleeping.
"""
import gzip
import io
import json
import logging
import math
import multiprocessing as mp
import os
import random
import tarfile
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

_logger = logging.getLogger(__name__)

INFO_NAME = '_info.json'
DEFAULT_IMAGE_KEY = 'jpg;jpeg;png;webp'
DEFAULT_LABEL_KEY = 'cls'
_SPLIT_ALIASES = {'val': 'validation', 'validation': 'val'}
# Log the first bad items one by one, then every Nth, so a broken dataset cannot flood the log.
_LOG_FIRST_BAD, _LOG_EVERY_BAD = 10, 100
# A stream with this many failures in a row is not "some bad data" but a broken source or config.
_MAX_CONSECUTIVE_BAD_SAMPLES = 1000

Batch = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class ShardSource:
    """Shard URLs of one split, with the sample count that defines an epoch."""

    urls: List[str]
    num_samples: int
    shard_lengths: Optional[List[int]] = None
    name: str = ''

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError(f'source {self.name!r} has no shard URLs')
        if self.num_samples < 1:
            raise ValueError(f'source {self.name!r}: num_samples must be >= 1, got {self.num_samples}')
        if self.shard_lengths is not None and len(self.shard_lengths) != len(self.urls):
            raise ValueError(
                f'source {self.name!r}: {len(self.shard_lengths)} shard_lengths for {len(self.urls)} shards')


def _is_remote(spec: str) -> bool:
    """True for URLs that are not local files (http(s), pipe:, s3:, ...)."""
    scheme, sep, _ = spec.partition(':')
    return bool(sep) and scheme != 'file' and len(scheme) > 1


def _local_path(spec: str) -> str:
    return spec[len('file:'):] if spec.startswith('file:') else spec


def _is_pattern(spec: str) -> bool:
    """A shard list (brace pattern, '::' list, pipe command or .tar URL) rather than a dataset root."""
    return (spec.startswith('pipe:') or '{' in spec or '::' in spec
            or spec.endswith(('.tar', '.tar.gz', '.tgz')))


def _read_info(root: str) -> Dict[str, Any]:
    """Load ``root/_info.json`` from a local folder or a URL; FileNotFoundError names what was tried."""
    if _is_remote(root):
        url = f'{root.rstrip("/")}/{INFO_NAME}'
        try:
            with wds.gopen(url) as f:
                return json.load(f)
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f'could not read {url!r} ({exc}); pass a shard pattern instead') from exc
    path = _local_path(root)
    if not os.path.exists(path):
        raise FileNotFoundError(f'data source {root!r} not found: no such folder or shard pattern')
    info_path = os.path.join(path, INFO_NAME)
    if not os.path.isfile(info_path):
        raise FileNotFoundError(
            f'no {INFO_NAME} in {path!r}: give a folder holding timm\'s {INFO_NAME} and its shards, '
            'or a shard pattern such as "train-{0000..0099}.tar" with a sample count')
    with open(info_path) as f:
        return json.load(f)


def _check_local_shards(urls: Sequence[str], what: str) -> None:
    missing = [u for u in urls if not _is_remote(u) and not os.path.isfile(_local_path(u))]
    if missing:
        raise FileNotFoundError(f'{len(missing)} of {len(urls)} shards of {what} not found, e.g. {missing[:3]}')


def _split_from_info(info: Dict[str, Any], split: str, where: str) -> Tuple[str, Dict[str, Any]]:
    splits = info.get('splits') or {}
    for name in (split, _SPLIT_ALIASES.get(split)):
        if name in splits:
            return name, splits[name]
    raise ValueError(f'split {split!r} not found in {where}; available splits: {sorted(splits)}')


def resolve_source(data_dir_or_pattern: str, split: str, num_samples: Optional[int] = None) -> ShardSource:
    """Resolve a dataset folder/URL with ``_info.json``, or a shard pattern, into a :class:`ShardSource`.

    Args:
        data_dir_or_pattern: a folder or http(s) base URL holding ``_info.json`` (timm's layout), or
            shard URLs: a brace pattern (``/data/imagenet1k-train-{0000..1023}.tar``), a ``::``
            separated list, a ``pipe:`` command or a single ``.tar``.
        split: split name looked up in ``_info.json`` (``val`` and ``validation`` stand for each
            other); for a pattern it only names the source.
        num_samples: samples per epoch; required for a pattern unless a local ``_info.json`` next to
            the shards lists them; for a folder it overrides the count of ``_info.json``.

    Raises:
        ValueError: empty spec or pattern, missing split, or a pattern without a sample count.
        FileNotFoundError: missing folder, ``_info.json`` or local shards.
    """
    spec = (data_dir_or_pattern or '').strip()
    if not spec:
        raise ValueError('empty data source: give a folder with _info.json or a shard pattern')
    if not _is_pattern(spec):
        info = _read_info(spec)
        name, entry = _split_from_info(info, split, f'{INFO_NAME} of {spec!r}')
        base = spec.rstrip('/')
        urls = [f'{base}/{fname}' for fname in entry['filenames']]
        _check_local_shards(urls, f'split {name!r} of {spec!r}')
        lengths = [int(n) for n in entry['shard_lengths']] if entry.get('shard_lengths') else None
        total = int(entry['num_samples'])
        if num_samples is not None and num_samples != total:
            _logger.info('split %r: using num_samples=%d instead of %d from %s', name, num_samples, total, INFO_NAME)
        return ShardSource(urls, num_samples if num_samples is not None else total, lengths, name)
    urls = expand_urls(spec)
    if not urls or not all(urls):
        raise ValueError(f'shard pattern {spec!r} expands to no URLs')
    _check_local_shards(urls, f'pattern {spec!r}')
    lengths = _lengths_from_sibling_info(urls)
    if num_samples is None:
        if lengths is None:
            raise ValueError(
                f'shard pattern {spec!r} needs num_samples (no {INFO_NAME} next to the shards lists them)')
        num_samples = sum(lengths)
    return ShardSource(urls, num_samples, lengths, split)


def _lengths_from_sibling_info(urls: Sequence[str]) -> Optional[List[int]]:
    """Shard lengths of local shards from an ``_info.json`` in their folder, if it lists all of them."""
    if any(_is_remote(u) for u in urls):
        return None
    folder = os.path.dirname(_local_path(urls[0]))
    path = os.path.join(folder, INFO_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        info = json.load(f)
    known = {}
    for entry in (info.get('splits') or {}).values():
        known.update(zip(entry.get('filenames', []), entry.get('shard_lengths', [])))
    names = [os.path.basename(_local_path(u)) for u in urls]
    if os.path.dirname(_local_path(urls[-1])) != folder or not all(n in known for n in names):
        return None
    return [int(known[n]) for n in names]


class DataStats:
    """Bad-sample and bad-shard counters shared by the loader's worker processes."""

    def __init__(self) -> None:
        self._bad_samples = mp.Value('q', 0)
        self._bad_shards = mp.Value('q', 0)

    @property
    def bad_samples(self) -> int:
        """Samples skipped so far (undecodable image, missing or invalid label)."""
        return int(self._bad_samples.value)

    @property
    def bad_shards(self) -> int:
        """Shards that could not be opened or broke off while reading (e.g. truncated)."""
        return int(self._bad_shards.value)

    @staticmethod
    def _add(counter: Any) -> int:
        with counter.get_lock():
            counter.value += 1
            return int(counter.value)

    def add_bad_sample(self, key: str, url: str, exc: BaseException) -> None:
        """Count one skipped sample and log it (rate-limited)."""
        n = self._add(self._bad_samples)
        if n <= _LOG_FIRST_BAD or n % _LOG_EVERY_BAD == 0:
            _logger.warning('skipped bad sample %r of %s: %r (%d bad samples so far)', key, url, exc, n)

    def add_bad_shard(self, url: str, exc: BaseException) -> None:
        """Count one unreadable or truncated shard and log it (rate-limited)."""
        n = self._add(self._bad_shards)
        if n <= _LOG_FIRST_BAD or n % _LOG_EVERY_BAD == 0:
            _logger.warning('stopped reading shard %s: %r (%d bad shards so far)', url, exc, n)


def _split_member_name(name: str) -> Tuple[Optional[str], str]:
    """Split a tar member name into (sample key, lower-case extension) at the first dot of the base name."""
    folder, _, base = name.rpartition('/')
    stem, dot, ext = base.partition('.')
    if not dot or not stem:
        return None, ''
    return (f'{folder}/{stem}' if folder else stem), ext.lower()


_BLOCK = 512
_READ_BUFFER = 1 << 20
_REGULAR = (b'0', b'\0', b'7')


def _read_exact(stream: Any, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise tarfile.ReadError(f'unexpected end of data: wanted {size} bytes, got {len(data)}')
    return data


def _parse_header(block: bytes) -> Tuple[str, int, bytes]:
    """(name, size, type flag) of a ustar/GNU header block; ReadError on a bad checksum."""
    stored = int(block[148:156].strip(b' \0') or b'0', 8)
    if stored != sum(block[:148]) + 256 + sum(block[156:]):
        raise tarfile.ReadError('bad tar header checksum')
    name = block[:100].split(b'\0', 1)[0]
    if block[257:262] == b'ustar' and block[345] != 0:
        name = block[345:500].split(b'\0', 1)[0] + b'/' + name
    return name.decode('utf-8', 'surrogateescape'), tarfile.nti(block[124:136]), block[156:157]


def _parse_pax(data: bytes) -> Dict[str, str]:
    """Records ``"<len> key=value\n"`` of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b'\0':
        length = int(data[pos:data.index(b' ', pos)])
        key, _, value = data[data.index(b' ', pos) + 1:pos + length - 1].partition(b'=')
        records[key.decode('utf-8')] = value.decode('utf-8', 'surrogateescape')
        pos += length
    return records


def tar_members(stream: Any) -> Iterator[Tuple[str, bytes]]:
    """Yield (name, data) of the regular files of an uncompressed tar stream, in order.

    A lean sequential reader: ``tarfile``'s stream mode costs about as much per image as a tenth
    of its JPEG decode. Handles ustar, GNU long names and pax ``path``/``size`` records; raises
    ``tarfile.ReadError`` on a truncated stream or a corrupt header.
    """
    long_name: Optional[str] = None
    pax: Dict[str, str] = {}
    while True:
        block = stream.read(_BLOCK)
        if not block or block == bytes(_BLOCK):
            return
        if len(block) != _BLOCK:
            raise tarfile.ReadError(f'unexpected end of data in a header ({len(block)} bytes)')
        name, size, kind = _parse_header(block)
        size = int(pax.get('size', size))
        data = _read_exact(stream, size)
        _read_exact(stream, -size % _BLOCK)
        if kind == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b'\0').decode('utf-8', 'surrogateescape')
        elif kind == tarfile.XHDTYPE:
            pax = _parse_pax(data)
        elif kind != tarfile.XGLTYPE:
            if kind in _REGULAR:
                yield pax.get('path', long_name or name), data
            long_name, pax = None, {}


def read_shard(url: str, stats: DataStats) -> Iterator[Dict[str, Any]]:
    """Yield the samples (``{'__key__', '__url__', ext: bytes}``) of one tar shard (``.tar.gz``/``.tgz`` too).

    A shard that cannot be opened or breaks off mid-way is counted as bad; the samples completed
    before the break are kept, the one being read is dropped.
    """
    try:
        stream = wds.gopen(url, bufsize=_READ_BUFFER)
    except Exception as exc:  # gopen raises many types (OSError, ValueError, subprocess errors)
        stats.add_bad_shard(url, exc)
        return
    current: Optional[Dict[str, Any]] = None
    try:
        members = tar_members(gzip.GzipFile(fileobj=stream) if url.endswith(('.gz', '.tgz')) else stream)
        for name, data in members:
            key, ext = _split_member_name(name)
            if key is None or key.startswith('__'):
                continue
            if current is not None and current['__key__'] != key:
                yield current
                current = None
            if current is None:
                current = {'__key__': key, '__url__': url}
            current[ext] = data
        if current is not None:
            yield current
    except Exception as exc:  # corrupt data surfaces as ReadError, OSError, EOFError, zlib.error...
        stats.add_bad_shard(url, exc)
    finally:
        stream.close()


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
            with Image.open(io.BytesIO(sample[key])) as img:
                return img.convert('RGB')
    raise KeyError(f'no image member among {list(image_keys)}')


def decode_samples(
        samples: Iterable[Dict[str, Any]],
        *,
        transform: Callable[[Image.Image], torch.Tensor],
        image_keys: Sequence[str],
        label_key: str,
        stats: DataStats,
) -> Iterator[Tuple[torch.Tensor, int]]:
    """Decode, label and transform raw samples, skipping (and counting) the ones that fail.

    Raises RuntimeError after many failures in a row: that is a broken source or configuration.
    """
    failures = 0
    for sample in samples:
        try:
            label = _parse_label(sample, label_key)
            image = transform(_decode_image(sample, image_keys))
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            stats.add_bad_sample(sample.get('__key__', '?'), sample.get('__url__', '?'), exc)
            failures += 1
            if failures >= _MAX_CONSECUTIVE_BAD_SAMPLES:
                raise RuntimeError(
                    f'{failures} bad samples in a row (last: {sample.get("__key__")!r} of '
                    f'{sample.get("__url__")}: {exc!r}); check image_key={list(image_keys)} and '
                    f'label_key={label_key!r}') from exc
            continue
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


def _samples_from_shards(urls: Iterable[str], stats: DataStats, max_empty: int) -> Iterator[Dict[str, Any]]:
    """Samples of the given shards in order; raises RuntimeError after ``max_empty`` empty shards in a row."""
    empty = 0
    for url in urls:
        count = 0
        for sample in read_shard(url, stats):
            count += 1
            yield sample
        empty = 0 if count else empty + 1
        if empty >= max_empty:
            raise RuntimeError(f'{empty} shards in a row gave no samples (last: {url}); check the data source')


class WdsTrainDataset(IterableDataset):
    """Per-worker training pipeline: shards -> shuffle buffer -> decode/transform -> batches.

    Each DataLoader worker yields its share of ``batches_per_rank`` full batches per epoch. All
    randomness (shard order, shuffle buffer and, inside worker processes, the augmentations) is
    seeded from (seed, epoch, rank, worker): runs reproduce and every epoch reshuffles.
    """

    def __init__(self, urls: Sequence[str], *, batches_per_rank: int, batch_size: int,
                 transform: Callable[[Image.Image], torch.Tensor], seed: int, rank: int, world_size: int,
                 shuffle_buffer: int, shuffle_initial: int, image_keys: Sequence[str], label_key: str,
                 stats: DataStats) -> None:
        super().__init__()
        self.urls = list(urls)
        self.batches_per_rank = batches_per_rank
        self.batch_size = batch_size
        self.transform = transform
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_initial = shuffle_initial
        self.image_keys = list(image_keys)
        self.label_key = label_key
        self.stats = stats
        self._epoch = mp.Value('q', 0)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle the next iteration uses (also seen by persistent workers)."""
        self._epoch.value = epoch

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def __iter__(self) -> Iterator[Batch]:
        worker, num_workers = _worker_info()
        num_batches = len(range(worker, self.batches_per_rank, num_workers))
        if num_batches == 0:
            return iter(())
        epoch = self.epoch
        stream = self.rank * num_workers + worker
        num_streams = self.world_size * num_workers
        rng = random.Random(f'stream/{self.seed}/{epoch}/{stream}/{num_streams}')
        if get_worker_info() is not None:
            # Augmentations draw from the global RNGs; in a worker process those are ours to seed.
            aug_seed = rng.getrandbits(32)
            random.seed(aug_seed)
            np.random.seed(aug_seed)
            torch.manual_seed(aug_seed)
        shards = _shard_stream(self.urls, self.seed, epoch, stream, num_streams, rng)
        pipeline = wds.DataPipeline(
            lambda: shards,
            partial(_samples_from_shards, stats=self.stats, max_empty=max(10, 2 * len(self.urls))),
            wds.shuffle(self.shuffle_buffer, self.shuffle_initial, rng=rng),
            partial(decode_samples, transform=self.transform, image_keys=self.image_keys,
                    label_key=self.label_key, stats=self.stats),
            wds.batched(self.batch_size, collation_fn=collate, partial=False),
        ).with_epoch(nbatches=num_batches)
        return iter(pipeline)


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


class WdsValDataset(IterableDataset):
    """Per-worker validation pipeline: this stream's samples, in shard order, decoded and batched."""

    def __init__(self, urls: Sequence[str], *, batch_size: int, transform: Callable[[Image.Image], torch.Tensor],
                 rank: int, world_size: int, image_keys: Sequence[str], label_key: str, stats: DataStats) -> None:
        super().__init__()
        self.urls = list(urls)
        self.batch_size = batch_size
        self.transform = transform
        self.rank = rank
        self.world_size = world_size
        self.image_keys = list(image_keys)
        self.label_key = label_key
        self.stats = stats

    def _samples(self, parts: Sequence[Tuple[int, int, int]]) -> Iterator[Dict[str, Any]]:
        for shard, stride, offset in parts:
            for i, sample in enumerate(read_shard(self.urls[shard], self.stats)):
                if i % stride == offset:
                    yield sample

    def __iter__(self) -> Iterator[Batch]:
        worker, num_workers = _worker_info()
        parts = _val_assignment(len(self.urls), self.rank * num_workers + worker, self.world_size * num_workers)
        samples = decode_samples(self._samples(parts), transform=self.transform, image_keys=self.image_keys,
                                 label_key=self.label_key, stats=self.stats)
        return wds.batched(self.batch_size, collation_fn=collate, partial=True)(samples)


def _val_batches_per_rank(source: ShardSource, batch_size: int, rank: int, world_size: int,
                          num_workers: int) -> int:
    """Exact batch count of this rank when shard lengths are known, else an even-split estimate."""
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
    """A DataLoader over a WebDataset pipeline with a fixed ``len()`` and epoch control.

    Iterating yields ``(uint8 images [B, 3, H, W], int64 labels [B])``. Training loaders yield
    exactly ``len(self)`` batches per epoch on every rank; validation loaders yield each of their
    samples once (``len`` is exact when shard lengths are known, an estimate otherwise).
    Attributes ``mean``, ``std`` and the random-erasing settings ``re_prob``, ``re_mode``,
    ``re_count`` are read by :class:`~esam_timm.data.loader.DevicePrefetcher`.
    """

    def __init__(self, dataset: Union[WdsTrainDataset, WdsValDataset], *, num_batches: int, num_workers: int,
                 pin_memory: bool, prefetch_factor: Optional[int], persistent_workers: bool, stats: DataStats,
                 mean: Sequence[float], std: Sequence[float], re_prob: float = 0., re_mode: str = 'const',
                 re_count: int = 1) -> None:
        self.dataset = dataset
        self.num_batches = num_batches
        self.stats = stats
        self.mean, self.std = tuple(mean), tuple(std)
        self.re_prob, self.re_mode, self.re_count = re_prob, re_mode, re_count
        self._epoch_set = False
        self._iterated = False
        self.loader = DataLoader(
            dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            persistent_workers=persistent_workers and num_workers > 0)

    def __len__(self) -> int:
        return self.num_batches

    @property
    def bad_samples(self) -> int:
        """Samples skipped so far in all workers."""
        return self.stats.bad_samples

    @property
    def bad_shards(self) -> int:
        """Shards that failed to open or broke off so far in all workers."""
        return self.stats.bad_shards

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
        return iter(self.loader)


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
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        persistent_workers: bool = True,
) -> WdsLoader:
    """Build the training loader: ``len()`` = ``ceil(num_samples / (batch_size * world_size))`` on every rank.

    Args:
        source: shards and sample count (:func:`resolve_source`).
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
        pin_memory, prefetch_factor, persistent_workers: passed to ``torch.utils.data.DataLoader``.
    """
    _check_loader_args(batch_size, num_workers, rank, world_size)
    if shuffle_buffer < 1:
        raise ValueError(f'shuffle_buffer must be >= 1, got {shuffle_buffer}')
    if color_jitter is not None and not any(np.atleast_1d(color_jitter)):
        color_jitter = None  # timm would add a ColorJitter that does nothing but still costs time
    transform = create_transform(
        img_size, is_training=True, scale=scale, ratio=ratio, hflip=hflip, vflip=vflip,
        color_jitter=color_jitter, auto_augment=auto_augment, interpolation=interpolation,
        mean=tuple(mean), std=tuple(std), train_crop_mode=train_crop_mode, use_prefetcher=True)
    num_batches = math.ceil(source.num_samples / (batch_size * world_size))
    stats = DataStats()
    dataset = WdsTrainDataset(
        source.urls, batches_per_rank=num_batches, batch_size=batch_size, transform=transform, seed=seed,
        rank=rank, world_size=world_size, shuffle_buffer=shuffle_buffer,
        shuffle_initial=shuffle_initial if shuffle_initial is not None else max(1, shuffle_buffer // 4),
        image_keys=_image_keys(image_key), label_key=_check_label_key(label_key), stats=stats)
    _logger.info('train loader %r: %d shards, %d samples, %d batches of %d per rank x %d ranks',
                 source.name, len(source.urls), source.num_samples, num_batches, batch_size, world_size)
    return WdsLoader(dataset, num_batches=num_batches, num_workers=num_workers, pin_memory=pin_memory,
                     prefetch_factor=prefetch_factor, persistent_workers=persistent_workers, stats=stats,
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
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        persistent_workers: bool = True,
) -> WdsLoader:
    """Build the validation loader: every sample exactly once across ranks x workers, no resampling.

    Ranks may get different batch counts (the last batch of each worker can be partial): run no
    collective per batch; sum the metrics once at the end with :func:`all_reduce_sums`. ``crop_pct``,
    ``crop_mode``, ``interpolation``, ``mean``, ``std`` go to timm's eval transform; the other
    arguments mean what they mean in :func:`create_train_loader`.
    """
    _check_loader_args(batch_size, num_workers, rank, world_size)
    transform = create_transform(
        img_size, is_training=False, crop_pct=crop_pct, crop_mode=crop_mode, interpolation=interpolation,
        mean=tuple(mean), std=tuple(std), use_prefetcher=True)
    stats = DataStats()
    dataset = WdsValDataset(
        source.urls, batch_size=batch_size, transform=transform, rank=rank, world_size=world_size,
        image_keys=_image_keys(image_key), label_key=_check_label_key(label_key), stats=stats)
    num_batches = _val_batches_per_rank(source, batch_size, rank, world_size, num_workers)
    return WdsLoader(dataset, num_batches=num_batches, num_workers=num_workers, pin_memory=pin_memory,
                     prefetch_factor=prefetch_factor, persistent_workers=persistent_workers, stats=stats,
                     mean=mean, std=std)


def all_reduce_sums(values: Union[torch.Tensor, Sequence[float]],
                    device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Sum metric totals such as ``(correct, count, loss_sum)`` over all ranks; a float64 copy is returned.

    Call it once after validation on every rank. Without an initialised process group it returns
    the local values. With NCCL pass the rank's CUDA ``device``.
    """
    tensor = torch.as_tensor(values).detach().to(device=device, dtype=torch.float64).clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor

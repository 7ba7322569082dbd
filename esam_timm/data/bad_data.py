"""Bad-data accounting: what one epoch of a loader read, what it lost, and where.

Counting rules (the loaders in :mod:`esam_timm.data.wds` follow them):

- ``samples`` counts the good samples a loader delivered in batches; ``bad_samples`` the ones it
  could not use: an undecodable image, no image member, a missing or invalid label, and the samples
  an unreadable or truncated shard did not deliver when its length is known from ``_info.json``
  (when it is not, only the sample cut in two counts). Both count reads: a training epoch that
  resamples a shard counts its good and bad samples each time, so :attr:`DataReport.bad_fraction`
  is the share of sample reads that were lost.
- ``bad_shards`` lists each shard that could not be opened, broke off or ended short of its
  ``_info.json`` length once per epoch, with the first error seen, however many ranks, workers or
  resampled reads hit it.
- A report covers one epoch of one loader: each new iteration starts an empty one.
  :func:`reduce_data_report` merges the ranks' reports; :func:`check_bad_fraction` warns and stops
  the run past ``--max-bad-fraction``.
- Only the data can be bad. Running out of memory, a CUDA fault or a decoder that is missing or
  broken is not a bad sample (:func:`is_resource_failure` tells them apart): the loaders stop with
  :class:`DataPipelineError`, one line, instead of counting every sample after it as lost.
"""
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from esam_timm.distributed import all_reduce_sum, is_distributed

from .sources import INFO_NAME

__all__ = ['BadDataError', 'DataPipelineError', 'DataReport', 'check_bad_fraction', 'is_resource_failure',
           'reduce_data_report']

_logger = logging.getLogger(__name__)

# Shards named in a warning or error; the report itself keeps all of them.
_WORST_SHOWN = 5
# What a decoder's error text says when the machine, not the sample, failed (TorchCodec reports CUDA and
# nvJPEG failures as plain RuntimeErrors; torch's CPU allocator too).
_RESOURCE_FAILURE_TEXT = ('out of memory', "can't allocate memory", 'cuda error', 'cudaerror', 'cuda driver',
                          'failed to synchronize cuda stream', 'failed to get current cuda device',
                          'failed to initialize nvjpeg', 'not compiled with nvjpeg', 'device-side assert')
_RESOURCE_FAILURE_TYPES = (MemoryError, ImportError) + tuple(
    t for t in (getattr(torch, 'OutOfMemoryError', None), getattr(torch, 'AcceleratorError', None)) if t is not None)


def is_resource_failure(exc: BaseException) -> bool:
    """True when ``exc`` is the machine failing (memory, a CUDA fault, a decoder library that cannot run),
    not the data: such an error must stop the run instead of being counted as a bad sample."""
    if isinstance(exc, _RESOURCE_FAILURE_TYPES):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _RESOURCE_FAILURE_TEXT)


class DataPipelineError(RuntimeError):
    """The data pipeline cannot go on (out of memory, a CUDA fault, a decoder that fails on good data, a
    source of which a thousand samples in a row fail: wrong keys): not some bad data, so never counted
    against ``--max-bad-fraction``. The message is one line naming where it happened and what to change."""


@dataclass
class DataReport:
    """Good and bad samples and broken shards of one epoch (one loader, or all ranks after a reduce).

    Attributes:
        samples: good samples delivered in batches.
        bad_samples: samples lost (see the module docstring for what counts).
        bad_shards: URL -> first error text, for each shard that could not be opened, broke off or
            ended short; each shard once.
        bad_samples_by_shard: URL -> bad samples of that shard; the values sum to ``bad_samples``.
    """

    samples: int = 0
    bad_samples: int = 0
    bad_shards: Dict[str, str] = field(default_factory=dict)
    bad_samples_by_shard: Dict[str, int] = field(default_factory=dict)

    @property
    def num_bad_shards(self) -> int:
        """Distinct shards that could not be read in full."""
        return len(self.bad_shards)

    @property
    def bad_fraction(self) -> float:
        """``bad_samples / (samples + bad_samples)``; 1.0 when nothing was read but shards failed, else 0.0."""
        total = self.samples + self.bad_samples
        if total:
            return self.bad_samples / total
        return 1.0 if self.bad_shards else 0.0

    def has_bad_data(self) -> bool:
        """True when any sample or shard was lost."""
        return bool(self.bad_samples or self.bad_shards)

    def add_bad_samples(self, url: str, count: int = 1) -> None:
        """Count ``count`` lost samples of shard ``url``."""
        if count:
            self.bad_samples += count
            self.bad_samples_by_shard[url] = self.bad_samples_by_shard.get(url, 0) + count

    def add_bad_shard(self, url: str, error: str) -> None:
        """Record that shard ``url`` failed; the first error text is kept."""
        self.bad_shards.setdefault(url, error)

    def merge(self, other: 'DataReport') -> None:
        """Add ``other`` into this report: counts sum, each shard stays listed once."""
        self.samples += other.samples
        self.bad_samples += other.bad_samples
        for url, count in other.bad_samples_by_shard.items():
            self.bad_samples_by_shard[url] = self.bad_samples_by_shard.get(url, 0) + count
        for url, error in other.bad_shards.items():
            self.bad_shards.setdefault(url, error)

    def copy(self) -> 'DataReport':
        """An independent copy (the loader keeps adding to its own)."""
        return DataReport(self.samples, self.bad_samples, dict(self.bad_shards), dict(self.bad_samples_by_shard))

    def worst_shards(self, limit: Optional[int] = _WORST_SHOWN) -> List[Tuple[str, int, Optional[str]]]:
        """``(url, bad samples, error or None)`` of the shards with bad data, most bad samples first.

        Broken shards come before others with as many bad samples; ties go by URL.
        """
        urls = set(self.bad_samples_by_shard) | set(self.bad_shards)
        ranked = sorted(urls, key=lambda u: (-self.bad_samples_by_shard.get(u, 0), u not in self.bad_shards, u))
        return [(u, self.bad_samples_by_shard.get(u, 0), self.bad_shards.get(u)) for u in ranked[:limit]]

    def metrics(self) -> Dict[str, float]:
        """Flat numbers for ``summary.csv`` and W&B: samples, bad_samples, bad_shards, bad_fraction."""
        return {'samples': float(self.samples), 'bad_samples': float(self.bad_samples),
                'bad_shards': float(self.num_bad_shards), 'bad_fraction': self.bad_fraction}

    def summary(self, limit: Optional[int] = _WORST_SHOWN) -> str:
        """One line for the log: the counts, the share and the worst shards."""
        text = (f'{self.bad_samples} bad of {self.samples + self.bad_samples} samples '
                f'({self.bad_fraction:.2%}), {self.num_bad_shards} bad shard(s)')
        worst = self.worst_shards(limit)
        if worst:
            text += '; worst: ' + '; '.join(_describe_shard(*w) for w in worst)
        return text


def _describe_shard(url: str, bad: int, error: Optional[str]) -> str:
    return f'{url} ({bad} bad samples' + (f', unreadable: {error})' if error else ')')


class BadDataError(RuntimeError):
    """An epoch lost more data than ``--max-bad-fraction`` allows; ``report`` holds the details."""

    def __init__(self, message: str, report: DataReport, max_fraction: float) -> None:
        super().__init__(message)
        self.report = report
        self.max_fraction = max_fraction

    def __reduce__(self) -> Tuple[type, Tuple[str, DataReport, float]]:
        return type(self), (str(self), self.report, self.max_fraction)  # picklable across processes


def reduce_data_report(report: DataReport, device: Optional[Union[str, torch.device]] = None) -> DataReport:
    """Merge the ranks' reports into one, identical on every rank (a copy of ``report`` outside DDP).

    A collective: call it on every rank. Counts are summed with one
    :func:`esam_timm.distributed.all_reduce_sum`; only when some rank saw bad data are the per-shard
    tables gathered (``all_gather_object``) and merged, so a shard hit on several ranks is listed
    once. With NCCL pass the rank's CUDA ``device`` (and have ``torch.cuda.set_device`` called).
    """
    if not is_distributed():
        return report.copy()
    entries = len(report.bad_shards) + len(report.bad_samples_by_shard)
    samples, bad_samples, any_entries = all_reduce_sum([report.samples, report.bad_samples, entries], device).tolist()
    merged = DataReport()
    if any_entries:
        gathered: List[Optional[DataReport]] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, DataReport(0, 0, report.bad_shards, report.bad_samples_by_shard))
        for other in gathered:
            if other is not None:
                merged.merge(other)
    merged.samples, merged.bad_samples = int(samples), int(bad_samples)
    return merged


def check_bad_fraction(report: DataReport, max_fraction: float, *, what: str = 'data', warn: bool = True) -> None:
    """Warn about any bad data in ``report``; raise :class:`BadDataError` when its share is above ``max_fraction``.

    Call it with the reduced report (:func:`reduce_data_report`) on every rank, so all ranks stop
    together. ``what`` names the data in the messages (e.g. ``'train epoch 3'``); ``warn=False``
    keeps the warning off (e.g. on non-primary ranks). The error message reads::

        {what}: {bad} of {total} samples unreadable ({share:.2%}), more than --max-bad-fraction
        {max_fraction:g} ({max_fraction:.2%}); worst shards: {url} ({n} bad samples[, unreadable:
        {error}]); ... Fix or remove these shards (and their entries in _info.json), or raise
        --max-bad-fraction.

    Raises:
        ValueError: ``max_fraction`` is not in [0, 1].
        BadDataError: the share of bad samples is above ``max_fraction``.
    """
    if not 0.0 <= max_fraction <= 1.0:
        raise ValueError(f'max_fraction (--max-bad-fraction) must be in [0, 1], e.g. 0.01 for 1%, got {max_fraction}')
    if warn and report.has_bad_data():
        _logger.warning('%s: %s', what, report.summary())
    share = report.bad_fraction
    if share <= max_fraction:
        return
    shards = '; '.join(_describe_shard(*w) for w in report.worst_shards())
    raise BadDataError(
        f'{what}: {report.bad_samples} of {report.samples + report.bad_samples} samples unreadable ({share:.2%}), '
        f'more than --max-bad-fraction {max_fraction:g} ({max_fraction:.2%}); worst shards: {shards}. '
        f'Fix or remove these shards (and their entries in {INFO_NAME}), or raise --max-bad-fraction.',
        report, max_fraction)

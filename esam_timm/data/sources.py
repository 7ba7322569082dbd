"""Data sources: a dataset folder with timm's ``_info.json``, or a shard pattern, as shard URLs and counts.

The only module that reads ``_info.json`` (and knows its name): the loaders, the trainer, the shard
writer and the demo dataset ask here. A source is a folder (or http(s) base URL) holding
``_info.json`` plus shards, or a brace pattern of shard URLs with a sample count.
"""
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import webdataset as wds
from webdataset.shardlists import expand_urls

__all__ = ['CLASS_MAP_NAME', 'INFO_NAME', 'ShardSource', 'has_info', 'num_classes_from_info', 'read_info',
           'resolve_source']

_logger = logging.getLogger(__name__)

INFO_NAME = '_info.json'
CLASS_MAP_NAME = 'class_map.txt'
_SPLIT_ALIASES = {'val': 'validation', 'validation': 'val'}


@dataclass
class ShardSource:
    """Shard URLs of one split, with the sample count that defines an epoch.

    ``shard_lengths`` (from ``_info.json``) lets the loaders give exact validation lengths and
    count the samples a truncated or unreadable shard did not deliver.
    """

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


def _load_json(f: Any, where: str) -> Dict[str, Any]:
    try:
        info = json.load(f)
    except ValueError as exc:
        raise ValueError(f'{where} is not valid JSON ({exc}); fix it, or delete it and re-run make_shards') from exc
    if not isinstance(info, dict):
        raise ValueError(f'{where} must hold a JSON object, got {type(info).__name__}')
    return info


def read_info(root: str) -> Dict[str, Any]:
    """Load ``root/_info.json`` from a local folder or a URL.

    Raises:
        FileNotFoundError: no such folder, or no ``_info.json`` in it (the message names what was tried).
        ValueError: the file is not a JSON object.
    """
    if _is_remote(root):
        url = f'{root.rstrip("/")}/{INFO_NAME}'
        try:
            with wds.gopen(url) as f:
                return _load_json(f, repr(url))
        except OSError as exc:
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
        return _load_json(f, repr(info_path))


def has_info(data_dir: str) -> bool:
    """True when the local folder ``data_dir`` holds an ``_info.json`` (a dataset that is complete)."""
    return os.path.isfile(os.path.join(_local_path(data_dir), INFO_NAME))


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
        raise ValueError(f'empty data source: give a folder with {INFO_NAME} or a shard pattern')
    if not _is_pattern(spec):
        info = read_info(spec)
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


def _sibling_folder(urls: Sequence[str]) -> Optional[str]:
    """The one local folder holding all of ``urls``, else None (remote URLs, or several folders)."""
    if any(_is_remote(u) for u in urls):
        return None
    folders = {os.path.dirname(_local_path(u)) for u in urls}
    return folders.pop() if len(folders) == 1 else None


def _lengths_from_sibling_info(urls: Sequence[str]) -> Optional[List[int]]:
    """Shard lengths of local shards from an ``_info.json`` in their folder, if it lists all of them."""
    folder = _sibling_folder(urls)
    if folder is None or not has_info(folder or '.'):
        return None
    info = read_info(folder or '.')
    known = {}
    for entry in (info.get('splits') or {}).values():
        known.update(zip(entry.get('filenames', []), entry.get('shard_lengths', [])))
    names = [os.path.basename(_local_path(u)) for u in urls]
    if not all(n in known for n in names):
        return None
    return [int(known[n]) for n in names]


def num_classes_from_info(data_dir: str) -> Optional[int]:
    """Class count of a dataset: from its ``_info.json``, else the lines of its ``class_map.txt``; None if unknown.

    ``data_dir`` is a dataset folder or URL, or a shard pattern (then the folder holding its local
    shards is asked). ``_info.json`` gives it as ``features.label.num_classes`` or
    ``features.label.names`` (HF's timm datasets) or a top-level ``num_classes``; make_shards
    writes ``class_map.txt``, one class name per line.
    """
    root: Optional[str] = (data_dir or '').strip()
    if root and _is_pattern(root):
        folder = _sibling_folder(expand_urls(root))
        root = None if folder is None else (folder or '.')
    if not root:
        return None
    try:
        info: Dict[str, Any] = read_info(root)
    except FileNotFoundError:
        info = {}
    label = (info.get('features') or {}).get('label') or {}
    if 'num_classes' in label:
        return int(label['num_classes'])
    if 'names' in label:
        return len(label['names'])
    if 'num_classes' in info:
        return int(info['num_classes'])
    class_map = os.path.join(_local_path(root), CLASS_MAP_NAME)
    if not _is_remote(root) and os.path.isfile(class_map):
        with open(class_map) as f:
            return sum(1 for line in f if line.strip())
    return None

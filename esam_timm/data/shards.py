"""Write image datasets as shuffled WebDataset tar shards with timm's ``_info.json``.

The command line is ``python -m esam_timm.data.make_shards SRC OUT``; it turns an ImageFolder tree (ImageNet's
``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG`` layout) into shards. Images keep their original
bytes (no re-encoding, so no quality loss); every sample has three members: the image (``.jpg``,
``.png`` or ``.webp``), ``.cls`` (the class index as ASCII text) and ``.json`` (file name, label,
class name). ``_info.json`` follows the layout of the public ``timm/imagenet-1k-wds`` shards, so
timm's own ``wds/`` reader accepts the output as well.
"""
import json
import logging
import math
import os
import random
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import webdataset as wds
from tqdm import tqdm

_logger = logging.getLogger(__name__)

INFO_NAME = '_info.json'
CLASS_MAP_NAME = 'class_map.txt'
# Fixed member time stamp: the same input gives byte-identical shards.
_MTIME = 1_700_000_000.0
_IMAGE_EXTS = {'.jpg': 'jpg', '.jpeg': 'jpg', '.png': 'png', '.webp': 'webp'}
_SPLIT_DIRS = {'train': ('train',), 'validation': ('val', 'validation')}


@dataclass(frozen=True)
class ShardRecord:
    """One sample to write: ``image`` is encoded bytes, or a file path read by the writer process."""

    key: str
    image: Union[bytes, str]
    ext: str
    label: int
    meta: Mapping[str, Any] = field(default_factory=dict)


def shard_sizes(num_samples: int, max_count: int) -> List[int]:
    """Split ``num_samples`` into the fewest shards of at most ``max_count``, sizes differing by <= 1."""
    if max_count < 1:
        raise ValueError(f'max_count must be >= 1, got {max_count}')
    if num_samples < 1:
        raise ValueError(f'cannot write a split with {num_samples} samples; need at least 1')
    num_shards = math.ceil(num_samples / max_count)
    base, extra = divmod(num_samples, num_shards)
    return [base + 1 if i < extra else base for i in range(num_shards)]


def _write_shard(path: str, records: Sequence[ShardRecord]) -> int:
    """Write one tar shard atomically (temp file + rename) and return its sample count."""
    tmp_path = f'{path}.{os.getpid()}.tmp'
    with wds.TarWriter(tmp_path, mtime=_MTIME, encoder=False) as writer:
        for rec in records:
            if isinstance(rec.image, bytes):
                image = rec.image
            else:
                with open(rec.image, 'rb') as f:
                    image = f.read()
            meta = dict(rec.meta, label=rec.label)
            writer.write({
                '__key__': rec.key,
                rec.ext: image,
                'cls': str(rec.label).encode('ascii'),
                'json': json.dumps(meta, sort_keys=True).encode('utf-8'),
            })
    os.replace(tmp_path, path)
    return len(records)


def write_split(
        records: Sequence[ShardRecord],
        out_dir: Union[str, Path],
        split: str,
        *,
        prefix: str,
        max_count: int = 1000,
        workers: int = 1,
        seed: int = 0,
        progress: bool = True,
) -> Dict[str, Any]:
    """Shuffle ``records`` and write them as ``{prefix}-{split}-NNNN.tar`` shards into ``out_dir``.

    The order is shuffled once with ``seed`` so that every shard holds a mix of classes (the train
    loader's shuffle buffer only mixes nearby samples). Shards are written by ``workers`` processes.
    Returns the split's ``_info.json`` entry (name, num_samples, filenames, shard_lengths).
    """
    counts = Counter(r.key for r in records)
    dupes = sorted(k for k, n in counts.items() if n > 1)
    if dupes:
        raise ValueError(f'sample keys must be unique within split {split!r}; duplicated: {dupes[:5]}')
    bad_keys = [k for k in counts if '.' in k or '/' in k]
    if bad_keys:
        raise ValueError(f'sample keys must not contain "." or "/" (WebDataset splits on them): {bad_keys[:5]}')
    order = list(records)
    random.Random(seed).shuffle(order)
    sizes = shard_sizes(len(order), max_count)
    width = max(4, len(str(len(sizes) - 1)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    filenames = [f'{prefix}-{split}-{i:0{width}d}.tar' for i in range(len(sizes))]
    chunks, start = [], 0
    for size in sizes:
        chunks.append(order[start:start + size])
        start += size
    paths = [str(out_dir / name) for name in filenames]
    bar = tqdm(total=len(order), desc=f'{split} shards', unit='img', disable=not progress)
    with bar:
        if workers <= 1:
            for path, chunk in zip(paths, chunks):
                bar.update(_write_shard(path, chunk))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for count in pool.map(_write_shard, paths, chunks):
                    bar.update(count)
    _logger.info('wrote %d samples of split %r into %d shards in %s', len(order), split, len(sizes), out_dir)
    return {'name': split, 'num_samples': len(order), 'filenames': filenames, 'shard_lengths': sizes}


def write_info(
        out_dir: Union[str, Path],
        name: str,
        splits: Mapping[str, Mapping[str, Any]],
        extra: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write (or merge into) ``out_dir/_info.json`` in timm's layout; splits already listed are kept.

    ``extra`` adds top-level keys (timm's reader ignores them). The file is replaced atomically so a
    reader never sees a half-written file, and it is written last, marking the dataset complete.
    """
    path = Path(out_dir) / INFO_NAME
    info: Dict[str, Any] = {'name': name, 'splits': {}}
    if path.exists():
        with open(path) as f:
            old = json.load(f)
        info['splits'].update(old.get('splits', {}))
    info['splits'].update({k: dict(v) for k, v in splits.items()})
    info.update(extra or {})
    tmp_path = path.with_name(f'{INFO_NAME}.{os.getpid()}.tmp')
    with open(tmp_path, 'w') as f:
        json.dump(info, f, indent=2)
    os.replace(tmp_path, path)
    return path


def _safe_key(rel_path: str) -> str:
    """Turn a relative file path into a WebDataset key: no extension, no '.', no '/'."""
    stem = os.path.splitext(rel_path)[0]
    return re.sub(r'[./\\]', '_', stem)


def find_classes(split_dir: Union[str, Path]) -> List[str]:
    """Class names of an ImageFolder split: its sub-folder names, sorted (torchvision's order)."""
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f'no class sub-folders found in {str(split_dir)!r}')
    return classes


def scan_image_folder(split_dir: Union[str, Path], class_to_idx: Mapping[str, int]) -> List[ShardRecord]:
    """List the images of an ImageFolder split as records (paths, not bytes: workers read them)."""
    split_dir = Path(split_dir)
    records, skipped = [], 0
    for class_name in sorted(e.name for e in os.scandir(split_dir) if e.is_dir()):
        if class_name not in class_to_idx:
            raise ValueError(
                f'class folder {class_name!r} in {str(split_dir)!r} is not in the class map '
                f'({len(class_to_idx)} classes, e.g. {sorted(class_to_idx)[:3]})')
        for root, _, files in os.walk(split_dir / class_name):
            for fname in sorted(files):
                ext = _IMAGE_EXTS.get(os.path.splitext(fname)[1].lower())
                if ext is None:
                    skipped += 1
                    continue
                full = os.path.join(root, fname)
                rel = os.path.relpath(full, split_dir)
                records.append(ShardRecord(
                    key=_safe_key(rel), image=full, ext=ext, label=class_to_idx[class_name],
                    meta={'filename': rel, 'class_name': class_name}))
    if skipped:
        _logger.warning('skipped %d files without an image extension %s in %s', skipped, sorted(_IMAGE_EXTS), split_dir)
    if not records:
        raise FileNotFoundError(f'no images ({", ".join(sorted(_IMAGE_EXTS))}) found under {str(split_dir)!r}')
    return records


def load_class_map(path: Union[str, Path]) -> Dict[str, int]:
    """Read a class map file: one class name per line, the line number is the class index."""
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    if len(set(names)) != len(names):
        raise ValueError(f'class map {str(path)!r} lists a class more than once')
    return {name: i for i, name in enumerate(names)}


def _find_split_dirs(src: Path, splits: Optional[Sequence[str]]) -> List[Tuple[str, Path]]:
    """Map output split names to source folders: ``name=folder`` items, or train/val(idation) found in src."""
    found = []
    if splits:
        for item in splits:
            name, _, folder = item.partition('=')
            path = src / (folder or name)
            if not path.is_dir():
                raise FileNotFoundError(f'split folder {str(path)!r} for split {name!r} does not exist')
            found.append((name, path))
        return found
    for name, candidates in _SPLIT_DIRS.items():
        for folder in candidates:
            if (src / folder).is_dir():
                found.append((name, src / folder))
                break
    if not found:
        raise FileNotFoundError(
            f'no split folders in {str(src)!r}: looked for {[c for v in _SPLIT_DIRS.values() for c in v]}; '
            'pass --splits name=folder')
    return found


def make_shards(
        src: Union[str, Path],
        out: Union[str, Path],
        *,
        splits: Optional[Sequence[str]] = None,
        prefix: Optional[str] = None,
        max_count: int = 1000,
        workers: int = 1,
        seed: int = 0,
        class_map: Optional[Union[str, Path]] = None,
        progress: bool = True,
) -> Path:
    """Convert the ImageFolder splits under ``src`` into shards in ``out``; return ``out/_info.json``.

    ``splits`` items are ``name`` or ``name=folder`` (default: ``train`` and ``val``/``validation``,
    written as timm's split names ``train`` and ``validation``). Class indices come from
    ``class_map`` (one name per line) or the sorted class folders of the first split; the map used
    is written to ``out/class_map.txt``.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f'source folder {str(src)!r} does not exist')
    split_dirs = _find_split_dirs(src, splits)
    if class_map is not None:
        class_to_idx = load_class_map(class_map)
    else:
        class_to_idx = {c: i for i, c in enumerate(find_classes(split_dirs[0][1]))}
    prefix = prefix or src.resolve().name
    out.mkdir(parents=True, exist_ok=True)
    with open(out / CLASS_MAP_NAME, 'w') as f:
        f.writelines(f'{name}\n' for name in sorted(class_to_idx, key=class_to_idx.get))
    infos = {}
    for name, path in split_dirs:
        records = scan_image_folder(path, class_to_idx)
        infos[name] = write_split(
            records, out, name, prefix=prefix, max_count=max_count, workers=workers, seed=seed, progress=progress)
    return write_info(out, prefix, infos)

"""Write image datasets as shuffled WebDataset tar shards with timm's ``_info.json``.

The command line is ``python -m esam_timm.data.make_shards SRC OUT``; it turns an ImageFolder tree
(``SRC/<split>/<class>/<image>``, e.g. ImageNet's ``train/n01440764/*.JPEG``) into shards. Images
keep their original bytes (no re-encoding, so no quality loss); every sample has three members: the
image (``.jpg``, ``.png`` or ``.webp``), ``.cls`` (the class index as ASCII text) and ``.json``
(file name, label, class name). ``_info.json`` follows the layout of the public
``timm/imagenet-1k-wds`` shards, so timm's own ``wds/`` reader accepts the output as well.

What :func:`make_shards` guarantees:

- Every requested split's layout is checked before anything is written: a flat folder of images
  (such as ImageNet's official ``val/``) or stray images beside the class folders are refused with
  the expected layout and how to get it.
- Every image is decoded while it is packed; files PIL cannot decode are skipped, logged and listed
  under the split's ``corrupt_files`` in ``_info.json``, never packed.
- Re-running into a folder replaces the splits it writes: their old shards (those the old
  ``_info.json`` lists and those named like the new ones) are removed once the new ``_info.json`` is
  in place, so ``_info.json`` and the folder agree. Other files are left alone; ``.tar`` files no
  split lists are named in a warning.
- Every file is written atomically (:mod:`esam_timm.fileio`); ``_info.json`` is written last, and a
  rewritten split is taken out of it first, so a crash never leaves it listing half-written shards.
"""
import io
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
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from esam_timm.fileio import atomic_open, atomic_write_text

from .sources import CLASS_MAP_NAME, INFO_NAME, read_info
from .tar import describe_error

_logger = logging.getLogger(__name__)

# Fixed member time stamp: the same input gives byte-identical shards.
_MTIME = 1_700_000_000.0
_IMAGE_EXTS = {'.jpg': 'jpg', '.jpeg': 'jpg', '.png': 'png', '.webp': 'webp'}
_SPLIT_DIRS = {'train': ('train',), 'validation': ('val', 'validation')}
_SHARD_SUFFIXES = ('.tar', '.tar.gz', '.tgz')
# File names shown in a log line; _info.json lists them all.
_SHOWN = 10

LAYOUT_HELP = (
    'make_shards reads the ImageFolder layout SRC/<split>/<class>/<image> (e.g. '
    'val/n01440764/ILSVRC2012_val_00000293.JPEG), one folder per class in every split. ImageNet\'s '
    'official val/ is flat: sort it into class folders first, e.g. with the widely used valprep.sh '
    '(from the PyTorch ImageNet example) or with the devkit\'s ground-truth labels, then re-run.')


@dataclass(frozen=True)
class ShardRecord:
    """One sample to write: ``image`` is encoded bytes, or a file path read by the writer process."""

    key: str
    image: Union[bytes, str]
    ext: str
    label: int
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The name reports use: the source file name when known, else the key."""
        return str(self.meta.get('filename', self.key))


def shard_sizes(num_samples: int, max_count: int) -> List[int]:
    """Split ``num_samples`` into the fewest shards of at most ``max_count``, sizes differing by <= 1."""
    if max_count < 1:
        raise ValueError(f'max_count must be >= 1, got {max_count}')
    if num_samples < 1:
        raise ValueError(f'cannot write a split with {num_samples} samples; need at least 1')
    num_shards = math.ceil(num_samples / max_count)
    base, extra = divmod(num_samples, num_shards)
    return [base + 1 if i < extra else base for i in range(num_shards)]


def _load_checked(rec: ShardRecord) -> Tuple[Optional[bytes], Optional[str]]:
    """(image bytes, None) when PIL decodes the image in full, as the loader will; else (None, error text)."""
    try:
        if isinstance(rec.image, bytes):
            data = rec.image
        else:
            with open(rec.image, 'rb') as f:
                data = f.read()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except UnidentifiedImageError:  # its message shows only the in-memory buffer
        return None, 'UnidentifiedImageError: not an image format PIL can read'
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return None, describe_error(exc)
    return data, None


def _write_shard(path: str, records: Sequence[ShardRecord]) -> Tuple[int, List[Dict[str, str]]]:
    """Write one tar shard atomically, skipping images that do not decode.

    Returns the number of samples written and ``{'file', 'error'}`` for each skipped image.
    """
    written, corrupt = 0, []
    with atomic_open(path, 'wb') as f, wds.TarWriter(f, mtime=_MTIME, encoder=False) as writer:
        for rec in records:
            image, error = _load_checked(rec)
            if image is None:
                corrupt.append({'file': rec.name, 'error': str(error)})
                continue
            meta = dict(rec.meta, label=rec.label)
            writer.write({
                '__key__': rec.key,
                rec.ext: image,
                'cls': str(rec.label).encode('ascii'),
                'json': json.dumps(meta, sort_keys=True).encode('utf-8'),
            })
            written += 1
    return written, corrupt


def check_records(records: Sequence[ShardRecord], split: str) -> None:
    """Refuse keys that WebDataset cannot round-trip: duplicates, or keys holding '.' or '/'."""
    counts = Counter(r.key for r in records)
    dupes = sorted(k for k, n in counts.items() if n > 1)
    if dupes:
        raise ValueError(f'sample keys must be unique within split {split!r}; duplicated: {dupes[:5]}')
    bad_keys = [k for k in counts if '.' in k or '/' in k]
    if bad_keys:
        raise ValueError(f'sample keys must not contain "." or "/" (WebDataset splits on them): {bad_keys[:5]}')


def _shard_pattern(prefix: str, split: str) -> 're.Pattern[str]':
    return re.compile(rf'{re.escape(prefix)}-{re.escape(split)}-\d+\.tar')


def _remove_files(out_dir: Path, names: Set[str], why: str) -> None:
    for name in sorted(names):
        path = out_dir / name
        if path.is_file():
            path.unlink()
            _logger.info('removed %s (%s)', path, why)


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
    Each image is decoded first; one that fails is skipped, logged and listed under
    ``corrupt_files`` (``[{'file', 'error'}]``) in the returned entry, and a shard left empty is not
    kept. Older ``{prefix}-{split}-NNNN.tar`` files that this call did not write are removed.
    Returns the split's ``_info.json`` entry (name, num_samples, filenames, shard_lengths).

    Raises:
        ValueError: duplicate or invalid keys, or no image of the split decodes.
    """
    check_records(records, split)
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
    results: List[Tuple[int, List[Dict[str, str]]]] = []
    bar = tqdm(total=len(order), desc=f'{split} shards', unit='img', disable=not progress)
    with bar:
        if workers <= 1:
            for path, chunk in zip(paths, chunks):
                results.append(_write_shard(path, chunk))
                bar.update(len(chunk))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for result, chunk in zip(pool.map(_write_shard, paths, chunks), chunks):
                    results.append(result)
                    bar.update(len(chunk))
    corrupt = [item for _, items in results for item in items]
    kept = [(name, count) for name, (count, _) in zip(filenames, results) if count]
    _remove_files(out_dir, {name for name, (count, _) in zip(filenames, results) if not count},
                  'every image of it failed to decode')
    if not kept:
        raise ValueError(f'none of the {len(order)} images of split {split!r} decodes, e.g. {corrupt[:3]}')
    pattern = _shard_pattern(prefix, split)
    _remove_files(out_dir, {e.name for e in os.scandir(out_dir) if pattern.fullmatch(e.name)} - set(filenames),
                  f'a stale shard of split {split!r}')
    entry: Dict[str, Any] = {'name': split, 'num_samples': sum(n for _, n in kept),
                             'filenames': [name for name, _ in kept], 'shard_lengths': [n for _, n in kept]}
    if corrupt:
        entry['corrupt_files'] = corrupt
        shown = ', '.join(f"{c['file']} ({c['error']})" for c in corrupt[:_SHOWN])
        _logger.warning('split %r: skipped %d corrupt image(s) that do not decode (all listed under corrupt_files '
                        'in %s): %s%s', split, len(corrupt), INFO_NAME, shown, ', ...' if len(corrupt) > _SHOWN else '')
    _logger.info('wrote %d samples of split %r into %d shards in %s', entry['num_samples'], split, len(kept), out_dir)
    return entry


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
        info['splits'].update(read_info(str(out_dir)).get('splits', {}))
    info['splits'].update({k: dict(v) for k, v in splits.items()})
    info.update(extra or {})
    atomic_write_text(path, json.dumps(info, indent=2))
    return path


def _forget_splits(out_dir: Path, splits: Sequence[str]) -> Set[str]:
    """Take ``splits`` out of an existing ``_info.json`` before they are rewritten; return their old shard files."""
    if not (out_dir / INFO_NAME).is_file():
        return set()
    info = read_info(str(out_dir))
    old = info.get('splits') or {}
    files = {f for s in splits for f in (old.get(s) or {}).get('filenames', [])}
    if any(s in old for s in splits):
        info['splits'] = {k: v for k, v in old.items() if k not in splits}
        atomic_write_text(out_dir / INFO_NAME, json.dumps(info, indent=2))
    return files


def _warn_unlisted_shards(out_dir: Path) -> None:
    """Name the shard-like files in ``out_dir`` that no split of its ``_info.json`` lists."""
    listed = {f for s in (read_info(str(out_dir)).get('splits') or {}).values() for f in s.get('filenames', [])}
    unlisted = sorted(e.name for e in os.scandir(out_dir) if e.name.endswith(_SHARD_SUFFIXES) and e.name not in listed)
    if unlisted:
        _logger.warning('%d shard file(s) in %s are listed by no split of %s and are not part of the dataset '
                        '(left alone: written by another tool or run?): %s', len(unlisted), out_dir, INFO_NAME,
                        ', '.join(unlisted[:_SHOWN]) + (', ...' if len(unlisted) > _SHOWN else ''))


def _safe_key(rel_path: str) -> str:
    """Turn a relative file path into a WebDataset key: no extension, no '.', no '/'."""
    stem = os.path.splitext(rel_path)[0]
    return re.sub(r'[./\\]', '_', stem)


def check_split_layout(split_dir: Union[str, Path], split: str) -> None:
    """Refuse a split folder that is not ``<split>/<class>/<image>``: a flat folder of images, or images
    lying beside the class folders (they would not be packed). Reads names only."""
    split_dir = Path(split_dir)
    entries = list(os.scandir(split_dir))
    classes = [e.name for e in entries if e.is_dir()]
    loose = sorted(e.name for e in entries if e.is_file() and os.path.splitext(e.name)[1].lower() in _IMAGE_EXTS)
    if loose:
        where = 'and no class folders' if not classes else f'beside its {len(classes)} class folders'
        raise ValueError(
            f'split {split!r}: {str(split_dir)!r} holds {len(loose)} image files directly (e.g. {loose[:3]}) '
            f'{where}; nothing was written. {LAYOUT_HELP}')
    if not classes:
        raise ValueError(f'split {split!r}: no class folders in {str(split_dir)!r}; nothing was written. {LAYOUT_HELP}')


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
    is written to ``out/class_map.txt``. Every split is checked (layout, class names, keys) before
    anything is written; corrupt images are skipped and listed; the old shards of the splits written
    are removed (see the module docstring).

    Raises:
        FileNotFoundError: missing source or split folder, or a split without images.
        ValueError: a split not in ``<split>/<class>/<image>`` layout, a class missing from the
            class map, invalid keys, or a split none of whose images decodes.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f'source folder {str(src)!r} does not exist')
    split_dirs = _find_split_dirs(src, splits)
    for name, path in split_dirs:
        check_split_layout(path, name)
    if class_map is not None:
        class_to_idx = load_class_map(class_map)
    else:
        class_to_idx = {c: i for i, c in enumerate(find_classes(split_dirs[0][1]))}
    records = {}
    for name, path in split_dirs:
        records[name] = scan_image_folder(path, class_to_idx)
        check_records(records[name], name)
    prefix = prefix or src.resolve().name
    out.mkdir(parents=True, exist_ok=True)
    old_files = _forget_splits(out, list(records))
    atomic_write_text(out / CLASS_MAP_NAME, ''.join(f'{c}\n' for c in sorted(class_to_idx, key=class_to_idx.get)))
    infos = {name: write_split(recs, out, name, prefix=prefix, max_count=max_count, workers=workers, seed=seed,
                               progress=progress)
             for name, recs in records.items()}
    info_path = write_info(out, prefix, infos)
    _remove_files(out, old_files - {f for entry in infos.values() for f in entry['filenames']},
                  'a shard of the previous version of its split')
    _warn_unlisted_shards(out)
    return info_path

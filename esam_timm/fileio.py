"""Atomic file writes: write a temporary file beside the target, flush it to disk, rename it over.

A crash (or a kill -9) leaves either the old file or the new one, never a half-written one. The one home
for every file the package writes that a later reader must trust: checkpoints, args.yaml, summary.csv,
shards and ``_info.json``.
"""
import os
import shutil
from contextlib import contextmanager
from typing import Any, BinaryIO, Iterator, TextIO, Union

import torch

__all__ = ['atomic_open', 'atomic_write_text', 'atomic_torch_save', 'atomic_copy']

PathLike = Union[str, 'os.PathLike[str]']


def _tmp_name(path: PathLike) -> str:
    """A temporary name unique to this process, so two writers never share one."""
    return f'{os.fspath(path)}.{os.getpid()}.tmp'


@contextmanager
def atomic_open(path: PathLike, mode: str = 'w', **kwargs: Any) -> Iterator[Union[TextIO, BinaryIO]]:
    """``open()`` for writing whose result appears at ``path`` only when the block ends without error."""
    if mode not in ('w', 'wb'):
        raise ValueError(f'atomic_open mode={mode!r} is invalid: use "w" or "wb".')
    tmp = _tmp_name(path)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_open(path, 'w', newline='') as f:
        f.write(text)


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` that never leaves a half-written checkpoint."""
    with atomic_open(path, 'wb') as f:
        torch.save(obj, f)


def atomic_copy(src: PathLike, dst: PathLike) -> None:
    """Make ``dst`` a copy of ``src`` (a hard link when the file system allows), atomically."""
    tmp = _tmp_name(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

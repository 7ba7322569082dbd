"""Atomic file writes: write a temporary file beside the target, flush it to disk, rename it over.

A crash (or a kill -9) leaves either the old file or the new one, never a half-written one. The one home
for every file the package writes that a later reader must trust: checkpoints, args.yaml, summary.csv,
shards and ``_info.json``.

A write that fails because the file system is full raises :class:`DiskFullError`, one message naming
the file and the free space, whatever layer noticed it (torch's zip writer wraps the ``OSError`` in a
long ``RuntimeError``). A killed writer leaves its ``<name>.<pid>.tmp`` behind: :func:`remove_stale_tmp`
clears those of a folder its caller owns.
"""
import errno
import glob
import os
import shutil
from contextlib import contextmanager
from typing import Any, BinaryIO, Iterator, List, Optional, TextIO, Union

import torch

__all__ = ['DiskFullError', 'atomic_open', 'atomic_write_text', 'atomic_torch_save', 'atomic_copy',
           'remove_stale_tmp']

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A file could not be written because its file system (or the user's quota) is full."""

    def __init__(self, path: str) -> None:
        folder = os.path.dirname(os.path.abspath(path))
        try:
            free = f'{shutil.disk_usage(folder).free / 2 ** 20:.0f} MiB free there now'
        except OSError:
            free = 'free space unknown'
        super().__init__(f'no space left on the device to write {path} ({free}): free some space or write '
                         f'elsewhere (--output); the file it would replace is unchanged')
        self.errno = errno.ENOSPC


def _is_disk_full(exc: Optional[BaseException]) -> bool:
    """True when ``exc`` or an exception it was raised from says the disk or quota is full."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if 'No space left on device' in str(exc) or 'Disk quota exceeded' in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False

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
    except Exception as exc:
        if _is_disk_full(exc):
            raise DiskFullError(os.fspath(path)) from exc
        raise
    finally:
        if os.path.lexists(tmp):
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
    except Exception as exc:
        if _is_disk_full(exc):
            raise DiskFullError(os.fspath(dst)) from exc
        raise
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def remove_stale_tmp(folder: PathLike) -> List[str]:
    """Remove the temporary files killed writers left in ``folder`` (call it only while no other process
    writes there, e.g. under the run folder's lock); returns their names."""
    removed = []
    for path in sorted(glob.glob(os.path.join(glob.escape(os.fspath(folder)), '*.tmp'))):
        try:
            os.remove(path)
        except FileNotFoundError:
            continue
        removed.append(os.path.basename(path))
    return removed

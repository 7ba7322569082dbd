"""The lean tar reader: the samples of one WebDataset shard, and a clear error when the shard breaks.

Shards are opened with ``webdataset.gopen``, so local paths, ``file:``, ``pipe:`` and http(s) URLs
all work; ``.tar.gz``/``.tgz`` shards are decompressed on the fly. This module knows nothing about
labels, images or bad-data accounting: :func:`read_shard` raises :class:`ShardReadError` and the
pipelines in :mod:`esam_timm.data.wds` decide what a failure costs.
"""
import gzip
import tarfile
from typing import Any, Dict, Iterator, Optional, Tuple

import webdataset as wds

__all__ = ['ShardReadError', 'read_shard', 'split_member_name', 'tar_members']

_BLOCK = 512
_READ_BUFFER = 1 << 20
_REGULAR = (b'0', b'\0', b'7')


class ShardReadError(OSError):
    """A shard could not be opened, broke off mid-way (truncated, corrupt header) or its reader failed.

    ``partial`` is True when the break cut a sample in two (that sample is lost); ``cause`` is the
    original exception.
    """

    def __init__(self, url: str, cause: BaseException, partial: bool) -> None:
        super().__init__(f'{url}: {describe_error(cause)}')
        self.url = url
        self.cause = cause
        self.partial = partial


def describe_error(exc: BaseException) -> str:
    """``"Type: message"``, the text that bad-data reports and logs show for an exception."""
    text = str(exc)
    return f'{type(exc).__name__}: {text}' if text else type(exc).__name__


def split_member_name(name: str) -> Tuple[Optional[str], str]:
    """Split a tar member name into (sample key, lower-case extension) at the first dot of the base name."""
    folder, _, base = name.rpartition('/')
    stem, dot, ext = base.partition('.')
    if not dot or not stem:
        return None, ''
    return (f'{folder}/{stem}' if folder else stem), ext.lower()


def _read_exact(stream: Any, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise tarfile.ReadError(f'unexpected end of data: wanted {size} bytes, got {len(data)}')
    return data


def _parse_header(block: bytes) -> Tuple[str, int, bytes]:
    """(name, size, type flag) of a ustar/GNU header block; ReadError on a bad checksum."""
    try:
        stored = int(block[148:156].strip(b' \0') or b'0', 8)
    except ValueError:
        stored = -1
    if stored != sum(block[:148]) + 256 + sum(block[156:]):
        raise tarfile.ReadError('bad tar header checksum (corrupt, or not a tar file)')
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


def _close_quietly(stream: Any) -> None:
    """Close a stream that is being abandoned; its own close error would hide the first one."""
    try:
        stream.close()
    except Exception:  # a pipe: command killed mid-read reports a status on close; nothing to add
        pass


def read_shard(url: str) -> Iterator[Dict[str, Any]]:
    """Yield the samples (``{'__key__', '__url__', ext: bytes}``) of one tar shard (``.tar.gz``/``.tgz`` too).

    Members named ``__*`` are skipped. The samples completed before a failure are yielded; then
    :class:`ShardReadError` is raised (``partial`` says whether a sample was cut in two). A shard
    that ends cleanly at a member boundary without the end-of-archive blocks reads as complete:
    only a known shard length (``_info.json``) can tell it is short.
    """
    try:
        stream = wds.gopen(url, bufsize=_READ_BUFFER)
    except Exception as exc:  # gopen raises many types (OSError, ValueError, subprocess errors)
        raise ShardReadError(url, exc, partial=False) from exc
    current: Optional[Dict[str, Any]] = None
    try:
        members = tar_members(gzip.GzipFile(fileobj=stream) if url.endswith(('.gz', '.tgz')) else stream)
        for name, data in members:
            key, ext = split_member_name(name)
            if key is None or key.startswith('__'):
                continue
            if current is not None and current['__key__'] != key:
                sample, current = current, None
                yield sample
            if current is None:
                current = {'__key__': key, '__url__': url}
            current[ext] = data
    except Exception as exc:  # corrupt data surfaces as ReadError, OSError, EOFError, zlib.error...
        _close_quietly(stream)
        raise ShardReadError(url, exc, partial=current is not None) from exc
    except BaseException:  # GeneratorExit (the consumer stopped early), KeyboardInterrupt
        _close_quietly(stream)
        raise
    try:
        stream.close()  # a pipe: command reports its failure here
    except Exception as exc:
        raise ShardReadError(url, exc, partial=current is not None) from exc
    if current is not None:
        yield current

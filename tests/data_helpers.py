"""Shared helpers for the data-layer tests: tiny real-JPEG shards with one label per sample."""
import io
import json
import os
import tarfile
from pathlib import Path
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from esam_timm.data.shards import ShardRecord, write_info

IMAGE_SIZE = 32


def jpeg_bytes(index: int, size: int = IMAGE_SIZE) -> bytes:
    """A small real JPEG whose content depends on ``index`` (a two-colour split at a varying row)."""
    rng = np.random.default_rng(index)
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = rng.integers(0, 256, size=3)
    pixels[index % size:] = rng.integers(0, 256, size=3)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format='JPEG', quality=90)
    return buf.getvalue()


def truncated_jpeg(index: int) -> bytes:
    """``jpeg_bytes(index)`` cut in the middle of its compressed data: the header parses (PIL and a GPU
    decode's worker side read its size), the decode fails (PIL, TorchCodec: "truncated")."""
    data = jpeg_bytes(index)
    start_of_scan = data.index(b'\xff\xda')
    return data[:start_of_scan + (len(data) - start_of_scan) // 2]


def decoded(index: int) -> np.ndarray:
    """What PIL decodes from ``jpeg_bytes(index)``: the reference for round-trip checks (CHW uint8)."""
    return np.asarray(Image.open(io.BytesIO(jpeg_bytes(index))).convert('RGB')).transpose(2, 0, 1)


def write_identity_shards(out_dir: Path, sizes: Sequence[int], split: str = 'train',
                          overrides: Optional[Dict[int, Dict[str, Optional[bytes]]]] = None) -> List[str]:
    """Write shards of the given sizes where sample ``i`` has label ``i``; list the shard file names.

    ``overrides`` maps a sample index to member bytes replacing the written ones (``None`` drops
    the member), to plant bad samples. ``_info.json`` is written in timm's layout.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = overrides or {}
    names, index = [], 0
    for shard, size in enumerate(sizes):
        name = f'data-{split}-{shard:04d}.tar'
        with tarfile.open(out_dir / name, 'w') as tar:
            for _ in range(size):
                members = {'cls': str(index).encode(), 'jpg': jpeg_bytes(index),
                           'json': json.dumps({'label': index}).encode()}
                members.update(overrides.get(index, {}))
                for ext, data in members.items():
                    if data is None:
                        continue
                    info = tarfile.TarInfo(f'{index:06d}.{ext}')
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                index += 1
        names.append(name)
    write_info(out_dir, 'data', {split: {'name': split, 'num_samples': sum(sizes), 'filenames': names,
                                         'shard_lengths': list(sizes)}})
    return names


def truncate_in_sample(path: Path, index: int) -> None:
    """Cut a tar file in the middle of the image data of sample ``index`` (its earlier samples stay whole)."""
    with tarfile.open(path) as tar:
        member = tar.getmember(f'{index:06d}.jpg')
        cut = member.offset_data + member.size // 2
    with open(path, 'r+b') as f:
        f.truncate(cut)


def truncate_after_sample(path: Path, index: int) -> None:
    """Cut a tar file cleanly after the last member of sample ``index``: no error, just fewer samples."""
    with tarfile.open(path) as tar:
        last = [m for m in tar.getmembers() if m.name.startswith(f'{index:06d}.')][-1]
        cut = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    with open(path, 'r+b') as f:
        f.truncate(cut)


def write_image_folder(root: Path, counts: Dict[str, Dict[str, int]]) -> Dict[Tuple[str, str], bytes]:
    """Write an ImageFolder tree ``root/split/class/img_k.JPEG``; return {(split, relpath): bytes}."""
    files, index = {}, 0
    for split, per_class in counts.items():
        for class_name, n in per_class.items():
            os.makedirs(root / split / class_name, exist_ok=True)
            for k in range(n):
                data = jpeg_bytes(index)
                rel = f'{class_name}/img_{k}.JPEG'
                (root / split / rel).write_bytes(data)
                files[(split, rel)] = data
                index += 1
    return files


def records_for(indices: Sequence[int]) -> List[ShardRecord]:
    """In-memory records with label = index, for ``write_split``."""
    return [ShardRecord(key=f's{i:05d}', image=jpeg_bytes(i), ext='jpg', label=i) for i in indices]


__all__ = ['IMAGE_SIZE', 'decoded', 'jpeg_bytes', 'records_for', 'truncate_after_sample', 'truncate_in_sample',
           'truncated_jpeg', 'write_identity_shards', 'write_image_folder']


def run_ranks(target, *args, world_size: int = 2, timeout: float = 170) -> None:
    """Run ``target(rank, world_size, port, *args)`` in ``world_size`` spawned processes (a gloo group on a
    free local port) and fail if any hangs or exits non-zero."""
    import multiprocessing
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context('spawn')
    procs = [ctx.Process(target=target, args=(rank, world_size, port, *args)) for rank in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, 'a rank hung'
    assert [p.exitcode for p in procs] == [0] * world_size


@contextmanager
def gloo_group(rank: int, world_size: int, port: int) -> Iterator[None]:
    """Inside a :func:`run_ranks` worker: join the gloo group for the block, leave it after."""
    import datetime
    import multiprocessing

    import torch.distributed as dist
    # A spawned child inherits 'spawn'; DataLoader workers would re-import torch and timm each.
    multiprocessing.set_start_method('fork', force=True)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()

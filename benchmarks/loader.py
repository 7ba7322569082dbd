"""Images/s of one loader worker process vs. a plain PIL decode + RandomResizedCrop + flip loop.

Makes ImageNet-sized JPEGs (default 500x375, quality 90), writes them as shards with the project's
shard writer, then times, in alternating rounds (best round counts, as the machine may be shared):

* baseline: one process, JPEG bytes in memory -> PIL decode -> torchvision RandomResizedCrop(224)
  -> RandomHorizontalFlip -> uint8 tensor;
* plain worker: the baseline loop inside one DataLoader worker (what a worker process costs);
* ours in-process: the same loader with ``num_workers=0`` (what the wds path adds, no IPC);
* ours: ``create_train_loader`` with ONE worker process (tar reading, shuffle buffer, decode,
  timm's 224 training transform with the same augmentations, collation), timed in the main
  process over whole epochs (persistent worker, so its start-up is excluded).

Rates are images per CPU-second of the process doing the work (the worker's CPU time read from
/proc), which is what "per core" means and is robust to other load on a shared machine; wall-clock
rates are printed next to them.

Run: ``python benchmarks/loader.py [--images 512] [--rounds 5]``.
"""
import argparse
import io
import logging
import os
import platform
import tempfile
import time
from typing import Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, IterableDataset
from torchvision import transforms
from torchvision.transforms.functional import pil_to_tensor

from esam_timm.data import ShardRecord, create_train_loader, resolve_source, write_info, write_split


def photo_like_jpeg(rng: np.random.Generator, width: int, height: int, quality: int) -> bytes:
    """A JPEG with gradients, shapes and texture, so it compresses like a photo, not a flat image."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([(rng.uniform(0, 255) + rng.uniform(-0.3, 0.3) * xx + rng.uniform(-0.3, 0.3) * yy)
                     for _ in range(3)], axis=-1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        box = [x0, y0, x0 + rng.uniform(20, 200), y0 + rng.uniform(20, 200)]
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, size=(height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format='JPEG', quality=quality)
    return buf.getvalue()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def baseline_rate(jpegs: List[bytes], size: int) -> Tuple[float, float]:
    """(images per CPU second, images per wall second) of the plain single-process loop."""
    rrc, flip = transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()
    cpu, wall = time.process_time(), time.perf_counter()
    for data in jpegs:
        with Image.open(io.BytesIO(data)) as img:
            pil_to_tensor(flip(rrc(img.convert('RGB'))))
    return len(jpegs) / (time.process_time() - cpu), len(jpegs) / (time.perf_counter() - wall)


class _PlainLoop(IterableDataset):
    """The baseline loop as a DataLoader dataset: isolates the cost of being a worker process."""

    def __init__(self, jpegs: List[bytes], size: int, batch_size: int) -> None:
        super().__init__()
        self.jpegs, self.size, self.batch_size = jpegs, size, batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        rrc, flip = transforms.RandomResizedCrop(self.size), transforms.RandomHorizontalFlip()
        batch = []
        for data in self.jpegs:
            with Image.open(io.BytesIO(data)) as img:
                batch.append(pil_to_tensor(flip(rrc(img.convert('RGB')))))
            if len(batch) == self.batch_size:
                yield torch.stack(batch)
                batch = []


def loader_rate(loader: Iterable, epoch: Optional[int] = None) -> Tuple[float, float]:
    """(images per CPU second of the worker process, images per wall second) over one whole epoch."""
    if epoch is not None:
        loader.set_epoch(epoch)
    it = iter(loader)
    pid = it._workers[0].pid  # the persistent worker; it idles between epochs
    cpu, wall, count = _cpu_seconds(pid), time.perf_counter(), 0
    for batch in it:
        count += (batch[0] if isinstance(batch, (tuple, list)) else batch).shape[0]
    return count / (_cpu_seconds(pid) - cpu), count / (time.perf_counter() - wall)


def in_process_rate(loader, epoch: int) -> Tuple[float, float]:
    """(images per CPU second, per wall second) of a ``num_workers=0`` loader run in this process."""
    loader.set_epoch(epoch)
    cpu, wall = time.process_time(), time.perf_counter()
    count = sum(images.shape[0] for images, _ in loader)
    return count / (time.process_time() - cpu), count / (time.perf_counter() - wall)


def cpu_model() -> str:
    with open('/proc/cpuinfo') as f:
        for line in f:
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--images', type=int, default=512, help='JPEGs to make (one epoch of the loader)')
    parser.add_argument('--width', type=int, default=500)
    parser.add_argument('--height', type=int, default=375)
    parser.add_argument('--quality', type=int, default=90)
    parser.add_argument('--size', type=int, default=224, help='training crop size')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--rounds', type=int, default=5, help='alternating timing rounds; the best counts')
    parser.add_argument('--workdir', help='where to write the shards (default: a temp folder)')
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    rng = np.random.default_rng(0)
    jpegs = [photo_like_jpeg(rng, args.width, args.height, args.quality) for _ in range(args.images)]
    workdir = args.workdir or tempfile.mkdtemp(prefix='esam_loader_bench_')
    records = [ShardRecord(key=f'img{i:06d}', image=data, ext='jpg', label=i % 1000) for i, data in enumerate(jpegs)]
    write_info(workdir, 'bench', {'train': write_split(records, workdir, 'train', prefix='bench', max_count=128,
                                                       progress=False)})
    source = resolve_source(workdir, 'train')
    common = dict(batch_size=args.batch_size, img_size=args.size, num_workers=1, seed=0,
                  interpolation='bilinear', shuffle_buffer=256)
    same_aug = create_train_loader(source, color_jitter=0., **common)
    same_aug_inline = create_train_loader(source, color_jitter=0., **dict(common, num_workers=0))
    timm_default = create_train_loader(source, color_jitter=0.4, **common)
    plain_worker = DataLoader(_PlainLoop(jpegs, args.size, args.batch_size), batch_size=None, num_workers=1,
                              persistent_workers=True)

    print(f'machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}')
    print(f'{args.images} JPEGs {args.width}x{args.height} q{args.quality}, '
          f'mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB; crop {args.size}, batch {args.batch_size}')
    names = {'baseline': 'baseline: PIL decode + RandomResizedCrop + flip, 1 process',
             'plain_worker': 'the same loop inside 1 DataLoader worker (+ stacking)',
             'ours_inline': 'wds train loader in this process (num_workers=0), same augmentations',
             'ours': 'wds train loader, 1 worker, same augmentations',
             'ours_jitter': 'wds train loader, 1 worker, + color_jitter 0.4 (timm default)'}
    best = {k: (0., 0.) for k in names}
    for r in range(args.rounds):
        rates = {'baseline': baseline_rate(jpegs, args.size), 'plain_worker': loader_rate(plain_worker),
                 'ours_inline': in_process_rate(same_aug_inline, r), 'ours': loader_rate(same_aug, r),
                 'ours_jitter': loader_rate(timm_default, r)}
        print(f'round {r}: ' + ', '.join(f'{k} {c:.0f}/cpu-s {w:.0f}/s' for k, (c, w) in rates.items()))
        best = {k: (max(best[k][0], rates[k][0]), max(best[k][1], rates[k][1])) for k in names}
    print('best of rounds, images per CPU-second of the process | per wall-second:')
    for k, label in names.items():
        print(f'  {label:<72} {best[k][0]:6.0f} | {best[k][1]:6.0f}')
    print(f'ratio ours / baseline per core: {best["ours"][0] / best["baseline"][0]:.3f} '
          f'(wall clock: {best["ours"][1] / best["baseline"][1]:.3f})')
    print(f'ratio ours / same loop in a worker per core: {best["ours"][0] / best["plain_worker"][0]:.3f}')
    print(f'ratio ours in-process / baseline per core: {best["ours_inline"][0] / best["baseline"][0]:.3f}')

if __name__ == '__main__':
    main()

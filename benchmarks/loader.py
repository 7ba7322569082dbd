"""Images per CPU-second of one loader worker: timm's own loader vs ours (PIL decode, fast decode, GPU decode).

Makes ImageNet-sized JPEGs (default 500x375, quality 90) from real photographs: random crops (30-100%
of the area) and rescales of scikit-learn's 2 sample photos and scikit-image's photos (``skimage.data``;
the grey ones stored as RGB JPEGs, as ImageNet has some), or with ``--synthetic`` from generated
gradients and shapes. Writes them as WebDataset shards with timm's ``_info.json`` (the project's shard
writer), then times, in alternating rounds, each with ONE worker process, batch 32, 224 px:

* timm: ``timm.data.create_loader`` over ``timm.data.create_dataset('wds/bench', root=<shards>)`` (timm's
  own WebDataset reader and default ImageNet train transform: RandomResizedCrop(224, scale (0.08, 1),
  ratio (3/4, 4/3)), flip, uint8 ``fast_collate``; its prefetcher's normalisation runs in the main
  process, as ours runs on the device, so the worker does the same job in both);
* ours, decode='pil': ``esam_timm.data.create_train_loader`` with timm's transform;
* ours, decode='fast': the same draws (crop, flip, jitter) decoded by :mod:`esam_timm.data.decode`
  (TorchCodec's ``decode_jpeg`` for the full-size decode); its jitter runs in the worker, as when
  training on the CPU;
* ours, decode='fast', jitter on the device: what ``--decode fast`` does when training on a GPU: the
  worker decodes, crops and flips, and the colour jitter runs on the batch on the device
  (``BatchAugment``). No GPU here: that batch jitter runs on this CPU in the benchmark's process and
  its CPU time is counted with the worker's (the "+ device side" column), so the work equals timm's;
* ours, decode='gpu', on the CPU: GPU decode's code with ``device='cpu'``: the worker only parses
  headers and draws crops; the decode thread decodes with TorchCodec on this CPU, resizes, flips and
  jitters. Its worker column is what GPU decode asks of the loader workers; its "+ device side" column
  is a CPU stand-in, not a GPU figure;

each without colour jitter and with timm's default ``color_jitter=0.4``. Rates are images per
CPU-second of the worker process (its user + system time from /proc): robust to other load on a shared
machine; wall-clock rates are printed too. The "+ device side" rate adds the CPU time of the work done
outside the worker (the batch jitter, the decode thread); it equals the worker rate for the arms that
do everything in the worker. One untimed epoch per loader starts its worker; the table gives the best and
the median of the timed rounds. Also printed: a decode-only comparison of PIL and TorchCodec on the same
JPEGs, the share of crops that the fast path decodes at reduced DCT scale, and each arm's pixel mean and
std (the output statistics should agree).

Run: ``python benchmarks/loader.py [--images 1024] [--rounds 6] [--width 500 --height 375]``.
Needs the ``[bench]`` extra (scikit-learn, scikit-image) unless ``--synthetic``.
"""
import argparse
import gc
import io
import logging
import os
import platform
import random
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from esam_timm.data import ShardRecord, create_train_loader, resolve_source, write_info, write_split
from esam_timm.data.batch_aug import BatchAugment
from esam_timm.data.decode import draft_scale, jpeg_decoder, sample_crop
from esam_timm.data.gpu_decode import GpuDecodeLoader


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


# scikit-image's photographs (not its synthetic or microscopy-only images); grey ones become RGB.
_SKIMAGE_PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field', 'immunohistochemistry', 'retina',
                   'camera', 'brick', 'grass', 'gravel', 'moon', 'coins', 'clock', 'cell')


def real_photos() -> List[np.ndarray]:
    """scikit-learn's 2 sample photos and scikit-image's bundled photographs, as HxWx3 uint8 arrays."""
    import skimage.data
    from sklearn.datasets import load_sample_images
    photos = [np.asarray(p) for p in load_sample_images().images]
    for name in _SKIMAGE_PHOTOS:
        arr = getattr(skimage.data, name)()
        photos.append(np.stack([arr] * 3, axis=-1) if arr.ndim == 2 else arr[..., :3])
    photos.extend(skimage.data.stereo_motorcycle()[:2])
    return photos


def photo_jpegs(count: int, width: int, height: int, quality: int, seed: int = 0) -> List[bytes]:
    """``count`` JPEGs of ``width`` x ``height`` (a quarter of them portrait) from random crops of the photos."""
    rng = np.random.default_rng(seed)
    photos = real_photos()
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h0, w0 = photo.shape[:2]
        s = rng.uniform(0.3, 1.0) ** 0.5
        h, w = int(h0 * s), int(w0 * s)
        top, left = rng.integers(0, h0 - h + 1), rng.integers(0, w0 - w + 1)
        size = (width, height) if rng.random() < 0.75 else (height, width)
        img = Image.fromarray(np.ascontiguousarray(photo[top:top + h, left:left + w])).resize(size, Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format='JPEG', quality=quality)
        out.append(buf.getvalue())
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


class PixelStats:
    """Running per-arm pixel mean and std over all batches (uint8 values)."""

    def __init__(self) -> None:
        self.n, self.total, self.total_sq = 0, 0.0, 0.0

    def add(self, images: torch.Tensor) -> None:
        x = images.double()
        self.n += x.numel()
        self.total += float(x.sum())
        self.total_sq += float((x * x).sum())

    def __str__(self) -> str:
        mean = self.total / max(self.n, 1)
        return f'mean {mean:6.2f} std {max(self.total_sq / max(self.n, 1) - mean * mean, 0) ** 0.5:6.2f}'


@dataclass
class Arm:
    """One loader under test; ``device_augment`` is run on each batch in this process (the device side)."""
    loader: Iterable
    device_augment: Optional[BatchAugment] = None


def _worker_pid(loader: Any) -> int:
    """The pid of the one DataLoader worker behind ``loader`` (after its iterator was opened)."""
    while not isinstance(loader, torch.utils.data.DataLoader):
        loader = loader.loader  # GpuDecodeLoader -> WdsLoader -> DataLoader
    return loader._iterator._workers[0].pid


def arm_rate(arm: Arm, stats: PixelStats) -> Tuple[float, float, float]:
    """Over one whole epoch: (images per CPU-second of the worker, images per CPU-second of the worker plus
    the work done in this process outside its main thread or in ``device_augment``, images per wall second)."""
    it = iter(arm.loader)
    pid = _worker_pid(arm.loader)
    cpu, wall, count, device_side = _cpu_seconds(pid), time.perf_counter(), 0, 0.0
    process, main_thread = time.process_time(), time.thread_time()
    for batch in it:
        images = batch[0]
        if arm.device_augment is not None:
            start = time.thread_time()
            images = arm.device_augment(images)
            device_side += time.thread_time() - start
        count += images.shape[0]
        stats.add(images)
    worker = _cpu_seconds(pid) - cpu
    other_threads = (time.process_time() - process) - (time.thread_time() - main_thread)  # the decode thread
    return count / worker, count / (worker + other_threads + device_side), count / (time.perf_counter() - wall)


def decode_only(jpegs: List[bytes], passes: int = 3) -> Dict[str, float]:
    """Milliseconds per image of a full-size RGB decode in this process: PIL vs TorchCodec (best of passes)."""
    decode = jpeg_decoder()
    runs = {'PIL': lambda d: Image.open(io.BytesIO(d)).convert('RGB'),
            'TorchCodec': lambda d: decode(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode='RGB')}
    best = {}
    for name, run in runs.items():
        times = []
        for _ in range(passes):
            start = time.process_time()
            for data in jpegs:
                run(data)
            times.append((time.process_time() - start) / len(jpegs) * 1000)
        best[name] = min(times)
    return best


def cpu_model() -> str:
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith('Model name'):
                return line.split(':', 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor()


JITTER = ' + jitter 0.4'
TIMM, PIL, FAST, FAST_DEVICE, GPU = ('timm create_loader', 'ours decode=pil', 'ours decode=fast',
                                     'ours decode=fast, jitter on device', 'ours decode=gpu, on the CPU')


def build_arms(workdir: str, args: argparse.Namespace) -> Dict[str, Arm]:
    """The loaders, each with one persistent worker, over the same shards."""
    from timm.data import create_dataset, create_loader
    source = resolve_source(workdir, 'train')
    arms: Dict[str, Arm] = {}
    common = dict(batch_size=args.batch_size, img_size=args.size, num_workers=1, seed=0, interpolation='bilinear',
                  shuffle_buffer=256)
    for jitter_name, jitter in (('', None), (JITTER, 0.4)):
        dataset = create_dataset('wds/bench', root=workdir, split='train', is_training=True,
                                 batch_size=args.batch_size, seed=0, sample_shuffle_size=256, sample_initial_size=64)
        timm_loader = create_loader(dataset, input_size=(3, args.size, args.size), batch_size=args.batch_size,
                                    is_training=True, color_jitter=jitter, interpolation='bilinear', num_workers=1,
                                    device=torch.device('cpu'), use_prefetcher=True, persistent_workers=True)
        arms[TIMM + jitter_name] = Arm(timm_loader.loader)  # the DataLoader; normalising is not worker work
        for decode, name in (('pil', PIL), ('fast', FAST)):
            arms[name + jitter_name] = Arm(create_train_loader(source, decode=decode, color_jitter=jitter, **common))
        encoded = create_train_loader(source, decode='encoded', color_jitter=None, hflip=0., **common)
        arms[GPU + jitter_name] = Arm(GpuDecodeLoader(encoded, 'cpu', args.size, BatchAugment(0.5, 0., jitter),
                                                      batch_size=args.batch_size))
    arms[FAST_DEVICE + JITTER] = Arm(create_train_loader(source, decode='fast', color_jitter=None, **common),
                                     BatchAugment(hflip=0., color_jitter=0.4))
    return arms


def reduced_share(jpegs: List[bytes], size: int, draws: int = 20) -> float:
    """Share of timm crops (``draws`` per image) that are >= 2x the output: decoded at reduced scale."""
    rng, hits, total = random.Random(0), 0, 0
    for data in jpegs:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
        for _ in range(draws):
            _, _, h, w = sample_crop(width, height, rng=rng)
            hits += draft_scale(h, w, size, size) > 1
            total += 1
    return hits / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--images', type=int, default=1024, help='JPEGs to make (one epoch of each loader)')
    parser.add_argument('--width', type=int, default=500)
    parser.add_argument('--height', type=int, default=375)
    parser.add_argument('--quality', type=int, default=90)
    parser.add_argument('--size', type=int, default=224, help='training crop size')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--rounds', type=int, default=6, help='alternating timing rounds')
    parser.add_argument('--synthetic', action='store_true', help='generated images instead of real photographs')
    parser.add_argument('--workdir', help='where to write the shards (default: a temp folder)')
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    if args.synthetic:
        rng = np.random.default_rng(0)
        jpegs = [photo_like_jpeg(rng, args.width, args.height, args.quality) for _ in range(args.images)]
    else:
        jpegs = photo_jpegs(args.images, args.width, args.height, args.quality)
    workdir = args.workdir or tempfile.mkdtemp(prefix='esam_loader_bench_')
    records = [ShardRecord(key=f'img{i:06d}', image=data, ext='jpg', label=i % 1000) for i, data in enumerate(jpegs)]
    write_info(workdir, 'bench', {'train': write_split(records, workdir, 'train', prefix='bench', max_count=256,
                                                       progress=False)})
    arms = build_arms(workdir, args)

    print(f'machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; date {time.strftime("%Y-%m-%d %H:%M %Z")}')
    print(f'{args.images} {"synthetic" if args.synthetic else "real-photo"} JPEGs {args.width}x{args.height} '
          f'q{args.quality}, mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB; crop {args.size}, '
          f'batch {args.batch_size}, 1 worker per loader; crops decoded at reduced DCT scale by decode=fast: '
          f'{reduced_share(jpegs, args.size):.1%}')
    decode_ms = decode_only(jpegs[:256])
    print('full-size decode in this process, ms per image (best of 3): ' +
          ', '.join(f'{name} {ms:.3f}' for name, ms in decode_ms.items()))
    rates: Dict[str, List[Tuple[float, float, float]]] = {name: [] for name in arms}
    stats = {name: PixelStats() for name in arms}
    names = list(arms)
    for name in names:  # untimed: starts each persistent worker (imports, first shard opens)
        arm_rate(arms[name], PixelStats())
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            rates[name].append(arm_rate(arms[name], stats[name]))
        print(f'round {r}: ' + ', '.join(f'{n} {rates[n][-1][0]:.0f}/{rates[n][-1][1]:.0f}' for n in names), flush=True)

    print('\nimages per CPU-second of the worker | of the worker + device side run on this CPU (best | median of '
          'rounds), per wall-second (median), pixel stats:')
    for name in names:
        worker = [w for w, _, _ in rates[name]]
        total = [t for _, t, _ in rates[name]]
        wall = [w for _, _, w in rates[name]]
        print(f'  {name:<46} {max(worker):6.0f} | {statistics.median(worker):6.0f}   {max(total):6.0f} | '
              f'{statistics.median(total):6.0f}   {statistics.median(wall):6.0f}/s   {stats[name]}')

    def ratio(name: str, reference: str, column: int) -> str:
        ours = [row[column] for row in rates[name]]
        ref = [row[column] for row in rates[reference]]
        return f'best {max(ours) / max(ref):.2f}, median {statistics.median(ours) / statistics.median(ref):.2f}'

    for suffix in ('', JITTER):
        for name in (PIL, FAST, GPU):
            print(f'ratio {name}{suffix} / timm{suffix}, worker CPU-seconds: {ratio(name + suffix, TIMM + suffix, 0)}; '
                  f'with the device side on this CPU: {ratio(name + suffix, TIMM + suffix, 1)}')
    device = FAST_DEVICE + JITTER
    print(f'ratio {device} / timm{JITTER}, worker CPU-seconds: {ratio(device, TIMM + JITTER, 0)}'
          f' (unequal work: timm jitters in its worker); with the jitter\'s CPU time here counted (equal work): '
          f'{ratio(device, TIMM + JITTER, 1)}; with timm\'s jitter moved to the device too (its worker '
          f'then does the no-jitter work): {ratio(device, TIMM, 0)}')
    jitter_ms = [1000 / t - 1000 / w for w, t, _ in rates[device]]
    print(f'device-side batch jitter run on this CPU: {statistics.median(jitter_ms):.3f} ms per image (median)')
    # Our loaders' workers ignore SIGTERM (they leave it to the trainer); shut them down before the interpreter
    # exits, or multiprocessing's exit handler waits for them forever.
    arms.clear()
    gc.collect()


if __name__ == '__main__':
    main()

"""A small, learnable image dataset made on the fly: coloured shapes and patterns, one kind per class.

No download: images are drawn with PIL (random position, size, colours, rotation and pixel noise),
encoded as JPEG and written through the same shard writer as real data, so the CPU demo and the
tests exercise the real WebDataset path. With up to 10 classes the class is the shape alone (colours
are random); beyond 10, shape and a hue band together define the class.
"""
import io
import logging
import math
from pathlib import Path
from typing import Callable, Dict, List, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

from esam_timm.fileio import atomic_write_text

from .shards import ShardRecord, write_info, write_split
from .sources import CLASS_MAP_NAME, has_info, read_info

_logger = logging.getLogger(__name__)

Draw = Callable[[ImageDraw.ImageDraw, Tuple[float, float, float], Tuple[int, int, int], np.random.Generator], None]


def _polygon(n: int, cx: float, cy: float, r: float, phase: float) -> List[Tuple[float, float]]:
    return [(cx + r * math.cos(phase + 2 * math.pi * k / n), cy + r * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)]


def _circle(d, geo, color, rng):
    cx, cy, r = geo
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)


def _square(d, geo, color, rng):
    d.polygon(_polygon(4, *geo, rng.uniform(0, math.pi / 2)), fill=color)


def _triangle(d, geo, color, rng):
    d.polygon(_polygon(3, *geo, rng.uniform(0, 2 * math.pi)), fill=color)


def _ring(d, geo, color, rng):
    cx, cy, r = geo
    d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=max(2, int(r / 3)))


def _cross(d, geo, color, rng):
    cx, cy, r = geo
    w = max(2, int(r / 3))
    d.line([cx - r, cy - r, cx + r, cy + r], fill=color, width=w)
    d.line([cx - r, cy + r, cx + r, cy - r], fill=color, width=w)


def _star(d, geo, color, rng):
    cx, cy, r = geo
    phase = rng.uniform(0, 2 * math.pi)
    outer, inner = _polygon(5, cx, cy, r, phase), _polygon(5, cx, cy, r * 0.4, phase + math.pi / 5)
    d.polygon([p for pair in zip(outer, inner) for p in pair], fill=color)


def _stripes(vertical: bool) -> Draw:
    def draw(d, geo, color, rng):
        cx, cy, r = geo
        step = max(3, int(r / 2.5))
        for offset in range(int(-r), int(r), 2 * step):
            if vertical:
                d.rectangle([cx + offset, cy - r, cx + offset + step, cy + r], fill=color)
            else:
                d.rectangle([cx - r, cy + offset, cx + r, cy + offset + step], fill=color)
    return draw


def _checker(d, geo, color, rng):
    cx, cy, r = geo
    step = max(3, int(r / 2))
    for i, x in enumerate(range(int(cx - r), int(cx + r), step)):
        for j, y in enumerate(range(int(cy - r), int(cy + r), step)):
            if (i + j) % 2 == 0:
                d.rectangle([x, y, x + step - 1, y + step - 1], fill=color)


def _dots(d, geo, color, rng):
    cx, cy, r = geo
    dot = max(1.5, r / 5)
    for x in np.linspace(cx - r + dot, cx + r - dot, 3):
        for y in np.linspace(cy - r + dot, cy + r - dot, 3):
            d.ellipse([x - dot, y - dot, x + dot, y + dot], fill=color)


SHAPES: Dict[str, Draw] = {
    'circle': _circle, 'square': _square, 'triangle': _triangle, 'ring': _ring, 'cross': _cross,
    'star': _star, 'vstripes': _stripes(True), 'hstripes': _stripes(False), 'checker': _checker, 'dots': _dots,
}
_HUE_BANDS = 4
MAX_CLASSES = len(SHAPES) * _HUE_BANDS


def class_names(num_classes: int) -> List[str]:
    """Names of the demo classes, e.g. ``circle`` (or ``circle_h1`` when hue bands are used)."""
    shapes = list(SHAPES)
    if num_classes <= len(shapes):
        return shapes[:num_classes]
    return [f'{shapes[c % len(shapes)]}_h{c // len(shapes)}' for c in range(num_classes)]


def _hsv_to_rgb(h: float, s: float, v: float) -> Tuple[int, int, int]:
    rgb = Image.new('HSV', (1, 1), (int(h * 255) % 256, int(s * 255), int(v * 255))).convert('RGB')
    return rgb.getpixel((0, 0))


def render_image(label: int, num_classes: int, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one image of class ``label``: background, the class's shape, colour jitter and noise."""
    shapes = list(SHAPES.values())
    if num_classes <= len(shapes):
        hue = rng.uniform(0, 1)
    else:
        hue = (label // len(shapes) + rng.uniform(0.1, 0.9)) / _HUE_BANDS
    fg = _hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))
    bg = _hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.4), rng.uniform(0.05, 0.35))
    img = Image.new('RGB', (image_size, image_size), bg)
    r = rng.uniform(0.2, 0.38) * image_size
    cx, cy = rng.uniform(r, image_size - r, size=2)
    shapes[label % len(shapes)](ImageDraw.Draw(img), (cx, cy, r), fg, rng)
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, size=(image_size, image_size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def noisy_labels(labels: np.ndarray, rate: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Symmetric label noise: ``round(rate * N)`` labels, chosen at random, move to a uniformly drawn other
    class (the setting of SAM's and ESAM's label-noise experiments)."""
    noisy = labels.copy()
    chosen = rng.permutation(len(noisy))[:round(rate * len(noisy))]
    noisy[chosen] = (noisy[chosen] + rng.integers(1, num_classes, size=len(chosen))) % num_classes
    return noisy


def _records(split: str, num_classes: int, per_class: int, image_size: int, seed: int,
             label_noise: float = 0.0) -> List[ShardRecord]:
    """The split's images in class order; with ``label_noise``, a seeded share of them carry another
    class's label (the image and its ``class_name`` stay the true class, so the flip can be audited)."""
    names = class_names(num_classes)
    rng = np.random.default_rng([seed, 0 if split == 'train' else 1])
    true = np.arange(num_classes * per_class) % num_classes
    labels = noisy_labels(true, label_noise, num_classes, np.random.default_rng([seed, 2])) if label_noise else true
    records = []
    for i, (cls, label) in enumerate(zip(true, labels)):
        buf = io.BytesIO()
        render_image(int(cls), num_classes, image_size, rng).save(buf, format='JPEG', quality=90)
        records.append(ShardRecord(key=f'{split}_{i:07d}', image=buf.getvalue(), ext='jpg', label=int(label),
                                   meta={'class_name': names[cls]}))
    return records


def _is_complete(out_dir: Path, config: Dict[str, object]) -> bool:
    if not has_info(str(out_dir)):
        return False
    info = read_info(str(out_dir))
    if info.get('demo') != config:
        return False
    return all((out_dir / name).is_file()
               for split in ('train', 'validation') for name in info['splits'][split]['filenames'])


def make_demo_dataset(
        out_dir: Union[str, Path],
        num_classes: int = 10,
        train_per_class: int = 100,
        val_per_class: int = 20,
        image_size: int = 64,
        seed: int = 0,
        samples_per_shard: int = 100,
        label_noise: float = 0.0,
) -> Path:
    """Write the demo dataset (splits ``train`` and ``validation``) into ``out_dir``; return ``out_dir``.

    ``label_noise``: the share of training labels moved to another class (symmetric noise; validation
    labels stay clean). Idempotent: an existing complete dataset made with the same arguments is reused.
    Output is deterministic, so concurrent calls (e.g. from several ranks) write identical files atomically.
    """
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f'num_classes must be in [1, {MAX_CLASSES}], got {num_classes}')
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError(f'train_per_class and val_per_class must be >= 1, got {train_per_class}, {val_per_class}')
    if image_size < 16:
        raise ValueError(f'image_size must be >= 16 pixels, got {image_size}')
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f'label_noise must be a share in [0, 1), got {label_noise}')
    out_dir = Path(out_dir)
    config = {'num_classes': num_classes, 'train_per_class': train_per_class, 'val_per_class': val_per_class,
              'image_size': image_size, 'seed': seed, 'samples_per_shard': samples_per_shard}
    if label_noise:
        config['label_noise'] = label_noise  # absent when 0: clean datasets made before stay reusable
    if _is_complete(out_dir, config):
        _logger.info('reusing demo dataset in %s', out_dir)
        return out_dir
    splits = {}
    for split, per_class in (('train', train_per_class), ('validation', val_per_class)):
        records = _records(split, num_classes, per_class, image_size, seed, label_noise if split == 'train' else 0.0)
        splits[split] = write_split(records, out_dir, split, prefix='demo', max_count=samples_per_shard,
                                    seed=seed, progress=False)
    atomic_write_text(out_dir / CLASS_MAP_NAME, ''.join(f'{n}\n' for n in class_names(num_classes)))
    write_info(out_dir, 'demo', splits, extra={'demo': config})
    _logger.info('wrote demo dataset (%d classes) to %s', num_classes, out_dir)
    return out_dir

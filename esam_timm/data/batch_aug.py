"""timm's flips and colour jitter as batch operations on uint8 images, on any device.

timm's training transform flips and jitters one PIL image at a time. Here the per-sample draws are
made for the whole batch at once (same distributions: a flip with probability p; a uniformly random
order of brightness, contrast and saturation with factors uniform in torchvision's ranges) and
applied with a few batched tensor ops on the training device: by GPU decode
(:mod:`esam_timm.data.gpu_decode`), and by :class:`~esam_timm.data.prefetch.DevicePrefetcher` for the
fast CPU path when it trains on a GPU (the workers then only decode, crop and flip). The jitter is torchvision's
tensor ColorJitter (``F.adjust_brightness`` etc. on uint8, rounding down between steps); it differs
from timm's PIL ImageEnhance pixels by at most a grey level or two. Hue jitter is not supported.
"""
import random
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ['BatchAugment', 'ColorJitterParams', 'jitter_ranges']

# torchvision's ColorJitter order indices; 3 (hue) is drawn in the permutation but never applied here.
_BRIGHTNESS, _CONTRAST, _SATURATION = 0, 1, 2
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def jitter_ranges(color_jitter: Union[float, Sequence[float], None]) -> Optional[Tuple[Tuple[float, float], ...]]:
    """(min, max) factor ranges of brightness, contrast and saturation for timm's ``color_jitter``.

    A float ``v`` means ``(max(0, 1 - v), 1 + v)`` for all three (timm's ``--color-jitter``); a
    3-sequence gives one ``v`` each. None or all zero: no jitter (None).
    """
    if color_jitter is None:
        return None
    values = [float(color_jitter)] * 3 if isinstance(color_jitter, (int, float)) else [float(v) for v in color_jitter]
    if len(values) == 4 and values[3] == 0:
        values = values[:3]
    if len(values) != 3:
        raise ValueError(f'color_jitter {color_jitter!r}: give one value or (brightness, contrast, saturation); hue '
                         f'jitter is not supported by batch augmentation, decode with PIL (decode="pil") for it')
    if any(v < 0 for v in values):
        raise ValueError(f'color_jitter {color_jitter!r} must be >= 0')
    if not any(values):
        return None
    return tuple((max(0., 1. - v), 1. + v) for v in values)


@dataclass
class ColorJitterParams:
    """Per-sample jitter draws: ``order`` [B, 4] (a permutation of torchvision's 0..3 op indices) and
    ``factors`` [B, 3] (brightness, contrast, saturation)."""
    order: torch.Tensor
    factors: torch.Tensor


def _gray(images: torch.Tensor) -> torch.Tensor:
    """torchvision's uint8 grayscale, as float [B, 1, H, W] holding whole numbers."""
    r, g, b = images.unbind(1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).floor_().unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` for uint8 images kept in float: ``ratio x + (1 - ratio) y``, clamped, rounded down."""
    return (ratio * images + (1.0 - ratio) * other).clamp_(0, 255).floor_()


class BatchAugment:
    """Random flips and colour jitter of a uint8 image batch [B, 3, H, W] (any memory format, any device).

    Args:
        hflip, vflip: flip probabilities (timm's ``--hflip``, ``--vflip``).
        color_jitter: timm's ``color_jitter`` argument (see :func:`jitter_ranges`).
    Draws use torch's global RNG, or ``generator`` when given.
    """

    def __init__(self, hflip: float = 0.5, vflip: float = 0., color_jitter: Union[float, Sequence[float], None] = None,
                 generator: Optional[torch.Generator] = None) -> None:
        for name, p in (('hflip', hflip), ('vflip', vflip)):
            if not 0. <= p <= 1.:
                raise ValueError(f'{name} must be a probability in [0, 1], got {p}')
        self.hflip, self.vflip = hflip, vflip
        self.jitter = jitter_ranges(color_jitter)
        self.generator = generator

    @property
    def active(self) -> bool:
        """False when the augmentation would do nothing (no flips, no jitter)."""
        return bool(self.hflip or self.vflip or self.jitter)

    def reseed(self, *key: object) -> None:
        """Draw from now on from an own generator seeded by ``key`` (e.g. the run's seed, the rank and the
        epoch): reproducible whichever thread draws, and independent of the global RNG."""
        if self.generator is None:
            self.generator = torch.Generator()
        self.generator.manual_seed(random.Random('/'.join(map(str, key))).getrandbits(63))

    def draw_jitter(self, batch_size: int) -> Optional[ColorJitterParams]:
        """Per-sample jitter order and factors for ``batch_size`` images (None without jitter)."""
        if self.jitter is None:
            return None
        order = torch.rand(batch_size, 4, generator=self.generator).argsort(dim=1)
        lo = torch.tensor([r[0] for r in self.jitter])
        hi = torch.tensor([r[1] for r in self.jitter])
        factors = lo + (hi - lo) * torch.rand(batch_size, 3, generator=self.generator)
        return ColorJitterParams(order, factors)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Flip and jitter ``images`` (uint8 [B, 3, H, W]); returns a uint8 batch of the same layout.

        Draws are made on the host and reach the device in one non-blocking copy each: no host sync.
        """
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f'expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}')
        n = images.shape[0]
        for p, dim in ((self.hflip, 3), (self.vflip, 2)):
            if p > 0:
                flip = _to_device(torch.rand(n, generator=self.generator) < p, images.device).view(-1, 1, 1, 1)
                images = torch.where(flip, images.flip(dim), images)
        params = self.draw_jitter(n)
        return images if params is None else apply_color_jitter(images, params)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device``; to CUDA through pinned memory, so the copy does not block the host."""
    if device.type == 'cpu':
        return t
    return t.pin_memory().to(device, non_blocking=True)


def apply_color_jitter(images: torch.Tensor, params: ColorJitterParams) -> torch.Tensor:
    """Apply per-sample brightness/contrast/saturation in each sample's order; uint8 in, uint8 out.

    At each of the four steps the samples are grouped by their op there (a permutation and group
    sizes computed on the host from ``params``), and each group gets one batched op: the work of
    torchvision's ColorJitter one image at a time, with no host-device sync.
    """
    order = params.order.cpu()
    perms, counts = order.argsort(dim=0, stable=True).t(), []
    for step in range(order.shape[1]):
        counts.append(torch.bincount(order[:, step], minlength=4).tolist())
    perms = _to_device(perms.contiguous(), images.device)
    factors = _to_device(params.factors.float(), images.device)
    x = images.float()
    for step, count in enumerate(counts):
        perm = perms[step]
        xp, ratio = x.index_select(0, perm), factors.index_select(0, perm)
        start = 0
        for index in (_BRIGHTNESS, _CONTRAST, _SATURATION):
            end = start + count[index]
            if end > start:
                sel, r = xp[start:end], ratio[start:end, index].view(-1, 1, 1, 1)
                if index == _BRIGHTNESS:
                    other = torch.zeros_like(sel)
                elif index == _CONTRAST:
                    other = _gray(sel).mean(dim=(1, 2, 3), keepdim=True)
                else:
                    other = _gray(sel)
                xp[start:end] = _blend(sel, other, r)
            start = end
        x = torch.empty_like(x).index_copy_(0, perm, xp)
    return x.to(torch.uint8).contiguous(memory_format=_memory_format(images))


def _memory_format(images: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if images.is_contiguous(memory_format=torch.channels_last) and not \
        images.is_contiguous() else torch.contiguous_format

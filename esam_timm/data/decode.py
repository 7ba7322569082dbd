"""Fast CPU decode for training: timm's random-resized crop, sampled from the header, decoded cheaply.

timm's training transform decodes the whole JPEG with PIL, then crops and resizes with PIL's
resampler. This path gives the same crops at about twice the images per CPU-second:

- the crop ``(top, left, height, width)`` is drawn before decoding, from the image size in the
  JPEG header, by :func:`sample_crop`: timm's ``RandomResizedCropAndInterpolation.get_params``
  (torchvision's algorithm: 10 tries of area x log-uniform aspect, then the centre-crop fallback),
  same draws from the same RNG, so the crop-scale and aspect distributions are exactly timm's;
- when the crop is at least twice the output size in both directions, libjpeg decodes at 1/2, 1/4
  or 1/8 scale in the DCT domain (Pillow's ``draft``; the largest reduction that leaves the crop at
  >= the output size, :func:`draft_scale`) and PIL resizes the exact fractional crop box;
- otherwise the image is decoded by torchvision's ``decode_jpeg`` (the same libjpeg-turbo output as
  PIL, bit for bit, in two thirds of the time) and the crop, a view of the decoded memory, is resized
  by torch's antialiased uint8 kernel (PIL's filter, within 1 grey level, a third of PIL's time);
- everything stays uint8 (normalisation happens on the device) and the result is a CHW view of HWC
  memory, which :func:`esam_timm.data.wds.collate` stacks without a transpose.

Flips and colour jitter are batch operations (:mod:`esam_timm.data.batch_aug`). Data PIL cannot
read raises PIL's error, as the PIL path does, so bad samples count the same.
"""
import io
import math
import random
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

__all__ = ['CropBox', 'FastResizedCrop', 'INTERPOLATIONS', 'draft_scale', 'resized_crop', 'sample_crop']

CropBox = Tuple[int, int, int, int]  # (top, left, height, width) in the original image's pixels
# timm's interpolation names this path supports; 'random' picks one of the first two per sample, as timm does.
INTERPOLATIONS = ('bilinear', 'bicubic', 'random')
_PIL_RESAMPLE = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC}
_DRAFT_SCALES = (8, 4, 2)


def sample_crop(width: int, height: int, scale: Sequence[float] = (0.08, 1.0),
                ratio: Sequence[float] = (3. / 4., 4. / 3.), rng: Union[random.Random, object] = random) -> CropBox:
    """A random-resized-crop box ``(top, left, height, width)`` of a ``width`` x ``height`` image.

    Draw for draw timm's ``RandomResizedCropAndInterpolation.get_params`` (torchvision's algorithm
    with Python's RNG): with the same ``rng`` state both return the same box. ``rng`` is a
    ``random.Random`` or the ``random`` module (timm's choice, seeded per DataLoader worker).
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if w <= width and h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draft_scale(crop_height: int, crop_width: int, out_height: int, out_width: int) -> int:
    """The largest JPEG DCT reduction (8, 4, 2, else 1) that leaves the crop at >= the output size."""
    for s in _DRAFT_SCALES:
        if crop_height >= s * out_height and crop_width >= s * out_width:
            return s
    return 1


def _check_interpolation(interpolation: str) -> str:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f'interpolation {interpolation!r} is not supported by the fast decode path; use one of '
                         f'{list(INTERPOLATIONS)}, or decode with PIL (decode="pil")')
    return interpolation


def _pil_to_chw(img: Image.Image) -> torch.Tensor:
    """uint8 [3, H, W] view of a fresh HWC copy of an RGB PIL image."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def _decode_full(img: Image.Image, data: bytes) -> torch.Tensor:
    """The whole image as uint8 [3, H, W] (a view of HWC memory): torchvision for JPEG, else PIL.

    A JPEG torchvision rejects goes to PIL too, so what fails here is exactly what PIL cannot read.
    """
    if img.format == 'JPEG':
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass
    return _pil_to_chw(img.convert('RGB'))


def resized_crop(data: bytes, box: CropBox, size: Tuple[int, int], interpolation: str = 'bilinear',
                 img: Optional[Image.Image] = None) -> torch.Tensor:
    """Decode ``data``, crop ``box`` (original pixels) and resize to ``size`` (h, w): uint8 [3, h, w].

    Decodes at 1/2, 1/4 or 1/8 scale when :func:`draft_scale` allows (then PIL resizes the exact
    fractional box of the reduced image); else a full decode and torch's antialiased resize of the
    crop. ``img`` is ``data`` already opened by PIL (header read, nothing decoded), to save a parse.
    """
    top, left, height, width = box
    if img is None:
        img = Image.open(io.BytesIO(data))
    scale = draft_scale(height, width, *size) if img.format == 'JPEG' else 1
    if scale > 1:
        full_width = img.size[0]
        drafted = img.draft('RGB', (full_width // scale, img.size[1] // scale))
        if drafted is not None:
            s = full_width / drafted[1][2]  # the reduction libjpeg will apply (== scale)
            reduced = img.convert('RGB').resize((size[1], size[0]), _PIL_RESAMPLE[interpolation],
                                                box=(left / s, top / s, (left + width) / s, (top + height) / s))
            return _pil_to_chw(reduced)
    crop = _decode_full(img, data)[:, top:top + height, left:left + width]
    return F.interpolate(crop[None], size=size, mode=interpolation, antialias=True, align_corners=False)[0]


class FastResizedCrop:
    """Encoded image bytes -> uint8 [3, h, w]: timm's RandomResizedCrop(size, scale, ratio, interpolation).

    The crop is drawn from the header before decoding (:func:`sample_crop`, then, for 'random'
    interpolation, ``rng.choice`` as timm does), so the draws match timm's transform. ``rng`` defaults
    to the ``random`` module, which the training pipeline seeds per worker, as for timm's transform.
    ``reduced`` counts the images decoded at reduced DCT scale (:func:`draft_scale`).
    """

    def __init__(self, size: Union[int, Sequence[int]], scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3. / 4., 4. / 3.), interpolation: str = 'bilinear',
                 rng: Union[random.Random, object] = random) -> None:
        self.size = (size, size) if isinstance(size, int) else (int(size[-2]), int(size[-1]))
        if min(self.size) < 1:
            raise ValueError(f'size must be positive, got {size}')
        if not (0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f'scale {tuple(scale)} and ratio {tuple(ratio)} must be positive (min, max) ranges')
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.interpolation = _check_interpolation(interpolation)
        self.rng = rng
        self.decoded = 0
        self.reduced = 0

    def __call__(self, data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as img:
            box = sample_crop(img.size[0], img.size[1], self.scale, self.ratio, self.rng)
            interpolation = self.interpolation
            if interpolation == 'random':
                interpolation = self.rng.choice(INTERPOLATIONS[:2])
            self.decoded += 1
            self.reduced += draft_scale(box[2], box[3], *self.size) > 1 and img.format == 'JPEG'
            return resized_crop(data, box, self.size, interpolation, img=img)

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={tuple(round(r, 4) for r in self.ratio)}, '
                f'interpolation={self.interpolation})')

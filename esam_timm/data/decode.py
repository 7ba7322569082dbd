"""Fast CPU decode for training: timm's random-resized crop, sampled from the header, decoded cheaply.

timm's training transform decodes the whole JPEG with PIL, then crops and resizes with PIL's
resampler. This path gives the same crops for fewer CPU-seconds:

- the crop ``(top, left, height, width)`` is drawn before decoding, from the image size in the
  JPEG header, by :func:`sample_crop`: timm's ``RandomResizedCropAndInterpolation.get_params``
  (torchvision's algorithm: 10 tries of area x log-uniform aspect, then the centre-crop fallback),
  same draws from the same RNG, so the crop-scale and aspect distributions are exactly timm's;
- when the crop is at least twice the output size in both directions, libjpeg decodes at 1/2, 1/4
  or 1/8 scale in the DCT domain (Pillow's ``draft``, which TorchCodec does not offer; the largest
  reduction that leaves the crop at >= the output size, :func:`draft_scale`) and PIL resizes the exact
  fractional crop box;
- otherwise an RGB or greyscale JPEG is decoded by TorchCodec's ``decode_jpeg`` (PyTorch's media
  library: the same libjpeg-turbo pixels as PIL, bit for bit, in about 80% of PIL's time) and the crop,
  a view of the decoded memory, is resized by torch's antialiased uint8 kernel (PIL's filter, within 1
  grey level, a third of PIL's time); other formats and CMYK JPEGs go through PIL, as in timm;
- everything stays uint8 (normalisation happens on the device) and the result is a CHW view of HWC
  memory, which :func:`esam_timm.data.wds.collate` stacks without a transpose.

:class:`FastTrainTransform` adds timm's flips and colour jitter after the crop, in timm's order: the flips
are torchvision's, the jitter is :class:`PilColorJitter` (torchvision's PIL jitter, the same pixels bit for
bit in about 80% of its time; on the CPU PIL is faster than tensor ops), so with the same seeds every draw
is timm's. Data PIL cannot read raises PIL's error, as the PIL path
does, so bad samples count the same; a decoder that cannot run (TorchCodec missing or not loadable,
out of memory) raises an error that is not a bad sample
(:func:`~esam_timm.data.bad_data.is_resource_failure`).

For decoding on the GPU (:mod:`esam_timm.data.gpu_decode`) a worker only reads the header and draws
the crop (:class:`EncodedCrop`), and :func:`pack_encoded` ships a batch's JPEG bytes as one tensor.
"""
import functools
import io
import math
import random
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torchvision import transforms

from .bad_data import is_resource_failure

__all__ = ['CropBox', 'EncodedBatch', 'EncodedCrop', 'EncodedImage', 'FastResizedCrop', 'FastTrainTransform',
           'INTERPOLATIONS', 'PilColorJitter', 'TORCHCODEC_REQUIREMENT', 'draft_scale', 'image_member', 'jpeg_decoder',
           'needs_host_decode', 'open_image', 'pack_encoded', 'resized_crop', 'sample_crop']

# TorchCodec's decode_jpeg first shipped in 0.16; 0.16 and 0.17 pair with torch >= 2.11 (TorchCodec's
# README compatibility table). setup.cfg asks for the same range.
TORCHCODEC_REQUIREMENT = 'torchcodec>=0.16,<0.18'

CropBox = Tuple[int, int, int, int]  # (top, left, height, width) in the original image's pixels
# timm's interpolation names this path supports; 'random' picks one of the first two per sample, as timm does.
INTERPOLATIONS = ('bilinear', 'bicubic', 'random')
_PIL_RESAMPLE = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC}
_DRAFT_SCALES = (8, 4, 2)
# JPEG colour modes (as PIL's header parse names them) that TorchCodec and nvJPEG decode to RGB as PIL does.
_CODEC_MODES = ('RGB', 'L')


@functools.lru_cache(maxsize=None)
def jpeg_decoder() -> Callable[..., Any]:
    """TorchCodec's ``decode_jpeg`` (imported on first use, so that ``--decode pil`` never needs it).

    Raises ValueError in one line naming what to install when TorchCodec is missing, too old, or built
    for another torch (the trainer checks this at start: see ``WdsBackend.check_decode``).
    """
    try:
        from torchcodec.decoders import decode_jpeg
    except (ImportError, OSError, RuntimeError) as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == 'torchcodec':
            why = 'is not installed'
        else:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            why = f'cannot be loaded ({type(exc).__name__}: {first_line})'
        raise ValueError(f'--decode fast and --decode gpu decode JPEGs with TorchCodec, which {why}: pip install '
                         f'"{TORCHCODEC_REQUIREMENT}" (it pairs with torch >= 2.11; this is torch '
                         f'{torch.__version__}), or decode with PIL (--decode pil)') from None
    return decode_jpeg


def open_image(data: bytes) -> Image.Image:
    """``data`` opened by PIL (the header read, nothing decoded); data PIL cannot identify raises
    UnidentifiedImageError saying so, with its size and first bytes (PIL's own names only a buffer)."""
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f'{len(data)} bytes starting {bytes(data[:8])!r}: not an image format PIL can '
                                     f'read') from None


def needs_host_decode(img: Image.Image) -> bool:
    """True for data that TorchCodec's JPEG decoder does not read as timm would (PNG, WebP, CMYK JPEGs...):
    PIL decodes it, on the host."""
    return img.format != 'JPEG' or img.mode not in _CODEC_MODES


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
    """The whole image as uint8 [3, H, W] (a view of HWC memory): TorchCodec for RGB and greyscale JPEGs,
    else PIL.

    A JPEG TorchCodec rejects goes to PIL too, so what fails here is exactly what PIL cannot read; an
    error of the machine (out of memory) is raised as it is.
    """
    if not needs_host_decode(img):
        try:
            return jpeg_decoder()(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode='RGB')
        except RuntimeError as exc:
            if is_resource_failure(exc):
                raise
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
    crop = _decode_full(img, data)[None, :, top:top + height, left:left + width]
    # A dense channels-last copy of the crop first: torch's uint8 kernel is then a third faster and returns
    # channels-last, which collate stacks without a transpose (a cropped view gave a planar result: 0.2 ms more).
    crop = crop.contiguous(memory_format=torch.channels_last)
    return F.interpolate(crop, size=size, mode=interpolation, antialias=True, align_corners=False)[0]


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
        with open_image(data) as img:
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


_LEVELS = np.arange(256, dtype=np.float32)


def _blend_table(base: int, factor: float) -> List[int]:
    """``Image.blend(constant base, image, factor)`` as a lookup table for the 3 bands: PIL's arithmetic
    (float32 ``base + factor * (x - base)``, clipped to 0..255, truncated), one entry per grey level."""
    values = np.float32(base) + np.float32(factor) * (_LEVELS - np.float32(base))
    return np.clip(values, 0, 255).astype(np.uint8).tolist() * 3


class PilColorJitter:
    """torchvision's ``ColorJitter`` on a PIL image (timm's jitter), the same pixels bit for bit for fewer
    CPU-seconds: the same draws (``ColorJitter.get_params``, torch's global RNG, same order), and PIL's own
    ops, except that brightness and contrast with a factor above 1 (PIL's clipping blend, twice the time of
    its plain one) go through an equal lookup table; no torchvision wrappers per op."""

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float = 0.) -> None:
        self.params = transforms.ColorJitter(brightness, contrast, saturation, hue)

    def __call__(self, img: Image.Image) -> Image.Image:
        p = self.params
        order, brightness, contrast, saturation, hue = p.get_params(p.brightness, p.contrast, p.saturation, p.hue)
        for op in order.tolist():
            if op == 0 and brightness is not None:
                img = (Image.blend(Image.new('RGB', img.size, 0), img, brightness) if brightness <= 1
                       else img.point(_blend_table(0, brightness)))
            elif op == 1 and contrast is not None:
                histogram = img.convert('L').histogram()
                mean = int(sum(level * count for level, count in enumerate(histogram)) / sum(histogram) + 0.5)
                img = (Image.blend(Image.new('RGB', img.size, (mean,) * 3), img, contrast) if contrast <= 1
                       else img.point(_blend_table(mean, contrast)))
            elif op == 2 and saturation is not None:
                img = Image.blend(img.convert('L').convert('RGB'), img, saturation)
            elif op == 3 and hue is not None:
                img = TF.adjust_hue(img, hue)
        return img

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.params!r})'


class FastTrainTransform:
    """Encoded bytes -> uint8 [3, h, w]: timm's training transform (``create_transform(is_training=True)``
    without auto-augment) on the fast decode path.

    Crop (:class:`FastResizedCrop`), then torchvision's ``RandomHorizontalFlip``/``RandomVerticalFlip``
    on the uint8 tensor and the colour jitter on a PIL image (:class:`PilColorJitter`: torchvision's,
    bit for bit), each present when timm would add it: the same draws from the same global RNGs in the
    same order as timm's transform.
    """

    def __init__(self, size: Union[int, Sequence[int]], scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3. / 4., 4. / 3.), interpolation: str = 'bilinear', hflip: float = 0.5,
                 vflip: float = 0., color_jitter: Union[float, Sequence[float], None] = None) -> None:
        self.crop = FastResizedCrop(size, scale, ratio, interpolation)
        self.flips = [transforms.RandomHorizontalFlip(hflip)] if hflip > 0 else []
        if vflip > 0:
            self.flips.append(transforms.RandomVerticalFlip(vflip))
        self.jitter = None
        if color_jitter is not None:
            values = (float(color_jitter),) * 3 if isinstance(color_jitter, (int, float)) else tuple(color_jitter)
            if len(values) not in (3, 4):
                raise ValueError(f'color_jitter {color_jitter!r}: give one value or 3 (brightness, contrast, '
                                 f'saturation) or 4 (+ hue), as timm does')
            self.jitter = PilColorJitter(*values)

    def __call__(self, data: bytes) -> torch.Tensor:
        image = self.crop(data)
        for flip in self.flips:
            image = flip(image)
        if self.jitter is not None:
            jittered = self.jitter(Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()))
            image = _pil_to_chw(jittered)
        return image

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.crop!r}, flips={self.flips}, jitter={self.jitter})'


def image_member(sample: Dict[str, Any], image_keys: Sequence[str]) -> bytes:
    """The encoded bytes of a sample's first image member among ``image_keys``; KeyError when none."""
    for key in image_keys:
        if key in sample:
            return sample[key]
    raise KeyError(f'no image member among {list(image_keys)}')


class EncodedImage(NamedTuple):
    """One sample for device decoding: its bytes, the crop drawn for it, where it came from, and whether
    the host must decode it (:func:`needs_host_decode`: not an RGB or greyscale JPEG)."""
    data: bytes
    box: CropBox
    interpolation: int  # index into INTERPOLATIONS[:2]
    key: str
    url: str
    host: bool = False


class EncodedCrop:
    """Worker side of GPU decoding: read the header (PIL, nothing decoded), draw timm's crop, keep the bytes.

    Data whose header PIL cannot identify raises here, in the worker, and counts as a bad sample as
    on the CPU path; data that breaks later (a truncated JPEG) is counted by the device decoder. Images
    nvJPEG does not decode as timm would (PNG, WebP, CMYK JPEGs: a few in ImageNet) are marked for the
    host's decoder.
    """

    def __init__(self, size: Union[int, Sequence[int]], scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3. / 4., 4. / 3.), interpolation: str = 'bilinear',
                 rng: Optional[random.Random] = None) -> None:
        self.crop = FastResizedCrop(size, scale, ratio, interpolation, rng if rng is not None else random.Random(0))

    @property
    def size(self) -> Tuple[int, int]:
        return self.crop.size

    def reseed(self, seed: int) -> None:
        """Restart the crop draws from ``seed`` (the training pipeline does, per epoch and stream). The
        draws use this RNG, not Python's global one, so a decode thread and the trainer never share one."""
        self.crop.rng = random.Random(seed)

    def __call__(self, sample: Dict[str, Any], image_keys: Sequence[str]) -> EncodedImage:
        data = image_member(sample, image_keys)
        with open_image(data) as img:
            width, height = img.size
            host = needs_host_decode(img)
        crop = self.crop
        box = sample_crop(width, height, crop.scale, crop.ratio, crop.rng)
        interpolation = crop.interpolation
        if interpolation == 'random':
            interpolation = crop.rng.choice(INTERPOLATIONS[:2])
        return EncodedImage(data, box, INTERPOLATIONS.index(interpolation), sample.get('__key__', '?'),
                            sample.get('__url__', '?'), host)


class EncodedBatch(NamedTuple):
    """A batch of encoded images: ``data`` uint8 [sum of lengths] holds image k at
    ``offsets[k]:offsets[k + 1]``; ``boxes`` int64 [B, 6] = (top, left, height, width, interpolation, host)."""
    data: torch.Tensor
    offsets: torch.Tensor
    boxes: torch.Tensor
    keys: List[str]
    urls: List[str]

    def __len__(self) -> int:
        return len(self.keys)

    def images(self) -> List[torch.Tensor]:
        """The encoded images as 1-D uint8 views of ``data`` (what ``decode_jpeg`` takes)."""
        return list(self.data.split(self.offsets.diff().tolist()))


def pack_encoded(samples: Sequence[Tuple[EncodedImage, int]]) -> Tuple[EncodedBatch, torch.Tensor]:
    """Collate (EncodedImage, label) pairs into one :class:`EncodedBatch` and int64 labels [B].

    One byte tensor per batch, not one per image: a DataLoader worker hands it over in one piece.
    """
    images = [s[0] for s in samples]
    lengths = torch.tensor([0] + [len(im.data) for im in images], dtype=torch.int64)
    data = torch.frombuffer(bytearray(b''.join(im.data for im in images)), dtype=torch.uint8)
    boxes = torch.tensor([(*im.box, im.interpolation, im.host) for im in images], dtype=torch.int64)
    batch = EncodedBatch(data, lengths.cumsum(0), boxes, [im.key for im in images], [im.url for im in images])
    return batch, torch.tensor([s[1] for s in samples], dtype=torch.int64)

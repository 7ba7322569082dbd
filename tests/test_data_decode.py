"""The fast CPU decode path (esam_timm.data.decode) and batch flips/jitter (esam_timm.data.batch_aug):
same crop draws as timm, pixels within stated tolerances of timm's PIL path, reduced-size decode close
to a full-size decode of the same crop."""
import io
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation

from esam_timm.data.batch_aug import BatchAugment, apply_color_jitter, jitter_ranges
from esam_timm.data.decode import FastResizedCrop, FastTrainTransform, draft_scale, resized_crop, sample_crop


def photo_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A smooth photo-like JPEG (gradients, soft blobs, mild noise): what DCT scaling is made for."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        img[..., c] = rng.uniform(40, 200) + rng.uniform(-0.1, 0.1) * xx + rng.uniform(-0.1, 0.1) * yy
    for _ in range(8):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(20, 120)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        img += blob * rng.uniform(-80, 80, size=3)
    img += rng.normal(0, 3, size=img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format='JPEG', quality=quality)
    return buf.getvalue()


def pil_reference(data: bytes, box, size, interpolation=Image.BILINEAR) -> np.ndarray:
    """timm's path for a fixed crop: full PIL decode, crop, PIL resize (torchvision's F.resized_crop)."""
    top, left, h, w = box
    with Image.open(io.BytesIO(data)) as img:
        out = img.convert('RGB').crop((left, top, left + w, top + h)).resize((size[1], size[0]), interpolation)
    return np.asarray(out).transpose(2, 0, 1).astype(np.int16)


@pytest.mark.parametrize('width,height', [(500, 375), (375, 500), (64, 64), (2000, 100), (100, 2000), (7, 300)])
def test_sample_crop_matches_timm_draw_for_draw(width, height):
    """Same seed -> the same boxes as timm's get_params (incl. its centre-crop fallback on extreme aspects)."""
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    img = Image.new('RGB', (width, height))
    random.seed(123)
    expected = [RandomResizedCropAndInterpolation.get_params(img, scale, ratio) for _ in range(200)]
    rng = random.Random(123)
    assert [sample_crop(width, height, scale, ratio, rng) for _ in range(200)] == expected


def test_fast_crop_draws_match_timm_with_random_interpolation():
    """'random' interpolation: crop then rng.choice, as timm draws them."""
    data = photo_jpeg(320, 240)
    timm_rrc = RandomResizedCropAndInterpolation(64, interpolation='random')
    chosen = []
    random.seed(5)
    for _ in range(20):
        box = timm_rrc.get_params(Image.new('RGB', (320, 240)), timm_rrc.scale, timm_rrc.ratio)
        chosen.append((box, random.choice(timm_rrc.interpolation)))
    fast = FastResizedCrop(64, interpolation='random', rng=random.Random(5))
    ours = []
    for _ in range(20):
        state = fast.rng.getstate()
        fast(data)
        probe = random.Random()
        probe.setstate(state)
        ours.append(sample_crop(320, 240, fast.scale, fast.ratio, probe))
        probe.choice(('bilinear', 'bicubic'))
        assert probe.getstate() == fast.rng.getstate()  # the decoder drew exactly the crop and the interpolation
    assert ours == [box for box, _ in chosen]


@pytest.mark.parametrize('jitter,tolerance', [(None, 2), (0.4, 5)])
def test_fast_train_transform_matches_timms_transform_sample_by_sample(jitter, tolerance):
    """Same seeds -> the same crop, interpolation, flip and jitter draws as timm's create_transform (both
    leave the RNGs in the same state), so each output is timm's within the resize's 1 grey level (2 for
    bicubic), which jitter can scale: stated tolerance max 2 (5 with jitter), mean |diff| <= 0.2."""
    from timm.data import create_transform
    timm_transform = create_transform(64, is_training=True, color_jitter=jitter, interpolation='random',
                                      use_prefetcher=True)
    ours = FastTrainTransform(64, interpolation='random', color_jitter=jitter)
    datas = [photo_jpeg(160, 120, seed=s) for s in range(12)]
    outputs, states = [], []
    for run in (lambda d: timm_transform(Image.open(io.BytesIO(d)).convert('RGB')), ours):
        random.seed(7)
        torch.manual_seed(7)
        outputs.append([run(d) for d in datas])
        states.append((random.getstate(), torch.get_rng_state()))
    assert states[0][0] == states[1][0] and torch.equal(states[0][1], states[1][1])
    for k, (e, g) in enumerate(zip(*outputs)):
        assert g.shape == e.shape == (3, 64, 64) and g.dtype == torch.uint8
        diff = (e.int() - g.int()).abs()
        assert diff.max() <= tolerance and diff.float().mean() <= 0.2, (k, diff.max(), diff.float().mean())


@pytest.mark.parametrize('jitter', [(0.4, 0.4, 0.4), (0.9, 0.7, 1.5), (0.4, 0.4, 0.4, 0.1), (0., 0.5, 0.)])
def test_pil_color_jitter_is_torchvisions_bit_for_bit(jitter):
    """The same draws from torch's RNG (which stays in step) and the same pixels as torchvision's ColorJitter
    on PIL images, for factors on both sides of 1 (the lookup tables stand in for PIL's clipping blend)."""
    from torchvision import transforms

    from esam_timm.data.decode import PilColorJitter
    reference, ours = transforms.ColorJitter(*jitter), PilColorJitter(*jitter)
    images = [Image.open(io.BytesIO(photo_jpeg(96, 72, seed=s))).convert('RGB') for s in range(6)]
    images.append(Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)))
    for seed in range(40):
        image = images[seed % len(images)]
        torch.manual_seed(seed)
        expected = np.asarray(reference(image))
        state = torch.get_rng_state()
        torch.manual_seed(seed)
        np.testing.assert_array_equal(np.asarray(ours(image)), expected, err_msg=f'seed {seed}')
        assert torch.equal(torch.get_rng_state(), state)


def test_draft_scale_is_the_largest_reduction_keeping_the_crop_at_output_size():
    assert draft_scale(375, 500, 224, 224) == 1
    assert draft_scale(448, 448, 224, 224) == 2
    assert draft_scale(447, 1000, 224, 224) == 1
    assert draft_scale(900, 1000, 224, 224) == 4
    assert draft_scale(1800, 1792, 224, 224) == 8
    assert draft_scale(5000, 5000, 224, 224) == 8


def test_full_size_path_is_within_one_level_of_timms_pil_path():
    """No reduction possible: torchvision decode + torch's antialiased uint8 resize vs PIL crop + resize:
    within 1 grey level for bilinear, 2 for bicubic (its overshoot rounds differently)."""
    data = photo_jpeg(500, 375, seed=1)
    rng = random.Random(0)
    for _ in range(20):
        box = sample_crop(500, 375, rng=rng)
        for interp, pil_interp, tolerance in (('bilinear', Image.BILINEAR, 1), ('bicubic', Image.BICUBIC, 2)):
            ours = resized_crop(data, box, (224, 224), interp)
            assert ours.dtype == torch.uint8 and ours.shape == (3, 224, 224)
            diff = np.abs(ours.numpy().astype(np.int16) - pil_reference(data, box, (224, 224), pil_interp))
            assert diff.max() <= tolerance, (box, interp, diff.max())


@pytest.mark.parametrize('scale', [2, 4, 8])
def test_reduced_size_decode_is_within_tolerance_of_full_decode(scale):
    """Stated tolerance: a DCT-reduced decode of the same crop differs from the full-size decode + crop +
    resize by <= 1.5 grey levels on average, <= 0.5 in the mean (no bias), and 99% of values within 6."""
    size = (64, 64) if scale == 8 else (224, 224)
    width, height = (1200, 900) if scale < 8 else (800, 600)
    data = photo_jpeg(width, height, seed=scale)
    rng = np.random.default_rng(scale)
    checked = 0
    while checked < 8:
        h = int(rng.integers(scale * size[0], height + 1))
        w = int(rng.integers(scale * size[1], width + 1))
        if draft_scale(h, w, *size) != scale:
            continue
        box = (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
        ours = resized_crop(data, box, size).numpy().astype(np.int16)
        diff = ours - pil_reference(data, box, size)
        assert np.abs(diff).mean() <= 1.5, (box, np.abs(diff).mean())
        assert abs(diff.mean()) <= 0.5, (box, diff.mean())
        assert np.percentile(np.abs(diff), 99) <= 6, (box, np.percentile(np.abs(diff), 99))
        checked += 1
    decoder = FastResizedCrop(size, scale=(0.9, 1.0), rng=random.Random(0))
    decoder(data)
    assert decoder.reduced == 1


def test_fast_crop_handles_png_grayscale_and_cmyk_like_timm():
    """Non-JPEG and non-RGB data go through PIL: the output is RGB, the same as timm's convert('RGB')."""
    box, size = (4, 6, 40, 50), (32, 32)
    for mode, fmt in (('RGB', 'PNG'), ('L', 'JPEG'), ('CMYK', 'JPEG')):
        rng = np.random.default_rng(0)
        arr = rng.integers(0, 256, size=(60, 80, len(mode)), dtype=np.uint8).squeeze()
        buf = io.BytesIO()
        Image.fromarray(arr, mode=mode).save(buf, format=fmt)
        data = buf.getvalue()
        ours = resized_crop(data, box, size).numpy().astype(np.int16)
        assert np.abs(ours - pil_reference(data, box, size)).max() <= 2, (mode, fmt)


@pytest.mark.parametrize('data', [b'', b'not an image', photo_jpeg(64, 64)[:300]])
def test_bad_data_raises_like_pil(data):
    with pytest.raises(Exception):
        FastResizedCrop(32)(data)


def test_fast_crop_refuses_unsupported_interpolation():
    with pytest.raises(ValueError, match="'nearest'.*bilinear"):
        FastResizedCrop(32, interpolation='nearest')


def test_jitter_ranges_follow_timm_and_refuse_hue():
    assert jitter_ranges(0.4) == ((0.6, 1.4),) * 3
    assert jitter_ranges((0.1, 0.2, 1.5)) == ((0.9, 1.1), (0.8, 1.2), (0., 2.5))
    assert jitter_ranges(0.) is None and jitter_ranges(None) is None
    with pytest.raises(ValueError, match='hue'):
        jitter_ranges((0.4, 0.4, 0.4, 0.1))


def test_batched_jitter_equals_torchvision_one_image_at_a_time():
    """Each sample gets torchvision's tensor ColorJitter ops in its own order with its own factors."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 20, 24), dtype=torch.uint8, generator=g)
    images = images.contiguous(memory_format=torch.channels_last)
    params = BatchAugment(hflip=0., color_jitter=0.4, generator=g).draw_jitter(12)
    ours = apply_color_jitter(images, params)
    assert ours.dtype == torch.uint8 and ours.is_contiguous(memory_format=torch.channels_last)
    ops = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation}
    for b in range(12):
        expected = images[b].contiguous()
        for op in params.order[b].tolist():
            if op in ops:
                expected = ops[op](expected, float(params.factors[b, op]))
        assert (ours[b].int() - expected.int()).abs().max() <= 1, b


def test_jitter_draws_have_torchvision_distribution():
    aug = BatchAugment(color_jitter=0.4, generator=torch.Generator().manual_seed(1))
    params = aug.draw_jitter(24000)
    assert params.factors.min() >= 0.6 and params.factors.max() <= 1.4
    assert abs(params.factors.mean().item() - 1.0) < 0.01
    perms = {tuple(p) for p in params.order.tolist()}
    assert len(perms) == 24 and all(sorted(p) == [0, 1, 2, 3] for p in perms)
    counts = torch.bincount(params.order[:, 0], minlength=4).float() / 24000
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.02)


def test_batch_flips_flip_about_half_and_keep_layout():
    images = torch.arange(2 * 3 * 4 * 5, dtype=torch.uint8).view(2, 3, 4, 5).repeat(500, 1, 1, 1)
    out = BatchAugment(hflip=0.5, generator=torch.Generator().manual_seed(0))(images.clone())
    flipped = (out == images.flip(3)).flatten(1).all(1)
    kept = (out == images).flatten(1).all(1)
    assert bool((flipped | kept).all()) and 400 < int(flipped.sum()) < 600
    out = BatchAugment(hflip=0., vflip=1.)(images.clone())
    assert torch.equal(out, images.flip(2))


def test_loaders_count_bad_data_alike_for_every_decode_path(tmp_path):
    """create_train_loader(decode='pil'|'fast') and GPU decode (run on the CPU) skip and count the same kind of
    samples: an unreadable member in the worker, a truncated JPEG where it is decoded; all batches stay full.
    pil and fast read the stream equally far (the same counts); GPU decode reads whole encoded batches and
    refills, so it reads at least as far."""
    from data_helpers import truncated_jpeg, write_identity_shards

    from esam_timm.data import resolve_source
    from esam_timm.data.batch_aug import BatchAugment
    from esam_timm.data.gpu_decode import GpuDecodeLoader
    from esam_timm.data.wds import create_train_loader
    write_identity_shards(tmp_path, [8, 8], overrides={3: {'jpg': b'garbage'}, 9: {'jpg': truncated_jpeg(9)}})
    source = resolve_source(str(tmp_path), 'train')
    common = dict(batch_size=7, img_size=24, num_workers=0, seed=0, shuffle_buffer=4, color_jitter=0.4)
    reports = {}
    for decode in ('pil', 'fast', 'encoded'):
        loader = create_train_loader(source, decode=decode, **common)
        if decode == 'encoded':
            loader = GpuDecodeLoader(loader, 'cpu', 24, BatchAugment(0.5, 0., 0.4), batch_size=7)
        batches = list(loader)
        assert len(batches) == len(loader) == 3
        assert all(images.dtype == torch.uint8 and images.shape == (7, 3, 24, 24) for images, _ in batches)
        assert all(len(labels) == 7 for _, labels in batches)
        report = loader.data_report()
        assert report.samples == 21
        reports[decode] = report.bad_samples_by_shard
        assert not ({3, 9} & {int(label) for _, labels in batches for label in labels})
    assert reports['pil'] == reports['fast'] and set(reports['pil']) == set(source.urls)  # both bad samples met
    assert set(reports['encoded']) == set(source.urls)
    assert all(reports['encoded'][url] >= reports['pil'][url] for url in source.urls)

"""The GPU decode backend (esam_timm.data.gpu_decode), run on the CPU through the same code path
(device='cpu'); the CUDA test is marked and skipped without CUDA."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from esam_timm.data.batch_aug import BatchAugment
from esam_timm.data.decode import EncodedCrop, EncodedImage, pack_encoded, resized_crop
from esam_timm.data.gpu_decode import GpuDecodeLoader, check_cuda_device
from esam_timm.data.prefetch import DevicePrefetcher
from esam_timm.data.bad_data import DataReport
from test_data_decode import photo_jpeg

SIZE = (48, 48)


class _Batches:
    """A host loader stand-in: fixed (EncodedBatch, labels) batches and a report of what it delivered."""

    def __init__(self, batches):
        self.batches = batches
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)

    def data_report(self):
        return DataReport(samples=sum(len(labels) for _, labels in self.batches))


def _encoded(datas, boxes, first_label=0, url='shard-0.tar'):
    items = [(EncodedImage(d, box, 0, f'k{first_label + i}', url), first_label + i) for i, (d, box) in
             enumerate(zip(datas, boxes))]
    return pack_encoded(items)


def test_fixed_crop_equals_the_cpu_loaders_crop():
    """Within 1 grey level of the fast CPU path's crop of the same image (both torch's antialiased filter;
    the device path resizes in float and rounds, the CPU path in uint8)."""
    datas = [photo_jpeg(120, 90, seed=s) for s in range(4)]
    boxes = [(0, 0, 90, 120), (10, 20, 50, 60), (30, 5, 60, 70), (1, 2, 20, 30)]
    images, kept = GpuDecodeLoader(None, 'cpu', SIZE).decode_batch(_encoded(datas, boxes)[0])
    assert kept == [0, 1, 2, 3] and images.dtype == torch.uint8 and images.shape == (4, 3, *SIZE)
    for k, (data, box) in enumerate(zip(datas, boxes)):
        expected = resized_crop(data, box, SIZE)
        assert (images[k].int() - expected.int()).abs().max() <= 1, k


def test_batches_keep_labels_and_order_and_count_undecodable_images():
    """A truncated JPEG passes the worker's header check, fails on the device: dropped, counted for its
    shard, and the other images and labels stay in order."""
    datas = [photo_jpeg(64, 64, seed=s) for s in range(5)]
    truncated = datas[2][:len(datas[2]) // 2]
    boxes = [(0, 0, 64, 64)] * 5
    good, _ = _encoded(datas, boxes, first_label=0, url='a.tar')
    bad = _encoded(datas[:2] + [truncated] + datas[3:], boxes, first_label=10, url='b.tar')
    loader = GpuDecodeLoader(_Batches([_encoded(datas, boxes), bad]), 'cpu', SIZE)
    out = list(loader)
    assert [labels.tolist() for _, labels in out] == [[0, 1, 2, 3, 4], [10, 11, 13, 14]]
    assert torch.equal(out[1][0], out[0][0][[0, 1, 3, 4]])  # same images, same order, the bad one gone
    report = loader.data_report()
    assert (report.samples, report.bad_samples, report.bad_samples_by_shard) == (9, 1, {'b.tar': 1})
    assert good.keys == ['k0', 'k1', 'k2', 'k3', 'k4']
    list(loader)  # a new epoch starts a new report
    assert loader.data_report().bad_samples == 1


def test_worker_side_rejects_what_pil_cannot_identify_and_draws_timms_crop():
    crop = EncodedCrop(SIZE, rng=random.Random(3))
    sample = {'__key__': 'x', '__url__': 's.tar', 'jpg': b'this is not an image'}
    with pytest.raises(Exception, match='cannot identify'):
        crop(sample, ['jpg'])
    data = photo_jpeg(200, 150)
    encoded = crop({'__key__': 'y', '__url__': 's.tar', 'jpg': data}, ['png', 'jpg'])
    from esam_timm.data.decode import sample_crop
    assert encoded.box == sample_crop(200, 150, rng=random.Random(3))
    assert (encoded.key, encoded.url, encoded.data) == ('y', 's.tar', data)


def test_png_members_decode_through_the_cpu_fallback():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(buf, format='PNG')
    jpeg = photo_jpeg(50, 40)
    images, kept = GpuDecodeLoader(None, 'cpu', SIZE).decode_batch(
        _encoded([jpeg, buf.getvalue()], [(0, 0, 40, 50)] * 2)[0])
    assert kept == [0, 1]
    assert (images[1].int() - resized_crop(buf.getvalue(), (0, 0, 40, 50), SIZE).int()).abs().max() <= 1


def test_through_the_device_prefetcher_with_augmentation():
    """GpuDecodeLoader -> DevicePrefetcher: normalised float, channels-last, flips applied on the batch."""
    datas = [photo_jpeg(64, 64, seed=s) for s in range(6)]
    batches = [_encoded(datas, [(0, 0, 64, 64)] * 6)]
    plain = next(iter(GpuDecodeLoader(_Batches(batches), 'cpu', SIZE)))[0]
    flipped = GpuDecodeLoader(_Batches(batches), 'cpu', SIZE, BatchAugment(hflip=1.))
    assert torch.equal(next(iter(flipped))[0], plain.flip(3))
    images, labels = next(iter(DevicePrefetcher(flipped, 'cpu')))
    assert images.dtype == torch.float32 and images.is_contiguous(memory_format=torch.channels_last)
    expected = (plain.flip(3).float() - 127.5) / 63.75  # the loader's mean/std are passed through
    assert torch.allclose(images, expected, atol=1e-5) and labels.tolist() == list(range(6))


def test_refuses_without_cuda_naming_the_cpu_alternative():
    with pytest.raises(ValueError, match='--decode fast') as info:
        check_cuda_device('cpu')
    assert '\n' not in str(info.value)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='--decode fast'):
            check_cuda_device('cuda')


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_decode_matches_the_cpu_code_path():
    """nvJPEG vs libjpeg-turbo: stated tolerance mean |diff| <= 1.5 levels, 99% within 6 (their IDCT and
    chroma upsampling differ slightly); then the whole device path through DevicePrefetcher."""
    datas = [photo_jpeg(320, 240, seed=s) for s in range(8)]
    boxes = [(s * 5, s * 7, 200, 240) for s in range(8)]
    encoded, labels = _encoded(datas, boxes)
    on_cpu, _ = GpuDecodeLoader(None, 'cpu', (224, 224)).decode_batch(encoded)
    on_gpu, kept = GpuDecodeLoader(None, 'cuda', (224, 224)).decode_batch(encoded)
    assert kept == list(range(8)) and on_gpu.is_cuda
    diff = (on_gpu.cpu().float() - on_cpu.float()).abs()
    assert diff.mean() <= 1.5 and torch.quantile(diff.flatten()[::7], 0.99) <= 6
    loader = GpuDecodeLoader(_Batches([(encoded, labels)]), check_cuda_device('cuda'), (224, 224),
                             BatchAugment(hflip=0.5, color_jitter=0.4))
    images, targets = next(iter(DevicePrefetcher(loader, 'cuda')))
    assert images.is_cuda and images.is_contiguous(memory_format=torch.channels_last)
    assert targets.tolist() == list(range(8))

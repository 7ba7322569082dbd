"""DevicePrefetcher on the CPU: normalisation, channels-last, random erasing, mixup, pass-throughs."""
import pytest
import torch
from timm.data import Mixup

from data_helpers import write_identity_shards
from esam_timm.data import DataReport, DevicePrefetcher, create_train_loader, resolve_source

MEAN, STD = (0.25, 0.5, 0.75), (0.5, 0.25, 0.125)


class _ListLoader:
    """A loader stand-in with the attributes DevicePrefetcher reads."""

    def __init__(self, batches):
        self.batches = batches
        self.epochs = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def data_report(self):
        return DataReport(samples=8, bad_samples=3, bad_samples_by_shard={'a.tar': 3})


def _batches(n=2, b=4, size=6):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8),
             torch.arange(b) + i) for i in range(n)]


def test_normalised_channels_last_equals_hand_computation():
    batches = _batches()
    loader = _ListLoader(batches)
    pf = DevicePrefetcher(loader, 'cpu', mean=MEAN, std=STD, channels_last=True)
    out = list(pf)
    assert len(out) == len(pf) == 2
    for (x, y), (raw, labels) in zip(out, batches):
        mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
        std = torch.tensor(STD).view(1, 3, 1, 1) * 255
        expected = (raw.float() - mean) / std
        assert x.dtype == torch.float32 and x.shape == raw.shape
        assert x.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)
        assert torch.equal(y, labels)
    # a hand value: pixel 255 in channel 0 -> (255 - 63.75) / 127.5 = 1.5
    one = DevicePrefetcher(_ListLoader([(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8), torch.zeros(1))]),
                           'cpu', mean=MEAN, std=STD)
    assert next(iter(one))[0][0, :, 0, 0].tolist() == [1.5, 2.0, 2.0]
    assert pf.data_report().bad_samples == 3 and pf.data_report().num_bad_shards == 0 and pf.data_wait_s >= 0.0
    assert DevicePrefetcher(batches, 'cpu').data_report() is None  # a loader that keeps no report
    pf.set_epoch(4)
    assert loader.epochs == [4]


def test_contiguous_output_when_channels_last_off():
    x, _ = next(iter(DevicePrefetcher(_ListLoader(_batches()), 'cpu', mean=MEAN, std=STD, channels_last=False)))
    assert x.is_contiguous()


def test_mixup_on_device_gives_soft_targets():
    mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=10)
    pf = DevicePrefetcher(_ListLoader(_batches(b=4)), 'cpu', mean=MEAN, std=STD, mixup_fn=mixup)
    x, y = next(iter(pf))
    assert x.shape == (4, 3, 6, 6)
    assert y.shape == (4, 10) and y.dtype == torch.float32
    torch.testing.assert_close(y.sum(1), torch.ones(4))
    # sample i mixes labels i and 3 - i (the flipped batch): exactly those two classes are non-zero
    for i in range(4):
        assert set(torch.nonzero(y[i]).flatten().tolist()) <= {i, 3 - i}


def test_random_erasing_on_device_and_inherited_from_loader(tmp_path):
    batch = [(torch.full((4, 3, 16, 16), 200, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64))]
    x, _ = next(iter(DevicePrefetcher(_ListLoader(batch), 'cpu', mean=MEAN, std=STD, re_prob=1.0)))
    for img in x:  # const mode erases to 0; every other value is (200 - mean) / std != 0
        assert (img == 0).any() and (img != 0).any()
    with pytest.raises(ValueError, match='re_prob must be in'):
        DevicePrefetcher(_ListLoader(batch), 'cpu', re_prob=2.0)
    write_identity_shards(tmp_path, [4])
    loader = create_train_loader(resolve_source(str(tmp_path), 'train'), batch_size=2, img_size=16,
                                 num_workers=0, re_prob=0.5, re_count=2, mean=MEAN, std=STD)
    pf = DevicePrefetcher(loader, 'cpu')
    assert pf.random_erasing is not None and pf.random_erasing.probability == 0.5
    assert pf.random_erasing.max_count == 2
    torch.testing.assert_close(pf.mean.flatten(), torch.tensor(MEAN) * 255)
    assert len(pf) == 2 and len(list(pf)) == 2


@pytest.mark.cuda
def test_cuda_stream_prefetch_matches_cpu():
    batches = _batches(n=3)
    cpu = [x for x, _ in DevicePrefetcher(_ListLoader(batches), 'cpu', mean=MEAN, std=STD)]
    gpu = [x.cpu() for x, _ in DevicePrefetcher(_ListLoader(batches), 'cuda', mean=MEAN, std=STD)]
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(a, b)


def test_device_augment_jitters_the_uint8_batch_before_normalising_with_per_epoch_draws():
    """The fast path's colour jitter on the device: BatchAugment on the uint8 batch, then normalisation, its
    draws from a generator seeded by (seed, rank, epoch): the same per epoch, new for the next, and the
    global RNG untouched."""
    from esam_timm.data.batch_aug import BatchAugment
    batches = _batches(n=3, b=4, size=8)
    state = torch.get_rng_state()

    def epoch(pf, number=None):
        if number is not None:
            pf.set_epoch(number)
        return [x for x, _ in pf]

    pf = DevicePrefetcher(_ListLoader(batches), 'cpu', mean=MEAN, std=STD, channels_last=False, seed=5, rank=1,
                          augment=BatchAugment(hflip=0., color_jitter=0.4))
    first = epoch(pf)
    assert torch.equal(torch.get_rng_state(), state)
    reference = BatchAugment(hflip=0., color_jitter=0.4)
    reference.reseed('device-augment', 5, 1, 0)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1) * 255, torch.tensor(STD).view(1, 3, 1, 1) * 255
    for x, (raw, _) in zip(first, batches):
        jittered = reference(raw)
        assert not torch.equal(jittered, raw)
        torch.testing.assert_close(x, (jittered.float() - mean) / std, rtol=0, atol=1e-5)
    second = epoch(pf)  # no set_epoch: the next epoch's draws
    assert not torch.equal(second[0], first[0])
    again = epoch(pf, 0)
    assert all(torch.equal(a, b) for a, b in zip(again, first))
    assert DevicePrefetcher(_ListLoader(batches), 'cpu', augment=BatchAugment(hflip=0.)).augment is None  # no-op


def test_fast_decode_jitters_in_the_workers_on_the_cpu(tmp_path):
    """Training on the CPU the fast path keeps timm's PIL jitter in the workers (the batch jitter on the CPU
    would run in the training process); on a GPU it moves to the device (tests/test_gpu_decode.py, CUDA)."""
    from esam_timm.data.backend_wds import WdsBackend
    from esam_timm.data.backends import Augmentation, ImageConfig, LoaderConfig
    write_identity_shards(tmp_path, [8])
    backend = WdsBackend('wds/data', str(tmp_path))
    config = LoaderConfig(batch_size=4, image=ImageConfig((3, 16, 16), 'bilinear', MEAN, STD, 1.0),
                          device=torch.device('cpu'), workers=0)
    loader = backend.train_loader(backend.split('train', training=True), config, Augmentation(color_jitter=0.4),
                                  seed=0, decode='fast')
    assert loader.augment is None and loader.loader.dataset.transform.jitter is not None

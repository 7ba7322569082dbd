"""The GPU decode backend (esam_timm.data.gpu_decode), run on the CPU through the same code path
(device='cpu', TorchCodec's CPU decoder standing in for nvJPEG); the CUDA tests are marked and skipped
without CUDA."""
import io
import random
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import esam_timm.data.gpu_decode as gpu_decode
from esam_timm.data.bad_data import DataPipelineError, DataReport
from esam_timm.data.batch_aug import BatchAugment
from esam_timm.data.decode import EncodedCrop, EncodedImage, jpeg_decoder, pack_encoded, resized_crop, sample_crop
from esam_timm.data.gpu_decode import GpuDecodeLoader, StreamHandoff, check_cuda_device
from esam_timm.data.prefetch import DevicePrefetcher
from test_data_decode import photo_jpeg

SIZE = (48, 48)


class _Batches:
    """A host loader stand-in: fixed (EncodedBatch, labels) batches, ``length`` output batches per epoch, and a
    report of what it handed out (as WdsLoader's)."""

    def __init__(self, batches, length=None):
        self.batches = batches
        self.length = len(batches) if length is None else length
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        self.handed = 0

    def __len__(self):
        return self.length

    def __iter__(self):
        self.handed = 0
        for batch in self.batches:
            self.handed += len(batch[1])
            yield batch

    def data_report(self):
        return DataReport(samples=self.handed)


def _encoded(datas, boxes, first_label=0, url='shard-0.tar', host=()):
    items = [(EncodedImage(d, box, 0, f'k{first_label + i}', url, i in host), first_label + i) for i, (d, box) in
             enumerate(zip(datas, boxes))]
    return pack_encoded(items)


def _photos(n, width=64, height=64, first_seed=0):
    return [photo_jpeg(width, height, seed=first_seed + s) for s in range(n)]


def test_fixed_crop_equals_the_cpu_loaders_crop():
    """Within 1 grey level of the fast CPU path's crop of the same image (both torch's antialiased filter;
    the device path resizes in float and rounds, the CPU path in uint8)."""
    datas = [photo_jpeg(120, 90, seed=s) for s in range(4)]
    boxes = [(0, 0, 90, 120), (10, 20, 50, 60), (30, 5, 60, 70), (1, 2, 20, 30)]
    images, kept = GpuDecodeLoader(None, 'cpu', SIZE, batch_size=4).decode_batch(_encoded(datas, boxes)[0])
    assert kept == [0, 1, 2, 3] and images.dtype == torch.uint8 and images.shape == (4, 3, *SIZE)
    for k, (data, box) in enumerate(zip(datas, boxes)):
        expected = resized_crop(data, box, SIZE)
        assert (images[k].int() - expected.int()).abs().max() <= 1, k


def test_an_undecodable_image_is_counted_and_its_place_refilled_from_the_stream():
    """A truncated JPEG passes the worker's header check and fails where it is decoded: it is counted for its
    shard, the next image of the stream takes its place, the rest waits for the next batch; every batch is
    full and in stream order, and the epoch has exactly len() batches."""
    datas = _photos(15)
    truncated = datas[7][:len(datas[7]) // 2]
    boxes = [(0, 0, 64, 64)] * 5
    host = _Batches([_encoded(datas[:5], boxes, 0, 'a.tar'),
                     _encoded(datas[5:7] + [truncated] + datas[8:10], boxes, 5, 'b.tar'),
                     _encoded(datas[10:15], boxes, 10, 'c.tar')], length=2)
    loader = GpuDecodeLoader(host, 'cpu', SIZE, batch_size=5)
    out = list(loader)
    assert [labels.tolist() for _, labels in out] == [[0, 1, 2, 3, 4], [5, 6, 8, 9, 10]]
    reference, _ = GpuDecodeLoader(None, 'cpu', SIZE, batch_size=15).decode_batch(
        _encoded(datas, [(0, 0, 64, 64)] * 15)[0])
    assert torch.equal(out[1][0], reference[[5, 6, 8, 9, 10]])  # the same pixels as decoded alone
    report = loader.data_report()
    # 10 delivered; the image decoded but left over at the epoch's end (11..14) is neither good nor bad
    assert (report.samples, report.bad_samples, report.bad_samples_by_shard) == (10, 1, {'b.tar': 1})
    list(loader)  # a new epoch starts a new report
    assert loader.data_report().bad_samples == 1 and loader.data_report().samples == 10


def test_a_stream_that_ends_before_the_epoch_is_full_is_an_error():
    datas = _photos(4)
    host = _Batches([_encoded(datas[:2] + [b'\xff\xd8\xff' + b'0' * 40, datas[3]], [(0, 0, 64, 64)] * 4)])
    with pytest.raises(RuntimeError, match='ended after 1 batches, before 1 full batches'):
        list(GpuDecodeLoader(host, 'cpu', SIZE, batch_size=4))


def test_worker_side_rejects_what_pil_cannot_identify_and_draws_timms_crop():
    crop = EncodedCrop(SIZE, rng=random.Random(3))
    sample = {'__key__': 'x', '__url__': 's.tar', 'jpg': b'this is not an image'}
    with pytest.raises(Exception, match="20 bytes starting b'this is ': not an image format PIL can read"):
        crop(sample, ['jpg'])
    data = photo_jpeg(200, 150)
    encoded = crop({'__key__': 'y', '__url__': 's.tar', 'jpg': data}, ['png', 'jpg'])
    assert encoded.box == sample_crop(200, 150, rng=random.Random(3))
    assert (encoded.key, encoded.url, encoded.data, encoded.host) == ('y', 's.tar', data, False)


def _png(width=50, height=40, mode='RGB', fmt='PNG'):
    buf = io.BytesIO()
    channels = len(mode)
    arr = np.random.default_rng(0).integers(0, 256, (height, width, channels), dtype=np.uint8).squeeze()
    Image.fromarray(arr, mode=mode).save(buf, format=fmt)
    return buf.getvalue()


def test_png_and_cmyk_jpeg_are_marked_for_the_host_and_decoded_as_pil_decodes_them():
    """The worker marks what nvJPEG does not decode as timm would; the loader decodes it with PIL."""
    png, cmyk = _png(), _png(mode='CMYK', fmt='JPEG')
    crop = EncodedCrop(SIZE, scale=(1.0, 1.0), ratio=(1.25, 1.25))
    marks = [crop({'jpg': data}, ['jpg']).host for data in (photo_jpeg(50, 40), png, cmyk)]
    assert marks == [False, True, True]
    datas = [photo_jpeg(50, 40), png, cmyk]
    images, kept = GpuDecodeLoader(None, 'cpu', SIZE, batch_size=3).decode_batch(
        _encoded(datas, [(0, 0, 40, 50)] * 3, host=(1, 2))[0])
    assert kept == [0, 1, 2]
    for k in (1, 2):
        assert (images[k].int() - resized_crop(datas[k], (0, 0, 40, 50), SIZE).int()).abs().max() <= 1, k


class _FlakyDevice:
    """TorchCodec's decode_jpeg, except that calls naming a device (the device path) raise ``error`` for the
    images listed in ``fail`` (their byte length identifies them), or for every call when ``fail`` is None."""

    def __init__(self, error, fail=None):
        self.real, self.error, self.fail = jpeg_decoder(), error, fail
        self.device_calls = 0

    def __call__(self, source, mode='RGB', device=None):
        if device is not None:
            self.device_calls += 1
            items = source if isinstance(source, list) else [source]
            if self.fail is None or any(len(t) in self.fail for t in items):
                raise self.error
            return self.real(source, mode=mode, device=device)
        return self.real(source, mode=mode)


def _flaky(monkeypatch, error, fail=None):
    flaky = _FlakyDevice(error, fail)
    monkeypatch.setattr(gpu_decode, 'jpeg_decoder', lambda: flaky)
    return flaky


def test_an_image_the_device_rejects_but_the_host_decodes_is_not_bad_data(monkeypatch, caplog):
    datas = _photos(4)
    _flaky(monkeypatch, RuntimeError('Failed to decode batch: 9'), fail={len(datas[2])})
    loader = GpuDecodeLoader(_Batches([_encoded(datas, [(0, 0, 64, 64)] * 4)]), 'cpu', SIZE, batch_size=4)
    (images, labels), = list(loader)
    assert labels.tolist() == [0, 1, 2, 3] and loader.data_report().bad_samples == 0
    reference = GpuDecodeLoader(None, 'cpu', SIZE, batch_size=4)
    expected, _ = reference.decode_batch(_encoded(datas, [(0, 0, 64, 64)] * 4)[0])
    assert torch.equal(images, expected)
    assert "the device could not decode sample 'k2'" in caplog.text and 'decoded on the host' in caplog.text


@pytest.mark.parametrize('error', [
    torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 MiB'),
    RuntimeError('decode_images, DecodeJpegCuda.cpp:471, Failed to synchronize CUDA stream: 700'),
    RuntimeError('Failed to decode batch: 9'),  # every image fails on the device, and the host decodes them all
])
def test_out_of_memory_a_cuda_fault_or_a_failing_device_stop_with_one_line(monkeypatch, error):
    """Not bad data: the consumer gets one DataPipelineError line and nothing is counted as bad."""
    flaky = _flaky(monkeypatch, error)
    datas = _photos(4)
    loader = GpuDecodeLoader(_Batches([_encoded(datas, [(0, 0, 64, 64)] * 4)]), 'cpu', SIZE, batch_size=4)
    with pytest.raises(DataPipelineError) as info:
        list(loader)
    message = str(info.value)
    assert '\n' not in message and 'not the data, so nothing is counted as bad' in message
    assert ('lower -b' in message) == isinstance(error, torch.OutOfMemoryError)
    assert loader.data_report().bad_samples == 0 and flaky.device_calls >= 1


class _RecordingHandoff(StreamHandoff):
    """StreamHandoff on the CPU that logs each stream rule with the thread that applied it."""

    def __init__(self, log):
        super().__init__(torch.device('cpu'))
        self.log = log
        self.active = set()

    def producing(self):
        handoff = self

        class _Context:
            def __enter__(self):
                handoff.active.add(threading.get_ident())
                handoff.log.append(('producing', threading.current_thread().name))

            def __exit__(self, *exc):
                handoff.active.discard(threading.get_ident())
        return _Context()

    def publish(self):
        self.log.append(('publish', threading.current_thread().name))
        return f'event{sum(1 for entry in self.log if entry[0] == "publish")}'

    def receive(self, event, tensors):
        self.log.append(('receive ' + event, threading.current_thread().name, [id(t) for t in tensors]))


def test_the_next_batch_is_decoded_and_augmented_on_the_side_while_the_caller_holds_this_one(monkeypatch):
    """The order the overlap relies on: the producer thread enters its stream context before it decodes
    (allocations belong to the side stream), decodes and augments each batch inside it, publishes an event
    after the last write; the caller's thread only receives (waits on that event, marks the memory used by
    its stream) and meanwhile the producer finishes the NEXT batch: a caller that holds batch k until
    batch k + 1 is published would hang if decoding ran in the caller's next()."""
    log = []
    handoff = _RecordingHandoff(log)
    loader = GpuDecodeLoader(None, 'cpu', SIZE, BatchAugment(hflip=0.5, color_jitter=0.4), batch_size=4,
                             handoff=handoff)
    real_decode, real_augment = loader.decode_batch, loader.augment.__class__.__call__
    published = [threading.Event() for _ in range(5)]

    def decode_batch(encoded, tally=None):
        log.append(('decode', threading.current_thread().name, threading.get_ident() in handoff.active))
        return real_decode(encoded, tally)

    def augment(self, images):
        log.append(('augment', threading.current_thread().name, threading.get_ident() in handoff.active))
        return real_augment(self, images)

    def publish():
        event = _RecordingHandoff.publish(handoff)
        published[int(event[5:]) - 1].set()
        return event

    monkeypatch.setattr(loader, 'decode_batch', decode_batch)
    monkeypatch.setattr(BatchAugment, '__call__', augment)
    monkeypatch.setattr(handoff, 'publish', publish)
    datas = _photos(4)
    loader.loader = _Batches([_encoded(datas, [(0, 0, 64, 64)] * 4, 4 * b) for b in range(5)])
    caller = threading.current_thread().name
    for k, (images, labels) in enumerate(loader):
        log.append(('caller holds', caller, k))
        if k + 1 < len(loader):
            assert published[k + 1].wait(timeout=30), f'batch {k + 1} was not prepared while the caller held {k}'
        assert labels.tolist() == list(range(4 * k, 4 * k + 4))
    producer = log[0][1]
    assert producer != caller and log[0] == ('producing', producer)
    produced = [i for i, entry in enumerate(log) if entry[0] in ('decode', 'augment', 'publish')]
    assert [log[i][0] for i in produced] == ['decode', 'augment', 'publish'] * 5
    for k in range(5):  # per batch: decode < augment < publish (producer, inside its stream) < receive (caller)
        decode, augment, publish = produced[3 * k:3 * k + 3]
        receive = next(i for i, e in enumerate(log) if e[0] == f'receive event{k + 1}')
        assert decode < augment < publish < receive
        assert log[decode][1:] == (producer, True) and log[augment][1:] == (producer, True)
        assert log[publish][1] == producer and log[receive][1] == caller
        hold = log.index(('caller holds', caller, k))
        assert receive < hold  # the caller's stream waits for the batch before the caller gets it
    assert all(entry[0] != 'decode' or entry[1] == producer for entry in log)


def test_augmentation_draws_are_seeded_per_epoch_and_leave_the_global_rng_alone():
    datas = _photos(4)

    def run(epoch, seed=1):
        loader = GpuDecodeLoader(_Batches([_encoded(datas, [(0, 0, 64, 64)] * 4)]), 'cpu', SIZE,
                                 BatchAugment(hflip=0.5, color_jitter=0.4), batch_size=4, seed=seed)
        loader.set_epoch(epoch)
        return next(iter(loader))[0]

    state = torch.get_rng_state()
    first = run(0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(run(0), first) and not torch.equal(run(1), first) and not torch.equal(run(0, seed=2), first)


def test_through_the_device_prefetcher_with_augmentation():
    """GpuDecodeLoader -> DevicePrefetcher: normalised float, channels-last, flips applied on the batch."""
    datas = [photo_jpeg(64, 64, seed=s) for s in range(6)]
    batches = [_encoded(datas, [(0, 0, 64, 64)] * 6)]
    plain = next(iter(GpuDecodeLoader(_Batches(batches), 'cpu', SIZE, batch_size=6)))[0]
    flipped = GpuDecodeLoader(_Batches(batches), 'cpu', SIZE, BatchAugment(hflip=1.), batch_size=6)
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


def test_a_missing_torchcodec_is_one_line_naming_the_install(monkeypatch):
    import builtins
    import esam_timm.data.decode as decode
    real_import = builtins.__import__

    def no_torchcodec(name, *args, **kwargs):
        if name.startswith('torchcodec'):
            raise ModuleNotFoundError(f"No module named '{name}'", name='torchcodec')
        return real_import(name, *args, **kwargs)

    decode.jpeg_decoder.cache_clear()
    monkeypatch.setattr(builtins, '__import__', no_torchcodec)
    try:
        with pytest.raises(ValueError) as info:
            decode.jpeg_decoder()
    finally:
        monkeypatch.undo()
        decode.jpeg_decoder.cache_clear()
    message = str(info.value)
    assert '\n' not in message and 'TorchCodec, which is not installed' in message
    assert 'pip install "torchcodec>=0.16,<0.18"' in message and '--decode pil' in message


@pytest.mark.cuda
def test_cuda_decode_matches_the_cpu_code_path():
    """nvJPEG vs libjpeg-turbo: stated tolerance mean |diff| <= 1.5 levels, 99% within 6 (their IDCT and
    chroma upsampling differ slightly); then the whole device path through DevicePrefetcher."""
    datas = [photo_jpeg(320, 240, seed=s) for s in range(8)]
    boxes = [(s * 5, s * 7, 200, 240) for s in range(8)]
    encoded, labels = _encoded(datas, boxes)
    on_cpu, _ = GpuDecodeLoader(None, 'cpu', (224, 224), batch_size=8).decode_batch(encoded)
    on_gpu, kept = GpuDecodeLoader(None, 'cuda', (224, 224), batch_size=8).decode_batch(encoded)
    assert kept == list(range(8)) and on_gpu.is_cuda
    diff = (on_gpu.cpu().float() - on_cpu.float()).abs()
    assert diff.mean() <= 1.5 and torch.quantile(diff.flatten()[::7], 0.99) <= 6
    loader = GpuDecodeLoader(_Batches([(encoded, labels)] * 3, length=3), check_cuda_device('cuda'), (224, 224),
                             BatchAugment(hflip=0.5, color_jitter=0.4), batch_size=8)
    out = list(DevicePrefetcher(loader, 'cuda'))
    assert len(out) == 3
    for images, targets in out:
        assert images.is_cuda and images.is_contiguous(memory_format=torch.channels_last)
        assert targets.tolist() == list(range(8))


@pytest.mark.cuda
def test_cuda_truncated_jpeg_is_bad_data_and_the_batch_is_refilled():
    """On the device the same rule as on the CPU: a truncated JPEG is counted, the batch stays full."""
    datas = _photos(8)
    datas[3] = datas[3][:len(datas[3]) // 2]
    host = _Batches([_encoded(datas[:4], [(0, 0, 64, 64)] * 4, 0, 'a.tar'),
                     _encoded(datas[4:], [(0, 0, 64, 64)] * 4, 4, 'b.tar')], length=1)
    loader = GpuDecodeLoader(host, check_cuda_device('cuda'), SIZE, batch_size=4)
    (images, labels), = list(loader)
    assert images.is_cuda and labels.tolist() == [0, 1, 2, 4]
    assert loader.data_report().bad_samples_by_shard == {'a.tar': 1}


@pytest.mark.cuda
def test_cuda_fast_decode_moves_the_colour_jitter_to_the_device(tmp_path):
    from data_helpers import write_identity_shards
    from esam_timm.data.backend_wds import WdsBackend
    from esam_timm.data.backends import Augmentation, ImageConfig, LoaderConfig
    write_identity_shards(tmp_path, [8])
    backend = WdsBackend('wds/data', str(tmp_path))
    config = LoaderConfig(batch_size=4, image=ImageConfig((3, 16, 16), 'bilinear', (0.5,) * 3, (0.25,) * 3, 1.0),
                          device=torch.device('cuda'), workers=0)
    loader = backend.train_loader(backend.split('train', training=True), config, Augmentation(color_jitter=0.4),
                                  seed=0, decode='fast')
    assert loader.augment is not None and loader.augment.jitter == ((0.6, 1.4),) * 3
    assert loader.augment.hflip == 0 and loader.loader.dataset.transform.jitter is None  # flips stay in the workers
    images, targets = next(iter(loader))
    assert images.is_cuda and images.shape == (4, 3, 16, 16) and targets.is_cuda

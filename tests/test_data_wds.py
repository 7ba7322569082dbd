"""WebDataset loaders and their per-epoch bad-data reports, on real JPEG shards written into tmp_path."""
import json
import math
import os
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
import torch.distributed as dist

from data_helpers import (IMAGE_SIZE, decoded, gloo_group, run_ranks, truncate_after_sample, truncate_in_sample,
                          write_identity_shards)
from esam_timm.data import (
    BadDataError,
    DataPipelineError,
    DevicePrefetcher,
    check_bad_fraction,
    create_train_loader,
    create_val_loader,
    resolve_source,
)
from esam_timm.distributed import all_reduce_sum

SIZES = [7, 2, 4]  # uneven shards, fewer than 2 ranks x 2 workers


def _val_labels(loader) -> List[int]:
    return [int(y) for _, labels in loader for y in labels]


def _train_epoch(loader, epoch):
    loader.set_epoch(epoch)
    batches = list(loader)
    labels = torch.cat([y for _, y in batches]).tolist()
    images = torch.cat([x for x, _ in batches])
    return labels, images


# ---------------------------------------------------------------- loaders

def test_bad_loader_arguments(tmp_path):
    write_identity_shards(tmp_path, SIZES)
    src = resolve_source(str(tmp_path), 'train')
    with pytest.raises(ValueError, match='rank must be in'):
        create_train_loader(src, batch_size=2, img_size=16, rank=2, world_size=2)
    with pytest.raises(ValueError, match="label_key 'json:'"):
        create_val_loader(src, batch_size=2, img_size=16, label_key='json:')


@pytest.mark.parametrize('num_workers', [0, 2])
def test_val_round_trip_exact_images_and_labels(tmp_path, num_workers):
    write_identity_shards(tmp_path, SIZES)
    loader = create_val_loader(resolve_source(str(tmp_path), 'train'), batch_size=3, img_size=IMAGE_SIZE,
                               crop_pct=1.0, num_workers=num_workers)
    seen = {}
    for images, labels in loader:
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        for img, y in zip(images, labels.tolist()):
            seen[y] = img.numpy()
    assert sorted(seen) == list(range(13))
    for i, img in seen.items():
        np.testing.assert_array_equal(img, decoded(i))
    # len is exact with shard lengths known: shards (7, 4 | 2) over 2 workers, or all 13 in one stream
    assert len(loader) == (math.ceil(11 / 3) + 1 if num_workers == 2 else 5)
    assert len(list(loader)) == len(loader)


@pytest.mark.parametrize('num_workers', [0, 2])
def test_val_num_samples_reads_exactly_the_leading_samples(tmp_path, num_workers):
    write_identity_shards(tmp_path, SIZES)
    loader = create_val_loader(resolve_source(str(tmp_path), 'train', num_samples=8), batch_size=3,
                               img_size=IMAGE_SIZE, crop_pct=1.0, num_workers=num_workers)
    labels = sorted(y for _, batch in loader for y in batch.tolist())
    assert labels == list(range(8))  # shard 0's 7 samples, then the first of shard 1 (cut)
    assert len(list(loader)) == len(loader)
    assert loader.data_report().bad_samples == 0 and not loader.data_report().bad_shards


def test_val_label_from_json_field(tmp_path):
    write_identity_shards(tmp_path, [4], overrides={2: {'cls': None}})
    loader = create_val_loader(resolve_source(str(tmp_path), 'train'), batch_size=8, img_size=16,
                               num_workers=0, label_key='json:label')
    assert _val_labels(loader) == [0, 1, 2, 3]
    assert loader.data_report().bad_samples == 0 and loader.data_report().samples == 4


def test_train_loader_length_and_content(tmp_path):
    write_identity_shards(tmp_path, SIZES)
    loader = create_train_loader(resolve_source(str(tmp_path), 'train'), batch_size=4, img_size=16,
                                 num_workers=2, seed=3, shuffle_buffer=8)
    assert len(loader) == math.ceil(13 / 4)
    batches = list(loader)
    assert len(batches) == 4
    for images, labels in batches:
        assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8
        assert labels.min() >= 0 and labels.max() <= 12
    # a larger epoch than the data: resampling keeps the stream going
    long = create_train_loader(resolve_source(str(tmp_path), 'train', num_samples=100), batch_size=4,
                               img_size=16, num_workers=2, seed=3, shuffle_buffer=8)
    assert len(long) == 25 and len(list(long)) == 25


def test_train_epochs_reshuffle_and_seed_reproduces(tmp_path):
    write_identity_shards(tmp_path, SIZES)
    src = resolve_source(str(tmp_path), 'train', num_samples=24)

    def make():
        return create_train_loader(src, batch_size=4, img_size=16, num_workers=1, seed=7, shuffle_buffer=16)

    a, b = make(), make()
    labels_a0, images_a0 = _train_epoch(a, 0)
    labels_a1, _ = _train_epoch(a, 1)
    labels_b0, images_b0 = _train_epoch(b, 0)
    assert len(labels_a0) == 24
    assert labels_a0 == labels_b0
    assert torch.equal(images_a0, images_b0)  # augmentations are seeded too
    assert labels_a1 != labels_a0
    assert _train_epoch(a, 0)[0] == labels_a0  # resume at an epoch replays it
    other_seed = create_train_loader(src, batch_size=4, img_size=16, num_workers=1, seed=8, shuffle_buffer=16)
    assert _train_epoch(other_seed, 0)[0] != labels_a0


def test_train_epoch_advances_without_set_epoch(tmp_path):
    write_identity_shards(tmp_path, SIZES)
    loader = create_train_loader(resolve_source(str(tmp_path), 'train', num_samples=24), batch_size=4,
                                 img_size=16, num_workers=0, seed=1, shuffle_buffer=16)
    first = torch.cat([y for _, y in loader]).tolist()
    second = torch.cat([y for _, y in loader]).tolist()
    assert first != second and loader.dataset.epoch == 1


def test_corrupt_jpeg_missing_label_and_truncated_shard_are_skipped_and_counted(tmp_path):
    names = write_identity_shards(tmp_path, SIZES, overrides={1: {'jpg': b'not a jpeg at all'},
                                                               8: {'cls': None}})
    truncate_in_sample(tmp_path / names[2], 11)  # shard 2 holds 9..12: 9 and 10 survive
    src = resolve_source(str(tmp_path), 'train')
    for num_workers in (0, 2):
        loader = create_val_loader(src, batch_size=4, img_size=16, num_workers=num_workers)
        labels = _val_labels(loader)
        assert sorted(labels) == [0, 2, 3, 4, 5, 6, 7, 9, 10]
        report = loader.data_report()
        # 1 corrupt image + 1 label-less sample + the 2 samples (11, 12) the truncated shard lost
        assert (report.bad_samples, report.num_bad_shards) == (4, 1)
        assert report.bad_samples_by_shard == {src.urls[0]: 1, src.urls[1]: 1, src.urls[2]: 2}
        assert list(report.bad_shards) == [src.urls[2]] and 'ReadError' in report.bad_shards[src.urls[2]]
        assert report.samples == 9
    train = create_train_loader(src, batch_size=4, img_size=16, num_workers=2, seed=0, shuffle_buffer=4)
    labels = torch.cat([y for _, y in train]).tolist()
    assert len(labels) == 16 and not {1, 8, 11, 12} & set(labels)
    report = train.data_report()
    assert report.bad_samples >= 2 and report.num_bad_shards == 1  # every shard is read at least once


@pytest.mark.parametrize('num_workers', [0, 2])
def test_all_bad_data_raises_instead_of_spinning(tmp_path, num_workers):
    """A source that never decodes stops with one DataPipelineError naming the keys to check, also from a
    worker (it used to surface as the worker's RuntimeError traceback)."""
    write_identity_shards(tmp_path, [3], overrides={i: {'jpg': b'junk'} for i in range(3)})
    loader = create_train_loader(resolve_source(str(tmp_path), 'train'), batch_size=2, img_size=16,
                                 num_workers=num_workers, seed=0, shuffle_buffer=2)
    with pytest.raises(DataPipelineError, match=r"^1000 bad samples in a row .*check image_key=\['jpg', "):
        list(loader)


def test_shards_that_all_fail_to_open_raise_instead_of_spinning(tmp_path):
    """Training shards that never give a sample (not tar files) stop a worker's endless resampling with one
    DataPipelineError naming the last shard (it used to surface as the worker's RuntimeError traceback)."""
    names = write_identity_shards(tmp_path, [2, 2])
    for name in names:
        (tmp_path / name).write_bytes(b'not a tar file' * 100)
    loader = create_train_loader(resolve_source(str(tmp_path), 'train', num_samples=4), batch_size=2,
                                 img_size=16, num_workers=2, seed=0, shuffle_buffer=2)
    with pytest.raises(DataPipelineError, match=r'^10 shards in a row gave no samples \(last: .*data-train-000[01]\.tar\)'):
        list(loader)


def test_all_reduce_sum_without_process_group():
    out = all_reduce_sum([3, 4.5])
    assert out.dtype == torch.float64 and out.tolist() == [3.0, 4.5]


# ---------------------------------------------------------------- per-epoch bad-data reports

def test_truncated_shard_counts_once_per_epoch_when_resampled(tmp_path):
    names = write_identity_shards(tmp_path, SIZES)
    truncate_in_sample(tmp_path / names[2], 11)  # shard 2 holds 9..12: 11 and 12 are lost on every read
    src = resolve_source(str(tmp_path), 'train', num_samples=80)  # 6 passes over 13 samples: resampling
    loader = create_train_loader(src, batch_size=4, img_size=16, num_workers=2, seed=0, shuffle_buffer=4)
    for epoch in range(2):
        loader.set_epoch(epoch)
        labels = torch.cat([y for _, y in loader]).tolist()
        report = loader.data_report()
        assert report.bad_shards.keys() == {src.urls[2]} and report.num_bad_shards == 1
        reads = report.bad_samples_by_shard[src.urls[2]] // 2  # each read of the shard loses 2 samples
        assert reads >= 2 and report.bad_samples == 2 * reads  # resampled, yet listed once
        assert report.samples == len(labels) == 80 and not {11, 12} & set(labels)


@pytest.mark.parametrize('num_workers', [0, 2])
def test_bad_samples_summed_exactly_over_workers_and_reset_each_epoch(tmp_path, num_workers):
    # with 2 workers, worker 0 reads shards 0 and 2, worker 1 shard 1; worker 0's last sample (12) is bad
    # and comes after its last full batch, so only the closing report-only item can carry it
    bad = {0: {'jpg': b'not a jpeg'}, 5: {'jpg': b'\xff\xd8 broken'}, 8: {'jpg': None}, 12: {'cls': b'x'}}
    write_identity_shards(tmp_path, SIZES, overrides=bad)
    src = resolve_source(str(tmp_path), 'train')
    loader = create_val_loader(src, batch_size=2, img_size=16, num_workers=num_workers)
    for _ in range(2):
        assert sorted(_val_labels(loader)) == [1, 2, 3, 4, 6, 7, 9, 10, 11]
        report = loader.data_report()
        assert (report.samples, report.bad_samples, report.num_bad_shards) == (9, 4, 0)
        assert report.bad_samples_by_shard == {src.urls[0]: 2, src.urls[1]: 1, src.urls[2]: 1}
        assert report.bad_fraction == 4 / 13


def test_label_less_shard_is_counted_and_stops_the_check(tmp_path):
    write_identity_shards(tmp_path, SIZES, overrides={i: {'cls': None} for i in range(7, 9)})
    src = resolve_source(str(tmp_path), 'train')
    loader = create_val_loader(src, batch_size=4, img_size=16, num_workers=2)
    assert sorted(_val_labels(loader)) == [0, 1, 2, 3, 4, 5, 6, 9, 10, 11, 12]
    report = loader.data_report()
    assert (report.samples, report.bad_samples) == (11, 2)
    assert report.bad_samples_by_shard == {src.urls[1]: 2}
    check_bad_fraction(report, 0.2)  # 2 of 13 = 15% is allowed at 20%
    with pytest.raises(BadDataError, match=r'2 of 13 samples unreadable \(15\.38%\), more than '
                                           r'--max-bad-fraction 0\.01 \(1\.00%\); worst shards: .*'
                                           r'data-train-0001\.tar \(2 bad samples\)') as info:
        check_bad_fraction(report, 0.01, what='train epoch 0')
    assert str(info.value).startswith('train epoch 0: ') and info.value.report.bad_samples == 2
    train = create_train_loader(src, batch_size=4, img_size=16, num_workers=0, seed=0, shuffle_buffer=4)
    assert len(list(train)) == len(train)
    with pytest.raises(BadDataError, match='data-train-0001.tar'):
        check_bad_fraction(train.data_report(), 0.01)


def test_shard_short_of_its_info_length_or_unreadable_counts_its_missing_samples(tmp_path):
    names = write_identity_shards(tmp_path, SIZES)
    truncate_after_sample(tmp_path / names[0], 4)  # a clean cut: the tar reader sees no error
    (tmp_path / names[1]).write_bytes(b'garbage' * 100)
    src = resolve_source(str(tmp_path), 'train')
    loader = create_val_loader(src, batch_size=4, img_size=16, num_workers=0)
    assert sorted(_val_labels(loader)) == [0, 1, 2, 3, 4, 9, 10, 11, 12]
    report = loader.data_report()
    assert report.bad_samples_by_shard == {src.urls[0]: 2, src.urls[1]: 2}
    assert report.bad_shards[src.urls[0]] == 'ended after 5 of the 7 samples listed in _info.json'
    assert report.bad_shards[src.urls[1]] == 'ReadError: bad tar header checksum (corrupt, or not a tar file)'
    assert [url for url, _, _ in report.worst_shards()] == [src.urls[0], src.urls[1]]  # ties: by URL
    # without known lengths the clean cut goes unnoticed and the garbage shard loses no known sample
    os.remove(tmp_path / '_info.json')
    unknown = create_val_loader(resolve_source(f'{tmp_path}/data-train-{{0000..0002}}.tar', 'x', num_samples=13),
                                batch_size=4, img_size=16, num_workers=0)
    assert sorted(_val_labels(unknown)) == [0, 1, 2, 3, 4, 9, 10, 11, 12]
    report = unknown.data_report()
    assert (report.bad_samples, report.bad_shards.keys()) == (0, {src.urls[1]})


def test_prefetcher_passes_the_report_through(tmp_path):
    write_identity_shards(tmp_path, [3, 3], overrides={5: {'jpg': b'junk'}})
    loader = create_val_loader(resolve_source(str(tmp_path), 'train'), batch_size=2, img_size=16, num_workers=2)
    pf = DevicePrefetcher(loader, 'cpu')
    batches = list(pf)
    assert sum(len(y) for _, y in batches) == 5
    assert (pf.data_report().samples, pf.data_report().bad_samples) == (5, 1)


# ---------------------------------------------------------------- 2 ranks x 2 workers (gloo)

def _ddp_worker(rank: int, world_size: int, port: int, data_dirs: List[str], out_dir: str) -> None:
    with gloo_group(rank, world_size, port):
        for case, data_dir in enumerate(data_dirs):
            result = {}
            train = create_train_loader(resolve_source(data_dir, 'train'), batch_size=2, img_size=16,
                                        num_workers=2, seed=5, rank=rank, world_size=world_size, shuffle_buffer=4)
            result['train_len'] = len(train)
            result['train_batches'] = []
            for epoch in range(2):
                train.set_epoch(epoch)
                n = 0
                for _ in train:
                    n += 1
                    dist.barrier()  # a DDP step: hangs if one rank has fewer batches
                result['train_batches'].append(n)
            val = create_val_loader(resolve_source(data_dir, 'train'), batch_size=3, img_size=16, num_workers=2,
                                    rank=rank, world_size=world_size)
            batches = list(val)
            labels = [int(y) for _, ys in batches for y in ys]
            result['val_labels'] = labels
            result['val_len'] = len(val)
            result['val_batches'] = len(batches)
            result['totals'] = all_reduce_sum([len(labels), sum(labels)]).tolist()
            with open(os.path.join(out_dir, f'case{case}-rank{rank}.json'), 'w') as f:
                json.dump(result, f)


@pytest.mark.slow
def test_two_ranks_two_workers_uneven_shards(tmp_path):
    """Both layouts in one process group (spawning costs more than the checks)."""
    cases = [SIZES, [9, 1, 3, 6, 2]]  # fewer shards than 2 x 2 streams; more shards, uneven
    data_dirs = []
    for case, sizes in enumerate(cases):
        data_dirs.append(str(tmp_path / f'data{case}'))
        write_identity_shards(Path(data_dirs[-1]), sizes)
    run_ranks(_ddp_worker, data_dirs, str(tmp_path))
    for case, sizes in enumerate(cases):
        total = sum(sizes)
        results = [json.loads((tmp_path / f'case{case}-rank{r}.json').read_text()) for r in range(2)]
        expected_len = math.ceil(total / (2 * 2))
        for res in results:
            assert res['train_len'] == expected_len
            assert res['train_batches'] == [expected_len, expected_len]
            assert res['val_len'] == res['val_batches']
            assert res['totals'] == [float(total), float(sum(range(total)))]
        all_labels = results[0]['val_labels'] + results[1]['val_labels']
        assert sorted(all_labels) == list(range(total)), f'case {sizes}'

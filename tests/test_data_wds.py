"""WebDataset sources and loaders on real JPEG shards written into tmp_path."""
import gzip
import io
import json
import math
import multiprocessing
import os
import socket
import tarfile
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from data_helpers import IMAGE_SIZE, decoded, truncate_in_sample, write_identity_shards
from esam_timm.data import all_reduce_sums, create_train_loader, create_val_loader, resolve_source
from esam_timm.data.wds import tar_members

SIZES = [7, 2, 4]  # uneven shards, fewer than 2 ranks x 2 workers


def _val_labels(loader) -> List[int]:
    return [int(y) for _, labels in loader for y in labels]


def _train_epoch(loader, epoch):
    loader.set_epoch(epoch)
    batches = list(loader)
    labels = torch.cat([y for _, y in batches]).tolist()
    images = torch.cat([x for x, _ in batches])
    return labels, images


# ---------------------------------------------------------------- sources

def test_resolve_folder_reads_info(tmp_path):
    names = write_identity_shards(tmp_path, SIZES)
    src = resolve_source(str(tmp_path), 'train')
    assert src.urls == [f'{tmp_path}/{n}' for n in names]
    assert (src.num_samples, src.shard_lengths, src.name) == (13, SIZES, 'train')
    assert resolve_source(f'file:{tmp_path}', 'train', num_samples=5).num_samples == 5


def test_resolve_val_alias(tmp_path):
    write_identity_shards(tmp_path, [3], split='validation')
    assert resolve_source(str(tmp_path), 'val').name == 'validation'


def test_resolve_pattern_with_and_without_count(tmp_path):
    write_identity_shards(tmp_path, SIZES)
    pattern = f'{tmp_path}/data-train-{{0000..0002}}.tar'
    src = resolve_source(pattern, 'train', num_samples=99)
    assert len(src.urls) == 3 and src.num_samples == 99
    # lengths found in the _info.json next to the shards
    sub = resolve_source(f'{tmp_path}/data-train-{{0001..0002}}.tar', 'train')
    assert (sub.num_samples, sub.shard_lengths) == (6, [2, 4])


def test_resolve_pattern_without_count_or_info(tmp_path):
    write_identity_shards(tmp_path, SIZES)
    os.remove(tmp_path / '_info.json')
    with pytest.raises(ValueError, match='needs num_samples'):
        resolve_source(f'{tmp_path}/data-train-{{0000..0002}}.tar', 'train')


def test_resolve_missing_path(tmp_path):
    missing = str(tmp_path / 'nope')
    with pytest.raises(FileNotFoundError, match='nope'):
        resolve_source(missing, 'train')


def test_resolve_folder_without_info(tmp_path):
    with pytest.raises(FileNotFoundError, match='_info.json'):
        resolve_source(str(tmp_path), 'train')


def test_resolve_missing_shards_in_pattern(tmp_path):
    write_identity_shards(tmp_path, SIZES)
    with pytest.raises(FileNotFoundError, match=r'2 of 5 shards .*data-train-0003.tar'):
        resolve_source(f'{tmp_path}/data-train-{{0000..0004}}.tar', 'train', num_samples=10)


@pytest.mark.parametrize('spec', ['', '   '])
def test_resolve_empty_spec(spec):
    with pytest.raises(ValueError, match='empty data source'):
        resolve_source(spec, 'train')


def test_resolve_pattern_expanding_to_nothing():
    with pytest.raises(ValueError, match='expands to no URLs'):
        resolve_source('::', 'train', num_samples=1)


def test_resolve_missing_split(tmp_path):
    write_identity_shards(tmp_path, SIZES)
    with pytest.raises(ValueError, match=r"split 'test' not found .*\['train'\]"):
        resolve_source(str(tmp_path), 'test')


def test_bad_loader_arguments(tmp_path):
    write_identity_shards(tmp_path, SIZES)
    src = resolve_source(str(tmp_path), 'train')
    with pytest.raises(ValueError, match='rank must be in'):
        create_train_loader(src, batch_size=2, img_size=16, rank=2, world_size=2)
    with pytest.raises(ValueError, match="label_key 'json:'"):
        create_val_loader(src, batch_size=2, img_size=16, label_key='json:')


# ---------------------------------------------------------------- loaders

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


def test_val_label_from_json_field(tmp_path):
    write_identity_shards(tmp_path, [4], overrides={2: {'cls': None}})
    loader = create_val_loader(resolve_source(str(tmp_path), 'train'), batch_size=8, img_size=16,
                               num_workers=0, label_key='json:label')
    assert _val_labels(loader) == [0, 1, 2, 3]
    assert loader.bad_samples == 0


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
        assert (loader.bad_samples, loader.bad_shards) == (2, 1)
    train = create_train_loader(src, batch_size=4, img_size=16, num_workers=2, seed=0, shuffle_buffer=4)
    labels = torch.cat([y for _, y in train]).tolist()
    assert len(labels) == 16 and not {1, 8, 11, 12} & set(labels)
    assert train.bad_samples >= 2 and train.bad_shards >= 1  # every shard is read at least once


def test_all_bad_data_raises_instead_of_spinning(tmp_path):
    write_identity_shards(tmp_path, [3], overrides={i: {'jpg': b'junk'} for i in range(3)})
    loader = create_train_loader(resolve_source(str(tmp_path), 'train'), batch_size=2, img_size=16,
                                 num_workers=0, seed=0, shuffle_buffer=2)
    with pytest.raises(RuntimeError, match='bad samples in a row'):
        list(loader)


def test_all_reduce_sums_without_process_group():
    out = all_reduce_sums([3, 4.5])
    assert out.dtype == torch.float64 and out.tolist() == [3.0, 4.5]


# ---------------------------------------------------------------- 2 ranks x 2 workers (gloo)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, data_dirs: List[str], out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    # A spawned child inherits 'spawn'; DataLoader workers would re-import torch and timm each.
    multiprocessing.set_start_method('fork', force=True)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
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
            result['totals'] = all_reduce_sums([len(labels), sum(labels)]).tolist()
            with open(os.path.join(out_dir, f'case{case}-rank{rank}.json'), 'w') as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_two_workers_uneven_shards(tmp_path):
    """Both layouts in one process group (spawning costs more than the checks)."""
    cases = [SIZES, [9, 1, 3, 6, 2]]  # fewer shards than 2 x 2 streams; more shards, uneven
    data_dirs = []
    for case, sizes in enumerate(cases):
        data_dirs.append(str(tmp_path / f'data{case}'))
        write_identity_shards(Path(data_dirs[-1]), sizes)
    ctx = multiprocessing.get_context('spawn')
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, data_dirs, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=170)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, 'a rank hung'
    assert [p.exitcode for p in procs] == [0, 0]
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


# ---------------------------------------------------------------- tar reader

@pytest.mark.parametrize('fmt', [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_members_long_names_and_formats(tmp_path, fmt):
    names = ['a.cls', 'dir/' + 'x' * 90 + '/b.jpg'] + (['c' * 120 + '.json'] if fmt != tarfile.USTAR_FORMAT else [])
    path = tmp_path / 'm.tar'
    with tarfile.open(path, 'w', format=fmt) as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 700 * i + 3
            tar.addfile(info, io.BytesIO(bytes([i]) * info.size))
    with open(path, 'rb') as f:
        got = list(tar_members(f))
    assert [n for n, _ in got] == names
    assert [d for _, d in got] == [bytes([i]) * (700 * i + 3) for i in range(len(names))]


def test_gzipped_shard_is_read(tmp_path):
    write_identity_shards(tmp_path, [3])
    (tmp_path / 'data-train-0000.tar.gz').write_bytes(gzip.compress((tmp_path / 'data-train-0000.tar').read_bytes()))
    loader = create_val_loader(resolve_source(f'{tmp_path}/data-train-0000.tar.gz', 'x', num_samples=3),
                               batch_size=4, img_size=16, num_workers=0)
    assert _val_labels(loader) == [0, 1, 2]

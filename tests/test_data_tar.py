"""The lean tar reader: formats, gzip, and the errors a broken shard raises."""
import gzip
import io
import tarfile

import pytest

from data_helpers import truncate_in_sample, write_identity_shards
from esam_timm.data import create_val_loader, resolve_source
from esam_timm.data.tar import ShardReadError, read_shard, tar_members


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
    assert [int(y) for _, labels in loader for y in labels] == [0, 1, 2]


def test_read_shard_yields_whole_samples_then_raises(tmp_path):
    names = write_identity_shards(tmp_path, [4])
    url = str(tmp_path / names[0])
    samples = list(read_shard(url))
    assert [s['__key__'] for s in samples] == ['000000', '000001', '000002', '000003']
    assert set(samples[0]) == {'__key__', '__url__', 'cls', 'jpg', 'json'} and samples[0]['__url__'] == url
    truncate_in_sample(tmp_path / names[0], 2)
    got = []
    with pytest.raises(ShardReadError, match='unexpected end of data') as info:
        for sample in read_shard(url):
            got.append(sample['__key__'])
    assert got == ['000000', '000001'] and info.value.partial and info.value.url == url
    with pytest.raises(ShardReadError) as info:
        list(read_shard(str(tmp_path / 'missing.tar')))
    assert not info.value.partial and isinstance(info.value.cause, FileNotFoundError)

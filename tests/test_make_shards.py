"""Shard writer: ImageFolder -> shuffled shards with original bytes, _info.json, class map, timm compatibility."""
import json
import tarfile

import pytest
from timm.data import create_dataset

from data_helpers import records_for, write_image_folder
from esam_timm.data import create_val_loader, make_shards, resolve_source, write_split
from esam_timm.data.make_shards import main
from esam_timm.data.shards import shard_sizes

COUNTS = {'train': {'cat': 5, 'dog': 3, 'emu': 4}, 'val': {'cat': 2, 'dog': 2, 'emu': 1}}


def _members(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_shard_sizes_balanced():
    assert shard_sizes(10, 4) == [4, 3, 3]
    assert shard_sizes(8, 4) == [4, 4]
    assert shard_sizes(1, 100) == [1]
    with pytest.raises(ValueError, match='max_count must be >= 1, got 0'):
        shard_sizes(5, 0)


def test_cli_image_folder_to_shards(tmp_path):
    files = write_image_folder(tmp_path / 'src', COUNTS)
    out = tmp_path / 'out'
    main([str(tmp_path / 'src'), str(out), '--max-count', '4', '--workers', '2', '--prefix', 'zoo',
          '--no-progress'])
    info = json.loads((out / '_info.json').read_text())
    assert info['name'] == 'zoo'
    assert sorted(info['splits']) == ['train', 'validation']
    train, val = info['splits']['train'], info['splits']['validation']
    assert train == {'name': 'train', 'num_samples': 12, 'shard_lengths': [4, 4, 4],
                     'filenames': ['zoo-train-0000.tar', 'zoo-train-0001.tar', 'zoo-train-0002.tar']}
    assert (val['num_samples'], val['shard_lengths']) == (5, [3, 2])
    assert (out / 'class_map.txt').read_text() == 'cat\ndog\nemu\n'
    classes = {'cat': 0, 'dog': 1, 'emu': 2}
    seen = []
    for name in train['filenames']:
        members = _members(out / name)
        assert [n.rsplit('.', 1)[1] for n, _ in members] == ['cls', 'jpg', 'json'] * (len(members) // 3)
        for (_, cls), (_, jpg), (_, meta) in zip(members[0::3], members[1::3], members[2::3]):
            meta = json.loads(meta)
            assert jpg == files[('train', meta['filename'])]  # original bytes kept
            assert int(cls) == meta['label'] == classes[meta['class_name']] == classes[meta['filename'].split('/')[0]]
            seen.append(meta['filename'])
    assert sorted(seen) == sorted(rel for split, rel in files if split == 'train')
    assert seen != sorted(seen)  # shuffled across shards


def test_output_readable_by_timm_and_our_loader(tmp_path):
    write_image_folder(tmp_path / 'src', COUNTS)
    out = tmp_path / 'out'
    make_shards(tmp_path / 'src', out, max_count=2, progress=False)
    ds = create_dataset('wds/zoo', root=str(out), split='validation', is_training=False)
    assert len(ds) == 5
    assert sorted(int(y) for _, y in ds) == [0, 0, 1, 1, 2]
    loader = create_val_loader(resolve_source(str(out), 'validation'), batch_size=2, img_size=16, num_workers=0)
    assert sorted(int(y) for _, ys in loader for y in ys) == [0, 0, 1, 1, 2]


def test_deterministic_and_class_map_file(tmp_path):
    write_image_folder(tmp_path / 'src', COUNTS)
    class_map = tmp_path / 'map.txt'
    class_map.write_text('emu\ncat\ndog\nyak\n')
    info_a = make_shards(tmp_path / 'src', tmp_path / 'a', splits=['val'], class_map=class_map, progress=False)
    make_shards(tmp_path / 'src', tmp_path / 'b', splits=['val'], class_map=class_map, progress=False)
    names = json.loads(info_a.read_text())['splits']['val']['filenames']
    for name in names:
        assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes()
    labels = sorted(int(data) for name in names for n, data in _members(tmp_path / 'a' / name) if n.endswith('.cls'))
    assert labels == [0, 1, 1, 2, 2]  # emu=0, cat=1, dog=2 from the map
    assert (tmp_path / 'a' / 'class_map.txt').read_text() == 'emu\ncat\ndog\nyak\n'


def test_clear_errors(tmp_path):
    write_image_folder(tmp_path / 'src', COUNTS)
    with pytest.raises(FileNotFoundError, match='missing'):
        make_shards(tmp_path / 'missing', tmp_path / 'out')
    with pytest.raises(FileNotFoundError, match="split folder .*'test'"):
        make_shards(tmp_path / 'src', tmp_path / 'out', splits=['test'])
    (tmp_path / 'map.txt').write_text('cat\ndog\n')
    with pytest.raises(ValueError, match="class folder 'emu'"):
        make_shards(tmp_path / 'src', tmp_path / 'out', class_map=tmp_path / 'map.txt', progress=False)
    with pytest.raises(FileNotFoundError, match='no split folders'):
        make_shards(tmp_path / 'src' / 'train', tmp_path / 'out')
    with pytest.raises(ValueError, match='duplicated'):
        write_split(records_for([1, 1]), tmp_path / 'out', 'train', prefix='x', progress=False)


def test_write_split_merges_into_existing_info(tmp_path):
    from esam_timm.data import write_info
    a = write_split(records_for(range(5)), tmp_path, 'train', prefix='x', max_count=2, progress=False)
    write_info(tmp_path, 'x', {'train': a})
    b = write_split(records_for(range(3)), tmp_path, 'validation', prefix='x', progress=False)
    write_info(tmp_path, 'x', {'validation': b})
    info = json.loads((tmp_path / '_info.json').read_text())
    assert {k: v['num_samples'] for k, v in info['splits'].items()} == {'train': 5, 'validation': 3}
    assert a['shard_lengths'] == [2, 2, 1]

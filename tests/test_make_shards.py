"""Shard writer: ImageFolder -> shuffled shards with original bytes, _info.json, class map, timm compatibility."""
import json
import logging
import os
import tarfile

import pytest
from timm.data import create_dataset

from data_helpers import jpeg_bytes, records_for, write_image_folder
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


def _shard_files(out):
    return sorted(p.name for p in out.iterdir() if p.name.endswith('.tar'))


def _listed(out):
    return sorted(f for s in json.loads((out / '_info.json').read_text())['splits'].values() for f in s['filenames'])


def test_flat_val_refused_before_any_shard_is_written(tmp_path, capsys):
    write_image_folder(tmp_path / 'src', {'train': COUNTS['train']})
    flat = tmp_path / 'src' / 'val'
    flat.mkdir()
    for i in range(3):
        (flat / f'ILSVRC2012_val_{i:08d}.JPEG').write_bytes(jpeg_bytes(i))
    out = tmp_path / 'out'
    with pytest.raises(ValueError, match=r"split 'validation': .*val' holds 3 image files directly .*ILSVRC2012_val_"
                                         r"00000000.JPEG.* and no class folders; nothing was written\. .*"
                                         r"SRC/<split>/<class>/<image>.*valprep\.sh"):
        make_shards(tmp_path / 'src', out, progress=False)
    assert not out.exists()
    with pytest.raises(SystemExit, match='make_shards: error: .*holds 3 image files directly'):
        main([str(tmp_path / 'src'), str(out), '--no-progress'])
    assert not out.exists()
    # images lying beside class folders would be dropped: refused as well
    (tmp_path / 'src' / 'train' / 'stray.jpg').write_bytes(jpeg_bytes(0))
    with pytest.raises(ValueError, match=r"split 'train': .* holds 1 image files directly .* beside its 3 class"):
        make_shards(tmp_path / 'src', out, splits=['train'], progress=False)
    os.remove(tmp_path / 'src' / 'train' / 'stray.jpg')
    (tmp_path / 'src' / 'empty').mkdir()
    with pytest.raises(ValueError, match="split 'empty': no class folders"):
        make_shards(tmp_path / 'src', out, splits=['train', 'empty'], progress=False)
    assert not out.exists()


def test_corrupt_images_are_skipped_reported_and_not_packed(tmp_path, caplog):
    files = write_image_folder(tmp_path / 'src', COUNTS)
    src_train = tmp_path / 'src' / 'train'
    (src_train / 'cat' / 'img_1.JPEG').write_bytes(files[('train', 'cat/img_1.JPEG')][:300])  # truncated
    (src_train / 'dog' / 'img_0.JPEG').write_bytes(b'not an image')
    out = tmp_path / 'out'
    with caplog.at_level(logging.WARNING, logger='esam_timm.data.shards'):
        make_shards(tmp_path / 'src', out, max_count=4, workers=2, progress=False)
    train = json.loads((out / '_info.json').read_text())['splits']['train']
    assert train['num_samples'] == 10 and sum(train['shard_lengths']) == 10
    corrupt = {c['file']: c['error'] for c in train['corrupt_files']}
    assert sorted(corrupt) == ['cat/img_1.JPEG', 'dog/img_0.JPEG']
    assert 'truncated' in corrupt['cat/img_1.JPEG'].lower()
    assert corrupt['dog/img_0.JPEG'] == 'UnidentifiedImageError: not an image format PIL can read'
    assert "split 'train': skipped 2 corrupt image(s)" in caplog.text and 'dog/img_0.JPEG' in caplog.text
    packed = [json.loads(data)['filename'] for name in train['filenames']
              for n, data in _members(out / name) if n.endswith('.json')]
    assert sorted(packed) == sorted(rel for split, rel in files if split == 'train' and rel not in corrupt)
    loader = create_val_loader(resolve_source(str(out), 'train'), batch_size=4, img_size=16, num_workers=0)
    assert sum(len(y) for _, y in loader) == 10 and not loader.data_report().has_bad_data()
    assert 'corrupt_files' not in json.loads((out / '_info.json').read_text())['splits']['validation']


def test_rerun_leaves_no_stale_shard(tmp_path, caplog):
    write_image_folder(tmp_path / 'src', COUNTS)
    out = tmp_path / 'out'
    make_shards(tmp_path / 'src', out, max_count=2, prefix='zoo', progress=False)
    assert len(_shard_files(out)) == 6 + 3
    make_shards(tmp_path / 'src', out, max_count=4, prefix='zoo', progress=False)
    assert _shard_files(out) == _listed(out) and len(_listed(out)) == 3 + 2
    # a new prefix: the old files of the rewritten split go, the split not rewritten stays
    make_shards(tmp_path / 'src', out, splits=['train'], max_count=6, prefix='new', progress=False)
    assert _shard_files(out) == _listed(out) == ['new-train-0000.tar', 'new-train-0001.tar',
                                                 'zoo-validation-0000.tar', 'zoo-validation-0001.tar']
    # a leftover named like this run's shards (a crashed earlier run) goes; a foreign file stays, named
    (out / 'new-train-0007.tar').write_bytes(b'')
    (out / 'other.tar').write_bytes(b'')
    with caplog.at_level(logging.WARNING, logger='esam_timm.data.shards'):
        make_shards(tmp_path / 'src', out, splits=['train'], max_count=6, prefix='new', progress=False)
    assert _shard_files(out) == sorted(_listed(out) + ['other.tar'])
    assert '1 shard file(s) in' in caplog.text and 'other.tar' in caplog.text
    assert sum(len(y) for _, y in create_val_loader(resolve_source(str(out), 'train'), batch_size=4,
                                                    img_size=16, num_workers=0)) == 12

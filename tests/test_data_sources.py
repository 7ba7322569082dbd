"""Data sources: _info.json folders and shard patterns resolved into shard URLs, counts and class counts."""
import json
import os

import pytest

from data_helpers import write_identity_shards
from esam_timm.data import INFO_NAME, has_info, num_classes_from_info, read_info, resolve_source

SIZES = [7, 2, 4]


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
    os.remove(tmp_path / INFO_NAME)
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


def test_corrupt_info_names_the_file(tmp_path):
    (tmp_path / INFO_NAME).write_text('{"splits": ')
    with pytest.raises(ValueError, match=f'{INFO_NAME}.* is not valid JSON'):
        resolve_source(str(tmp_path), 'train')
    (tmp_path / INFO_NAME).write_text('[1, 2]')
    with pytest.raises(ValueError, match='must hold a JSON object, got list'):
        read_info(str(tmp_path))


def test_num_classes_from_info_class_map_and_unknown(tmp_path):
    write_identity_shards(tmp_path, SIZES)
    assert has_info(str(tmp_path)) and not has_info(str(tmp_path / 'nope'))
    assert num_classes_from_info(str(tmp_path)) is None
    (tmp_path / 'class_map.txt').write_text('cat\ndog\n\nemu\n')
    assert num_classes_from_info(str(tmp_path)) == 3
    assert num_classes_from_info(f'{tmp_path}/data-train-{{0000..0002}}.tar') == 3  # the shards' folder
    info = json.loads((tmp_path / INFO_NAME).read_text())
    (tmp_path / INFO_NAME).write_text(json.dumps(dict(info, num_classes=7)))
    assert num_classes_from_info(str(tmp_path)) == 7
    (tmp_path / INFO_NAME).write_text(json.dumps(dict(info, features={'label': {'names': ['a', 'b']}})))
    assert num_classes_from_info(str(tmp_path)) == 2
    (tmp_path / INFO_NAME).write_text(json.dumps(dict(info, features={'label': {'num_classes': 1000}})))
    assert num_classes_from_info(str(tmp_path)) == 1000
    assert num_classes_from_info(str(tmp_path / 'nope')) is None
    assert num_classes_from_info('') is None

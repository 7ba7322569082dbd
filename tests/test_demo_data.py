"""The built-in demo dataset: layout, determinism, reuse, and that images carry their class."""
import json
import tarfile

import numpy as np
import pytest

from esam_timm.data import create_val_loader, make_demo_dataset, resolve_source
from esam_timm.data.demo import class_names, render_image

SMALL = dict(num_classes=4, train_per_class=6, val_per_class=3, image_size=32, samples_per_shard=10)


def test_layout_counts_and_labels(tmp_path):
    out = make_demo_dataset(tmp_path / 'demo', **SMALL)
    info = json.loads((out / '_info.json').read_text())
    assert info['splits']['train']['num_samples'] == 24 and info['splits']['train']['shard_lengths'] == [8, 8, 8]
    assert info['splits']['validation']['num_samples'] == 12
    assert (out / 'class_map.txt').read_text().split() == ['circle', 'square', 'triangle', 'ring']
    loader = create_val_loader(resolve_source(str(out), 'validation'), batch_size=5, img_size=32, crop_pct=1.0,
                               num_workers=0)
    images, labels = zip(*loader)
    labels = sorted(int(y) for ys in labels for y in ys)
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert images[0].shape[1:] == (3, 32, 32)


def test_reused_when_complete_and_remade_when_config_changes(tmp_path):
    out = make_demo_dataset(tmp_path, **SMALL)
    shard = out / 'demo-train-0000.tar'
    before = shard.stat().st_mtime_ns
    data = shard.read_bytes()
    make_demo_dataset(tmp_path, **SMALL)
    assert shard.stat().st_mtime_ns == before  # not rewritten
    shard.unlink()
    make_demo_dataset(tmp_path, **SMALL)
    assert shard.read_bytes() == data  # rewritten identically
    make_demo_dataset(tmp_path, **dict(SMALL, seed=1))
    assert shard.read_bytes() != data
    assert json.loads((out / '_info.json').read_text())['demo']['seed'] == 1


def test_class_is_visible_in_the_image():
    """Same class and seed state -> same drawing; foreground covers a real, non-noise area."""
    a = np.asarray(render_image(0, 10, 48, np.random.default_rng(1)), dtype=np.float32)
    b = np.asarray(render_image(0, 10, 48, np.random.default_rng(1)), dtype=np.float32)
    assert np.array_equal(a, b)
    spread = a.max(axis=(0, 1)) - a.min(axis=(0, 1))
    assert spread.max() > 100  # a drawn shape, not noise around a flat colour


def test_hue_bands_beyond_ten_classes_and_bad_args(tmp_path):
    assert class_names(12)[10:] == ['circle_h1', 'square_h1']
    with pytest.raises(ValueError, match=r'num_classes must be in \[1, 40\], got 41'):
        make_demo_dataset(tmp_path, num_classes=41)
    with pytest.raises(ValueError, match='image_size must be >= 16'):
        make_demo_dataset(tmp_path, image_size=8)


def test_label_noise_moves_the_stated_share_of_training_labels_only(tmp_path):
    """Exactly round(0.25 * 40) = 10 training labels name another class than the drawn one (kept in the
    sample's class_name), spread over classes; validation labels stay clean."""
    out = make_demo_dataset(tmp_path, **dict(SMALL, train_per_class=10, label_noise=0.25))
    names = class_names(4)
    flipped = {}
    for split in ('train', 'validation'):
        for shard in sorted(out.glob(f'demo-{split}-*.tar')):
            with tarfile.open(shard) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for name, data in members.items():
                if name.endswith('.json'):
                    meta = json.loads(data)
                    label = int(members[name[:-len('json')] + 'cls'])
                    flipped.setdefault(split, []).append(names.index(meta['class_name']) != label)
    assert sum(flipped['train']) == 10 and len(flipped['train']) == 40
    assert not any(flipped['validation'])
    assert json.loads((out / '_info.json').read_text())['demo']['label_noise'] == 0.25
    with pytest.raises(ValueError, match=r'label_noise must be a share in \[0, 1\), got 1.5'):
        make_demo_dataset(tmp_path / 'bad', label_noise=1.5)

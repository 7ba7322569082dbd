import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a CUDA device: skipped without one, run by benchmarks/gpu_check.py."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs CUDA (run by benchmarks/gpu_check.py part1 on a GPU)')
    for item in items:
        if 'cuda' in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)


@pytest.fixture(scope='session')
def demo_dir(tmp_path_factory):
    """The built-in demo data at test size: 10 classes, 320 train / 100 validation images of 32 px."""
    from esam_timm.data import make_demo_dataset
    out = tmp_path_factory.mktemp('demo-data')
    return str(make_demo_dataset(out, num_classes=10, train_per_class=32, val_per_class=10, image_size=32,
                                 samples_per_shard=80))

"""The data-backend seam (esam_timm.data.backends): --dataset prefixes pick backends, a backend registered
in one line is what the trainer and the sharpness CLI read, and --decode reaches the WebDataset loaders."""
import os
from pathlib import Path

import pytest
import torch

from esam_timm.data import BACKENDS, DataReport, Loader, Split, backend_for, open_data
from esam_timm.data.backend_folder import FolderBackend
from esam_timm.data.backend_wds import WdsBackend
from esam_timm.data.backends import Augmentation, DataBackend, ImageConfig, LoaderConfig
from esam_timm.train import parse_args
from train_helpers import read_summary, run_trainer

BASE = ['--data-dir', '/nonexistent-data-is-fine-for-parsing', '--model', 'resnet10t']
IMAGE = ImageConfig(input_size=(3, 32, 32), interpolation='bilinear', mean=(0.5,) * 3, std=(0.25,) * 3,
                    crop_pct=1.0)


class _ToyLoader:
    """Seeded random images of ``num_classes`` classes: what a backend hands the trainer, and nothing more."""

    def __init__(self, split: Split, config: LoaderConfig, batches: int, seed: int) -> None:
        self.split, self.config, self.batches, self.seed = split, config, batches, seed
        self.epoch = 0
        self.delivered = 0

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def data_report(self) -> DataReport:
        return DataReport(samples=self.delivered, bad_samples=1, bad_samples_by_shard={'toy-shard': 1})

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        self.delivered = 0
        for _ in range(self.batches):
            labels = torch.randint(self.split.num_classes, (self.config.batch_size,), generator=generator)
            images = torch.randn(self.config.batch_size, *self.config.image.input_size, generator=generator)
            images += labels[:, None, None, None].float()  # learnable: the class shifts the mean
            self.delivered += len(labels)
            yield images.to(self.config.device), labels.to(self.config.device)


class ToyBackend(DataBackend):
    """A backend in a test: 48 samples of 3 classes per split, decoded with 'pil' only."""

    name = 'toy tensors'

    def split(self, name, *, training, num_samples=None):
        return Split(name, None, num_samples or 48, 3)

    def subset(self, name, size, seed):
        return Split(name, None, min(size, 48), 3)

    def train_loader(self, split, config, augment, *, seed, decode='pil', mixup_fn=None):
        return _ToyLoader(split, config, split.num_samples // config.batch_size, seed)

    def eval_loader(self, split, config):
        return _ToyLoader(split, config, -(-split.num_samples // config.batch_size), 0)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(BACKENDS, 'toy/', ToyBackend)  # the one registry line a new backend adds
    return ToyBackend


def test_the_dataset_prefix_picks_the_backend(toy, monkeypatch):
    assert backend_for('wds/imagenet') is WdsBackend
    assert backend_for('') is FolderBackend and backend_for('torch/cifar10') is FolderBackend
    assert backend_for('toy/shapes') is toy
    monkeypatch.setitem(BACKENDS, 'wds/special/', toy)
    assert backend_for('wds/special/x') is toy and backend_for('wds/x') is WdsBackend  # the longest prefix wins
    backend = open_data('toy/shapes', '/anywhere', seed=3, batch_size=8)
    assert isinstance(backend, toy) and (backend.root, backend.seed, backend.batch_size) == ('/anywhere', 3, 8)


def test_built_in_loaders_keep_the_contract(demo_dir, tmp_path):
    """Both built-in backends return objects with the Loader protocol's methods (len, iter, set_epoch,
    data_report) and declare the class count their data holds."""
    from data_helpers import write_image_folder
    write_image_folder(Path(tmp_path / 'folder'), {'train': {'a': 3, 'b': 3}})
    config = LoaderConfig(batch_size=2, image=IMAGE, device=torch.device('cpu'), workers=0)
    for backend, split_name in ((open_data('wds/demo', demo_dir), 'train'),
                                (open_data('', str(tmp_path / 'folder')), 'train')):
        split = backend.split(split_name, training=True)
        assert split.num_classes == (10 if isinstance(backend, WdsBackend) else 2)
        for loader in (backend.train_loader(split, config, Augmentation(), seed=0), backend.eval_loader(split, config)):
            assert isinstance(loader, Loader) and len(loader) >= 1
    folder = open_data('', str(tmp_path / 'folder'))
    assert folder.train_loader(folder.split('train', training=True), config, Augmentation(),
                               seed=0).data_report() is None


def test_trainer_and_sharpness_cli_read_a_backend_registered_in_one_line(toy, tmp_path, monkeypatch):
    """A toy backend, one BACKENDS entry: the trainer trains and validates on it (its bad-data report reaches
    summary.csv) and the sharpness CLI measures the checkpoint on its batches."""
    argv = ['--dataset', 'toy/shapes', '--data-dir', str(tmp_path), '--model', 'test_resnet', '--img-size', '32',
            '-b', '8', '--epochs', '2', '--opt', 'momentum', '--lr', '0.05', '--warmup-epochs', '0', '--workers', '0',
            '--no-progress', '--log-interval', '3', '--output', str(tmp_path / 'out'), '--experiment', 'toy',
            '--max-bad-fraction', '0.1']
    args, text = parse_args(argv)
    from esam_timm.train import Trainer
    trainer = Trainer(args, text)
    metrics = trainer.fit()
    assert trainer.num_classes == 3 and trainer.num_updates == 2 * 6
    rows = read_summary(tmp_path / 'out' / 'toy')
    assert [float(r['train_samples_read']) for r in rows] == [48.0, 48.0]
    assert float(rows[0]['train_bad_samples']) == 1 and float(rows[0]['eval_bad_samples']) == 1
    assert metrics['eval_top1'] > 100 / 3  # above chance: the toy classes are learnable

    from esam_timm.sharpness.cli import main
    monkeypatch.setattr('esam_timm.sharpness.cli.setup_logging', lambda: None)
    code = main([str(tmp_path / 'out' / 'toy' / 'last.pth.tar'), '--dataset', 'toy/shapes', '--data-dir',
                 str(tmp_path), '-b', '8', '--num-batches', '2', '--workers', '0', '--eig-iters', '1',
                 '--trace-samples', '0', '--landscape-points', '0', '--contour-points', '0', '--no-progress',
                 '--output', str(tmp_path / 'sharpness')])
    assert code == 0 and os.path.isfile(tmp_path / 'sharpness' / 'sharpness.json')


def _parse_error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize('argv, message', [
    (['--decode', 'jpeg'], "--decode must be one of ['pil', 'fast', 'gpu'], got 'jpeg'"),
    (['--decode', 'fast', '--dataset', ''], "--decode fast is not available for folders and timm datasets "
                                            "(--dataset ''), which decode with pil: use --decode pil; --decode fast "
                                            "works with --dataset wds/<name>"),
    (['--decode', 'fast', '--aa', 'rand-m9-mstd0.5'], '--decode fast does not do auto-augment (--aa rand-m9-mstd0.5): '
                                                      'use --decode pil for it'),
])
def test_decode_flag_refuses_what_cannot_work(capsys, argv, message):
    assert message in _parse_error(capsys, BASE + argv)


def test_decode_flag_is_in_the_help_and_gpu_decode_needs_cuda(capsys):
    """benchmarks/gpu_check.py trains each decode path when train_esam.py --help lists --decode."""
    from esam_timm.train import build_parser
    assert '--decode HOW' in build_parser().format_help()
    args, _ = parse_args(BASE + ['--decode', 'fast', '--aa', 'rand-m9', '--no-aug'])  # no-aug: no auto-augment
    assert args.decode == 'fast'
    if not torch.cuda.is_available():
        err = _parse_error(capsys, BASE + ['--decode', 'gpu'])
        assert 'GPU decode needs a CUDA device' in err and 'with --decode fast' in err and err.count('\n') == 1


@pytest.mark.parametrize('decode', ['fast', 'gpu'])
def test_the_trainer_trains_through_each_decode_path(demo_dir, tmp_path, monkeypatch, decode):
    """--decode fast decodes in the loader; --decode gpu runs GpuDecodeLoader (here on the CPU: the CUDA
    check is lifted) behind the device prefetcher. Both train and count their data."""
    if decode == 'gpu':
        for module in ('esam_timm.data.backend_wds', 'esam_timm.data.gpu_decode'):
            monkeypatch.setattr(f'{module}.check_cuda_device', torch.device)
    trainer, metrics = run_trainer(demo_dir, tmp_path, '--opt', 'esam', '--epochs', '1', '--decode', decode,
                                   '--val-split', '')
    from esam_timm.data.prefetch import DevicePrefetcher
    assert isinstance(trainer.train_loader, DevicePrefetcher)
    host = type(trainer.train_loader.loader).__name__
    assert host == ('GpuDecodeLoader' if decode == 'gpu' else 'WdsLoader')
    assert metrics['train_samples_read'] == 320 and metrics['train_bad_samples'] == 0
    assert torch.isfinite(torch.tensor(metrics['train_loss']))

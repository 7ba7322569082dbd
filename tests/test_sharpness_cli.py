"""``python -m esam_timm.sharpness`` on a real trainer checkpoint of the demo data: the table, sharpness.json,
the PNG plots, W&B offline, and one-line errors with exit code 2."""
import glob
import json
import math
import os
import struct
import subprocess
import sys

import pytest
import torch

from esam_timm.sharpness.cli import PROG, checkpoint_names, main
from train_helpers import run_trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
# small enough for 2 cores: 2 batches of 16 at 32 px, few iterations and landscape points
QUICK = ['-b', '16', '--num-batches', '2', '--workers', '0', '--eig-iters', '3', '--trace-samples', '2',
         '--landscape-points', '5', '--contour-points', '3', '--interp-points', '5', '--no-progress']


@pytest.fixture(scope='module')
def trained(demo_dir, tmp_path_factory):
    """A trainer checkpoint (1 epoch of SGD with EMA on the demo shards) and a plain timm state dict of the
    same architecture at initialisation."""
    import timm
    out = tmp_path_factory.mktemp('sharpness-train')
    run_trainer(demo_dir, out, '--opt', 'momentum', '--epochs', '1', '--model-ema')
    plain = os.path.join(out, 'init.pth')
    torch.save(timm.create_model('test_resnet', num_classes=10).state_dict(), plain)
    return os.path.join(out, 'run', 'last.pth.tar'), plain


@pytest.fixture(autouse=True)
def _no_root_handler(monkeypatch):
    """main() installs a stderr log handler once per process; here pytest's log capture does that job."""
    monkeypatch.setattr('esam_timm.sharpness.cli.setup_logging', lambda: None)


def _cli(demo_dir, output, *args):
    return main([*QUICK, '--data-dir', demo_dir, '--dataset', 'wds/demo', '--output', str(output), *args])


def test_cli_on_a_trainer_checkpoint_writes_json_and_plots(demo_dir, trained, tmp_path, capsys):
    checkpoint, plain = trained
    assert _cli(demo_dir, tmp_path, checkpoint, plain, '--names', 'sgd', 'init') == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ['checkpoint', 'loss', 'top_eig', 'iters', 'converged', 'trace', 'trace_se',
                                'm_sharpness']
    assert [line.split()[0] for line in table[1:3]] == ['sgd', 'init']
    assert "32 samples (2 batches of split 'train'); m-sharpness at rho 0.05, m 16" in table[3]
    names = sorted(os.listdir(tmp_path))
    assert names == ['interpolation.png', 'landscape_1d.png', 'landscape_2d_init.png', 'landscape_2d_sgd.png',
                     'sharpness.json']
    for name in names[:-1]:
        with open(tmp_path / name, 'rb') as f:
            assert f.read(8) == PNG_MAGIC, name
    with open(tmp_path / 'sharpness.json') as f:
        result = json.load(f)
    config = result['config']
    assert (config['model'], config['num_classes'], config['input_size']) == ('test_resnet', 10, [3, 32, 32])
    assert (config['split'], config['num_samples'], config['rho'], config['m']) == ('train', 32, 0.05, 16)
    runs = result['checkpoints']
    assert list(runs) == ['sgd', 'init']
    for entry in runs.values():
        report = entry['report']
        assert report['eig_iterations'] <= 3 and math.isfinite(report['top_eigenvalue'])
        assert report['hessian_trace'] is not None and report['m_sharpness'] > 0
        assert entry['landscape_1d']['alphas'] == [-1.0, -0.5, 0.0, 0.5, 1.0]
        assert entry['landscape_1d']['losses'][2] == pytest.approx(report['loss'], rel=1e-6)
        grid = entry['landscape_2d']
        assert len(grid['losses']) == 3 and len(grid['losses'][0]) == 3
        assert grid['losses'][1][1] == pytest.approx(report['loss'], rel=1e-6)
    assert runs['sgd']['report']['top_eigenvalue'] != runs['init']['report']['top_eigenvalue']
    (curve,) = result['interpolation']
    assert (curve['from'], curve['to'], curve['alphas']) == ('sgd', 'init', [-0.25, 0.125, 0.5, 0.875, 1.25])
    ends = _cli(demo_dir, tmp_path / 'ends', checkpoint, plain, '--interp-range', '0', '1', '--interp-points', '2',
                '--eig-iters', '1', '--trace-samples', '0', '--landscape-points', '0', '--contour-points', '0')
    assert ends == 0
    with open(tmp_path / 'ends' / 'sharpness.json') as f:
        ends = json.load(f)
    losses = [entry['report']['loss'] for entry in ends['checkpoints'].values()]
    assert ends['interpolation'][0]['losses'] == pytest.approx(losses, rel=1e-6)
    assert sorted(os.listdir(tmp_path / 'ends')) == ['interpolation.png', 'sharpness.json']


def _offline_records(path):
    """The protobuf records of an offline W&B run file: 32 KiB blocks of (crc, length, type) framed chunks
    after a 7-byte file header; types 1 = whole record, 2/3/4 = first/middle/last piece."""
    from wandb.proto import wandb_internal_pb2
    with open(path, 'rb') as f:
        data = f.read()
    records, pending, pos = [], b'', 7
    while pos + 7 <= len(data):
        left_in_block = 32768 - pos % 32768
        if left_in_block < 7:
            pos += left_in_block
            continue
        _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
        if length == 0 and kind == 0:  # block padding
            pos += left_in_block
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_run_holds_numbers_and_images(demo_dir, trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_DIR', str(tmp_path))
    monkeypatch.setenv('WANDB_SILENT', 'true')
    checkpoint, _ = trained
    out = tmp_path / 'out'
    assert _cli(demo_dir, out, checkpoint, '--ema', '--log-wandb', '--wandb-project', 'esam-sharpness') == 0
    with open(out / 'sharpness.json') as f:
        report = json.load(f)['checkpoints']['last']['report']
    (run_file,) = glob.glob(str(tmp_path / 'wandb' / 'offline-run-*' / 'run-*.wandb'))
    rows = [{item.key or '/'.join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in _offline_records(run_file) if r.WhichOneof('record_type') == 'history']
    (row,) = [r for r in rows if 'sharpness/last/loss' in r]
    for key in ('loss', 'top_eigenvalue', 'm_sharpness', 'hessian_trace', 'trace_std_error', 'eig_iterations'):
        assert row[f'sharpness/last/{key}'] == pytest.approx(report[key], rel=1e-12), key
    run_dir = os.path.dirname(run_file)
    for key in ('sharpness/landscape_1d', 'sharpness/landscape_2d/last'):  # W&B flattens an image's fields
        assert row[f'{key}/_type'] == 'image-file' and row[f'{key}/format'] == 'png'
        with open(os.path.join(run_dir, 'files', row[f'{key}/path']), 'rb') as f:
            assert f.read(8) == PNG_MAGIC


def test_missing_checkpoint_is_one_error_line_and_exit_code_2(demo_dir, tmp_path):
    missing = str(tmp_path / 'nope.pth.tar')
    proc = subprocess.run([sys.executable, '-m', 'esam_timm.sharpness', missing, '--data-dir', demo_dir],
                          cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f'{PROG}: error: checkpoint {missing!r} is not a file']
    assert not proc.stdout


def test_checkpoint_of_another_architecture_is_refused(demo_dir, trained, tmp_path, capsys):
    import timm
    checkpoint, _ = trained
    other = str(tmp_path / 'resnet10t.pth')
    torch.save(timm.create_model('resnet10t', num_classes=10).state_dict(), other)
    assert _cli(demo_dir, tmp_path / 'out', checkpoint, other) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f'{PROG}: error: checkpoint {other!r} does not fit model test_resnet: ')
    assert 'missing keys' in err[-1] and 'pass the --model and --num-classes it was trained with' in err[-1]
    assert not os.path.exists(tmp_path / 'out')  # refused before anything was measured or written
    assert _cli(demo_dir, tmp_path / 'out', other) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"{PROG}: error: {other!r} records no architecture (a plain state dict): pass --model, --num-classes and "
        f"--img-size")


def test_bad_inputs_name_what_would_work(demo_dir, trained, tmp_path, capsys):
    checkpoint, plain = trained
    cases = [
        ([plain, '--ema', '--model', 'test_resnet', '--img-size', '32'],
         f'checkpoint {plain!r} is a plain state dict, without EMA weights: drop --ema'),
        ([checkpoint, '--train-split', 'nosuch'], "'nosuch'"),
        ([checkpoint, plain, '--names', 'a'], '--names gives 1 names for 2 checkpoints: give one per checkpoint'),
        ([checkpoint, '--model', 'no_such_model'], "--model 'no_such_model': Unknown model"),
    ]
    for argv, message in cases:
        assert _cli(demo_dir, tmp_path, *argv) == 2, argv
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f'{PROG}: error: ') and message in last, last


def test_checkpoint_names_tell_runs_apart():
    assert checkpoint_names(['runs/sgd/last.pth.tar', 'runs/esam/last.pth.tar']) == ['sgd-last', 'esam-last']
    assert checkpoint_names(['a/model_best.pth.tar', 'b/checkpoint-3.pth.tar']) == ['model_best', 'checkpoint-3']


def test_image_folder_batches_are_a_fixed_mix_of_classes(tmp_path, capsys):
    """timm's folder datasets are sorted by class: the batches are a seeded random subset, not the first
    images."""
    from pathlib import Path

    import timm
    from data_helpers import write_image_folder
    from esam_timm.sharpness.cli import _open_split, build_parser
    write_image_folder(Path(tmp_path / 'folder'), {'train': {'a': 12, 'b': 12, 'c': 12}})
    plain = str(tmp_path / 'init.pth')
    torch.save(timm.create_model('test_resnet', num_classes=3).state_dict(), plain)
    argv = [plain, '--data-dir', str(tmp_path / 'folder'), '--dataset', '', '--model', 'test_resnet',
            '--img-size', '32', '-b', '4', '--num-batches', '2']
    _, split = _open_split(build_parser().parse_args(argv), 'train')
    subset = split.data
    assert len(subset) == 8 and subset.indices == _open_split(build_parser().parse_args(argv), 'train')[1].data.indices
    assert len({subset.dataset.reader.samples[i][1] for i in subset.indices}) > 1
    assert main([*QUICK, *argv, '--output', str(tmp_path / 'out')]) == 0  # 3 classes, from the folder
    with open(tmp_path / 'out' / 'sharpness.json') as f:
        config = json.load(f)['config']
    assert (config['num_classes'], config['num_samples'], config['dataset']) == (3, 8, '')

"""End-to-end runs of the trainer on tiny demo shards on the CPU: optimizers, bf16, exact resume, W&B
offline, and a 2-process torchrun."""
import glob
import json
import os
import struct
import subprocess
import sys

import pytest
import torch

from train_helpers import demo_copy_without_labels, read_summary as _summary, run_trainer as _train, trainer_argv as _argv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCHES_PER_EPOCH = 10  # 320 training samples / batch 32


@pytest.mark.parametrize('opt, selected', [('momentum', None), ('sam', 1.0), ('esam', 0.5)])
def test_end_to_end_learns(demo_dir, tmp_path, opt, selected):
    trainer, metrics = _train(demo_dir, tmp_path, '--opt', opt, '--epochs', '3')
    run_dir = os.path.join(tmp_path, 'run')
    assert metrics['epoch'] == 2 and trainer.num_updates == 3 * BATCHES_PER_EPOCH
    assert metrics['eval_top1'] > 25.0, f'{opt}: top-1 {metrics["eval_top1"]} not above chance (10%)'
    rows = _summary(run_dir)
    assert [r['epoch'] for r in rows] == ['0', '1', '2']
    assert float(rows[2]['eval_top1']) == pytest.approx(metrics['eval_top1'])
    if selected is None:
        assert 'train_sharpness' not in rows[0]
    else:
        assert float(rows[0]['train_selected_share']) == selected
        beta = 0.6 if opt == 'esam' else 1.0
        assert float(rows[0]['train_perturb_norm']) == pytest.approx(0.05 / beta, rel=1e-4)
        assert float(rows[0]['train_skipped_ascents']) == 0
    names = sorted(os.listdir(run_dir))
    assert {'args.yaml', 'last.pth.tar', 'model_best.pth.tar', 'summary.csv'} <= set(names)
    assert [n for n in names if n.startswith('checkpoint-')]
    assert not [n for n in names if n.endswith('.tmp') or n.startswith('recovery-')]
    ckpt = torch.load(os.path.join(run_dir, 'last.pth.tar'), map_location='cpu', weights_only=True)
    assert (ckpt['epoch'], ckpt['batches_done'], ckpt['num_updates']) == (2, BATCHES_PER_EPOCH, 30)
    if opt == 'esam':
        assert 'generator_state' in ckpt['optimizer']['esam']


@pytest.mark.parametrize('sds', ['first-order', 'loss'])
def test_f2_free_sds_from_the_cli(demo_dir, tmp_path, sds):
    """The CLI's --esam-sds reaches the optimizer; the run trains (accuracy: benchmarks/accuracy.py)."""
    trainer, metrics = _train(demo_dir, tmp_path, '--opt', 'esam', '--esam-sds', sds, '--epochs', '2')
    assert trainer.sam.sds == sds and trainer.sam.sds_mode.signal == sds
    rows = _summary(os.path.join(tmp_path, 'run'))
    assert float(rows[1]['train_loss']) < float(rows[0]['train_loss'])
    assert float(rows[0]['train_selected_share']) == 0.5
    assert float(rows[0]['train_perturb_norm']) == pytest.approx(0.05 / 0.6, rel=1e-4)
    assert ('train_sharpness' in rows[0]) == (sds == 'first-order')


def test_msam_from_the_cli_checkpoints_the_clean_weights(demo_dir, tmp_path):
    """--opt msam trains one pass per update at w - rho v / ||v|| (rho 3 by default: msam's own), reports
    ||w~ - w|| (0 on the very first update, no momentum yet), and saves w, never w~."""
    trainer, metrics = _train(demo_dir, tmp_path, '--opt', 'msam', '--epochs', '2')
    from esam_timm import MSAM
    assert isinstance(trainer.optimizer, MSAM) and trainer.optimizer.rho == 3.0 and trainer.sam is None
    assert not trainer.optimizer.perturbed
    rows = _summary(os.path.join(tmp_path, 'run'))
    assert float(rows[1]['train_loss']) < float(rows[0]['train_loss'])
    assert float(rows[0]['train_perturb_norm']) == pytest.approx(3.0 * (BATCHES_PER_EPOCH - 1) / BATCHES_PER_EPOCH)
    assert float(rows[1]['train_perturb_norm']) == pytest.approx(3.0)
    assert 'train_sharpness' not in rows[0] and metrics['eval_top1'] > 10.0  # above chance
    ckpt = torch.load(os.path.join(tmp_path, 'run', 'last.pth.tar'), map_location='cpu', weights_only=True)
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(ckpt['state_dict'][name], tensor), name


def test_msam_resumes_bitwise(demo_dir, tmp_path):
    common = ['--opt', 'msam', '--rho', '2.0', '--recovery-interval', '4', '--workers', '0']
    _, full = _train(demo_dir, tmp_path / 'full', *common)
    with pytest.raises(_Killed):
        _train(demo_dir, tmp_path / 'killed', *common, callbacks=[_kill_at(0, 7)])
    killed_dir = tmp_path / 'killed' / 'run'
    _train(demo_dir, tmp_path / 'killed', *common, '--resume', str(killed_dir / 'recovery-0-4.pth.tar'))
    a = torch.load(tmp_path / 'full' / 'run' / 'last.pth.tar', map_location='cpu', weights_only=True)
    b = torch.load(killed_dir / 'last.pth.tar', map_location='cpu', weights_only=True)
    for name, tensor in a['state_dict'].items():
        assert torch.equal(tensor, b['state_dict'][name]), name


@pytest.mark.slow
def test_torchcompile_first_order_run(demo_dir, tmp_path):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    trainer, metrics = _train(demo_dir, tmp_path, '--opt', 'esam', '--esam-sds', 'first-order', '--epochs', '1',
                              '--torchcompile')
    assert trainer.sam.sds == 'first-order' and metrics['train_selected_share'] == 0.5
    assert 0.0 < metrics['train_sharpness'] < 10.0 and metrics['eval_top1'] > 0.0
    # train F1 (batch 32), F3 (16 selected) and eval: a bounded set of graphs, none broken
    assert counters['stats']['unique_graphs'] <= 6 and not counters['graph_break']


def test_bf16_autocast_run(demo_dir, tmp_path):
    trainer, metrics = _train(demo_dir, tmp_path, '--opt', 'esam', '--epochs', '1', '--amp',
                              '--amp-dtype', 'bfloat16')
    assert trainer.amp_dtype == torch.bfloat16 and trainer.scaler is None
    assert torch.isfinite(torch.tensor(metrics['train_loss'])) and metrics['train_loss'] > 0
    assert metrics['train_selected_share'] == 0.5 and metrics['train_skipped_ascents'] == 0
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert 0.0 <= metrics['eval_top1'] <= 100.0


class _Killed(Exception):
    pass


def _kill_at(epoch, batch):
    def callback(trainer, e, done):
        if (e, done) == (epoch, batch):
            raise _Killed
    return callback


@pytest.mark.parametrize('kill_at, resume_file, extra', [
    ((0, 7), 'recovery-0-4.pth.tar', ['--workers', '0']),   # mid-epoch: a recovery checkpoint
    ((1, 3), 'last.pth.tar', ['--workers', '0']),            # after an epoch: last.pth.tar
    ((0, 7), 'recovery-0-4.pth.tar', ['--workers', '1']),
    ((1, 3), 'last.pth.tar', ['--workers', '1']),
    # 4 micro-batches per update (windows of 4, 4 and 2 batches), a recovery checkpoint every update
    ((0, 4), 'recovery-0-4.pth.tar', ['--workers', '0', '--grad-accum-steps', '4', '--recovery-interval', '1']),
    ((1, 4), 'last.pth.tar', ['--workers', '0', '--grad-accum-steps', '4']),
])
def test_killed_and_resumed_equals_uninterrupted(demo_dir, tmp_path, kill_at, resume_file, extra):
    """Dropout, mixup, random erasing, EMA, ESAM's SWP generator and the cosine schedule all continue
    exactly: the final weights are bitwise those of the uninterrupted run."""
    common = ['--opt', 'esam', '--drop', '0.2', '--mixup', '0.4', '--reprob', '0.3', '--model-ema',
              '--model-ema-decay', '0.9', '--recovery-interval', '4', '--sched-on-updates',
              '--warmup-epochs', '1', *extra]
    _, full = _train(demo_dir, tmp_path / 'full', *common)
    with pytest.raises(_Killed):
        _train(demo_dir, tmp_path / 'killed', *common, callbacks=[_kill_at(*kill_at)])
    killed_dir = tmp_path / 'killed' / 'run'
    assert (killed_dir / resume_file).is_file()
    assert not list(killed_dir.glob('*.tmp'))
    resumed_trainer, resumed = _train(demo_dir, tmp_path / 'killed', *common, '--resume',
                                      str(killed_dir / resume_file))
    assert resumed_trainer.start_epoch == (0 if 'recovery' in resume_file else 1)
    a = torch.load(tmp_path / 'full' / 'run' / 'last.pth.tar', map_location='cpu', weights_only=True)
    b = torch.load(killed_dir / 'last.pth.tar', map_location='cpu', weights_only=True)
    accum = int(extra[extra.index('--grad-accum-steps') + 1]) if '--grad-accum-steps' in extra else 1
    assert a['num_updates'] == b['num_updates'] == 2 * -(-BATCHES_PER_EPOCH // accum)
    for key in ('state_dict', 'state_dict_ema'):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f'{key}.{name} differs after resume'
    for pid, state in a['optimizer']['state'].items():
        assert torch.equal(state['momentum_buffer'], b['optimizer']['state'][pid]['momentum_buffer'])
    assert torch.equal(a['optimizer']['esam']['generator_state'], b['optimizer']['esam']['generator_state'])
    assert resumed['eval_top1'] == full['eval_top1'] and resumed['ema_eval_top1'] == full['ema_eval_top1']
    full_rows, resumed_rows = _summary(tmp_path / 'full' / 'run'), _summary(killed_dir)
    assert [r['epoch'] for r in resumed_rows] == ['0', '1']
    for a_row, b_row in zip(full_rows, resumed_rows):  # the resumed epoch's row covers the whole epoch
        for key in ('train_loss', 'train_sharpness', 'train_grad_norm', 'train_selected_share'):
            assert a_row[key] == b_row[key], key
    assert not list(killed_dir.glob('recovery-*')), 'the recovery checkpoint resumed from was not removed'


def _wandb_history(run_file):
    """History rows of an offline W&B run file (a leveldb-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb
    raw = open(run_file, 'rb').read()
    block, pos, records, partial = 32768, 7, [], b''
    while pos + 7 <= len(raw):
        space = block - pos % block
        if space < 7:
            pos += space
            continue
        _, length, kind = struct.unpack('<IHB', raw[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += space
            continue
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            partial = data
        else:
            partial += data
        if kind in (1, 4):
            records.append(partial)
    rows = []
    for data in records:
        record = pb.Record()
        record.ParseFromString(data)
        if record.WhichOneof('record_type') == 'history':
            rows.append({item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


@pytest.mark.slow
def test_wandb_offline_run_holds_esam_metrics(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_DIR', str(tmp_path))
    monkeypatch.setenv('WANDB_SILENT', 'true')
    _train(demo_dir, tmp_path, '--opt', 'esam', '--epochs', '1', '--log-wandb', '--wandb-project', 'esam-test',
           '--wandb-tags', 'ci')
    files = glob.glob(str(tmp_path / 'wandb' / 'offline-run-*' / 'run-*.wandb'))
    assert len(files) == 1
    rows = _wandb_history(files[0])
    train_rows = [r for r in rows if 'train/loss' in r]
    assert [r['_step'] for r in train_rows] == [5, 10]
    for row in train_rows:
        assert row['train/selected_share'] == 0.5
        assert row['train/perturb_norm'] == pytest.approx(0.05 / 0.6, rel=1e-4)
        assert row['train/skipped_ascents'] == 0
        for key in ('train/sharpness', 'train/grad_norm', 'train/lr', 'train/samples_per_sec',
                    'train/data_time'):
            assert key in row
        assert 0 <= row['train/data_wait_share'] <= 1
    epoch_row = rows[-1]  # the epoch's summary.csv row under timm's keys
    for key in ('eval_top1', 'eval_loss', 'train_loss', 'train_sharpness', 'train_skipped_ascents', 'lr', 'epoch',
                'train_data_wait_share'):
        assert key in epoch_row, key


def test_wandb_failure_is_a_warning(monkeypatch):
    import wandb
    from esam_timm.wandb_logger import WandbLogger

    def broken_init(**kwargs):
        raise RuntimeError('no network')
    monkeypatch.setattr(wandb, 'init', broken_init)
    with pytest.warns(UserWarning, match='wandb.init failed .*no network.*training continues'):
        logger = WandbLogger(True, project='p', tags=[], config={}, output_dir='.')
    assert not logger.active
    logger.log({'a': 1}, step=1)
    logger.finish()


def test_a_mid_epoch_resume_with_another_global_batch_is_refused(demo_dir, tmp_path):
    common = ['--opt', 'esam', '--epochs', '1', '--recovery-interval', '3']
    with pytest.raises(_Killed):
        _train(demo_dir, tmp_path, *common, callbacks=[_kill_at(0, 4)])
    checkpoint = tmp_path / 'run' / 'recovery-0-3.pth.tar'
    with pytest.raises(ValueError, match=r'stopped in the middle of epoch 0 \(after 3 of its 10 updates\) of a run '
                                         r'with a global batch of 32 .* A mid-epoch checkpoint continues only with '
                                         r'the same global batch: --grad-accum-steps 1 keeps it with -b 32 on 1 '
                                         r'process\(es\)'):
        _train(demo_dir, tmp_path, *common, '--grad-accum-steps', '2', '--resume', str(checkpoint))


@pytest.mark.slow
@pytest.mark.parametrize('accum, opt', [(1, 'esam'), (4, 'esam'), (2, 'msam')])
def test_torchrun_two_processes_gloo(demo_dir, tmp_path, accum, opt):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           os.path.join(REPO, 'train_esam.py'), *_argv(demo_dir, tmp_path, '--opt', opt, '--epochs', '1',
                                                      '-b', '16', '--grad-accum-steps', str(accum),
                                                      '--dist-bn', 'reduce' if accum > 1 else '')]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr
    assert 'Process 0 of 2' in log and '(gloo)' in log
    assert '(100 images)' in log  # the validation split counted exactly once across both ranks
    # an epoch is ceil(320 / global batch) updates of full batches: 10, 3 (of 4 batches) and 5 updates
    updates = -(-320 // (32 * accum))
    assert log.count(f'Train: 0 [{updates * accum:>5d}/{updates * accum}') == 1  # only rank 0 logs
    assert f'global batch of {32 * accum} (16 per process x 2 processes x {accum} accumulated)' in log
    assert f'1 epochs of {updates * accum} batches ({updates} updates)' in log
    rows = _summary(tmp_path / 'run')
    assert [r['epoch'] for r in rows] == ['0']
    if opt == 'esam':
        assert float(rows[0]['train_selected_share']) == 0.5
    else:  # the first of the 5 updates has no momentum yet
        assert float(rows[0]['train_perturb_norm']) == pytest.approx(3.0 * 4 / 5)


def test_image_folder_dataset(tmp_path):
    """--dataset '' trains on an ImageFolder through timm's own loaders."""
    from PIL import Image
    for split, count in (('train', 16), ('validation', 4)):
        for label in range(2):
            folder = tmp_path / 'folder' / split / f'class{label}'
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new('RGB', (32, 32), (255 * label, 40 + i, 90)).save(folder / f'{i}.png')
    trainer, metrics = _train(str(tmp_path / 'folder'), tmp_path / 'out', '--dataset', '', '--opt', 'esam',
                              '--epochs', '1', '-b', '8')
    assert trainer.num_classes == 2 and trainer.num_updates == 4
    assert metrics['train_selected_share'] == 0.5
    assert float(_summary(tmp_path / 'out' / 'run')[0]['epoch']) == 0


def test_unreadable_data_is_counted_in_the_summary(demo_dir, tmp_path):
    data = demo_copy_without_labels(demo_dir, tmp_path / 'data')
    _, metrics = _train(data, tmp_path, '--opt', 'esam', '--epochs', '1', '--max-bad-fraction', '0.5')
    row = _summary(tmp_path / 'run')[0]
    # one shard of four has no labels: its samples are counted (as reads: the stream resamples shards)
    assert 0.05 < float(row['train_bad_fraction']) < 0.5
    assert float(row['train_bad_samples']) > 0 and float(row['eval_bad_samples']) == 0
    assert float(row['train_samples_read']) + float(row['train_bad_samples']) >= 320


@pytest.mark.slow
def test_a_label_less_shard_on_two_ranks_stops_the_run(demo_dir, tmp_path):
    data = demo_copy_without_labels(demo_dir, tmp_path / 'data')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           os.path.join(REPO, 'train_esam.py'), *_argv(data, tmp_path / 'out', '--opt', 'esam', '--epochs', '1',
                                                      '-b', '16')]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=str(tmp_path))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith('train_esam.py: error:')]
    assert len(errors) == 2  # each rank stops with the same one line (torchrun then reports the failed children)
    assert all('more than --max-bad-fraction 0.01' in e and 'demo-train-0001.tar' in e for e in errors)
    assert all("The epoch's checkpoint is saved" in e for e in errors)
    assert (tmp_path / 'out' / 'run' / 'last.pth.tar').exists()  # written before the stop: resuming loses nothing


def test_val_interval_and_an_ema_kept_on_the_cpu(demo_dir, tmp_path):
    _, metrics = _train(demo_dir, tmp_path, '--opt', 'momentum', '--epochs', '3', '--val-interval', '2',
                        '--model-ema', '--model-ema-force-cpu')
    rows = _summary(tmp_path / 'run')
    assert [r['eval_top1'] != '' for r in rows] == [False, True, True]  # after epoch 1 and the last
    assert all('ema_eval_top1' not in r or r['ema_eval_top1'] == '' for r in rows)
    ckpt = torch.load(tmp_path / 'run' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert 'state_dict_ema' in ckpt


def test_flatness_is_measured_every_n_epochs_on_fixed_batches(demo_dir, tmp_path):
    _, metrics = _train(demo_dir, tmp_path, '--opt', 'esam', '--epochs', '3', '--sharpness-interval', '2',
                        '--sharpness-batches', '1', '--sharpness-iters', '5')
    rows = _summary(tmp_path / 'run')
    measured = ['sharpness_top_eigenvalue' in r and r['sharpness_top_eigenvalue'] != '' for r in rows]
    assert measured == [False, True, True]  # after epoch 1 and after the last
    for row in rows[1:]:
        assert float(row['sharpness_top_eigenvalue']) > 0 and float(row['sharpness_loss']) > 0
        assert row['sharpness_m_sharpness'] != '' and float(row['sharpness_rho']) == 0.05
    assert metrics['sharpness_num_samples'] == 32  # one validation batch, the same one each time

"""Runs that fail safe (issue 17): divergence stops without NaN checkpoints, a resume continues its own
run folder, SIGINT/SIGTERM and bad data stop with a checkpoint that resumes exactly, setup and runtime
failures end in one complete message, and the run folder's lock dies with the trainer."""
import errno
import glob
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from esam_timm.data import BadDataError, LabelRangeError
from esam_timm.fileio import DiskFullError
from esam_timm.train import (DivergedError, GracefulStop, RunFolderBusy, SetupError, Trainer, TrainingStopped,
                             claim_run_folder, parse_args)
from train_helpers import (demo_copy_without_labels, read_summary, resume_line, signal_when, start_in_own_group,
                           trainer_argv)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'train_esam.py')
SHORT = ('--train-num-samples', '160')  # 5 batches of 32 per epoch
ENV = dict(os.environ, OMP_NUM_THREADS='1')


def _trainer(demo_dir, out, *extra, callbacks=()):
    args, text = parse_args(trainer_argv(demo_dir, out, *SHORT, *extra))
    return Trainer(args, text, step_callbacks=callbacks)


def _fit(demo_dir, out, *extra, callbacks=()):
    trainer = _trainer(demo_dir, out, *extra, callbacks=callbacks)
    return trainer, trainer.fit()


def _weights(path):
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    return {f'{key}.{name}': t for key in ('state_dict', 'state_dict_ema') for name, t in ckpt.get(key, {}).items()}


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name, tensor in wa.items():
        assert torch.equal(tensor, wb[name]), f'{name} differs'


def _all_checkpoints_finite(folder):
    paths = glob.glob(os.path.join(folder, '*.pth.tar'))
    for path in paths:
        for name, tensor in _weights(path).items():
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), f'{path}: {name} is not finite'
    return paths


def _nan_loss_from(update):
    """A callback-free injection: wrap the trainer's loss so it is NaN once ``update`` updates are done."""
    def install(trainer):
        loss_fn = trainer.loss_fn
        trainer.loss_fn = lambda logits, targets: loss_fn(logits, targets) * (
            float('nan') if trainer.num_updates >= update else 1.0)
    return install


# ------------------------------------------------------------------------------- 1. divergence

def test_a_loss_that_turns_nan_stops_the_run_and_every_checkpoint_is_finite(demo_dir, tmp_path):
    trainer = _trainer(demo_dir, tmp_path, '--opt', 'esam', '--max-nonfinite', '3')
    trainer.setup()
    _nan_loss_from(6)(trainer)  # updates 7, 8, 9 (epoch 1, batches 2-4) have a NaN loss
    with pytest.raises(DivergedError) as info:
        trainer.fit()
    run = tmp_path / 'run'
    message = str(info.value)
    assert '\n' not in message
    assert message.startswith('training diverged at epoch 1, batch 4 of 5: 3 updates in a row had a non-finite '
                              'loss or gradient (--max-nonfinite 3; none of them was applied)')
    assert f'the last checkpoint with finite weights is {run / "last.pth.tar"}' in message
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # the skipped updates were not applied
    assert _all_checkpoints_finite(run)
    assert [r['epoch'] for r in read_summary(run)] == ['0']


def test_skipped_updates_are_counted_in_the_epoch_line_and_summary(demo_dir, tmp_path, caplog):
    trainer = _trainer(demo_dir, tmp_path, '--opt', 'esam', '--epochs', '1', '--val-split', '')
    trainer.setup()
    loss_fn = trainer.loss_fn
    trainer.loss_fn = lambda logits, targets: loss_fn(logits, targets) * (
        float('nan') if trainer.num_updates == 2 else 1.0)  # one bad update: skipped, the run goes on
    with caplog.at_level(logging.INFO):
        metrics = trainer.fit()
    assert metrics['train_skipped_nonfinite'] == 1 and metrics['train_skipped_overflow'] == 0
    assert float(read_summary(tmp_path / 'run')[0]['train_skipped_nonfinite']) == 1
    assert 'Skipped updates: 1' in caplog.text and ', skipped updates: 1 non-finite' in caplog.text


def test_non_finite_weights_are_never_checkpointed(demo_dir, tmp_path):
    def poison(trainer, epoch, done):
        if done == 3:
            with torch.no_grad():
                trainer.model.get_classifier().bias[0] = float('inf')
    with pytest.raises(DivergedError, match=r'the weights after epoch 0, batch 4 are not finite \(\d+ tensors, e\.g\. '
                                            r'state_dict\..*so no checkpoint was written; the last checkpoint with '
                                            r'finite weights is .*recovery-0-2\.pth\.tar'):
        _fit(demo_dir, tmp_path, '--opt', 'momentum', '--recovery-interval', '2', callbacks=[poison])
    assert [os.path.basename(p) for p in _all_checkpoints_finite(tmp_path / 'run')] == ['recovery-0-2.pth.tar']


@pytest.mark.slow
def test_the_issues_diverging_run_exits_non_zero_without_nan_checkpoints(demo_dir, tmp_path):
    """The issue's `--lr 1e6` run: it used to exit 0 with NaN in last.pth.tar and model_best.pth.tar."""
    cmd = [sys.executable, SCRIPT, *trainer_argv(demo_dir, tmp_path, *SHORT, '--opt', 'esam', '--lr', '1e6')]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=str(tmp_path))
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith('train_esam.py: error:')]
    assert len(errors) == 1 and ('training diverged' in errors[0] or 'are not finite' in errors[0]), errors
    assert 'Traceback' not in proc.stderr
    _all_checkpoints_finite(tmp_path / 'run')


# ------------------------------------------------------------------------------- 2. resume

def test_resuming_a_suffixed_run_continues_it_and_auto_finds_it(demo_dir, tmp_path, caplog):
    """The README's recipe: a config run twice lands in p2 and p2-1; resuming p2-1's checkpoint with
    --experiment p2 continues p2-1 (rows, model_best, best-k), and --resume auto picks the newest run
    with the same settings."""
    common = ('--opt', 'momentum', '--epochs', '1', '--experiment', 'p2')
    _fit(demo_dir, tmp_path, *common)
    with caplog.at_level(logging.WARNING):
        second, _ = _fit(demo_dir, tmp_path, *common)
    assert second.output_dir == str(tmp_path / 'p2-1')
    assert f'this run writes to {tmp_path / "p2-1"}; to continue the latest of them instead, pass --resume ' \
           f'{tmp_path / "p2" / "last.pth.tar"}' in caplog.text
    resumed, _ = _fit(demo_dir, tmp_path, *common, '--epochs', '2',
                      '--resume', str(tmp_path / 'p2-1' / 'last.pth.tar'))
    assert resumed.output_dir == str(tmp_path / 'p2-1')
    assert sorted(os.listdir(tmp_path)) == ['p2', 'p2-1']
    assert [r['epoch'] for r in read_summary(tmp_path / 'p2-1')] == ['0', '1']
    assert (tmp_path / 'p2-1' / 'model_best.pth.tar').is_file()
    last = torch.load(tmp_path / 'p2-1' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert sorted(epoch for _, epoch in last['checkpoint_history']) == [0, 1]

    _fit(demo_dir, tmp_path, *common, '--lr', '0.05')  # newest, but another lr: p2-2
    auto, _ = _fit(demo_dir, tmp_path, *common, '--epochs', '3', '--resume', 'auto')
    assert auto.resume_path == str(tmp_path / 'p2-1' / 'last.pth.tar') and auto.output_dir == str(tmp_path / 'p2-1')
    assert [r['epoch'] for r in read_summary(tmp_path / 'p2-1')] == ['0', '1', '2']
    fresh, _ = _fit(demo_dir, tmp_path, '--opt', 'momentum', '--epochs', '1', '--experiment', 'new',
                    '--resume', 'auto')
    assert fresh.resume_path == '' and fresh.output_dir == str(tmp_path / 'new')


def test_resume_auto_needs_an_experiment(capsys):
    with pytest.raises(SystemExit):
        parse_args(['--data-dir', 'd', '--model', 'resnet10t', '--resume', 'auto'])
    assert '--resume auto needs --experiment NAME' in capsys.readouterr().err


# ------------------------------------------------------------------------------- 3. graceful stop

def _signal_at(signum, epoch, done):
    def callback(trainer, e, d):
        if (e, d) == (epoch, done):
            os.kill(os.getpid(), signum)
    return callback


@pytest.mark.parametrize('signum, workers', [(signal.SIGTERM, '0'), (signal.SIGINT, '1')])
def test_a_signal_mid_epoch_leaves_a_checkpoint_that_resumes_bitwise(demo_dir, tmp_path, signum, workers):
    common = ('--opt', 'esam', '--drop', '0.2', '--model-ema', '--model-ema-decay', '0.9', '--workers', workers)
    _fit(demo_dir, tmp_path / 'full', *common)
    previous = signal.getsignal(signum)
    with pytest.raises(TrainingStopped) as info:
        _fit(demo_dir, tmp_path / 'stopped', *common, callbacks=[_signal_at(signum, 0, 3)])
    assert signal.getsignal(signum) is previous  # the trainer's handler is gone again
    run = tmp_path / 'stopped' / 'run'
    checkpoint = run / 'recovery-0-3.pth.tar'
    assert info.value.exit_code == 128 + signum
    assert str(info.value) == (f'stopped by {signal.Signals(signum).name} at epoch 0, batch 3 of 5; resume with: '
                               f'python train_esam.py -c {run / "args.yaml"} --resume {checkpoint}')
    assert checkpoint.is_file()
    _, resumed = _fit(demo_dir, tmp_path / 'stopped', *common, '--resume', str(checkpoint))
    _assert_same_weights(tmp_path / 'full' / 'run' / 'last.pth.tar', run / 'last.pth.tar')
    assert [r['epoch'] for r in read_summary(run)] == ['0', '1']


def test_a_second_signal_stops_at_once(monkeypatch):
    exits, clock = [], [100.0]
    monkeypatch.setattr(os, '_exit', exits.append)
    monkeypatch.setattr(time, 'monotonic', lambda: clock[0])
    with GracefulStop() as stop:
        stop._handle(signal.SIGINT, None)
        assert stop.requested() == signal.SIGINT and not exits
        clock[0] += 0.01
        stop._handle(signal.SIGINT, None)  # torchrun's forward of the same Ctrl-C: still the first request
        assert not exits
        clock[0] += 2.0
        stop._handle(signal.SIGINT, None)
    assert exits == [130]


@pytest.mark.slow
def test_ctrl_c_on_the_script_exits_130_with_the_resume_command(demo_dir, tmp_path):
    argv = trainer_argv(demo_dir, tmp_path, *SHORT, '--opt', 'esam', '--workers', '1', '--log-interval', '1')
    proc = start_in_own_group([sys.executable, SCRIPT, *argv], tmp_path)
    output = signal_when(proc, r'Train: 0 \[\s+2/5', signal.SIGINT)
    assert proc.returncode == 130, output[-3000:]
    assert 'Traceback' not in output
    command = shlex.split(resume_line(output, 'SIGINT'))
    assert command[:2] == ['python', SCRIPT] and command[2:-2] == argv
    assert os.path.isfile(command[-1])
    done = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, timeout=300, env=ENV,
                          cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r['epoch'] for r in read_summary(tmp_path / 'run')] == ['0', '1']
    assert (tmp_path / 'run' / 'model_best.pth.tar').is_file() and not list((tmp_path / 'run').glob('recovery-*'))


@pytest.mark.slow
def test_sigterm_to_a_torchrun_job_resumes_to_the_uninterrupted_weights(demo_dir, tmp_path):
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']
    argv = trainer_argv(demo_dir, tmp_path / 'stopped', '-b', '16', '--opt', 'esam', '--log-interval', '1',
                        '--val-split', '')
    full = subprocess.run([*launcher, SCRIPT, *trainer_argv(demo_dir, tmp_path / 'full', '-b', '16', '--opt', 'esam',
                                                            '--val-split', '')],
                          capture_output=True, text=True, timeout=300, env=ENV, cwd=str(tmp_path))
    assert full.returncode == 0, full.stderr[-3000:]
    proc = start_in_own_group([*launcher, SCRIPT, *argv], tmp_path)
    output = signal_when(proc, r'Train: 0 \[\s+3/10', signal.SIGTERM)  # SIGTERM to torchrun and both ranks
    lines = [l for l in output.splitlines() if l.startswith('train_esam.py: stopped by SIGTERM')]
    assert len(lines) == 2 and lines[0] == lines[1], output[-3000:]  # both ranks stopped at the same update
    command = shlex.split(resume_line(lines[0], 'SIGTERM'))
    assert command[:5] == ['torchrun', '--standalone', '--nproc_per_node', '2', SCRIPT]
    assert os.path.isfile(command[-1])
    resumed = subprocess.run([*launcher, *command[4:]], capture_output=True, text=True, timeout=300, env=ENV,
                             cwd=str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_weights(tmp_path / 'full' / 'run' / 'last.pth.tar', tmp_path / 'stopped' / 'run' / 'last.pth.tar')


def test_a_bad_data_stop_writes_the_epoch_first_so_raising_the_threshold_loses_nothing(demo_dir, tmp_path):
    data = demo_copy_without_labels(demo_dir, tmp_path / 'data')
    common = ('--opt', 'momentum', '--val-split', '')
    _fit(data, tmp_path / 'full', *common, '--max-bad-fraction', '0.5')
    with pytest.raises(BadDataError) as info:
        _fit(data, tmp_path / 'stopped', *common)
    run = tmp_path / 'stopped' / 'run'
    message = str(info.value)
    assert 'more than --max-bad-fraction 0.01' in message and 'demo-train-0001.tar' in message
    command = message.split('resume with: ', 1)[1]
    assert command.startswith(f'python train_esam.py -c {run / "args.yaml"} --resume {run / "last.pth.tar"} '
                              f'--max-bad-fraction 0.')
    assert [r['epoch'] for r in read_summary(run)] == ['0']
    _fit(data, tmp_path / 'stopped', *common, '--resume', str(run / 'last.pth.tar'), '--max-bad-fraction', '0.5')
    _assert_same_weights(tmp_path / 'full' / 'run' / 'last.pth.tar', run / 'last.pth.tar')


# ------------------------------------------------------------------------------- 5. messages

@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='needs /dev/full')
def test_a_full_disk_is_one_message_naming_the_file(demo_dir, tmp_path):
    def disk_full_at_the_epoch_end(trainer, epoch, done):
        if done == 5:  # the epoch's checkpoint is written next: its temporary file is /dev/full
            os.symlink('/dev/full', os.path.join(trainer.output_dir, f'last.pth.tar.{os.getpid()}.tmp'))
    with pytest.raises(DiskFullError) as info:
        _fit(demo_dir, tmp_path, '--opt', 'momentum', '--epochs', '1', '--val-split', '',
             callbacks=[disk_full_at_the_epoch_end])
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert re.fullmatch(rf'no space left on the device to write {re.escape(str(tmp_path / "run"))}'
                        r'/last\.pth\.tar \(\d+ MiB free there now\): free some space or write elsewhere \(--output\); '
                        r'the file it would replace is unchanged', message), message
    assert not list((tmp_path / 'run').glob('*.tmp'))


@pytest.mark.parametrize('argv, config, message', [
    (['--device', 'foo'], None, "--device 'foo' is not a device torch knows: use cpu, cuda or cuda:N"),
    (['--device', 'cuda'], None, "--device 'cuda': CUDA is not available on this machine"),
    ([], 'device: cuda\n', "device: cuda in config file 'CFG': CUDA is not available on this machine"),
    (['--model', 'nosuchmodel'], None, "--model 'nosuchmodel' is not a timm model"),
])
def test_setup_messages_are_complete_and_without_the_usage(tmp_path, capsys, argv, config, message):
    if 'cuda' in message and torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    if config is not None:
        (tmp_path / 'cfg.yaml').write_text(config)
        argv = ['-c', str(tmp_path / 'cfg.yaml'), *argv]
        message = message.replace('CFG', str(tmp_path / 'cfg.yaml'))
    with pytest.raises(SystemExit) as info:
        parse_args(['--data-dir', 'd', *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and 'usage:' not in err
    assert len(err.strip().splitlines()) == 1


def test_a_multi_line_setup_message_keeps_every_line(demo_dir, tmp_path):
    args, text = parse_args(trainer_argv(demo_dir, tmp_path, '--model', 'levit_128s', '--esam-sds', 'first-order'))
    with pytest.raises(SetupError) as info:
        Trainer(args, text).setup()
    message = str(info.value)
    assert message.startswith("SDS mode 'first-order' needs a classifier that is a linear layer")
    assert message.rstrip().endswith("Use SDS mode 'exact' or 'loss'.")
    assert not (tmp_path / 'run').exists()


def test_a_label_beyond_num_classes_names_its_shard_and_leaves_no_run_behind(demo_dir, tmp_path):
    import shutil
    data = tmp_path / 'data'
    shutil.copytree(demo_dir, data)
    os.remove(data / 'class_map.txt')  # the data no longer says how many classes it has
    with pytest.raises(LabelRangeError, match=r"sample '\w+' of shard .*demo-train-000\d\.tar has label [5-9], "
                                              r"outside the 5 classes of the model"):
        _fit(str(data), tmp_path / 'out', '--opt', 'momentum', '--num-classes', '5')
    trainer, _ = _fit(str(data), tmp_path / 'out', '--opt', 'momentum', '--epochs', '1', '--num-classes', '10')
    assert trainer.output_dir == str(tmp_path / 'out' / 'run')  # the failed run's args.yaml did not take the name


def test_unreadable_samples_are_not_said_to_be_in_zero_shards(demo_dir, tmp_path, caplog):
    data = demo_copy_without_labels(demo_dir, tmp_path / 'data')
    with caplog.at_level(logging.INFO):
        _fit(data, tmp_path, '--opt', 'momentum', '--epochs', '1', '--max-bad-fraction', '0.5', '--val-split', '')
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Epoch 0 done')]
    assert re.search(r'unreadable data: \d+ of \d+ samples read \(\d+\.\d\d%\), 0 broken shards', line), line
    assert 'samples in 0 shards' not in line


def test_stale_temporary_files_are_removed_at_the_nextstart_in_own_group(demo_dir, tmp_path, caplog):
    _fit(demo_dir, tmp_path, '--opt', 'momentum', '--epochs', '1', '--val-split', '')
    stale = tmp_path / 'run' / 'last.pth.tar.99999.tmp'
    stale.write_bytes(b'half a checkpoint')
    with caplog.at_level(logging.WARNING):
        _fit(demo_dir, tmp_path, '--opt', 'momentum', '--epochs', '2', '--val-split', '',
             '--resume', str(tmp_path / 'run' / 'last.pth.tar'))
    assert not stale.exists()
    assert f'Removed 1 temporary file(s) a killed write left in {tmp_path / "run"}: last.pth.tar.99999.tmp' \
        in caplog.text


def test_a_corrupt_image_warning_names_the_sample_and_its_shard(tmp_path, caplog):
    from data_helpers import write_identity_shards
    from esam_timm.data import create_val_loader, resolve_source
    write_identity_shards(tmp_path, [4], overrides={2: {'jpg': b'not a jpeg at all'}})
    loader = create_val_loader(resolve_source(str(tmp_path), 'train'), batch_size=4, img_size=16, num_workers=0)
    with caplog.at_level(logging.WARNING):
        assert sum(len(labels) for _, labels in loader) == 3
    (warning,) = [r.getMessage() for r in caplog.records if 'skipped bad sample' in r.getMessage()]
    assert f"skipped bad sample '000002' of {tmp_path / 'data-train-0000.tar'}: UnidentifiedImageError: the 'jpg' " \
           f"member (17 bytes, starting b'not a jp') is not an image format PIL can read" in warning
    assert 'BytesIO' not in warning


# ------------------------------------------------------------------------------- 6. the lock

def _forked_children(pid):
    """Processes forked by ``pid`` (same command line: data-loader workers, not exec'd helpers)."""
    def read(path):
        with open(path, 'rb') as f:
            return f.read()
    kids = []
    for stat in glob.glob('/proc/[0-9]*/stat'):
        child = int(stat.split('/')[2])
        try:
            if int(read(stat).rsplit(b')', 1)[1].split()[1]) == pid and \
                    read(f'/proc/{child}/cmdline') == read(f'/proc/{pid}/cmdline'):
                kids.append(child)
        except OSError:
            continue
    return kids


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_a_resume_right_after_kill_9_of_a_run_with_workers_is_not_refused(demo_dir, tmp_path):
    argv = trainer_argv(demo_dir, tmp_path, '--opt', 'momentum', '--workers', '2', '--epochs', '3')
    proc = subprocess.Popen([sys.executable, SCRIPT, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=ENV, cwd=str(tmp_path))
    run = tmp_path / 'run'
    deadline = time.monotonic() + 240
    workers = []
    while not ((run / 'args.yaml').exists() and len(workers) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
        workers = _forked_children(proc.pid)
    with pytest.raises(RunFolderBusy):  # the workers dropped their copy of the lock, the trainer still holds it
        claim_run_folder(str(tmp_path), 'run', resume=str(run / 'last.pth.tar'))
    proc.kill()
    proc.wait()
    try:
        assert any(_alive(pid) for pid in workers)  # the workers outlive the trainer for a moment...
        folder = claim_run_folder(str(tmp_path), 'run', resume=str(run / 'last.pth.tar'))  # ...without its lock
        folder.release()
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

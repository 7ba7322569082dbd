"""Runs you can trust: run folders are never shared or clobbered, and a run that cannot start says why
in one line (exit code 2) before it creates anything."""
import logging
import os
import subprocess
import sys

import pytest

from esam_timm.data import LabelRangeError
from esam_timm.train import RunFolderBusy, SetupError, Trainer, claim_run_folder, parse_args
from train_helpers import run_trainer, trainer_argv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_EPOCH = ('--epochs', '1', '--opt', 'momentum')


def _files(folder):
    return {name: open(os.path.join(folder, name), 'rb').read() for name in sorted(os.listdir(folder))
            if name != '.lock'}


def test_a_second_run_of_the_same_experiment_gets_its_own_folder(demo_dir, tmp_path):
    run_trainer(demo_dir, tmp_path, *ONE_EPOCH)
    first = _files(tmp_path / 'run')
    trainer, _ = run_trainer(demo_dir, tmp_path, *ONE_EPOCH, '--lr', '0.05')
    assert trainer.output_dir == str(tmp_path / 'run-1')
    assert _files(tmp_path / 'run') == first  # checkpoints, args.yaml, summary.csv untouched
    assert 'lr: 0.05' in (tmp_path / 'run-1' / 'args.yaml').read_text()
    trainer, _ = run_trainer(demo_dir, tmp_path, *ONE_EPOCH, '--epochs', '2', '--resume',
                             str(tmp_path / 'run' / 'last.pth.tar'))
    assert trainer.output_dir == str(tmp_path / 'run')  # resuming from a checkpoint in it continues that run


def test_a_folder_in_use_is_refused_at_start(demo_dir, tmp_path):
    run_trainer(demo_dir, tmp_path, *ONE_EPOCH)
    holder = claim_run_folder(str(tmp_path), 'run', resume=str(tmp_path / 'run' / 'last.pth.tar'))
    try:
        with pytest.raises(RunFolderBusy, match=r'run folder .*run is in use by pid \d+'):
            claim_run_folder(str(tmp_path), 'run', resume=str(tmp_path / 'run' / 'last.pth.tar'))
        args, text = parse_args(trainer_argv(demo_dir, tmp_path, *ONE_EPOCH, '--epochs', '2', '--resume',
                                             str(tmp_path / 'run' / 'last.pth.tar')))
        with pytest.raises(SetupError, match='is in use by pid'):
            Trainer(args, text).setup()
    finally:
        holder.release()
    claim_run_folder(str(tmp_path), 'run', resume=str(tmp_path / 'run' / 'last.pth.tar')).release()


@pytest.mark.parametrize('extra, message', [
    (('--data-dir', '/nonexistent/imagenet'), '/nonexistent/imagenet'),
    (('--train-split', 'nosuchsplit'), 'nosuchsplit'),
    (('--num-classes', '20'), '--num-classes 20 disagrees with the data in .* which has 10 classes'),
    (('--resume', '/nonexistent/last.pth.tar'), "--resume '/nonexistent/last.pth.tar' is not a file"),
    (('--sharpness-interval', '1', '--val-split', ''), '--sharpness-interval 1 measures flatness on validation'),
    (('--data-dir', 'IMAGEFOLDER'), "holds a 'train' folder but no _info.json: an ImageFolder tree.*--dataset ''"),
    (('--resume', 'NEWER'), r"has checkpoint format 2, newer than the format 1 this esam-timm reads: resume it with "
                            r"the esam-timm version that wrote it, or update"),
])
def test_setup_errors_are_one_line_and_leave_no_run_folder(demo_dir, tmp_path, extra, message):
    if 'IMAGEFOLDER' in extra:
        (tmp_path / 'images' / 'train' / 'cat').mkdir(parents=True)
        extra = ('--data-dir', str(tmp_path / 'images'))
    if 'NEWER' in extra:  # a checkpoint of a later format: refused before anything is read from it
        import torch
        torch.save({'version': 2, 'state_dict': {}, 'batches_done': 0}, tmp_path / 'newer.pth.tar')
        extra = ('--resume', str(tmp_path / 'newer.pth.tar'))
    args, text = parse_args(trainer_argv(demo_dir, tmp_path / 'out', *ONE_EPOCH, *extra))
    with pytest.raises(SetupError, match=message) as info:
        Trainer(args, text).setup()
    assert '\n' not in str(info.value)
    assert not (tmp_path / 'out').exists()


def test_resume_from_another_model_names_the_mismatch(demo_dir, tmp_path):
    run_trainer(demo_dir, tmp_path, *ONE_EPOCH)
    args, text = parse_args(trainer_argv(demo_dir, tmp_path / 'other', *ONE_EPOCH, '--model', 'resnet10t',
                                         '--resume', str(tmp_path / 'run' / 'last.pth.tar')))
    with pytest.raises(SetupError, match=r"does not fit --model resnet10t with 10 classes: .*\d+ shape mismatches .*"
                                         r"written for --model 'test_resnet'"):
        Trainer(args, text).setup()
    assert not (tmp_path / 'other').exists()


def test_the_script_prints_one_line_and_exits_2(demo_dir, tmp_path):
    cmd = [sys.executable, os.path.join(REPO, 'train_esam.py'),
           *trainer_argv(demo_dir, tmp_path / 'out', *ONE_EPOCH, '--num-classes', '1000')]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if 'error' in line.lower()]
    assert errors == [f'train_esam.py: error: --num-classes 1000 disagrees with the data in {demo_dir!r}, '
                      f'which has 10 classes: pass --num-classes 10 (or leave it out)']
    assert 'Traceback' not in proc.stderr
    assert not (tmp_path / 'out').exists()


def test_a_batch_larger_than_the_split_warns_that_samples_repeat(demo_dir, tmp_path, caplog):
    args, text = parse_args(trainer_argv(demo_dir, tmp_path, *ONE_EPOCH, '-b', '512'))
    with caplog.at_level(logging.WARNING):
        Trainer(args, text).setup()
    assert 'global batch of 512 (-b x processes) is larger than the training split (320 samples)' in caplog.text


def test_optimizer_line_shows_lookahead(demo_dir, tmp_path, caplog):
    args, text = parse_args(trainer_argv(demo_dir, tmp_path, '--epochs', '1', '--opt', 'lookahead_esam'))
    with caplog.at_level(logging.INFO):
        Trainer(args, text).setup()
    assert 'Optimizer Lookahead(ESAM(rho=0.05' in caplog.text


def test_labels_beyond_num_classes_stop_at_the_first_batch(demo_dir, tmp_path):
    import shutil
    data = tmp_path / 'data'
    shutil.copytree(demo_dir, data)
    os.remove(data / 'class_map.txt')  # the data no longer says how many classes it has
    with pytest.raises(LabelRangeError, match=r'label [5-9], outside the 5 classes of the model'):
        run_trainer(str(data), tmp_path, *ONE_EPOCH, '--num-classes', '5')


def test_a_data_pipeline_failure_is_one_line_and_exit_code_1(monkeypatch, capsys):
    """Out of memory, a CUDA fault or a broken decoder in the data pipeline: not bad data, not a traceback."""
    import runpy
    from esam_timm.data import DataPipelineError

    def fail(args, text):
        raise DataPipelineError('GPU decode ran out of device memory decoding a batch of 256: lower -b')
    monkeypatch.setattr('esam_timm.train.train', fail)
    monkeypatch.setattr(sys, 'argv', ['train_esam.py', '--data-dir', 'x'])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(os.path.join(REPO, 'train_esam.py'), run_name='__main__')
    assert info.value.code == 1
    assert capsys.readouterr().err == ('train_esam.py: error: GPU decode ran out of device memory decoding a batch '
                                       'of 256: lower -b\n')

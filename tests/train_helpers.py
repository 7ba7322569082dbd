"""Shared pieces of the trainer tests: a tiny demo run's command line, running it, reading its summary."""
import csv
import os
import re
import subprocess
import time

from esam_timm.train import Trainer, parse_args


def trainer_argv(demo_dir, out_dir, *extra):
    """test_resnet on the 32 px demo shards, 2 epochs of 10 batches of 32, one worker-less process."""
    return ['--data-dir', demo_dir, '--dataset', 'wds/demo', '--model', 'test_resnet', '--img-size', '32',
            '--crop-pct', '1.0', '-b', '32', '--epochs', '2', '--lr', '0.1', '--weight-decay', '5e-4',
            '--warmup-epochs', '0', '--smoothing', '0', '--no-aug', '--workers', '0', '--base-opt', 'momentum',
            '--log-interval', '5', '--no-progress', '--output', str(out_dir), '--experiment', 'run', *extra]


def run_trainer(demo_dir, out_dir, *extra, callbacks=()):
    args, text = parse_args(trainer_argv(demo_dir, out_dir, *extra))
    trainer = Trainer(args, text, step_callbacks=callbacks)
    return trainer, trainer.fit()


def read_summary(run_dir):
    with open(os.path.join(run_dir, 'summary.csv'), newline='') as f:
        return list(csv.DictReader(f))


def demo_copy_without_labels(demo_dir, out_dir, shard='demo-train-0001.tar'):
    """A copy of the demo data whose ``shard`` lost its ``.cls`` members (its samples have no label)."""
    import shutil
    import tarfile
    shutil.copytree(demo_dir, out_dir)
    src, dst = os.path.join(demo_dir, shard), os.path.join(out_dir, shard)
    with tarfile.open(src) as tin, tarfile.open(dst, 'w') as tout:
        for member in tin.getmembers():
            if not member.name.endswith('.cls'):
                tout.addfile(member, tin.extractfile(member))
    return str(out_dir)


ENV = dict(os.environ, OMP_NUM_THREADS='1')


def start_in_own_group(cmd, cwd):
    """A training process in its own process group (a terminal's Ctrl-C, SLURM and ``kill -- -PGID`` reach the
    whole group: the trainer, its data-loader workers and, under torchrun, every rank)."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            cwd=str(cwd), start_new_session=True)


def signal_when(proc, pattern, signum, timeout=300, group=True):
    """Read the process's output until ``pattern`` appears, then signal its process group (``group``) or the
    process alone; return all output."""
    lines, deadline, sent = [], time.monotonic() + timeout, False
    for line in proc.stdout:
        lines.append(line)
        if not sent and re.search(pattern, line):
            (os.killpg if group else os.kill)(proc.pid, signum)
            sent = True
        assert time.monotonic() < deadline, ''.join(lines[-30:])
    proc.wait(timeout=60)
    assert sent, ''.join(lines[-30:])
    return ''.join(lines)


def resume_line(output, signame):
    """The command a stopped run printed to resume it (the one line, or the same line from every rank)."""
    lines = {l for l in output.splitlines() if l.startswith(f'train_esam.py: stopped by {signame}')}
    (line,) = lines
    return line.split('resume with: ', 1)[1]

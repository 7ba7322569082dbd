"""A training process for the multi-process tests of tests/test_scale.py, started by torchrun or python.

    python tests/scale_worker.py SPEC.json

SPEC holds ``mode``: 'device' writes the device this process would train on (``--device`` as
``requested``, ``cuda_count`` visible GPUs); 'train' runs ``train_esam.py``'s Trainer on ``argv``
and records every update as a JSON line (rank, epoch, batches done, updates done, lr) into
``<record>.rank<R>.jsonl``. Options of 'train': ``signal_at_update`` sends SIGTERM to this process
after that update (every rank, as a scheduler would), ``slow_hvp_s`` makes each Hessian-vector product
of the flatness probe that much slower, ``dist_timeout_s`` joins the process group with that timeout.
Exit codes are train_esam.py's.
"""
import datetime
import json
import os
import signal
import sys
import time

import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from esam_timm.console import setup_logging  # noqa: E402
from esam_timm.train import TrainingStopped, Trainer, parse_args  # noqa: E402
from esam_timm.train.builders import Launch, pick_device  # noqa: E402


def _device(spec):
    launch = Launch.from_env()
    device, note = pick_device(spec['requested'], launch, cuda_available=True, cuda_count=spec['cuda_count'])
    with open(f'{spec["record"]}.rank{launch.rank}.json', 'w') as f:
        json.dump({'device': str(device), 'note': note}, f)


def _recorder(path, signal_at_update):
    def record(trainer, epoch, done):
        with open(path, 'a') as f:
            f.write(json.dumps({'rank': trainer.rank, 'epoch': epoch, 'done': done, 'updates': trainer.num_updates,
                                'lr': trainer._lr(), 'world_size': trainer.world_size}) + '\n')
        if trainer.num_updates == signal_at_update:
            os.kill(os.getpid(), signal.SIGTERM)
    return record


def _slow_hvp(seconds):
    from esam_timm.sharpness import hessian
    original = hessian._weighted_hvp

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)
    hessian._weighted_hvp = slow


def _train(spec):
    if spec.get('slow_hvp_s'):
        _slow_hvp(spec['slow_hvp_s'])
    if spec.get('dist_timeout_s') and int(os.environ.get('WORLD_SIZE', '1')) > 1:
        dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=spec['dist_timeout_s']))
    args, text = parse_args(spec['argv'])
    rank = int(os.environ.get('RANK', '0'))
    trainer = Trainer(args, text, argv=['train_esam.py', *spec['argv']],
                      step_callbacks=[_recorder(f'{spec["record"]}.rank{rank}.jsonl', spec.get('signal_at_update'))])
    try:
        trainer.fit()
    except TrainingStopped as e:
        sys.stderr.write(f'train_esam.py: {e}\n')
        sys.exit(e.exit_code)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    setup_logging()
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    {'device': _device, 'train': _train}[spec['mode']](spec)

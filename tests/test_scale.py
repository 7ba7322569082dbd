"""Ready for many GPUs (issue 21), tested on the CPU: each rank's device, timm's CUDA speed defaults, no
collective timeout from one rank's work, resume on another number of processes, preemption as SLURM and
torchrun deliver it, and what a run at scale prints."""
import json
import logging
import math
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from data_helpers import write_identity_shards
from esam_timm.data import create_train_loader, resolve_source
from esam_timm.data.workers import leave_stop_signals_to_the_trainer
from esam_timm.train import parse_args
from esam_timm.train.builders import Launch, apply_speed_defaults, pick_device, resolve_pin_memory
from esam_timm.train.checkpoint import BatchLayout, resume_position
from train_helpers import read_summary, resume_line, signal_when, start_in_own_group, trainer_argv

SIZES = [7, 2, 4]


# ------------------------------------------------------------------ 4. an epoch is whole updates

@pytest.mark.parametrize('world_size, accum', [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1)])
def test_an_epoch_is_a_whole_number_of_full_global_batches(tmp_path, world_size, accum):
    """13 samples, batch 2: ceil(13 / (2 x processes x accumulation)) updates, each of full batches, the
    same for 2 processes and for 1 process accumulating 2 (a run can resume on the other)."""
    write_identity_shards(tmp_path, SIZES)
    source = resolve_source(str(tmp_path), 'train')
    lengths = {len(create_train_loader(source, batch_size=2, img_size=16, rank=rank, world_size=world_size,
                                       batches_per_update=accum, num_workers=0)) for rank in range(world_size)}
    updates = math.ceil(13 / (2 * world_size * accum))
    assert lengths == {updates * accum}
    loader = create_train_loader(source, batch_size=2, img_size=16, world_size=world_size,
                                 batches_per_update=accum, num_workers=0)
    assert [labels.shape[0] for _, labels in loader] == [2] * updates * accum
    with pytest.raises(ValueError, match='batches_per_update must be >= 1, got 0'):
        create_train_loader(source, batch_size=2, img_size=16, batches_per_update=0)


# ------------------------------------------------------------------ 5. workers leave the stop to the trainer

def test_a_sigterm_from_outside_does_not_kill_the_loader_workers(tmp_path):
    """SLURM's and torchrun's SIGTERM reach the workers from another process than the trainer: they ignore
    it and the epoch goes on (PyTorch's own worker handler used to let them die of it)."""
    write_identity_shards(tmp_path, SIZES)
    loader = create_train_loader(resolve_source(str(tmp_path), 'train', num_samples=40), batch_size=2,
                                 img_size=16, num_workers=2, seed=3, shuffle_buffer=4, prefetch_factor=1)
    batches, first, workers = _start_workers(loader)
    assert len(workers) == 2
    _signal_from_outside(workers)
    time.sleep(0.5)
    rest = list(batches)
    assert 1 + len(rest) == len(loader) == 20
    assert first[0].shape == (2, 3, 16, 16)


def _slow_worker_start(worker_id: int) -> None:
    time.sleep(1.5)  # a loader's own worker_init_fn (timm's seeding, a dataset's set-up) that takes a while


def test_a_stop_signal_while_a_worker_starts_waits_for_it(tmp_path):
    """A SIGTERM or SIGINT that reaches a worker before its worker_init_fn has run (here: during a slow
    one of the loader's own, as timm's loader has) is held until the worker ignores it, for a DataLoader
    built elsewhere and for ours: the worker starts with both blocked."""
    write_identity_shards(tmp_path, SIZES)
    built_elsewhere = torch.utils.data.DataLoader(list(range(12)), batch_size=2, num_workers=2,
                                                  worker_init_fn=_slow_worker_start)
    leave_stop_signals_to_the_trainer(built_elsewhere)
    ours = create_train_loader(resolve_source(str(tmp_path), 'train', num_samples=40), batch_size=2,
                               img_size=16, num_workers=2, seed=3, shuffle_buffer=4, prefetch_factor=1)
    ours.loader.worker_init_fn = _slow_worker_start
    leave_stop_signals_to_the_trainer(ours.loader)  # the slow start, then ours; our loader's start context kept
    for loader, expected in ((built_elsewhere, 6), (ours, 20)):
        before = set(multiprocessing.active_children())
        batches = iter(loader)
        workers = [p for p in multiprocessing.active_children() if p not in before]
        assert len(workers) == 2
        _signal_from_outside(workers)
        assert len(list(batches)) == expected
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == set()  # the trainer's own mask is back


def _signal_from_outside(workers) -> None:
    """SIGTERM and SIGINT to each worker from another process, as a scheduler sends them."""
    for worker in workers:
        subprocess.run(['kill', '-TERM', str(worker.pid)], check=True)
        subprocess.run(['kill', '-INT', str(worker.pid)], check=True)


def _start_workers(loader):
    """Iterate ``loader`` to its first batch; return the iterator, that batch and the worker processes it
    started (not all children: earlier tests may leave other loaders' workers alive in this process)."""
    before = set(multiprocessing.active_children())
    batches = iter(loader)
    first = next(batches)
    return batches, first, [p for p in multiprocessing.active_children() if p not in before]


def test_the_trainers_own_sigterm_still_ends_a_worker(tmp_path):
    """multiprocessing ends the daemonic workers of a loader still alive at exit with SIGTERM from the
    trainer: that one is obeyed."""
    write_identity_shards(tmp_path, SIZES)
    loader = create_train_loader(resolve_source(str(tmp_path), 'train', num_samples=40), batch_size=2,
                                 img_size=16, num_workers=1, seed=3, shuffle_buffer=4, prefetch_factor=1)
    batches, _, (worker,) = _start_workers(loader)
    time.sleep(0.2)
    os.kill(worker.pid, signal.SIGTERM)
    worker.join(timeout=10)
    assert worker.exitcode == 0
    del batches


_EXIT_WITH_LIVE_WORKERS = """
import sys
from esam_timm.data import create_val_loader, resolve_source
loader = create_val_loader(resolve_source(sys.argv[1], 'train'), batch_size=2, img_size=16, num_workers=2,
                           persistent_workers=True)
next(iter(loader))
loader.cycle = loader  # kept alive until the interpreter's last moments
print('exiting', flush=True)
"""


def test_a_process_exits_with_persistent_loader_workers_alive(tmp_path):
    """Persistent workers of a loader the program never closed are ended at exit (they used to ignore the
    exiting trainer's SIGTERM, and the exit waited for them forever)."""
    write_identity_shards(tmp_path, SIZES)
    proc = subprocess.run([sys.executable, '-c', _EXIT_WITH_LIVE_WORKERS, str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env=ENV, cwd=REPO)
    assert proc.returncode == 0 and 'exiting' in proc.stdout, proc.stderr[-2000:]


# ------------------------------------------------------------------ helpers of the multi-process tests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'train_esam.py')
WORKER = os.path.join(REPO, 'tests', 'scale_worker.py')
ENV = dict(os.environ, OMP_NUM_THREADS='1')
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']


def _worker(tmp_path, name, spec, processes=1, timeout=300):
    """Run tests/scale_worker.py with ``spec`` on ``processes`` processes; return the finished process."""
    path = tmp_path / f'{name}.json'
    path.write_text(json.dumps(dict(spec, record=str(tmp_path / name))))
    launcher = TORCHRUN if processes == 2 else [sys.executable]
    return subprocess.run([*launcher, WORKER, str(path)], capture_output=True, text=True, timeout=timeout, env=ENV,
                          cwd=str(tmp_path))


def _records(tmp_path, name, rank=0):
    with open(tmp_path / f'{name}.rank{rank}.jsonl') as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------ 1. each rank on its own device

@pytest.mark.slow
def test_under_torchrun_each_rank_picks_its_own_gpu(tmp_path):
    """``--device cuda:0`` under torchrun used to put every rank on GPU 0 (NCCL: duplicate GPU)."""
    cases = (('cuda:0', 2, ['cuda:0', 'cuda:1'], [False, True]),  # rank 1 is moved off the GPU named
             ('cuda', 2, ['cuda:0', 'cuda:1'], [False, False]),
             ('cuda:1', 1, ['cuda:0', 'cuda:0'], [True, True]))  # one visible GPU per process (SLURM tasks)
    for requested, count, devices, moved in cases:
        name = f'device-{requested}-{count}'.replace(':', '')
        proc = _worker(tmp_path, name, dict(mode='device', requested=requested, cuda_count=count), processes=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        picked = [json.loads((tmp_path / f'{name}.rank{rank}.json').read_text()) for rank in (0, 1)]
        assert [p['device'] for p in picked] == devices
        assert [p['note'] is not None for p in picked] == moved


def test_device_mapping_rules():
    one = Launch()
    assert pick_device('', one, cuda_available=False, cuda_count=0) == (torch.device('cpu'), None)
    assert pick_device('cuda', one, cuda_available=True, cuda_count=4)[0] == torch.device('cuda', 0)
    assert pick_device('cuda:3', one, cuda_available=True, cuda_count=4) == (torch.device('cuda', 3), None)
    eight = Launch(rank=13, local_rank=5, world_size=16, local_world_size=8)
    device, note = pick_device('cuda:0', eight, cuda_available=True, cuda_count=8)
    assert device == torch.device('cuda', 5)
    assert note == ('--device cuda:0 names one GPU, but 16 processes train: each process uses its own GPU, '
                    'cuda:LOCAL_RANK (as timm does)')
    assert pick_device('cpu', eight, cuda_available=True, cuda_count=8) == (torch.device('cpu'), None)
    with pytest.raises(ValueError, match=r'^8 processes on this node, but it shows 4 CUDA device\(s\): start at most '
                                         r'4 processes per node \(torchrun --nproc_per_node 4\)'):
        pick_device('cuda', eight, cuda_available=True, cuda_count=4)


# ------------------------------------------------------------------ 2. timm's speed defaults on CUDA

@pytest.fixture
def cuda_backend_flags():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_cuda_runs_take_timms_speed_defaults_and_can_turn_them_off(cuda_backend_flags):
    args, _ = parse_args(['--data-dir', 'x'])
    assert (args.tf32, args.cudnn_benchmark, args.pin_mem) == (True, True, None)
    torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    apply_speed_defaults(torch.device('cpu'), tf32=args.tf32, cudnn_benchmark=args.cudnn_benchmark)
    assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32  # only on CUDA
    apply_speed_defaults(torch.device('cuda', 0), tf32=args.tf32, cudnn_benchmark=args.cudnn_benchmark)
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    off, _ = parse_args(['--data-dir', 'x', '--no-tf32', '--no-cudnn-benchmark', '--no-pin-mem'])
    apply_speed_defaults(torch.device('cuda', 0), tf32=off.tf32, cudnn_benchmark=off.cudnn_benchmark)
    assert not (torch.backends.cudnn.benchmark or torch.backends.cuda.matmul.allow_tf32
                or torch.backends.cudnn.allow_tf32)
    assert resolve_pin_memory(args.pin_mem, torch.device('cuda', 0)) is True
    assert resolve_pin_memory(args.pin_mem, torch.device('cpu')) is False
    assert resolve_pin_memory(off.pin_mem, torch.device('cuda', 0)) is False


def test_flatness_is_measured_in_full_fp32_under_the_tf32_default(cuda_backend_flags):
    from esam_timm.sharpness.core import measuring
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = torch.nn.Linear(3, 2)
    with measuring(model):
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


# ------------------------------------------------------------------ 3. no rank waits for another's probe

def _spread_probe(rank, world_size, port, out, one_rank_empty=False):
    import timm
    from data_helpers import gloo_group
    from esam_timm.sharpness import measure_sharpness
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=3)
    batches = [(torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(i)),
                torch.arange(n) % 3) for i, n in enumerate((6, 4, 5))]
    with gloo_group(rank, world_size, port):
        mine = batches[rank::world_size]  # rank 0: batches 0 and 2, rank 1: batch 1
        if one_rank_empty:  # fewer --sharpness-batches than processes: rank 1 holds none
            mine = batches if rank == 0 else []
        report = measure_sharpness(model, mine, torch.nn.functional.cross_entropy, rho=0.05, eig_iters=8,
                                   trace_samples=3, seed=1, distributed=True)
    torch.save(report.to_dict(), f'{out}.{rank}')


@pytest.mark.parametrize('one_rank_empty', [False, True])
def test_a_distributed_probe_equals_one_process_on_all_batches(tmp_path, one_rank_empty):
    """Each rank measures its own batches, the ranks add up their parts: the same numbers as one process on
    every batch (an independent run), on every rank; also when a rank holds no batch."""
    import timm
    from data_helpers import run_ranks
    from esam_timm.sharpness import measure_sharpness
    run_ranks(_spread_probe, str(tmp_path / 'report'), one_rank_empty, timeout=90)
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=3)
    batches = [(torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(i)),
                torch.arange(n) % 3) for i, n in enumerate((6, 4, 5))]
    whole = measure_sharpness(model, batches, torch.nn.functional.cross_entropy, rho=0.05, eig_iters=8,
                              trace_samples=3, seed=1).to_dict()
    for rank in (0, 1):
        spread = torch.load(tmp_path / f'report.{rank}')
        assert spread['num_samples'] == whole['num_samples'] == 15 and spread['m'] == whole['m'] == 6
        assert spread['eig_iterations'] == whole['eig_iterations']
        for key in ('loss', 'top_eigenvalue', 'm_sharpness', 'hessian_trace', 'trace_std_error'):
            assert spread[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_a_probe_longer_than_the_collective_timeout_does_not_end_the_run(demo_dir, tmp_path):
    """--sharpness-interval on 2 processes whose collectives time out after 8 s, with a probe of 12+ s:
    rank 1 used to wait for rank 0's probe in a barrier and fail."""
    argv = trainer_argv(demo_dir, tmp_path, '--train-num-samples', '64', '--epochs', '1', '-b', '16', '--opt',
                        'momentum', '--sharpness-interval', '1', '--sharpness-iters', '12', '--sharpness-batches', '2')
    proc = _worker(tmp_path, 'probe', dict(mode='train', argv=argv, slow_hvp_s=1.0, dist_timeout_s=8), processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Flatness after epoch 0' in proc.stderr
    (row,) = read_summary(tmp_path / 'run')
    assert float(row['sharpness_num_samples']) == 32 and math.isfinite(float(row['sharpness_top_eigenvalue']))


# ------------------------------------------------------------------ 4. resume on another number of processes

def _checkpoint(world_size, batch_size, accum, batches_per_epoch, done, epoch=3):
    return {'epoch': epoch, 'batches_done': done, 'batches_per_epoch': batches_per_epoch, 'world_size': world_size,
            'args': {'batch_size': batch_size, 'grad_accum_steps': accum}}


def test_a_mid_epoch_position_maps_to_the_same_update_on_another_layout(caplog):
    eight = _checkpoint(8, 256, 1, 626, 300)  # 8 GPUs, stopped after 300 of 626 updates
    four = BatchLayout(batch_size=256, world_size=4, grad_accum_steps=2, batches_per_epoch=1252)
    assert resume_position('r.pth', eight, four) == (3, 600)  # 300 updates of 2 batches each
    assert 'the same global batch, so epoch 3 continues after its 300 of 626 updates' in caplog.text
    sixteen = BatchLayout(batch_size=128, world_size=16, grad_accum_steps=1, batches_per_epoch=626)
    assert resume_position('r.pth', eight, sixteen) == (3, 300)
    assert resume_position('r.pth', _checkpoint(8, 256, 1, 626, 626), four) == (4, 0)  # the epoch was done
    same = BatchLayout(batch_size=256, world_size=8, grad_accum_steps=1, batches_per_epoch=626)
    assert resume_position('r.pth', eight, same) == (3, 300)


def test_a_mid_epoch_position_with_another_global_batch_is_refused_with_the_flag_that_keeps_it(caplog):
    eight = _checkpoint(8, 256, 1, 626, 300)
    four = BatchLayout(batch_size=256, world_size=4, grad_accum_steps=1, batches_per_epoch=1252)
    with pytest.raises(ValueError) as info:
        resume_position('r.pth', eight, four)
    assert str(info.value) == (
        "--resume 'r.pth' stopped in the middle of epoch 3 (after 300 of its 626 updates) of a run with a global "
        "batch of 2048 (256 per process x 8 processes x 1 accumulated), 626 updates per epoch; this run has a global "
        "batch of 1024 (256 per process x 4 processes x 1 accumulated), 1252 updates per epoch. A mid-epoch "
        "checkpoint continues only with the same global batch: --grad-accum-steps 2 keeps it with -b 256 on 4 "
        "process(es); or resume from the last epoch-boundary checkpoint (last.pth.tar) with the new settings")
    odd = BatchLayout(batch_size=100, world_size=3, grad_accum_steps=1, batches_per_epoch=50)
    with pytest.raises(ValueError, match=r'choose -b and --grad-accum-steps so that -b x processes x '
                                         r'--grad-accum-steps = 2048'):
        resume_position('r.pth', eight, odd)
    with caplog.at_level(logging.WARNING):
        assert resume_position('r.pth', _checkpoint(8, 256, 1, 626, 626), four) == (4, 0)
    assert 'the schedule of an uninterrupted run is not kept' in caplog.text


def _updates(records):
    """(epoch, updates done, lr, loader batches of all processes in the update) per update: the batches of
    the epoch so far are ``done x processes`` whatever the layout, so their difference is the update's."""
    out, previous = [], {}
    for r in records:
        seen = r['done'] * r['world_size']
        out.append((r['epoch'], r['updates'], r['lr'], seen - previous.get(r['epoch'], 0)))
        previous[r['epoch']] = seen
    return out


@pytest.mark.slow
def test_a_run_stopped_mid_epoch_resumes_on_another_number_of_processes(demo_dir, tmp_path):
    """2 processes x b 16 -> 1 process x b 16 x 2 accumulated, and back: the resumed run continues at the
    update it stopped after, every update sees a full global batch of 32, and the lr schedule and update count
    equal an uninterrupted run's."""
    common = ('--train-num-samples', '160', '--epochs', '2', '-b', '16', '--opt', 'esam', '--sched', 'cosine',
              '--warmup-epochs', '1', '--warmup-lr', '0.01', '--val-split', '')
    two = dict(mode='train')
    full = _worker(tmp_path, 'full', dict(two, argv=trainer_argv(demo_dir, tmp_path / 'full', *common)), 2)
    assert full.returncode == 0, full.stderr[-3000:]
    reference = _updates(_records(tmp_path, 'full'))
    assert len(reference) == 2 * 5 and all(r[3] == 2 for r in reference)  # 160 / 32 = 5 updates per epoch

    for stop_on, resume_on, accum_before, accum_after in ((2, 1, '1', '2'), (1, 2, '2', '1')):
        name = f'{stop_on}to{resume_on}'
        out = tmp_path / name
        stopped = _worker(tmp_path, f'{name}-stopped', dict(two, signal_at_update=3, argv=trainer_argv(
            demo_dir, out, *common, '--grad-accum-steps', accum_before)), stop_on)
        assert stopped.returncode == 143 or (stop_on == 2 and stopped.returncode != 0), stopped.stderr[-3000:]
        (checkpoint,) = (out / 'run').glob('recovery-0-*.pth.tar')
        resumed = _worker(tmp_path, f'{name}-resumed', dict(two, argv=trainer_argv(
            demo_dir, out, *common, '--grad-accum-steps', accum_after, '--resume', str(checkpoint))), resume_on)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        updates = _updates(_records(tmp_path, f'{name}-stopped') + _records(tmp_path, f'{name}-resumed'))
        assert updates == reference, name  # the same updates, lr and global batch
        assert 'the order of its remaining samples differs from an uninterrupted run' in resumed.stderr


# ------------------------------------------------------------------ 5. preemption as schedulers deliver it

def _weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['state_dict']


@pytest.mark.slow
@pytest.mark.parametrize('processes, group', [(1, True), (2, False), (2, True)],
                         ids=['group-signal-to-one-process', 'sigterm-to-torchrun', 'group-signal-to-torchrun-job'])
def test_sigterm_as_schedulers_deliver_it_stops_every_rank_with_a_checkpoint(demo_dir, tmp_path, processes, group):
    """With data-loader workers: SLURM's signal to every process of the step (the process group), and
    Kubernetes' SIGTERM to torchrun alone (which forwards it to each rank's group). Each rank finishes its
    update, the recovery checkpoint is written, every rank prints the same resume command and exits 143;
    used to: 'DataLoader worker (pid N) is killed by signal: Terminated', a traceback, no checkpoint."""
    launcher = TORCHRUN if processes == 2 else [sys.executable]
    argv = trainer_argv(demo_dir, tmp_path / 'stopped', '-b', str(32 // processes), '--opt', 'esam', '--workers', '1',
                        '--log-interval', '1', '--val-split', '')
    proc = start_in_own_group([*launcher, SCRIPT, *argv], tmp_path)
    output = signal_when(proc, r'Train: 0 \[\s+3/10', signal.SIGTERM, group=group)
    assert 'DataLoader worker' not in output, output[-3000:]
    frames = [line for line in output.splitlines() if line.strip().startswith('File "')]
    assert not [f for f in frames if 'esam_timm' in f or 'train_esam.py' in f], output[-3000:]  # no rank failed
    if processes == 1:  # (torchrun itself prints its SignalException when it is the one signalled)
        assert 'Traceback' not in output, output[-3000:]
    stops = [line for line in output.splitlines() if line.startswith('train_esam.py: stopped by SIGTERM')]
    assert len(stops) == processes and len(set(stops)) == 1, output[-3000:]
    assert proc.returncode == 143 if processes == 1 else proc.returncode != 0
    command = resume_line(output, 'SIGTERM')
    checkpoint = command.split()[-1]
    assert os.path.basename(checkpoint).startswith('recovery-0-') and os.path.isfile(checkpoint)
    if group or processes == 1:
        return
    full = subprocess.run([*launcher, SCRIPT, *trainer_argv(demo_dir, tmp_path / 'full', '-b', '16', '--opt', 'esam',
                                                            '--workers', '1', '--val-split', '')],
                          capture_output=True, text=True, timeout=300, env=ENV, cwd=str(tmp_path))
    assert full.returncode == 0, full.stderr[-3000:]
    resumed = subprocess.run([*launcher, SCRIPT, *argv, '--resume', checkpoint], capture_output=True, text=True,
                             timeout=300, env=ENV, cwd=str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done, reference = _weights(tmp_path / 'stopped' / 'run' / 'last.pth.tar'), _weights(tmp_path / 'full' / 'run' /
                                                                                         'last.pth.tar')
    assert all(torch.equal(done[k], reference[k]) for k in reference)


# ------------------------------------------------------------------ 6. what a run at scale prints

def test_the_start_block_says_how_the_run_is_laid_out(demo_dir, tmp_path, caplog):
    from esam_timm.train import Trainer
    args, text = parse_args(trainer_argv(demo_dir, tmp_path, '--epochs', '1', '-b', '16', '--grad-accum-steps', '2',
                                         '--lr', '0.05', '--opt', 'esam', '--channels-last',
                                         '--val-split', ''))
    with caplog.at_level(logging.INFO):
        Trainer(args, text).setup()
    lines = [r.getMessage() for r in caplog.records]
    start = next(i for i, line in enumerate(lines) if line.startswith('Run: '))
    block = lines[start:start + 5]
    assert block[0] == f'Run: 1 process on 1 node: {socket.gethostname()} cpu'
    assert block[1].startswith('  Optimizer ESAM(rho=0.05, beta=0.6, gamma=0.5, sds=exact, base=SGD), lr 0.05 (--lr, '
                               'used as given); global batch of 32 (16 per process x 1 processes x 2 accumulated)')
    assert block[2] == '  Precision fp32; channels-last; eager (no torch.compile)'
    assert block[3] == f"  Data 'wds/demo' from {demo_dir}, decode pil, 0 workers per process"
    assert block[4] == f'  1 epochs of 20 batches (10 updates); output in {tmp_path / "run"}'


def test_the_placements_of_many_processes_read_as_nodes_and_gpu_ranges():
    from esam_timm.train.builders import describe_placements
    eight = [f'a cuda:{i}' for i in range(8)] + [f'b cuda:{i}' for i in range(8)]
    assert describe_placements(eight) == '2 nodes: a cuda:0-7; b cuda:0-7'
    assert describe_placements(['a cpu', 'a cpu']) == '1 node: a cpu, cpu'


def test_the_data_wait_share_is_the_time_spent_waiting_for_batches(monkeypatch):
    from esam_timm.train import StepMeter, format_train_line
    clock = [100.0]
    monkeypatch.setattr('esam_timm.train.reporting.time.perf_counter', lambda: clock[0])
    meter = StepMeter()
    for data_time in (0.1, 0.3):  # two updates of 1 s each, 0.4 s of them waiting for the loader
        clock[0] += 1.0
        meter.update({'loss': torch.tensor(1.0)}, 8, data_time)
    read = meter.read()
    assert read['data_wait_share'] == pytest.approx(0.2)
    assert 'Data: 200.0 (200.0) ms, wait 20%' in format_train_line(0, 2, 4, read, read, lr=0.1)


def test_layer_decay_flags_reach_timm_only_when_set_and_an_older_timm_refuses_them(monkeypatch):
    """Issue 24: the GPU node's timm may predate create_optimizer_v2's layer_decay_min_scale /
    layer_decay_no_opt_scale; the trainer passes them only when set and refuses them in one line there."""
    import timm
    import timm.optim
    from esam_timm.train.builders import build_optimizer
    seen = {}

    def older_factory(model, opt='', lr=None, weight_decay=0., momentum=0.9, layer_decay=None, **kwargs):
        seen.update(kwargs, layer_decay=layer_decay)
        return torch.optim.SGD(model.parameters(), lr=lr)
    monkeypatch.setattr(timm.optim, 'create_optimizer_v2', older_factory)
    model = torch.nn.Linear(2, 2)
    args, _ = parse_args(['--data-dir', 'x', '--opt', 'momentum', '--layer-decay', '0.75'])
    build_optimizer(args, model, 0.1)
    assert seen['layer_decay'] == 0.75 and 'layer_decay_min_scale' not in seen
    args, _ = parse_args(['--data-dir', 'x', '--opt', 'momentum', '--layer-decay', '0.75',
                          '--layer-decay-min-scale', '0.1'])
    with pytest.raises(ValueError, match=rf'^--layer-decay-min-scale 0.1: timm {timm.__version__} has no '
                                         r'layer_decay_min_scale in create_optimizer_v2; drop the flag or use a '
                                         r'newer timm$'):
        build_optimizer(args, model, 0.1)

"""The run folder and what is kept in it: a lock for the life of the run, and the checkpoints (their
format, how they are written, and how a run resumes from one).

A run folder belongs to one run. :func:`claim_run_folder` never lets a new run write into a folder
that holds another run's files: it picks the next free suffixed name (``<name>-1``, ``<name>-2``, ...,
as timm's ``get_outdir(inc=True)`` does), and a run resumed from a checkpoint of a run folder continues
in that folder, whatever ``--experiment`` says. The folder is held under an exclusive lock that a second
process asking for it is refused by; the lock is the trainer's alone (forked data-loader workers drop
their copy), so it ends with the trainer, also on kill -9. :func:`find_resume_checkpoint` is
``--resume auto``: the newest checkpoint of the experiment's folders whose run had the same settings.
:class:`CheckpointManager` writes ``last.pth.tar`` every epoch, the best ``max_history`` epochs as
``checkpoint-<epoch>.pth.tar`` plus ``model_best.pth.tar``, and the latest recovery checkpoint; every
file goes through :mod:`esam_timm.fileio`, so a crash never leaves a half-written one.

The format (:func:`checkpoint_state`, :func:`resume_from`): timm's key names (``state_dict``,
``state_dict_ema``, ``optimizer``, ``epoch``, ``arch``, ``args``) plus what an exact resume needs: the
position (``batches_done`` of ``batches_per_epoch``), ``num_updates``, the GradScaler and plateau
scheduler states, the epoch's statistics so far (``epoch_meter``), the best-checkpoint ranking
(``checkpoint_history``) and ``version`` (:data:`CHECKPOINT_VERSION`): a checkpoint of a newer format
is refused with a message rather than misread.
"""
import glob
import logging
import math
import os
import re
import shlex
import socket
import time
import weakref
from dataclasses import dataclass
from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import yaml

from esam_timm.fileio import atomic_copy, atomic_torch_save, remove_stale_tmp
from esam_timm.weights import state_dict_mismatch

__all__ = ['CHECKPOINT_VERSION', 'BatchLayout', 'CheckpointManager', 'ResumePoint', 'RunFolder', 'RunFolderBusy',
           'TrainingState', 'checkpoint_state', 'claim_run_folder', 'find_resume_checkpoint', 'resume_command',
           'resume_from', 'resume_position', 'LOCK_NAME', 'ARGS_NAME']

_logger = logging.getLogger(__name__)

LOCK_NAME = '.lock'
ARGS_NAME = 'args.yaml'
_CHECKPOINT_PATTERNS = ('last.pth.tar', 'recovery-*.pth.tar')
# The format this trainer writes; it reads this one and older ones. Raise it when a key changes meaning.
CHECKPOINT_VERSION = 1

_held: 'weakref.WeakSet[RunFolder]' = weakref.WeakSet()


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunFolder:
    """A run folder held under an exclusive ``flock`` on ``<path>/.lock`` until :meth:`release` (or the
    process ends: the kernel drops the lock of a killed process, so a crash never leaves it stuck).

    A forked child (a data-loader worker) closes its inherited copy of the lock at once: a flock lasts
    as long as any process has the file open, and workers can outlive a killed trainer by seconds.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock_file: Optional[Any] = None

    def try_acquire(self) -> bool:
        """Take the lock if no other process holds it; on success write this process into the lock file."""
        import fcntl
        handle = open(os.path.join(self.path, LOCK_NAME), 'a+')
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(f'pid {os.getpid()} on {socket.gethostname()} since {time.strftime("%Y-%m-%d %H:%M:%S")}\n')
        handle.flush()
        self._lock_file = handle
        _held.add(self)
        return True

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunFolderBusy` naming the process that holds it."""
        if not self.try_acquire():
            raise RunFolderBusy(
                f'run folder {self.path} is in use by {_lock_owner(self.path)}: wait for that run to end, or pass '
                f'another --experiment (or --output) for this one')

    def release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing drops the flock
            self._lock_file = None
            _held.discard(self)

    def _drop_in_child(self) -> None:
        """In a forked child: close this process's copy of the lock file; the parent keeps the lock."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def remove_stale_files(self) -> None:
        """Remove what killed writers left (``*.tmp``); only under the lock, when no one else writes here."""
        removed = remove_stale_tmp(self.path)
        if removed:
            _logger.warning('Removed %d temporary file(s) a killed write left in %s: %s', len(removed), self.path,
                            ', '.join(removed))


def _drop_inherited_locks() -> None:
    for folder in list(_held):
        folder._drop_in_child()
    _held.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def _lock_owner(path: str) -> str:
    try:
        with open(os.path.join(path, LOCK_NAME)) as f:
            return f.read().strip() or 'another process'
    except OSError:
        return 'another process'


def _holds_a_run(path: str) -> bool:
    """True when the folder holds more than a lock, the args.yaml of a run that wrote nothing else (it
    died before its first checkpoint) and temporary files of killed writes."""
    return os.path.isdir(path) and any(
        name not in (LOCK_NAME, ARGS_NAME) and not name.endswith('.tmp') for name in os.listdir(path))


def is_run_folder(path: str) -> bool:
    """A folder a run of this trainer wrote (it holds ``args.yaml``)."""
    return os.path.isfile(os.path.join(path, ARGS_NAME))


def experiment_folders(root: str, name: str) -> List[str]:
    """``root/name`` and its suffixed siblings ``root/name-<n>`` that exist, in suffix order."""
    base = os.path.join(root, name)
    suffixed = []
    for path in glob.glob(glob.escape(base) + '-*'):
        match = re.fullmatch(r'-(\d+)', path[len(base):])
        if match and os.path.isdir(path):
            suffixed.append((int(match.group(1)), path))
    return ([base] if os.path.isdir(base) else []) + [path for _, path in sorted(suffixed)]


def newest_checkpoint(folder: str) -> Optional[str]:
    """The most recently written ``last.pth.tar`` or ``recovery-*.pth.tar`` of a run folder, or None."""
    paths = [p for pattern in _CHECKPOINT_PATTERNS for p in glob.glob(os.path.join(glob.escape(folder), pattern))]
    return max(paths, key=os.path.getmtime) if paths else None


def _settings_differ(folder: str, settings: Mapping[str, Any], ignored: Collection[str]) -> List[str]:
    """The settings (other than ``ignored``) in which the run of ``folder`` differs from ``settings``,
    as ``key: theirs -> ours``; keys only one side has are not compared."""
    try:
        with open(os.path.join(folder, ARGS_NAME)) as f:
            theirs = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return [f'{ARGS_NAME} unreadable']
    return [f'{key}: {theirs[key]!r} -> {value!r}' for key, value in sorted(settings.items())
            if key not in ignored and key in theirs and theirs[key] != value]


def find_resume_checkpoint(root: str, name: str, settings: Mapping[str, Any],
                           ignored: Collection[str]) -> Optional[str]:
    """``--resume auto``: the newest checkpoint among ``root/name`` and ``root/name-<n>`` whose run had
    ``settings`` (``args.yaml`` equal except for the ``ignored`` keys), or None (start a new run).

    Folders of the experiment with other settings (a sweep over a config that pins ``experiment``) are
    passed over with a warning saying how they differ.
    """
    candidates = []
    for folder in experiment_folders(root, name):
        checkpoint = newest_checkpoint(folder)
        if checkpoint is None:
            continue
        differ = _settings_differ(folder, settings, ignored)
        if differ:
            _logger.warning('--resume auto: passing over %s, whose run had other settings (%s)', checkpoint,
                            ', '.join(differ[:5]) + (', ...' if len(differ) > 5 else ''))
            continue
        candidates.append(checkpoint)
    return max(candidates, key=os.path.getmtime) if candidates else None


def claim_run_folder(root: str, name: str, resume: str = '') -> RunFolder:
    """Create (or reuse) the run folder for this run and lock it.

    A run resumed from a checkpoint continues in the checkpoint's folder when that is a run folder (or
    is ``root/name``): the lock then refuses the resume while another process runs there. Otherwise the
    run gets ``root/name``, or the first ``name-<n>`` that is free, when ``root/name`` holds another run;
    a folder left by a run that died before writing anything but ``args.yaml`` is reused. Stale
    temporary files of killed writes are removed once the folder is locked.
    """
    path = os.path.join(root, name)
    resume_dir = (os.path.dirname(resume) or os.curdir) if resume else ''
    if resume_dir and (is_run_folder(resume_dir) or os.path.realpath(resume_dir) == os.path.realpath(path)):
        if os.path.realpath(resume_dir) != os.path.realpath(path):
            _logger.info('Resuming the run in %s (the folder of --resume %s)', resume_dir, resume)
        folder = RunFolder(resume_dir)
        folder.acquire()
    else:
        os.makedirs(root, exist_ok=True)
        suffix, taken = 0, []
        while True:
            candidate = path if suffix == 0 else f'{path}-{suffix}'
            os.makedirs(candidate, exist_ok=True)
            folder = RunFolder(candidate)
            if folder.try_acquire():
                if not _holds_a_run(candidate):
                    break
                folder.release()
            taken.append(candidate)
            suffix += 1
        if taken:
            _warn_taken(taken, candidate)
    folder.remove_stale_files()
    return folder


def _warn_taken(taken: Sequence[str], chosen: str) -> None:
    """Say where a new run went instead, and how to continue the newest of the runs already there."""
    newest = [c for c in (newest_checkpoint(f) for f in taken) if c is not None]
    hint = ''
    if newest:
        latest = max(newest, key=os.path.getmtime)
        hint = (f'; to continue the latest of them instead, pass --resume {latest} (or --resume auto, which '
                f'picks the latest run with the same settings)')
    held = f'Run folders {", ".join(taken)} hold other runs' if len(taken) > 1 else \
        f'Run folder {taken[0]} holds another run'
    _logger.warning('%s; this run writes to %s%s', held, chosen, hint)


def resume_command(checkpoint: str, argv: Optional[Sequence[str]], args_file: str) -> str:
    """The shell command that resumes this run from ``checkpoint``.

    ``argv`` is the script's command line (``sys.argv``); any ``--resume`` in it is replaced. Without it
    (a Trainer built in Python) the run's ``args.yaml`` stands for the flags. Under torchrun the launcher
    is repeated with this node's process count (several nodes: add your rendezvous options).
    """
    if argv is None:
        script, flags = 'train_esam.py', ['-c', args_file]
    else:
        script, flags, skip = argv[0], [], False
        for token in argv[1:]:
            if skip:
                skip = False
            elif token == '--resume':
                skip = True
            elif not token.startswith('--resume='):
                flags.append(token)
    world = int(os.environ.get('WORLD_SIZE', '1'))
    local = int(os.environ.get('LOCAL_WORLD_SIZE', str(world)))
    if world == 1:
        launcher = 'python'
    elif world == local:
        launcher = f'torchrun --standalone --nproc_per_node {local}'
    else:
        launcher = f'torchrun --nnodes {world // local} --nproc_per_node {local} <your rendezvous options>'
    return f'{launcher} {shlex.join([script, *flags, "--resume", checkpoint])}'


def remove_if_exists(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class CheckpointManager:
    """``last.pth.tar`` every epoch, the best ``max_history`` epochs as ``checkpoint-<epoch>.pth.tar``
    plus ``model_best.pth.tar``, and the latest ``recovery-<epoch>-<batch>.pth.tar``.

    The trainer checks on every rank that the weights are finite before it hands a state here, so
    nothing written (``model_best`` included) holds NaN or inf.
    """

    def __init__(self, output_dir: str, max_history: int, decreasing: bool) -> None:
        self.output_dir = output_dir
        self.max_history = max_history
        self.decreasing = decreasing
        self.history: List[Tuple[float, int]] = []
        self.last_recovery: Optional[str] = None

    def _path(self, name: str) -> str:
        return os.path.join(self.output_dir, name)

    @property
    def last_path(self) -> str:
        return self._path('last.pth.tar')

    def recovery_path(self, epoch: int, batches_done: int) -> str:
        return self._path(f'recovery-{epoch}-{batches_done}.pth.tar')

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.decreasing else a > b

    @property
    def best(self) -> Optional[Tuple[float, int]]:
        return self.history[0] if self.history else None

    def save_epoch(self, state: Dict[str, Any], epoch: int, metric: Optional[float]) -> None:
        """Write last.pth.tar and, if ``metric`` ranks among the best, a kept checkpoint for ``epoch``."""
        keep = metric is not None and math.isfinite(metric) and (
            len(self.history) < self.max_history or self._better(metric, self.history[-1][0]))
        history = list(self.history)
        if keep:
            history = [h for h in history if h[1] != epoch] + [(metric, epoch)]
            history.sort(key=lambda h: h[0], reverse=not self.decreasing)
        dropped, history = history[self.max_history:], history[:self.max_history]
        state['checkpoint_history'] = [list(h) for h in history]
        last = self.last_path
        atomic_torch_save(state, last)
        self.history = history
        if keep:
            atomic_copy(last, self._path(f'checkpoint-{epoch}.pth.tar'))
            if self.history[0][1] == epoch:
                atomic_copy(last, self._path('model_best.pth.tar'))
        for _, old_epoch in dropped:
            if old_epoch != epoch:
                remove_if_exists(self._path(f'checkpoint-{old_epoch}.pth.tar'))
        self.remove_recovery()

    def save_recovery(self, state: Dict[str, Any], epoch: int, batches_done: int) -> str:
        """Write a mid-epoch recovery checkpoint; the previous one is removed once this one exists."""
        state['checkpoint_history'] = [list(h) for h in self.history]
        path = self.recovery_path(epoch, batches_done)
        atomic_torch_save(state, path)
        previous, self.last_recovery = self.last_recovery, path
        if previous and previous != path:
            remove_if_exists(previous)
        return path

    def adopt_recovery(self, path: str) -> None:
        """Treat a recovery checkpoint this run resumed from as its own: the next save removes it."""
        if os.path.realpath(os.path.dirname(path)) == os.path.realpath(self.output_dir) and \
                os.path.basename(path).startswith('recovery-'):
            self.last_recovery = path

    def remove_recovery(self) -> None:
        if self.last_recovery:
            remove_if_exists(self.last_recovery)
            self.last_recovery = None


@dataclass
class TrainingState:
    """The live objects a checkpoint saves and a resume restores (None where the run has none)."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Optional[Any] = None
    model_ema: Optional[Any] = None  # timm's ModelEmaV3: its ``module`` holds the weights
    scheduler: Optional[Any] = None


@dataclass
class ResumePoint:
    """Where a resumed run continues: the first epoch and batch to train, the updates already done, the
    statistics of a partly trained epoch (None when it resumes at an epoch's start), and the best
    checkpoints' ranking ``[(metric, epoch), ...]``."""
    epoch: int
    batch: int
    num_updates: int
    epoch_meter: Optional[Dict[str, Any]]
    history: List[Tuple[float, int]]


def checkpoint_state(state: TrainingState, args: Mapping[str, Any], *, epoch: int, batches_done: int,
                     batches_per_epoch: int, num_updates: int, world_size: int, metric: Optional[float] = None,
                     epoch_meter: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Everything a resumed run needs to continue exactly from (epoch, batches_done); ``args`` are the
    run's flags (``vars(args)``), ``world_size`` its number of processes (with ``-b`` and
    ``--grad-accum-steps`` it gives the global batch a resume on another world size must keep)."""
    checkpoint: Dict[str, Any] = {
        'version': CHECKPOINT_VERSION,
        'arch': args['model'],
        'epoch': epoch,
        'batches_done': batches_done,
        'batches_per_epoch': batches_per_epoch,
        'num_updates': num_updates,
        'world_size': world_size,
        'global_batch': args['batch_size'] * world_size * args['grad_accum_steps'],
        'state_dict': state.model.state_dict(),
        'optimizer': state.optimizer.state_dict(),
        'args': {k: (list(v) if isinstance(v, tuple) else v) for k, v in args.items()},
        'metric': metric,
    }
    if epoch_meter is not None:
        checkpoint['epoch_meter'] = epoch_meter
    if state.scaler is not None:
        checkpoint['scaler'] = state.scaler.state_dict()
    if state.model_ema is not None:
        checkpoint['state_dict_ema'] = state.model_ema.module.state_dict()
    if state.scheduler is not None and hasattr(state.scheduler, 'lr_scheduler'):
        checkpoint['scheduler'] = state.scheduler.lr_scheduler.state_dict()  # plateau: the only stateful one
    return checkpoint


def _read_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint dict in ``path``, or ValueError / FileNotFoundError naming what is wrong with it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--resume {path!r} is not a file')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pickle, zip and torch errors: none of them has a useful type
        raise ValueError(f'--resume {path!r} could not be read as a checkpoint ({type(e).__name__})') from e
    if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint or 'batches_done' not in checkpoint:
        raise ValueError(f'--resume {path!r} is not a checkpoint written by this trainer '
                         f'(use --initial-checkpoint for plain weights)')
    version = checkpoint.get('version', 1)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise ValueError(f'--resume {path!r} has checkpoint format {version!r}, newer than the format '
                         f'{CHECKPOINT_VERSION} this esam-timm reads: resume it with the esam-timm version that '
                         f'wrote it, or update')
    return checkpoint


@dataclass(frozen=True)
class BatchLayout:
    """How a run splits its global batch: ``-b`` per process x processes x ``--grad-accum-steps``, and the
    loader batches each process reads per epoch."""
    batch_size: int
    world_size: int
    grad_accum_steps: int
    batches_per_epoch: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size * self.grad_accum_steps

    @property
    def updates_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.grad_accum_steps)

    def describe(self) -> str:
        return (f'a global batch of {self.global_batch} ({self.batch_size} per process x {self.world_size} '
                f'processes x {self.grad_accum_steps} accumulated), {self.updates_per_epoch} updates per epoch')


def _saved_layout(checkpoint: Mapping[str, Any]) -> Optional[BatchLayout]:
    """The layout of the run that wrote ``checkpoint`` (None for checkpoints older than the key)."""
    args = checkpoint.get('args', {})
    if 'world_size' not in checkpoint:
        return None
    return BatchLayout(batch_size=int(args['batch_size']), world_size=int(checkpoint['world_size']),
                       grad_accum_steps=int(args.get('grad_accum_steps', 1)),
                       batches_per_epoch=int(checkpoint['batches_per_epoch']))


def _accumulation_for(saved: BatchLayout, layout: BatchLayout) -> Optional[int]:
    """The --grad-accum-steps that gives this run the saved global batch, or None when none does."""
    per_step = layout.batch_size * layout.world_size
    return saved.global_batch // per_step if saved.global_batch % per_step == 0 else None


def resume_position(path: str, checkpoint: Mapping[str, Any], layout: BatchLayout) -> Tuple[int, int]:
    """(epoch, batch) where this run (``layout``) continues a checkpoint written at ``batches_done`` of an
    epoch, also on another number of processes.

    An epoch-boundary checkpoint continues at the next epoch whatever the layout (a changed global batch
    changes the schedule: a warning says so). A mid-epoch one continues after the same number of updates,
    hence samples, of its epoch when the global batch and the updates per epoch are the same (8 processes
    resumed on 4 with ``--grad-accum-steps 2``): batch ``updates_done x --grad-accum-steps``. With another
    global batch it is refused (ValueError) with the flags that would keep it, or the epoch's start to go
    back to. Checkpoints that do not record their world size resume at the same batch count, as before.
    """
    epoch, done = int(checkpoint['epoch']), int(checkpoint['batches_done'])
    saved = _saved_layout(checkpoint)
    saved_bpe = int(checkpoint.get('batches_per_epoch') or layout.batches_per_epoch)
    if done >= saved_bpe:
        if saved is not None and saved.global_batch != layout.global_batch:
            _logger.warning('Checkpoint was written with %s; this run has %s: the schedule of an uninterrupted run '
                            'is not kept', saved.describe(), layout.describe())
        return epoch + 1, 0
    if saved is None:  # an older checkpoint: its position counts this run's batches
        if saved_bpe != layout.batches_per_epoch:
            _logger.warning('Checkpoint had %d batches per epoch, this run has %d (batch size or world size changed): '
                            'the resumed run will not match an uninterrupted one', saved_bpe, layout.batches_per_epoch)
        if done % layout.grad_accum_steps:
            raise ValueError(
                f'--resume {path!r} stopped after batch {done} of epoch {epoch}, inside an update of '
                f'--grad-accum-steps {layout.grad_accum_steps} (updates start at multiples of '
                f'{layout.grad_accum_steps}); resume with a --grad-accum-steps that divides {done}')
        return epoch, done
    updates_done = done // saved.grad_accum_steps
    if saved.global_batch != layout.global_batch or saved.updates_per_epoch != layout.updates_per_epoch:
        accum = _accumulation_for(saved, layout)
        keep = (f'--grad-accum-steps {accum} keeps it with -b {layout.batch_size} on {layout.world_size} '
                f'process(es)' if accum else f'choose -b and --grad-accum-steps so that -b x processes x '
                f'--grad-accum-steps = {saved.global_batch}')
        raise ValueError(
            f'--resume {path!r} stopped in the middle of epoch {epoch} (after {updates_done} of its '
            f'{saved.updates_per_epoch} updates) of a run with {saved.describe()}; this run has '
            f'{layout.describe()}. A mid-epoch checkpoint continues only with the same global batch: {keep}; '
            f'or resume from the last epoch-boundary checkpoint (last.pth.tar) with the new settings')
    if (saved.world_size, saved.batch_size, saved.grad_accum_steps) != (
            layout.world_size, layout.batch_size, layout.grad_accum_steps):
        _logger.warning('Resuming a run of %d process(es) x -b %d x %d accumulated on %d x %d x %d: the same global '
                        'batch, so epoch %d continues after its %d of %d updates with the same schedule; the '
                        'order of its remaining samples differs from an uninterrupted run (processes read their '
                        'own share of the shards)', saved.world_size, saved.batch_size, saved.grad_accum_steps,
                        layout.world_size, layout.batch_size, layout.grad_accum_steps, epoch, updates_done,
                        saved.updates_per_epoch)
    return epoch, updates_done * layout.grad_accum_steps


def resume_from(path: str, state: TrainingState, *, model_name: str, num_classes: int, layout: BatchLayout,
                restore_optimizer: bool = True) -> ResumePoint:
    """Load a checkpoint of this trainer into ``state`` and return where the run continues.

    Refuses (ValueError) a file that is not such a checkpoint, one of a newer format, one whose weights
    do not fit the model (naming the keys and shapes that differ) and a mid-epoch position this run's
    batch ``layout`` cannot continue (:func:`resume_position`, which also resumes on another number of
    processes). ``restore_optimizer=False`` (``--no-resume-opt``) keeps the fresh optimizer, scaler and
    scheduler.
    """
    checkpoint = _read_checkpoint(path)
    mismatch = state_dict_mismatch(state.model.state_dict(), checkpoint['state_dict'])
    if mismatch:
        raise ValueError(f'--resume {path!r} does not fit --model {model_name} with {num_classes} classes: '
                         f'{mismatch}; it was written for --model {checkpoint.get("arch")!r}')
    epoch, batch = resume_position(path, checkpoint, layout)
    state.model.load_state_dict(checkpoint['state_dict'])
    if state.model_ema is not None:
        state.model_ema.module.load_state_dict(checkpoint.get('state_dict_ema', checkpoint['state_dict']))
    if restore_optimizer:
        state.optimizer.load_state_dict(checkpoint['optimizer'])
        if state.scaler is not None and 'scaler' in checkpoint:
            state.scaler.load_state_dict(checkpoint['scaler'])
        if 'scheduler' in checkpoint and state.scheduler is not None and hasattr(state.scheduler, 'lr_scheduler'):
            state.scheduler.lr_scheduler.load_state_dict(checkpoint['scheduler'])
    history = [(float(m), int(e)) for m, e in checkpoint.get('checkpoint_history', [])]
    meter = checkpoint.get('epoch_meter') if batch else None
    return ResumePoint(epoch, batch, int(checkpoint['num_updates']), meter, history)

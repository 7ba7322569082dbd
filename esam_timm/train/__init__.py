"""The timm-style ESAM training script's machinery, one concern per module:

- ``flags``: every flag declared once (type, valid values, which optimizers read it, resume rules);
- ``config``: the parser, YAML config files and the checks and warnings, built from that table;
- ``builders``: runtime, model, optimizer, scheduler and the compiled/DDP model, from the flags;
- ``loaders``: the flags in the terms of the data seam (:mod:`esam_timm.data.backends`);
- ``checkpoint``: the run folder and its lock, the checkpoint format, saving and resuming;
- ``trainer``: the epoch loop and the wiring of the rest;
- ``evaluation``: validation, ``--dist-bn`` and flatness between epochs;
- ``reporting``: console lines, summary.csv and W&B behind one call per event;
- ``divergence``, ``signals``: how a run stops safely (non-finite updates, SIGINT/SIGTERM).

``train_esam.py`` is ``setup_logging(); args, text = parse_args(); train(args, text)``; a custom loop
can reuse :class:`Trainer` (with ``step_callbacks``) or its pieces.
"""
from .builders import resolve_lr
from .checkpoint import (CHECKPOINT_VERSION, CheckpointManager, RunFolderBusy, claim_run_folder,
                         find_resume_checkpoint)
from .config import args_to_yaml, build_parser, parse_args, validate_args
from .divergence import DivergedError
from .reporting import RunLog, StepMeter, format_train_line, write_summary
from .signals import GracefulStop, TrainingStopped
from .trainer import SetupError, Trainer, train

__all__ = [
    'args_to_yaml', 'build_parser', 'parse_args', 'validate_args', 'RunLog', 'StepMeter', 'format_train_line',
    'write_summary', 'CHECKPOINT_VERSION', 'CheckpointManager', 'RunFolderBusy', 'claim_run_folder',
    'find_resume_checkpoint', 'DivergedError', 'GracefulStop', 'TrainingStopped', 'SetupError', 'Trainer',
    'resolve_lr', 'train',
]

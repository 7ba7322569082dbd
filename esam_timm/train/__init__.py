"""The timm-style ESAM training script's machinery: config, data loaders, run folder and checkpoints,
the trainer and its reporting, and how a run stops safely (divergence, signals).

``train_esam.py`` is ``args, text = parse_args(); setup_logging(); train(args, text)``; a custom loop
can reuse :class:`Trainer` (with ``step_callbacks``) or its pieces.
"""
from .config import args_to_yaml, build_parser, parse_args, validate_args
from .checkpoint import CheckpointManager, RunFolderBusy, claim_run_folder, find_resume_checkpoint
from .divergence import DivergedError
from .reporting import StepMeter, WandbLogger, format_train_line, setup_logging, write_summary
from .signals import GracefulStop, TrainingStopped
from .trainer import SetupError, Trainer, resolve_lr, train

__all__ = [
    'args_to_yaml', 'build_parser', 'parse_args', 'validate_args', 'StepMeter', 'WandbLogger',
    'format_train_line', 'setup_logging', 'write_summary', 'CheckpointManager', 'RunFolderBusy',
    'claim_run_folder', 'find_resume_checkpoint', 'DivergedError', 'GracefulStop', 'TrainingStopped',
    'SetupError', 'Trainer', 'resolve_lr', 'train',
]

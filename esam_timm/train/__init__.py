"""The timm-style ESAM training script's machinery: config parsing, the trainer and its logging.

``train_esam.py`` is ``args, text = parse_args(); setup_logging(); train(args, text)``; a custom loop
can reuse :class:`Trainer` (with ``step_callbacks``) or its pieces.
"""
from .config import args_to_yaml, build_parser, parse_args, validate_args
from .logging import StepMeter, WandbLogger, format_train_line, setup_logging, write_summary
from .trainer import CheckpointManager, Trainer, resolve_lr, train

__all__ = [
    'args_to_yaml', 'build_parser', 'parse_args', 'validate_args', 'StepMeter', 'WandbLogger',
    'format_train_line', 'setup_logging', 'write_summary', 'CheckpointManager', 'Trainer',
    'resolve_lr', 'train',
]

"""Reading model weights for a measurement: the trainer's checkpoints, timm's, and plain state dicts.

A trainer (or timm ``train.py``) checkpoint is a dict with ``state_dict`` (and ``state_dict_ema`` with
EMA on), ``arch`` and ``args`` (the training flags: ``model``, ``num_classes``, ``img_size``, ...); a
plain timm state dict maps parameter names to tensors. Files are read with ``weights_only=True``
(timm's ``args`` Namespace is allowed), and DDP / ``torch.compile`` key prefixes are removed.
"""
import argparse
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn
from torch import Tensor

from esam_timm.weights import state_dict_mismatch

__all__ = ['CheckpointError', 'CheckpointState', 'load_model_state', 'load_into', 'state_dict_mismatch']


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, has no such weights, or does not fit the model."""


@dataclass
class CheckpointState:
    """Weights read from one file: the state dict, the training flags (``{}`` for a plain state dict),
    the architecture name when the file records one, and whether these are the EMA weights."""
    path: str
    state_dict: Dict[str, Tensor]
    args: Dict[str, Any] = field(default_factory=dict)
    arch: Optional[str] = None
    ema: bool = False


def _clean_keys(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    from timm.models import clean_state_dict
    return clean_state_dict(dict(state))


def load_model_state(path: str, *, ema: bool = False) -> CheckpointState:
    """Read the model weights in ``path`` (on the CPU): a trainer/timm checkpoint's ``state_dict``
    (``state_dict_ema`` with ``ema``), or a plain name -> tensor state dict.

    Raises :class:`CheckpointError` naming the file and what is wrong with it: not a file, not
    readable by ``torch.load``, neither kind of dict, or ``ema`` asked of a file without EMA weights.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path!r} is not a file')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike: the file is not a readable checkpoint
        reason = (str(e).splitlines() or [''])[0]
        raise CheckpointError(f'cannot read checkpoint {path!r} ({type(e).__name__}: {reason}): it is not a file '
                              f'written by torch.save') from None
    if not isinstance(data, dict):
        raise CheckpointError(f'checkpoint {path!r} holds a {type(data).__name__}, not a state dict or a '
                              f'checkpoint dict')
    if 'state_dict' in data and isinstance(data['state_dict'], dict):
        key = 'state_dict_ema' if ema else 'state_dict'
        if key not in data:
            raise CheckpointError(f'checkpoint {path!r} has no EMA weights (state_dict_ema; it was trained without '
                                  f'--model-ema): drop --ema')
        args = data.get('args') or {}
        args = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
        return CheckpointState(path=path, state_dict=_clean_keys(data[key]), args=args,
                               arch=data.get('arch') or args.get('model'), ema=ema)
    if data and all(isinstance(k, str) and torch.is_tensor(v) for k, v in data.items()):
        if ema:
            raise CheckpointError(f'checkpoint {path!r} is a plain state dict, without EMA weights: drop --ema')
        return CheckpointState(path=path, state_dict=_clean_keys(data))
    keys = ', '.join(sorted(map(str, data))[:6])
    raise CheckpointError(f'checkpoint {path!r} is neither a checkpoint with a state_dict entry nor a plain state '
                          f'dict of tensors (its keys: {keys})')


def load_into(model: nn.Module, checkpoint: CheckpointState, model_name: str) -> None:
    """Load ``checkpoint``'s weights into ``model``; a checkpoint that does not fit raises
    :class:`CheckpointError` naming the file, the model and the keys and shapes that differ."""
    mismatch = state_dict_mismatch(model.state_dict(), checkpoint.state_dict)
    if mismatch:
        arch = f' (trained as {checkpoint.arch})' if checkpoint.arch and checkpoint.arch != model_name else ''
        raise CheckpointError(f'checkpoint {checkpoint.path!r}{arch} does not fit model {model_name}: {mismatch}; '
                              f'pass the --model and --num-classes it was trained with')
    model.load_state_dict(checkpoint.state_dict)

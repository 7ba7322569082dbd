"""Does a state dict fit a model: the one-line answer the trainer's resume and the sharpness CLI both give."""
from typing import Mapping

from torch import Tensor

__all__ = ['state_dict_mismatch']


def state_dict_mismatch(own: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> str:
    """Why ``state`` does not load into a model whose state dict is ``own``, in one line ('' if it fits):
    missing and unexpected keys and shape mismatches, each counted with an example."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f'{k}: checkpoint {list(state[k].shape)} vs model {list(v.shape)}'
              for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = [f'{len(missing)} missing keys (e.g. {missing[0]})' if missing else '',
             f'{len(unexpected)} unexpected keys (e.g. {unexpected[0]})' if unexpected else '',
             f'{len(shapes)} shape mismatches (e.g. {shapes[0]})' if shapes else '']
    return ', '.join(p for p in parts if p)

"""esam-timm: Efficient Sharpness-Aware Minimization (ESAM, Du et al., ICLR 2022) for timm.

Importing the package registers ``esam``, ``sam`` and ``msam`` (Momentum-SAM) in timm's optimizer
factory, so ``timm.optim.create_optimizer_v2(model, 'esam', ...)`` and ``--opt esam`` work.
"""
from .registry import check_timm_version as _check_timm_version

_check_timm_version()

from . import models  # registers resnet18_cifar in timm
from .losses import PerSampleBinaryCrossEntropy, PerSampleCrossEntropy, create_per_sample_loss, per_sample_loss
from .msam import MSAM, find_msam
from .optim import DEFAULT_BETA, DEFAULT_GAMMA, ESAM, SAM, find_sam
from .registry import register_optimizers
from .selection import SDSMode, get_sds_mode, list_sds_modes, num_selected, register_sds_mode
from .step import train_step

register_optimizers()

__version__ = '0.1.0'
__all__ = [
    'ESAM', 'SAM', 'MSAM', 'find_sam', 'find_msam', 'DEFAULT_BETA', 'DEFAULT_GAMMA', 'train_step',
    'register_optimizers', 'create_per_sample_loss', 'per_sample_loss', 'PerSampleCrossEntropy',
    'PerSampleBinaryCrossEntropy', 'num_selected', 'SDSMode', 'get_sds_mode', 'list_sds_modes',
    'register_sds_mode',
]

"""Registration of ``esam``, ``sam`` and ``msam`` in timm's optimizer factory.

After ``import esam_timm``, ``timm.optim.create_optimizer_v2(model, 'esam', ...)`` and timm-style
scripts' ``--opt esam`` work, ``lookahead_esam`` included (likewise ``sam`` and ``msam``). The names carry
no underscore because timm looks up only the last ``_``-separated token of an optimizer name.

The OptimInfo flags ``has_eps``, ``has_momentum`` and ``has_betas`` tell timm's factory which of its
common kwargs to pass; all three wrappers take all three explicitly (they pass them on to the base
optimizer, whose own OptimInfo filters them), so the flags are all True, as their signatures say.
"""
import re
from typing import Tuple

import timm

from .msam import MSAM
from .optim import ESAM, SAM

__all__ = ['MIN_TIMM_VERSION', 'SAM_FAMILY', 'check_timm_version', 'optimizer_kind', 'is_sam_family',
           'is_msam', 'register_optimizers']

MIN_TIMM_VERSION: Tuple[int, int, int] = (1, 0, 12)
SAM_FAMILY = ('esam', 'sam')  # the ascent-gradient optimizers (ESAM's flags: rho, beta, gamma, sds)


def optimizer_kind(opt: str) -> str:
    """The registry name timm's factory looks up for ``opt``: its last ``_``-separated token, lower-cased
    (``'lookahead_esam'`` -> ``'esam'``). The one place this rule of timm's is written down."""
    return opt.lower().split('_')[-1]


def is_sam_family(opt: str) -> bool:
    """True for ``esam``/``sam`` and their wrapped forms (``lookahead_esam``)."""
    return optimizer_kind(opt) in SAM_FAMILY


def is_msam(opt: str) -> bool:
    """True for ``msam`` and its wrapped forms (``lookahead_msam``)."""
    return optimizer_kind(opt) == 'msam'


def _version_tuple(version: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r'\d+', version)[:3])


def check_timm_version(version: str = timm.__version__) -> None:
    """Raise ImportError on a timm without the optimizer registry (added in timm 1.0.12)."""
    if _version_tuple(version) < MIN_TIMM_VERSION:
        needed = '.'.join(map(str, MIN_TIMM_VERSION))
        raise ImportError(
            f'esam-timm needs timm>={needed} (its optimizer registry); timm {version} is installed. '
            f'Upgrade with: pip install "timm>={needed}"')


def register_optimizers() -> None:
    """Register ``esam``, ``sam`` and ``msam`` in timm's default optimizer registry (idempotent)."""
    from timm.optim._optim_factory import OptimInfo, default_registry
    # The wrappers take eps/betas/momentum explicitly and pass them on to the base optimizer, whose own
    # OptimInfo filters them.
    common = dict(has_eps=True, has_momentum=True, has_betas=True)
    infos = (
        OptimInfo(name='esam', opt_class=ESAM, description=(
            'Efficient SAM (Du et al. 2022): stochastic weight perturbation (beta) and sharpness-'
            'sensitive data selection (gamma) around any timm base optimizer (base_optimizer=...)'),
            **common),
        OptimInfo(name='sam', opt_class=SAM, description=(
            'Sharpness-Aware Minimization (Foret et al. 2020) around any timm base optimizer '
            '(base_optimizer=...); ESAM with beta = gamma = 1'), **common),
        OptimInfo(name='msam', opt_class=MSAM, description=(
            'Momentum-SAM (Becker et al. 2024): sharpness-aware training at the base optimizer\'s cost, '
            'perturbing along the momentum of SGD or Adam/AdamW (base_optimizer=...); works in any loop'),
            **common),
    )
    for info in infos:
        if info.name in default_registry.list_optimizers(info.name):
            if default_registry.get_optimizer_info(info.name).opt_class is info.opt_class:
                continue
        default_registry.register(info)

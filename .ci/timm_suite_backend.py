"""The ``TORCH_BACKEND`` module for running timm's released ``tests/test_optim.py`` on our optimizers.

timm's optimizer tests import ``os.environ['TORCH_BACKEND']`` before collecting, so this module registers
``esam``, ``sam`` and ``msam`` (``import esam_timm``) and then adjusts two registry defaults for the suite,
each because a test assumes something these optimizers refuse by design:

- ``esam`` and ``sam`` get ``allow_plain_steps=True``: the registry-wide property tests (copy, resume,
  zero lr, param group independence, low precision, ...) set ``.grad`` by hand and call ``step()``;
  by default ESAM/SAM refuse a step without an ascent, so that a plain training loop fails loudly.
  With the flag those tests check ESAM's base update, copies and state dicts; its closure steps
  (the basic cases) still run the full SAM step.
- ``esam`` gets ``gamma=1``: the basic cases drive ``step(closure)``, and a closure cannot run
  sharpness-sensitive data selection (ESAM's default gamma 0.5 is refused there, with a clear message).

``msam`` runs with its registered defaults. ``ESAM_SUITE_BASE`` (e.g. ``adamw``) sets the base
optimizer of all three; unset, their default (Nesterov SGD) is used.
"""
import dataclasses
import os

import esam_timm  # noqa: F401  (registers the optimizers)
from timm.optim._optim_factory import default_registry

_SUITE_DEFAULTS = {
    'esam': dict(allow_plain_steps=True, gamma=1.0),
    'sam': dict(allow_plain_steps=True),
    'msam': {},
}


def _adjust() -> None:
    base = os.environ.get('ESAM_SUITE_BASE')
    for name, extra in _SUITE_DEFAULTS.items():
        info = default_registry.get_optimizer_info(name)
        defaults = {**(info.defaults or {}), **extra}
        if base:
            defaults['base_optimizer'] = base
        if defaults:
            default_registry.register(dataclasses.replace(info, defaults=defaults))


_adjust()

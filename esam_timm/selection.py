"""Sharpness-sensitive Data Selection (SDS): which samples of a batch get the second backward.

A selection rule maps per-sample sharpness ``l_i(w+e) - l_i(w)`` (and the clean losses, for rules that
need them, e.g. ones robust to label noise) to the indices of exactly ``k`` samples. ``k`` is fixed by
the batch size alone, so every DDP rank selects the same number of samples and compiled graphs see one
shape. Add a rule with :func:`register_selection_rule`; the training step never changes.
"""
from typing import Callable, Dict, List, Union

import torch

__all__ = ['SelectionRule', 'num_selected', 'top_k_sharpness', 'register_selection_rule',
           'get_selection_rule', 'list_selection_rules']

SelectionRule = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""``rule(sharpness [B], clean_loss [B], k) -> LongTensor [k]`` of distinct sample indices."""

_RULES: Dict[str, SelectionRule] = {}


def num_selected(gamma: float, batch_size: int) -> int:
    """Samples kept by SDS: ``max(1, round(gamma * batch_size))`` (Python's round), at most the batch."""
    return min(batch_size, max(1, round(gamma * batch_size)))


def top_k_sharpness(sharpness: torch.Tensor, clean_loss: torch.Tensor, k: int) -> torch.Tensor:
    """The paper's rule: the ``k`` samples whose loss rises most at the ascent point (exact top-k)."""
    return torch.topk(sharpness, k).indices


def register_selection_rule(name: str, rule: SelectionRule) -> None:
    """Make ``rule`` available to :func:`esam_timm.train_step` as ``selection=name``."""
    _RULES[name] = rule


def list_selection_rules() -> List[str]:
    return sorted(_RULES)


def get_selection_rule(rule: Union[str, SelectionRule]) -> SelectionRule:
    """Resolve a rule name (or pass a callable through)."""
    if callable(rule):
        return rule
    if rule not in _RULES:
        raise ValueError(f'Unknown SDS selection rule {rule!r}: valid rules are {list_selection_rules()} '
                         f'or a callable rule(sharpness, clean_loss, k) -> indices.')
    return _RULES[rule]


register_selection_rule('topk', top_k_sharpness)

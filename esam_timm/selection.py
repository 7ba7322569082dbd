"""Sharpness-sensitive Data Selection (SDS): which samples of a batch get ESAM's second backward.

An SDS mode is a per-sample *signal* and a *rule* that picks exactly ``k`` samples from it. The
signals differ in what they cost:

- ``'exact'`` (the paper, the default): ``l_i(w+e) - l_i(w)`` from an extra no-grad forward F2 over the
  whole batch at ``w + e``. Step cost (forward = 1, backward = 2): ``3 + beta + 3 gamma``.
- ``'first-order'``: the classifier layer's first-order term of that rise,
  ``delta_i . (e_W h_i + e_b)`` with ``delta_i = dl_i/dz_i`` the per-sample logit gradient and ``h_i`` the
  classifier's input, both from F1/B1. Exact in closed form for that layer; no F2, so
  ``2 + beta + 3 gamma``.
- ``'loss'``: the clean loss ``l_i(w)`` (K-SAM-like: the hardest samples); no F2, no estimate.

The paper's rule takes the top k of the signal. Under label noise that favours mislabelled samples
(their loss, and so their loss rise, is largest), so two noise-robust rules keep the sharpness signal
but stop chasing noise, each for the ``exact`` and ``first-order`` signals:

- ``-trim`` (``'exact-trim'``, ``'first-order-trim'``): the small-loss criterion of Co-teaching (Han et
  al. 2018): the ``drop`` share of the batch with the highest clean loss (20% by default) is excluded,
  then the top k of the signal among the rest are taken (:class:`TrimHighLoss`).
- ``-relative`` (``'exact-relative'``, ``'first-order-relative'``): the top k of the sharpness relative
  to the clean loss, ``delta_i / l_i`` (:func:`relative_to_loss`): for cross-entropy the loss rise of
  a sample is about ``rho * ||g_i|| * cos(g_i, g)`` and ``||g_i||`` grows with ``l_i``, so the ratio
  ranks by how well a sample's gradient agrees with the batch's, not by how wrong its label is.

A rule may also keep the batch's class balance (``-balanced``, :class:`ClassBalanced`): each class keeps
about ``gamma`` of its own samples, the sharpest of them (or, ``-relative-balanced``, the sharpest relative
to their clean loss). The top k of a signal that the label alone decides picks whole classes: a model whose
output does not yet depend on its input (a Vision Transformer at initialisation: every image gets the same
logits) has a loss rise that only the label sets, the top k then holds about 4 of 10 classes, and the
second pass trains the class prior on them instead of features, which keeps the output input-independent:
the training loss stayed at chance for ten epochs (issue 23, ``benchmarks/vit_selection.py``). A balanced rule
cannot change the label mix of the second pass, so it does not feed that state.

``k = max(1, round(gamma * B))`` is fixed by the batch size alone, so every DDP rank selects the same
number of samples and compiled graphs see one shape. The mode is owned by the optimizer
(``ESAM(sds=...)``, ``create_optimizer_v2(..., sds=...)``, ``--esam-sds``); add one with
:func:`register_sds_mode`; the training step never changes.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

import torch

__all__ = ['SDS_SIGNALS', 'SelectionRule', 'SDSMode', 'num_selected', 'top_k', 'TrimHighLoss',
           'relative_to_loss', 'ClassBalanced', 'class_labels', 'logit_grad', 'first_order_sharpness',
           'register_sds_mode', 'get_sds_mode', 'list_sds_modes']

SDS_SIGNALS = ('exact', 'first-order', 'loss')

SelectionRule = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""``rule(score [B], clean_loss [B], k) -> LongTensor [k]`` of distinct sample indices. A rule with a true
``needs_labels`` attribute is called as ``rule(score, clean_loss, k, labels=labels)`` with the class index of
each sample [B] (:func:`class_labels`)."""


def top_k(score: torch.Tensor, clean_loss: torch.Tensor, k: int) -> torch.Tensor:
    """The paper's rule: the ``k`` samples with the largest score (exact top-k)."""
    return torch.topk(score, k).indices


class TrimHighLoss:
    """Co-teaching's small-loss criterion before the paper's rule: exclude the ``drop`` share of the batch
    with the highest clean loss, then take the top ``k`` of the score among the others.

    At most ``B - k`` samples are excluded, so exactly ``k`` are always selected (DDP ranks and compiled
    graphs see one shape). A class rather than a closure, so an optimizer holding it pickles.
    """

    def __init__(self, drop: float = 0.2) -> None:
        if not (isinstance(drop, (int, float)) and 0.0 <= drop < 1.0):
            raise ValueError(f'TrimHighLoss drop={drop!r} is invalid: it must be a share of the batch in [0, 1).')
        self.drop = float(drop)

    def __call__(self, score: torch.Tensor, clean_loss: torch.Tensor, k: int) -> torch.Tensor:
        batch_size = score.shape[0]
        excluded = min(round(self.drop * batch_size), batch_size - k)
        if excluded > 0:
            score = score.index_fill(0, torch.topk(clean_loss, excluded).indices, float('-inf'))
        return torch.topk(score, k).indices

    def __repr__(self) -> str:
        return f'TrimHighLoss(drop={self.drop})'

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrimHighLoss) and other.drop == self.drop

    def __hash__(self) -> int:
        return hash((TrimHighLoss, self.drop))


RELATIVE_LOSS_FLOOR = 1e-6  # a fitted sample's loss can round to 0: its ratio stays finite


def relative_to_loss(score: torch.Tensor, clean_loss: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` samples with the largest sharpness relative to their clean loss, ``score / l_i``."""
    return torch.topk(score / clean_loss.clamp_min(RELATIVE_LOSS_FLOOR), k).indices


def class_labels(targets: torch.Tensor) -> torch.Tensor:
    """Each sample's class: class-index targets [B] as they are, soft targets [B, C] (mixup, cutmix, BCE)
    by their largest entry."""
    return targets if targets.dim() == 1 else targets.argmax(1)


class ClassBalanced:
    """Select ``k`` samples with the batch's class shares: each class keeps about ``k / B`` of its own
    samples, those with the largest score within the class (``relative``: the largest score / clean loss,
    as :func:`relative_to_loss`).

    Why: the top k of the whole batch changes the label mix of ESAM's second pass whenever the score varies
    more between classes than within them, and for a model whose output does not depend on its input yet
    (a ViT at initialisation) the score is a function of the label alone: the top k is then whole classes,
    and the second pass trains the class prior, not features (see the module docstring).

    The allocation is the Sainte-Lague method: the ``j``-th best sample (from 0) of a class with ``n``
    samples in the batch gets the key ``(j + 1/2) / n``, and the ``k`` smallest keys win (ties: the larger
    score). So a class gets ``k n / B`` samples rounded to a neighbouring integer, and exactly ``k`` are
    selected in all. Vectorised over a [B, B] comparison: no host sync, no per-class loop.
    """

    needs_labels = True

    def __init__(self, relative: bool = False) -> None:
        self.relative = bool(relative)

    def __call__(self, score: torch.Tensor, clean_loss: torch.Tensor, k: int, *,
                 labels: torch.Tensor) -> torch.Tensor:
        batch_size = score.shape[0]
        if labels.shape != (batch_size,):
            raise ValueError(f'ClassBalanced needs one class index per sample, shape [{batch_size}]; got labels of '
                             f'shape {tuple(labels.shape)}.')
        priority = score / clean_loss.clamp_min(RELATIVE_LOSS_FLOOR) if self.relative else score
        order = torch.argsort(priority, descending=True, stable=True)  # order[0]: the highest priority
        position = torch.empty_like(order)
        position[order] = torch.arange(batch_size, device=order.device)
        same_class = labels[:, None] == labels[None, :]
        class_size = same_class.sum(1)
        rank_in_class = (same_class & (position[None, :] < position[:, None])).sum(1)
        key = (rank_in_class + 0.5) / class_size
        return order[torch.argsort(key[order], stable=True)[:k]]

    def __repr__(self) -> str:
        return f'ClassBalanced(relative={self.relative})'

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClassBalanced) and other.relative == self.relative

    def __hash__(self) -> int:
        return hash((ClassBalanced, self.relative))


@dataclass(frozen=True)
class SDSMode:
    """One way to choose the samples of the second pass.

    Args:
        signal: the per-sample score handed to ``rule``: ``'exact'`` (sharpness measured by F2),
            ``'first-order'`` (the classifier-layer estimate) or ``'loss'`` (the clean loss).
        rule: ``rule(score, clean_loss, k)`` returning the ``k`` selected indices.
    """
    signal: str
    rule: SelectionRule = top_k

    def __post_init__(self) -> None:
        if self.signal not in SDS_SIGNALS:
            raise ValueError(f'SDS signal {self.signal!r} is invalid: valid signals are {list(SDS_SIGNALS)}.')

    @property
    def needs_f2(self) -> bool:
        return self.signal == 'exact'

    @property
    def needs_labels(self) -> bool:
        """Whether the rule takes each sample's class (``rule(..., labels=...)``)."""
        return bool(getattr(self.rule, 'needs_labels', False))

    def select(self, score: torch.Tensor, clean_loss: torch.Tensor, k: int, targets: torch.Tensor) -> torch.Tensor:
        """The rule's ``k`` indices; a rule that needs labels gets the class of each sample from ``targets``."""
        if self.needs_labels:
            return self.rule(score, clean_loss, k, labels=class_labels(targets))
        return self.rule(score, clean_loss, k)


_MODES: Dict[str, SDSMode] = {}


def num_selected(gamma: float, batch_size: int) -> int:
    """Samples kept by SDS: ``max(1, round(gamma * batch_size))`` (Python's round), at most the batch."""
    return min(batch_size, max(1, round(gamma * batch_size)))


def logit_grad(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], logits: torch.Tensor,
               targets: torch.Tensor) -> torch.Tensor:
    """Per-sample logit gradients ``delta_i = dl_i/dz_i`` [B, C] (fp32), from the loss alone.

    The per-sample loss is re-evaluated on detached fp32 logits and differentiated, so any such loss
    (label smoothing, soft mixup targets, BCE) gives its own exact ``delta_i``; no backward hook needed.
    """
    with torch.enable_grad():
        z = logits.detach().float().requires_grad_(True)
        return torch.autograd.grad(loss_fn(z, targets).sum(), z)[0]


def first_order_sharpness(logit_grad: torch.Tensor, features: torch.Tensor, e_weight: torch.Tensor,
                          e_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-sample first-order loss rise from perturbing a linear classifier ``z = W h + b`` by ``e``.

    ``l_i(W + e_W, b + e_b) - l_i(W, b) ~ delta_i . (e_W h_i + e_b)`` with ``delta_i = dl_i/dz_i``
    ([B, C]) and ``h_i`` the classifier input ([B, D]); computed in fp32. Returns [B].
    """
    shift = features.flatten(1).float() @ e_weight.float().t()
    if e_bias is not None:
        shift = shift + e_bias.float()
    return (logit_grad.float() * shift).sum(1)


def register_sds_mode(name: str, mode: SDSMode) -> None:
    """Make ``mode`` available as ``ESAM(sds=name)`` and ``--esam-sds name``."""
    if not isinstance(mode, SDSMode):
        raise ValueError(f'register_sds_mode({name!r}, ...) takes an SDSMode, got {type(mode).__name__}.')
    _MODES[name] = mode


def list_sds_modes() -> List[str]:
    return list(_MODES)


def get_sds_mode(mode: Union[str, SDSMode]) -> SDSMode:
    """Resolve an SDS mode name (or pass an :class:`SDSMode` through)."""
    if isinstance(mode, SDSMode):
        return mode
    if mode not in _MODES:
        raise ValueError(f'Unknown SDS mode {mode!r}: valid modes are {list_sds_modes()} '
                         f'or an esam_timm.selection.SDSMode(signal, rule).')
    return _MODES[mode]


register_sds_mode('exact', SDSMode('exact'))
register_sds_mode('first-order', SDSMode('first-order'))
register_sds_mode('loss', SDSMode('loss'))
for _signal in ('exact', 'first-order'):
    register_sds_mode(f'{_signal}-trim', SDSMode(_signal, TrimHighLoss()))
    register_sds_mode(f'{_signal}-relative', SDSMode(_signal, relative_to_loss))
    register_sds_mode(f'{_signal}-balanced', SDSMode(_signal, ClassBalanced()))
    register_sds_mode(f'{_signal}-relative-balanced', SDSMode(_signal, ClassBalanced(relative=True)))

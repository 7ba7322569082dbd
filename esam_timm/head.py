"""The model's classifier layer as the training step sees it: what the first-order SDS estimate reads.

The estimate ``delta_i . (e_W h_i + e_b)`` needs each sample's classifier input ``h_i`` from the first
forward. A forward hook on ``model.get_classifier()`` keeps a reference to it (detached, no copy). The
hook is registered once per classifier and stays (a deep copy of the model carries its own), so a
``torch.compile``-d model traces it into its graph. Dynamo does not guard on hooks: one added after
the model (or another instance of its class) was compiled is never called, so make the tap with
:func:`classifier_tap` before compiling (the trainer does; ``train_step`` makes it on its first call,
which is early enough when that is the compiled model's first call).
"""
from typing import Any, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ['ClassifierTap', 'classifier_tap', 'unwrap_model']


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside DDP and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, '_orig_mod'):
            model = model._orig_mod
        else:
            return model


class ClassifierTap:
    """Forward hook on a linear classifier that keeps its latest input and output (detached references)."""

    def __init__(self, classifier: nn.Linear) -> None:
        self.features: Optional[torch.Tensor] = None
        self.logits: Optional[torch.Tensor] = None
        self.verified = False  # set once the classifier's output was seen to be the model's output
        classifier.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> None:
        self.features = args[0].detach()
        self.logits = output.detach()

    def clear(self) -> None:
        self.features = self.logits = None


def classifier_tap(model: nn.Module) -> Tuple[nn.Linear, ClassifierTap]:
    """The model's linear classifier and the tap on it (made on first use).

    Raises ValueError naming the module, and the SDS modes that need no classifier, when the model has
    no ``get_classifier()`` or its classifier is not an ``nn.Linear``.
    """
    inner = unwrap_model(model)
    get_classifier = getattr(inner, 'get_classifier', None)
    if get_classifier is None:
        raise ValueError(
            f"SDS mode 'first-order' needs a timm classifier (model.get_classifier()); "
            f"{type(inner).__name__} has none. Use SDS mode 'exact' or 'loss'.")
    classifier = get_classifier()
    if not isinstance(classifier, nn.Linear):
        raise ValueError(
            f"SDS mode 'first-order' needs a classifier that is a linear layer, but "
            f'{type(inner).__name__}.get_classifier() is {type(classifier).__name__} ({classifier!r}). '
            "Use SDS mode 'exact' or 'loss'.")
    tap = next((hook for hook in classifier._forward_hooks.values() if isinstance(hook, ClassifierTap)), None)
    return classifier, tap if tap is not None else ClassifierTap(classifier)

"""Per-sample versions of timm's training losses, for SDS.

Sharpness-sensitive data selection ranks samples by ``l_i(w+e) - l_i(w)``, so the training step needs
one loss per sample, shape ``[B]``. timm's ``LabelSmoothingCrossEntropy`` and
``SoftTargetCrossEntropy`` return only batch means; the modules here give the same values per sample
(their mean over the batch equals timm's loss) and accept class-index ``[B]`` or soft ``[B, C]``
(mixup/cutmix) targets.
"""
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

__all__ = ['PerSampleCrossEntropy', 'PerSampleBinaryCrossEntropy', 'create_per_sample_loss',
           'per_sample_loss']

class PerSampleCrossEntropy(nn.Module):
    """Cross-entropy per sample with optional label smoothing.

    Class-index targets give timm's ``LabelSmoothingCrossEntropy`` (or plain CE at smoothing 0) per
    sample; soft targets give ``SoftTargetCrossEntropy`` per sample (smoothing then also applies).
    """

    def __init__(self, smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f'Label smoothing {smoothing!r} is invalid: it must be in [0, 1).')
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, reduction='none', label_smoothing=self.smoothing)

    def extra_repr(self) -> str:
        return f'smoothing={self.smoothing}'


class PerSampleBinaryCrossEntropy(nn.Module):
    """timm's ``BinaryCrossEntropy`` per sample: the element-wise loss reduced over classes (mean, or
    sum with ``sum_classes``), so that its batch mean equals timm's loss."""

    def __init__(self, smoothing: float = 0.1, target_threshold: Optional[float] = None,
                 sum_classes: bool = False, pos_weight: Optional[Union[float, torch.Tensor]] = None) -> None:
        super().__init__()
        self.elementwise = BinaryCrossEntropy(
            smoothing=smoothing, target_threshold=target_threshold, reduction='none', pos_weight=pos_weight)
        self.sum_classes = sum_classes

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.elementwise(logits, target)
        return loss.sum(-1) if self.sum_classes else loss.mean(-1)


def create_per_sample_loss(
        *,
        smoothing: float = 0.0,
        mixup_active: bool = False,
        bce_loss: bool = False,
        bce_target_thresh: Optional[float] = None,
        bce_sum: bool = False,
        bce_pos_weight: Optional[float] = None,
) -> nn.Module:
    """The per-sample training loss that timm's train.py would pick for these flags.

    With mixup/cutmix active the targets arrive already smoothed, so ``smoothing`` is not applied again
    (as in timm): soft-target CE, or BCE with only the target threshold.
    """
    if bce_loss:
        return PerSampleBinaryCrossEntropy(
            smoothing=0.0 if mixup_active else smoothing, target_threshold=bce_target_thresh,
            sum_classes=bce_sum, pos_weight=bce_pos_weight)
    return PerSampleCrossEntropy(smoothing=0.0 if mixup_active else smoothing)


def per_sample_loss(criterion: nn.Module) -> nn.Module:
    """Turn one of timm's (or torch's) training losses into its per-sample twin.

    Supported: ``nn.CrossEntropyLoss`` (label_smoothing, no class weights), ``LabelSmoothingCrossEntropy``,
    ``SoftTargetCrossEntropy``, ``BinaryCrossEntropy`` and the per-sample modules themselves.
    """
    if isinstance(criterion, (PerSampleCrossEntropy, PerSampleBinaryCrossEntropy)):
        return criterion
    if isinstance(criterion, JsdCrossEntropy):
        raise ValueError(
            'JsdCrossEntropy cannot drive ESAM: its consistency term ties each image to its AugMix '
            'splits across the batch, so it has no per-sample loss for sharpness-sensitive data selection. '
            'Use cross-entropy (optionally with label smoothing) or BCE, or turn off --jsd-loss.')
    if isinstance(criterion, nn.CrossEntropyLoss):
        if criterion.weight is not None or criterion.ignore_index != -100:
            raise ValueError('nn.CrossEntropyLoss with class weights or ignore_index has no per-sample '
                             'twin here: its mean is not the mean of per-sample losses.')
        return PerSampleCrossEntropy(smoothing=criterion.label_smoothing)
    if isinstance(criterion, LabelSmoothingCrossEntropy):
        return PerSampleCrossEntropy(smoothing=criterion.smoothing)
    if isinstance(criterion, SoftTargetCrossEntropy):
        return PerSampleCrossEntropy(smoothing=0.0)
    if isinstance(criterion, BinaryCrossEntropy):
        if criterion.weight is not None or criterion.smooth_dense:
            raise ValueError('BinaryCrossEntropy with class weights or smooth_dense is not supported '
                             'for ESAM per-sample losses.')
        return PerSampleBinaryCrossEntropy(
            smoothing=criterion.smoothing, target_threshold=criterion.target_threshold,
            sum_classes=criterion.sum_classes, pos_weight=criterion.pos_weight)
    raise ValueError(
        f'No per-sample version of {type(criterion).__name__}: ESAM needs losses of shape [B]. Supported: '
        f'CrossEntropyLoss, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy, BinaryCrossEntropy, '
        f'or any callable loss_fn(logits, targets) -> [B].')

"""Per-sample losses: their batch mean equals timm's (mean-only) training losses."""
import pytest
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from esam_timm.losses import (PerSampleBinaryCrossEntropy, PerSampleCrossEntropy, create_per_sample_loss,
                              per_sample_loss)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 7, generator=g), torch.randint(0, 7, (12,), generator=g)


def mixup_targets(y: torch.Tensor, smoothing: float) -> torch.Tensor:
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=smoothing, num_classes=7)
    _, soft = mixup(torch.randn(12, 3, 4, 4), y)
    return soft


@pytest.mark.parametrize('timm_loss', [LabelSmoothingCrossEntropy(0.1), nn.CrossEntropyLoss(label_smoothing=0.2),
                                       nn.CrossEntropyLoss()])
def test_cross_entropy_per_sample_matches_timm(batch, timm_loss):
    logits, y = batch
    per_sample = per_sample_loss(timm_loss)(logits, y)
    assert per_sample.shape == (12,)
    torch.testing.assert_close(per_sample.mean(), timm_loss(logits, y))
    manual = -torch.log_softmax(logits, -1)[torch.arange(12), y]
    if isinstance(timm_loss, nn.CrossEntropyLoss) and timm_loss.label_smoothing == 0:
        torch.testing.assert_close(per_sample, manual)


def test_soft_target_cross_entropy_per_sample_matches_timm_with_mixup(batch):
    logits, y = batch
    soft = mixup_targets(y, smoothing=0.1)
    expected = SoftTargetCrossEntropy()(logits, soft)
    per_sample = create_per_sample_loss(smoothing=0.1, mixup_active=True)(logits, soft)
    torch.testing.assert_close(per_sample.mean(), expected)
    torch.testing.assert_close(per_sample, (-soft * torch.log_softmax(logits, -1)).sum(-1))


@pytest.mark.parametrize('kwargs', [dict(smoothing=0.1), dict(smoothing=0.0, target_threshold=0.2),
                                    dict(smoothing=0.1, sum_classes=True), dict(smoothing=0.1, pos_weight=2.0)])
def test_bce_per_sample_matches_timm(batch, kwargs):
    logits, y = batch
    timm_loss = BinaryCrossEntropy(**kwargs)
    per_sample = per_sample_loss(timm_loss)(logits, y)
    assert per_sample.shape == (12,)
    torch.testing.assert_close(per_sample.mean(), timm_loss(logits, y))
    direct = create_per_sample_loss(smoothing=kwargs['smoothing'], bce_loss=True,
                                    bce_target_thresh=kwargs.get('target_threshold'),
                                    bce_sum=kwargs.get('sum_classes', False),
                                    bce_pos_weight=kwargs.get('pos_weight'))
    torch.testing.assert_close(direct(logits, y), per_sample)


def test_bce_with_mixup_soft_targets(batch):
    logits, y = batch
    soft = mixup_targets(y, smoothing=0.1)
    loss = create_per_sample_loss(smoothing=0.1, mixup_active=True, bce_loss=True, bce_target_thresh=0.2)
    assert isinstance(loss, PerSampleBinaryCrossEntropy) and loss.elementwise.smoothing == 0.0
    torch.testing.assert_close(loss(logits, soft).mean(), BinaryCrossEntropy(smoothing=0.0, target_threshold=0.2)(logits, soft))


def test_factory_picks_timm_equivalents():
    assert isinstance(create_per_sample_loss(), PerSampleCrossEntropy)
    assert create_per_sample_loss(smoothing=0.1).smoothing == 0.1
    assert create_per_sample_loss(smoothing=0.1, mixup_active=True).smoothing == 0.0


def test_jsd_and_unknown_losses_are_refused_clearly():
    with pytest.raises(ValueError, match='JsdCrossEntropy cannot drive ESAM'):
        per_sample_loss(JsdCrossEntropy())
    with pytest.raises(ValueError, match='No per-sample version of MSELoss'):
        per_sample_loss(nn.MSELoss())
    with pytest.raises(ValueError, match=r'smoothing 1\.0 is invalid'):
        PerSampleCrossEntropy(1.0)

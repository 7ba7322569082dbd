"""CIFAR-style models for the paper's CIFAR recipes, registered in timm's model registry.

timm's ResNets have the ImageNet stem (7x7 stride-2 conv + max-pool), which leaves a 32x32 CIFAR image
1x1 after the second stage. The paper's CIFAR ResNet-18 uses a 3x3 stride-1 stem without pooling;
``timm.create_model('resnet18_cifar')`` builds that after ``import esam_timm``.
"""
from typing import Any

import torch.nn as nn
from timm.models import build_model_with_cfg, register_model
from timm.models.resnet import BasicBlock, ResNet

__all__ = ['resnet18_cifar']

_CIFAR_CFG = dict(
    num_classes=10, input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0, interpolation='bilinear',
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), first_conv='conv1', classifier='fc',
)


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 with a CIFAR stem (3x3 stride-1 conv, no max-pool), as in the ESAM paper's CIFAR runs."""
    if pretrained and not kwargs.get('pretrained_cfg_overlay', {}).get('file'):
        raise ValueError('resnet18_cifar has no hub weights: pass a local file '
                         '(pretrained_cfg_overlay=dict(file=...)) or train from scratch.')
    kwargs.setdefault('num_classes', _CIFAR_CFG['num_classes'])
    if not kwargs.get('pretrained_cfg'):
        kwargs['pretrained_cfg'] = dict(_CIFAR_CFG, num_classes=kwargs['num_classes'])
    model = build_model_with_cfg(ResNet, 'resnet18_cifar', pretrained, block=BasicBlock, layers=(2, 2, 2, 2),
                                 **kwargs)
    model.conv1 = nn.Conv2d(model.conv1.in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model

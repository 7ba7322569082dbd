"""Sharpness of a trained model: what SAM or ESAM bought, measured on any timm model and loader.

- :func:`measure_sharpness`: the loss, the top Hessian eigenvalue (power iteration on Hessian-vector
  products), SAM's m-sharpness and Hutchinson's Hessian trace on fixed batches, as a
  :class:`SharpnessReport` (``to_dict()`` for summary.csv, W&B or JSON).
- The pieces: :func:`hessian_top_eigenvalue`, :func:`hessian_trace`, :func:`hessian_vector_product`,
  :func:`m_sharpness`.
- Loss landscapes: :func:`filter_normalized_direction`, :func:`loss_landscape_1d`,
  :func:`loss_landscape_2d` (Li et al. 2018) and :func:`interpolate_checkpoints` (e.g. SGD to ESAM).
- Weights from files: :func:`load_model_state` reads the trainer's checkpoints (``state_dict`` or
  ``state_dict_ema``), timm's, and plain state dicts.

Every measurement runs in eval mode (BatchNorm running statistics, no dropout), without autocast, on
the trainable parameters, draws its random vectors from a generator seeded by its ``seed`` argument,
and leaves the model's weights, flags, modes and ``.grad`` exactly as it found them. The command line
``python -m esam_timm.sharpness CHECKPOINT [CHECKPOINT ...]`` runs all of it and writes
``sharpness.json`` and PNG plots.
"""
from .checkpoints import CheckpointError, CheckpointState, load_into, load_model_state, state_dict_mismatch
from .core import evaluate_loss, trainable_parameters, unwrap_model
from .hessian import EigenResult, TraceResult, hessian_top_eigenvalue, hessian_trace, hessian_vector_product
from .landscape import (Landscape1D, Landscape2D, filter_normalized_direction, interpolate_checkpoints, linspace,
                        loss_landscape_1d, loss_landscape_2d)
from .measure import SharpnessReport, m_sharpness, measure_sharpness

__all__ = [
    'SharpnessReport', 'measure_sharpness', 'm_sharpness', 'EigenResult', 'TraceResult', 'hessian_top_eigenvalue',
    'hessian_trace', 'hessian_vector_product', 'Landscape1D', 'Landscape2D', 'filter_normalized_direction',
    'loss_landscape_1d', 'loss_landscape_2d', 'interpolate_checkpoints', 'linspace', 'CheckpointError',
    'CheckpointState', 'load_model_state', 'load_into', 'state_dict_mismatch', 'evaluate_loss',
    'trainable_parameters', 'unwrap_model',
]

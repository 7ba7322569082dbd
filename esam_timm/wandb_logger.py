"""Weights & Biases, optional and never fatal: a missing package or a failing init, log or finish is a
warning and turns W&B off; the run goes on. Shared by the trainer and the sharpness CLI."""
import os
import warnings
from typing import Any, Dict, Iterable, Mapping, Optional

__all__ = ['WandbLogger']


class WandbLogger:
    """Thin wrapper over wandb that turns every failure into a warning and disables itself."""

    def __init__(self, enabled: bool, *, project: Optional[str], tags: Iterable[str], config: Mapping[str, Any],
                 output_dir: str, resume_id: str = '', name: Optional[str] = None) -> None:
        self.run = None
        if not enabled:
            return
        try:
            import wandb
        except ImportError:
            warnings.warn('--log-wandb given but wandb is not installed (pip install wandb); '
                          'training continues without W&B.')
            return
        kwargs: Dict[str, Any] = dict(project=project, config=dict(config), tags=list(tags) or None,
                                      name=name, dir=os.environ.get('WANDB_DIR', output_dir))
        if resume_id:
            kwargs.update(id=resume_id, resume='allow')
        try:
            self.run = wandb.init(**kwargs)
        except Exception as e:  # wandb raises many types (network, auth, usage): none may stop training
            warnings.warn(f'wandb.init failed ({type(e).__name__}: {e}); training continues without W&B.')
            self.run = None

    @property
    def active(self) -> bool:
        return self.run is not None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log a dict of scalars at a global step; a failure warns once and disables W&B."""
        if self.run is None:
            return
        try:
            self.run.log(dict(metrics), step=step)
        except Exception as e:
            warnings.warn(f'wandb.log failed ({type(e).__name__}: {e}); W&B logging disabled.')
            self.run = None

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as e:
            warnings.warn(f'wandb.finish failed ({type(e).__name__}: {e}).')
        self.run = None

"""Spies the tests put on optimizers: what the base step saw."""
import torch


def record_before_step(base: torch.optim.Optimizer, params):
    """Wrap the base optimizer's step to record, per step, the weights it starts from and the gradient."""
    seen = {'weights': [], 'grads': []}
    step = base.step

    def recording_step(*args, **kwargs):
        seen['weights'].append([p.detach().clone() for p in params])
        seen['grads'].append([p.grad.clone() for p in params])
        return step(*args, **kwargs)

    base.step = recording_step
    return seen

"""Momentum-SAM (Becker et al. 2024, arXiv 2401.12033): sharpness-aware training at SGD's cost, in any loop.

The rule: perturb to ``w~ = w - rho * v / ||v||`` with ``v`` the base optimizer's momentum (one L2 norm
over all tensors of all parameter groups), compute the gradient at ``w~`` with the training
forward/backward, then take the base optimizer's ordinary step from ``w`` with that gradient. No second
gradient, so it costs what the base optimizer costs.

:class:`MSAM` wraps momentum SGD or Adam/AdamW like timm's ``Lookahead`` (shared ``param_groups`` and
``state``). What makes it work in a plain ``loss.backward(); optimizer.step()`` loop, timm's ``train.py``
included, is that ``w~`` is put in place exactly for training forwards/backwards, by one global module
forward pre-hook (installed while an MSAM exists):

- the outermost call of a module that holds parameters of an MSAM, in train mode with grad enabled,
  perturbs all of that optimizer's parameters (``w`` is saved by ``_foreach_clone``);
- a tensor hook on that call's output queues a callback that restores ``w`` (``_foreach_copy_``,
  bitwise) at the END of the backward, so gradient clipping (AGC reads weights), EMA updates,
  checkpoints, ``state_dict()`` and evaluation all see ``w``;
- safety nets: ``step()`` restores before stepping, and a forward in eval mode or under no_grad
  restores first if a training forward was never backwarded;
- inside ``torch.compile`` tracing the hook does nothing: the outermost eager call (the compiled
  module's wrapper) does the work, so compiled models train without recompiles; the root of an in-place
  ``module.compile()``, whose hooks only run inside compiled code, runs them eagerly (a graph break
  before and after its forward);
- a forward run by a backward (activation checkpointing's recomputation) finds ``w~`` in place and does
  nothing.

Gradient accumulation: each training forward before the step perturbs again from the same ``w`` and
momentum, so all micro-batches see the same ``w~`` bitwise. Under DDP the momentum is identical on all
ranks after the all-reduce, so ``w~`` is too.
"""
import logging
import math
import threading
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
from torch.optim import Optimizer

from .optim import BaseOptimizerWrapper, ParamsT, _create_base_optimizer, _refuse_sharded_params

__all__ = ['MSAM', 'find_msam', 'DEFAULT_RHO']

_logger = logging.getLogger(__name__)

DEFAULT_RHO = 3.0  # the authors' README commands (rho about 2-3 in the paper)
NORM_EPS = 1e-12  # added to ||v||, as in the reference code

_SUPPORTED_BASES = ("momentum SGD ('sgd', 'nesterov', 'momentum', or torch.optim.SGD with momentum > 0) "
                    "and Adam/AdamW ('adam', 'adamw', torch.optim.Adam, torch.optim.AdamW)")


def _momentum_key(base: Optimizer) -> str:
    """The state entry holding the momentum MSAM follows; refuses bases whose momentum it does not know."""
    if isinstance(base, torch.optim.SGD):
        for index, group in enumerate(base.param_groups):
            if not group.get('momentum', 0) > 0:
                raise ValueError(
                    f"MSAM needs momentum to follow, but its SGD parameter group {index} has "
                    f"momentum={group.get('momentum')!r}: use momentum > 0 (e.g. 0.9), or another base.")
        return 'momentum_buffer'
    if isinstance(base, torch.optim.Adam):  # torch.optim.AdamW too
        return 'exp_avg'
    raise ValueError(
        f'MSAM base optimizer {type(base).__name__} is not supported: MSAM perturbs along the base '
        f"optimizer's momentum, which it knows for {_SUPPORTED_BASES}.")


def _refuse_sgd_without_momentum(base_optimizer: Union[str, Type[Optimizer]], momentum: Optional[float]) -> None:
    """Refuse momentum <= 0 for an SGD base before building it (torch's own error would not say why)."""
    cls: Any = base_optimizer
    if isinstance(base_optimizer, str):
        from timm.optim._optim_factory import default_registry
        name = base_optimizer.lower()
        cls = default_registry.get_optimizer_class(name, bind_defaults=False) \
            if name in default_registry.list_optimizers() else None
    if isinstance(cls, type) and issubclass(cls, torch.optim.SGD) and momentum is not None and not momentum > 0:
        raise ValueError(
            f'MSAM needs momentum to follow, but momentum={momentum!r} was given for its SGD base '
            f'{base_optimizer!r}: use momentum > 0 (e.g. 0.9), or another base.')


def _check_rho(rho: Any) -> float:
    if isinstance(rho, bool) or not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
        raise ValueError(f'MSAM rho={rho!r} is invalid: it must be a finite number >= 0 (0 gives plain '
                         f'base-optimizer steps, e.g. for warm-up; the authors use about 2-3).')
    return float(rho)


class MSAM(BaseOptimizerWrapper):
    """Momentum-SAM around momentum SGD or Adam/AdamW; works in any training loop.

    Args:
        params: parameters or parameter groups (as for any torch optimizer); several groups with their
            own lr / weight decay work (the momentum norm is global).
        base_optimizer: a timm optimizer name (``'sgd'``, ``'nesterov'``, ``'momentum'``, ``'adam'``,
            ``'adamw'``), built through timm's factory, or ``torch.optim.SGD`` / ``Adam`` / ``AdamW``.
        rho: radius of the perturbation ``||w~ - w||``; 0 makes plain base steps (e.g. during warm-up;
            set ``optimizer.rho`` at any time).
        lr, weight_decay, foreach, **kwargs: passed to the base optimizer.
        momentum, eps, betas: timm's common kwargs, passed to the base optimizer when given and when it
            takes them.

    Nothing else is needed: after ``import esam_timm``, a loop of ``loss_fn(model(x), y).backward();
    optimizer.step()`` trains with MSAM (see the module docstring for how). The first step, with no
    momentum yet, is a plain base step. :meth:`perturb` and :meth:`restore` are public for loops that
    want to place ``w~`` themselves.
    """

    # GradScaler.step then always calls step() (with found_inf / grad_scale set) instead of skipping it
    # on overflow: step() restores w and skips the base update itself.
    _step_supports_amp_scaling = True

    def __init__(
            self,
            params: ParamsT,
            base_optimizer: Union[str, Type[Optimizer]] = 'sgd',
            rho: float = DEFAULT_RHO,
            lr: Optional[float] = None,
            weight_decay: float = 0.0,
            momentum: Optional[float] = None,
            eps: Optional[float] = None,
            betas: Optional[Tuple[float, ...]] = None,
            foreach: Optional[bool] = None,
            **kwargs: Any,
    ) -> None:
        self.rho = rho
        _refuse_sgd_without_momentum(base_optimizer, momentum)
        self.base_optimizer = _create_base_optimizer(
            params, base_optimizer, lr, weight_decay, foreach, kwargs, owner='MSAM', momentum=momentum,
            eps=eps, betas=betas)
        self.momentum_key = _momentum_key(self.base_optimizer)
        super().__init__(self.base_optimizer.param_groups, self.base_optimizer.defaults)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        _refuse_sharded_params(self._params(), owner='MSAM')
        self._backup: List[torch.Tensor] = []
        self._perturbed: List[torch.Tensor] = []
        self._direction: Optional[Tuple[List[torch.Tensor], List[torch.Tensor], torch.dtype]] = None
        self._step_norm: Optional[torch.Tensor] = None  # ||w~ - w|| of this step's perturbation, if any
        self._last_norm: Optional[torch.Tensor] = None
        self._warned_unperturbed = False
        _track(self)

    @property
    def rho(self) -> float:
        """Perturbation radius; assign to change it (e.g. a warm-up from 0)."""
        return self._rho

    @rho.setter
    def rho(self, value: float) -> None:
        self._rho = _check_rho(value)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(rho={self.rho}, base_optimizer={self.base_optimizer!r})'

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state['_direction'] = None  # rebuilt from the copied state
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        _track(self)
        if self._perturbed:
            _PERTURBED.add(self)

    @property
    def perturbed(self) -> bool:
        """True while the parameters hold ``w~`` (from a training forward until the end of its backward)."""
        return bool(self._perturbed)

    def _direction_tensors(self) -> Tuple[List[torch.Tensor], List[torch.Tensor], torch.dtype]:
        """The parameters that have a momentum, their momentum tensors and the dtype to take the norm in
        (float32, or float64 for float64 tensors), gathered once per step (the base optimizer updates its
        momentum in place; a new step, a load or a new group may add tensors)."""
        if self._direction is None:
            params, buffers = [], []
            for group in self.param_groups:
                for p in group['params']:
                    buffer = self.state.get(p, {}).get(self.momentum_key)
                    if buffer is not None:
                        params.append(p)
                        buffers.append(buffer)
            wide = any(b.dtype == torch.float64 for b in buffers)
            self._direction = (params, buffers, torch.float64 if wide else torch.float32)
        return self._direction

    @torch.no_grad()
    def perturb(self) -> None:
        """Move to ``w~ = w - rho v / ||v||``, saving ``w``; nothing when already there, when rho is 0 or
        before the first step (no momentum yet). No host sync: a non-finite ``||v||`` gives no move."""
        if self._perturbed or self._rho == 0:
            return
        params, buffers, dtype = self._direction_tensors()
        if not params:
            return
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(buffers, dtype=dtype)))
        scale = torch.where(torch.isfinite(norm), self._rho / (norm + NORM_EPS), 0.0)
        self._backup = torch._foreach_clone(params)
        self._perturbed = params
        _PERTURBED.add(self)
        torch._foreach_sub_(params, torch._foreach_mul(buffers, scale))
        self._step_norm = scale * norm

    @torch.no_grad()
    def restore(self) -> None:
        """Return the parameters to ``w`` bitwise (a copy of the saved weights, not ``w~ + e``)."""
        if self._perturbed:
            torch._foreach_copy_(self._perturbed, self._backup)
            self._perturbed, self._backup = [], []
        _PERTURBED.discard(self)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Restore ``w`` if still perturbed, then the base optimizer's step with the gradient in ``.grad``
        (computed at ``w~`` by the training forward/backward).

        With a ``closure`` (torch's convention: it zeroes the gradients, computes the loss, calls
        ``backward()`` and returns the loss): perturb, call it at ``w~``, restore, step; its loss is
        returned. Under a GradScaler (``scaler.step(optimizer)``) an overflow skips the base update;
        ``w`` is restored either way.
        """
        found_inf = getattr(self, 'found_inf', None)  # set while a GradScaler runs this step
        loss = None
        if closure is not None:
            if found_inf is not None:
                raise RuntimeError(
                    'MSAM.step(closure) cannot run under an fp16 GradScaler: the closure\'s gradients would be '
                    'scaled and its overflow unchecked. Call scaler.scale(loss).backward() and '
                    'scaler.step(optimizer) without a closure (MSAM needs none), or use bf16.')
            self.perturb()
            try:
                with torch.enable_grad():
                    loss = closure()
            finally:
                self.restore()
        else:
            self.restore()
        self._end_step()
        if found_inf is not None and not self._unscale_and_check(found_inf):
            return loss  # an inf/nan gradient: skip the update, as GradScaler does
        self.base_optimizer.step()
        self._direction = None
        return loss

    def _end_step(self) -> None:
        """Record this step's perturbation norm; warn once if a step that could perturb did not."""
        norm, self._step_norm = self._step_norm, None
        if norm is None:
            if not self._warned_unperturbed and self._rho > 0 and self._direction_tensors()[0]:
                self._warned_unperturbed = True
                _logger.warning(
                    'MSAM stepped without perturbing: no training forward of a module holding its parameters '
                    '(train mode, grad enabled) ran since the last step, so this was a plain %s step. Call the '
                    'model as a module in train mode (not model.eval(), functional calls, or a whole training '
                    'step inside torch.compile), or set rho=0 for deliberate plain steps.',
                    type(self.base_optimizer).__name__)
            params = self.param_groups[0]['params']
            norm = torch.zeros((), device=params[0].device if params else None)
        self._last_norm = norm

    def step_stats(self) -> Dict[str, torch.Tensor]:
        """Statistics of the last step, as 0-dim tensors on the parameters' device (no host sync):
        ``perturb_norm``, ``||w~ - w||`` (rho, or 0 when no perturbation was made)."""
        if self._last_norm is None:
            params = self.param_groups[0]['params']
            self._last_norm = torch.zeros((), device=params[0].device if params else None)
        return {'perturb_norm': self._last_norm}

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group to the base optimizer (checked as at construction)."""
        if self.param_groups is not self.base_optimizer.param_groups:
            super().add_param_group(param_group)  # Optimizer.__init__ fills a list replaced right after
            return
        self.restore()
        self.base_optimizer.add_param_group(param_group)
        self.param_groups = self.base_optimizer.param_groups
        try:
            _momentum_key(self.base_optimizer)
        except ValueError:
            self.param_groups.pop()  # refused: the optimizer stays as it was
            raise
        self._direction = None
        _ownership_changed()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state dict of this MSAM or of its plain base optimizer (a resumed run continues
        bitwise: the perturbation depends on the loaded momentum only)."""
        self.restore()
        super().load_state_dict(state_dict)
        self._direction = None
        _ownership_changed()

    def _owns(self, param_ids: Sequence[int]) -> bool:
        ids = {id(p) for p in self._params()}
        return any(i in ids for i in param_ids)


def find_msam(optimizer: Optional[Optimizer]) -> Optional[MSAM]:
    """The MSAM inside ``optimizer`` (itself, or under wrappers such as timm's Lookahead), else None."""
    while optimizer is not None:
        if isinstance(optimizer, MSAM):
            return optimizer
        optimizer = getattr(optimizer, '_base_optimizer', None)
    return None


# ---------------------------------------------------------------------------------------------------
# Placing w~ for training forwards: global module hooks, installed while an MSAM is alive.

class _HookState:
    """Mutable state of the global hooks (one per process: DataParallel's replica threads run inside
    the root call, which perturbed before replicating)."""

    def __init__(self) -> None:
        self.root: Optional[nn.Module] = None  # the outermost module call now perturbing (or None)
        self.root_depth = 0  # re-entrant calls of the root module itself
        self.root_owners: List[MSAM] = []
        self.generation = 0  # bumped when which module holds which MSAM's parameters may change
        self.handles: Optional[Tuple[Any, Any]] = None
        self.lock = threading.RLock()  # a finalizer may run (garbage collection) while it is held


_STATE = _HookState()
_LIVE: 'weakref.WeakSet[MSAM]' = weakref.WeakSet()  # never strong: optimizers must be collectable
_PERTURBED: 'weakref.WeakSet[MSAM]' = weakref.WeakSet()
_OWNERS: 'weakref.WeakKeyDictionary[nn.Module, Tuple[int, Tuple[weakref.ref, ...]]]' = \
    weakref.WeakKeyDictionary()


def _track(optimizer: MSAM) -> None:
    """Register a live MSAM (weakly) and install the global hooks if needed."""
    with _STATE.lock:
        _LIVE.add(optimizer)
        _ownership_changed()
        if _STATE.handles is None:
            _STATE.handles = (
                nn.modules.module.register_module_forward_pre_hook(_forward_pre_hook),
                nn.modules.module.register_module_forward_hook(_forward_hook, always_call=True),
            )
    weakref.finalize(optimizer, _untrack)


def _untrack() -> None:
    """Remove the global hooks once no MSAM is alive (modules then run torch's hook-free fast path)."""
    with _STATE.lock:
        _ownership_changed()
        alive = any(True for _ in _LIVE)  # iteration skips a collected MSAM the set may still count
        if not alive and _STATE.handles is not None:
            for handle in _STATE.handles:
                handle.remove()
            _STATE.handles = None
            _STATE.root, _STATE.root_owners = None, []


def _ownership_changed() -> None:
    _STATE.generation += 1


def _owners(module: nn.Module) -> List[MSAM]:
    """The live MSAMs holding parameters of ``module`` (recursively), cached per module."""
    entry = _OWNERS.get(module)
    if entry is None or entry[0] != _STATE.generation:
        param_ids = [id(p) for p in module.parameters()]
        refs = tuple(weakref.ref(o) for o in list(_LIVE) if param_ids and o._owns(param_ids))
        entry = (_STATE.generation, refs)
        _OWNERS[module] = entry
    return [o for o in (ref() for ref in entry[1]) if o is not None]


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _is_compiled_root(module: nn.Module) -> bool:
    """A module compiled in place (``module.compile()``): torch runs its own hooks inside the compiled code."""
    return getattr(module, '_compiled_call_impl', None) is not None


def _forward_pre_hook(module: nn.Module, args: Any) -> None:
    if torch.compiler.is_compiling():
        # Traced code: nothing to do (the outermost call ran eagerly, e.g. torch.compile(model)'s wrapper),
        # except for the root of module.compile(), whose hooks only run here: one graph break, eager.
        if _is_compiled_root(module):
            _eager_pre_hook(module)
        return None
    return _pre_hook(module)


def _pre_hook(module: nn.Module) -> None:
    state = _STATE
    if state.root is not None:  # inside a perturbing forward: the submodules' fast path
        if module is state.root:
            state.root_depth += 1
        return None
    training = module.training and torch.is_grad_enabled()
    if not training and not _PERTURBED:
        return None
    if _in_backward():
        return None  # activation checkpointing recomputes a forward inside the backward: w~ is in place
    owners = _owners(module)
    if not owners:
        return None
    if training:
        for optimizer in owners:
            optimizer.perturb()
        state.root, state.root_depth, state.root_owners = module, 0, owners
    else:
        for optimizer in owners:
            optimizer.restore()  # an evaluation forward sees w, also after a forward never backwarded
    return None


def _forward_hook(module: nn.Module, args: Any, output: Any) -> None:
    if torch.compiler.is_compiling():
        if _is_compiled_root(module):
            _eager_post_hook(module, output)
        return None
    return _post_hook(module, output)


def _post_hook(module: nn.Module, output: Any) -> None:
    state = _STATE
    if module is not state.root:
        return None
    if state.root_depth:
        state.root_depth -= 1
        return None
    owners, state.root, state.root_owners = state.root_owners, None, []
    _restore_after_backward(output, owners)
    return None


_eager_pre_hook = torch.compiler.disable(_pre_hook, reason='MSAM perturbs the parameters eagerly')
_eager_post_hook = torch.compiler.disable(_post_hook, reason='MSAM hooks the output for the end of backward')


def _tensors(output: Any) -> Iterator[torch.Tensor]:
    """Tensors in a module output: a tensor, or nested tuples, lists and dicts of them."""
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _tensors(item)
    elif isinstance(output, dict):
        for item in output.values():
            yield from _tensors(item)


def _restore_after_backward(output: Any, owners: Sequence[MSAM]) -> None:
    """Restore ``w`` at the end of the first backward through ``output``: a hook on each output tensor that
    needs a gradient queues one engine callback, which runs once the whole backward has finished. An
    output no backward can go through (none, or no tensor needing a gradient; also a forward that raised)
    restores at once."""
    tensors = [t for t in _tensors(output) if t.requires_grad]
    if not tensors:
        for optimizer in owners:
            optimizer.restore()
        return
    refs = [weakref.ref(o) for o in owners]
    queued = [False]

    def restore() -> None:
        with torch.no_grad():
            for ref in refs:
                optimizer = ref()
                if optimizer is not None:
                    optimizer.restore()

    def on_grad(grad: torch.Tensor) -> None:
        if not queued[0]:
            queued[0] = True
            torch.autograd.Variable._execution_engine.queue_callback(restore)

    for tensor in tensors:
        tensor.register_hook(on_grad)

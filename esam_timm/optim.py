"""The ESAM optimizer: a wrapper that owns the ascent (perturb / restore) around any base optimizer.

ESAM (Du et al., ICLR 2022) is SAM with two savings. This module holds the part that only needs the
parameters: Stochastic Weight Perturbation (SWP, the per-tensor draw that decides which tensors get an
ascent gradient) and the ascent itself, ``w -> w + e`` and back by copy. The passes over the data
(forward/backward, sharpness-sensitive data selection, AMP, DDP) live in :mod:`esam_timm.step`.

Like timm's ``Lookahead``, the wrapper shares its base optimizer's ``param_groups`` and ``state``, so
LR schedulers, ``zero_grad`` and GradScaler work on it unchanged, and ``state_dict()`` is the base
optimizer's plus an ``'esam'`` entry with the SWP generator state.
"""
import inspect
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch.optim import Optimizer

from .selection import SDSMode, get_sds_mode

__all__ = ['ESAM', 'SAM', 'find_sam', 'DEFAULT_BETA', 'DEFAULT_GAMMA', 'DEFAULT_RHO']

ASCENT_EPS = 1e-7  # added to the gradient norm, as in the released code

# ESAM's defaults, the one place they are written: ESAM(...), create_optimizer_v2(model, 'esam') and the
# script's --opt esam all use them. The paper recommends beta 0.5-0.6 and gamma 0.5 (its ablations); the
# released code's CIFAR ResNet-18 run, the setting its headline numbers come from, used beta 0.6, gamma 0.5.
DEFAULT_BETA = 0.6
DEFAULT_GAMMA = 0.5
DEFAULT_RHO = 0.05  # ESAM's and SAM's ascent radius (the released CIFAR ResNet-18 setting)

# Optimizers of this package that wrap a base optimizer: none of them can be a base optimizer itself.
WRAPPER_NAMES = ('esam', 'sam', 'msam')

ParamsT = Union[Iterator[torch.Tensor], Iterator[Dict[str, Any]], List[Any]]

# Hook registries torch's Optimizer.__getstate__ leaves out of a copy (hooks are often closures that do not
# pickle); __setstate__ recreates them empty.
_TORCH_HOOK_ATTRS = (
    '_optimizer_step_pre_hooks', '_optimizer_step_post_hooks', '_optimizer_state_dict_pre_hooks',
    '_optimizer_state_dict_post_hooks', '_optimizer_load_state_dict_pre_hooks',
    '_optimizer_load_state_dict_post_hooks')


def _check_fraction(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise ValueError(f'ESAM {name}={value!r} is invalid: it must be a share in (0, 1].')
    return float(value)


def _accepts(cls: Type[Optimizer], name: str) -> bool:
    """Whether the optimizer class takes the keyword ``name`` (or any keyword)."""
    parameters = inspect.signature(cls.__init__).parameters
    return name in parameters or any(p.kind == p.VAR_KEYWORD for p in parameters.values())


def _create_base_optimizer(
        params: ParamsT,
        base_optimizer: Union[str, Type[Optimizer]],
        lr: Optional[float],
        weight_decay: float,
        foreach: Optional[bool],
        kwargs: Dict[str, Any],
        owner: str = 'ESAM',
        **common: Any,
) -> Optimizer:
    """Build the base optimizer: a timm registry name goes through timm's own factory (its kwargs
    filtering and per-name defaults, e.g. Nesterov for 'sgd'); a class is called directly.

    ``common`` holds timm's common kwargs (``momentum``, ``eps``, ``betas``); each is passed on only when
    given (not None), and then only where it means something: timm's factory drops it for a name whose
    OptimInfo does not take it (momentum for AdamW, betas for SGD), and a class gets it only when its
    signature has it, so a wrapper can take all three explicitly whatever its base.
    """
    given = {k: v for k, v in common.items() if v is not None}
    if isinstance(base_optimizer, str):
        from timm.optim import list_optimizers
        from timm.optim._optim_factory import default_registry
        name = base_optimizer.lower()
        if name in WRAPPER_NAMES or '_' in name or name not in default_registry.list_optimizers():
            valid = [n for n in list_optimizers() if n not in WRAPPER_NAMES]
            raise ValueError(
                f'Unknown {owner} base_optimizer {base_optimizer!r}: use a timm optimizer name '
                f'(one of {", ".join(valid)}) or a torch.optim.Optimizer class.')
        return default_registry.create_optimizer(
            params, name, lr=lr, weight_decay=weight_decay, foreach=foreach, **given, **kwargs)
    if isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
        if lr is not None:
            kwargs['lr'] = lr
        kwargs.update({k: v for k, v in given.items() if _accepts(base_optimizer, k)})
        return base_optimizer(params, weight_decay=weight_decay, **kwargs)
    raise ValueError(
        f'{owner} base_optimizer={base_optimizer!r} is invalid: use a timm optimizer name (str) '
        f'or a torch.optim.Optimizer subclass.')


def _refuse_sharded_params(params: Sequence[torch.Tensor], owner: str = 'ESAM') -> None:
    """The wrappers' norms, perturb and restore act on whole local tensors; sharded ones would get a
    per-shard norm and a wrong perturbation, so they are refused (see docs/training.md, FSDP2)."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor
    sharded = [p for p in params if isinstance(p, DTensor)]
    if sharded:
        raise NotImplementedError(
            f'{owner} got {len(sharded)} sharded parameters (DTensor, e.g. from FSDP2 fully_shard or tensor '
            f'parallelism): its perturbation needs a global norm and a whole-tensor perturb/restore, '
            f'which are not implemented for sharded parameters yet. Train with DDP (torchrun + '
            f'train_step), or see docs/training.md ("FSDP2") for the design.')


class BaseOptimizerWrapper(Optimizer):
    """What ESAM, SAM and MSAM share as wrappers of a base optimizer (as timm's ``Lookahead`` is).

    They share the base optimizer's ``param_groups`` and ``state``, so LR schedulers, ``zero_grad`` and
    GradScaler's unscale act on it. Copies (``copy.deepcopy``, ``pickle``) keep every attribute:
    torch's ``Optimizer.__getstate__`` keeps only ``defaults``, ``state`` and ``param_groups``, which
    would lose the base optimizer and the wrapper's settings; a copy made together with its parameters
    continues exactly as the original.
    """

    base_optimizer: Optimizer

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        for name in _TORCH_HOOK_ATTRS:
            state.pop(name, None)
        return state

    @property
    def is_second_order(self) -> bool:
        return getattr(self.base_optimizer, 'is_second_order', False)

    def _params(self) -> List[torch.Tensor]:
        return [p for group in self.param_groups for p in group['params']]

    @torch.no_grad()
    def _unscale_and_check(self, found_inf: torch.Tensor) -> bool:
        """Under GradScaler (``_step_supports_amp_scaling``): unscale the gradients if the scaler left them
        scaled; True when the update may go ahead. ``bool(found_inf)`` syncs with the device, as
        GradScaler's own skip decision does."""
        grad_scale = getattr(self, 'grad_scale', None)
        if grad_scale is not None:
            grads = [p.grad for p in self._params() if p.grad is not None]
            torch._foreach_mul_(grads, grad_scale.double().reciprocal().float())  # as GradScaler.unscale_
        return not bool(found_inf)

    def state_dict(self) -> Dict[str, Any]:
        """The base optimizer's state dict (it loads into the plain base optimizer too)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load into the base optimizer and share its new ``param_groups`` and ``state`` again."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state


class ESAM(BaseOptimizerWrapper):
    """Efficient Sharpness-Aware Minimization around a base optimizer.

    Args:
        params: parameters or parameter groups (as for any torch optimizer).
        base_optimizer: a timm optimizer name ('sgd', 'momentum', 'adamw', 'lamb', ...), built through
            timm's factory with timm's meaning of the name, or a ``torch.optim.Optimizer`` class.
        rho: ascent radius; ``||e|| = rho / beta`` (the released code's scaling, which the paper's rho
            values assume).
        beta: SWP keep probability: each parameter tensor is drawn into the ascent with probability beta.
            Default :data:`DEFAULT_BETA` (0.6, the paper's recommendation).
        gamma: SDS share of the batch used for the second forward/backward (k = max(1, round(gamma*B))).
            Default :data:`DEFAULT_GAMMA` (0.5).
        sds: how SDS picks those samples (see :mod:`esam_timm.selection`): ``'exact'`` (the paper: an
            extra no-grad forward measures each sample's sharpness), ``'first-order'`` (the classifier
            layer's first-order estimate from the first pass, no extra forward) or ``'loss'`` (the
            highest clean losses, no extra forward); or a registered name / ``SDSMode``.
        adaptive: ASAM-style ascent ``e = rho * w^2 g / ||w g|| / beta``.
        seed: seed of the dedicated SWP generator; every DDP rank must use the same seed.
        allow_plain_steps: let :meth:`step` without an ascent since the last step apply a plain base
            update (SAM-free warm-up epochs, gradients computed elsewhere) instead of raising. Off by
            default, so a plain ``loss.backward(); optimizer.step()`` loop fails loudly.
        lr, weight_decay, foreach, **kwargs: passed to the base optimizer.
        momentum, eps, betas: timm's common kwargs, passed to the base optimizer when given and when it
            takes them (timm's factory drops e.g. momentum for AdamW, betas for SGD).

    Three ways to run an update: :func:`esam_timm.train_step` (all of ESAM: SDS, AMP, DDP, gradient
    accumulation); ``step(closure)`` for closure-driven loops such as PyTorch Lightning's automatic
    optimisation (SAM with SWP; gamma must be 1); or by hand with :meth:`draw_swp`, :meth:`perturb`,
    :meth:`restore` and then :meth:`step`. ``step()`` refuses to run without an ascent since the last
    step (unless ``allow_plain_steps``), so a plain ``loss.backward(); optimizer.step()`` loop fails
    loudly instead of training the base optimizer alone; :class:`esam_timm.MSAM` is the sharpness-aware
    optimizer for such loops.
    """

    # GradScaler.step hands optimizers with this flag the step itself, with ``grad_scale`` (None when
    # unscale_() already ran) and ``found_inf`` set, instead of deciding for them. ESAM takes it so that it
    # sees the scaler: a closure passed positionally through scaler.step is refused, not run scaled.
    _step_supports_amp_scaling = True

    def __init__(
            self,
            params: ParamsT,
            base_optimizer: Union[str, Type[Optimizer]] = 'sgd',
            rho: float = DEFAULT_RHO,
            beta: float = DEFAULT_BETA,
            gamma: float = DEFAULT_GAMMA,
            sds: Union[str, SDSMode] = 'exact',
            adaptive: bool = False,
            seed: int = 0,
            allow_plain_steps: bool = False,
            lr: Optional[float] = None,
            weight_decay: float = 0.0,
            momentum: Optional[float] = None,
            eps: Optional[float] = None,
            betas: Optional[Tuple[float, ...]] = None,
            foreach: Optional[bool] = None,
            **kwargs: Any,
    ) -> None:
        if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
            raise ValueError(f'ESAM rho={rho!r} is invalid: it must be a finite number > 0.')
        self.rho = float(rho)
        self.beta = _check_fraction('beta', beta)
        self.gamma = _check_fraction('gamma', gamma)
        self.sds = sds
        self.adaptive = bool(adaptive)
        self.allow_plain_steps = bool(allow_plain_steps)
        self.base_optimizer = _create_base_optimizer(
            params, base_optimizer, lr, weight_decay, foreach, kwargs, momentum=momentum, eps=eps, betas=betas)
        super().__init__(self.base_optimizer.param_groups, self.base_optimizer.defaults)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        _refuse_sharded_params(self._params())
        self.generator = torch.Generator(device='cpu')
        self.generator.manual_seed(seed)
        self._backup: List[torch.Tensor] = []
        self._perturbed: List[torch.Tensor] = []
        self.ascent_taken = False  # an ascent (perturb(), made or skipped) waits for the step that uses it

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(rho={self.rho}, beta={self.beta}, gamma={self.gamma}, '
                f'sds={self.sds!r}, adaptive={self.adaptive}, base_optimizer={self.base_optimizer!r})')

    @property
    def sds(self) -> Union[str, SDSMode]:
        """The SDS mode: a registered name (``'exact'``, ``'first-order'``, ``'loss'``) or an ``SDSMode``."""
        return self._sds

    @sds.setter
    def sds(self, mode: Union[str, SDSMode]) -> None:
        self.sds_mode = get_sds_mode(mode)  # validates; raises with the valid names
        self._sds = mode

    def draw_swp(self) -> List[torch.Tensor]:
        """Draw the SWP subset for one step: the trainable tensors whose gradient the first backward needs.

        Each parameter tensor is kept with probability ``beta`` (one draw per tensor from
        :attr:`generator`, so every rank draws the same subset and a run replays from its seed). The
        caller restricts the first backward to the result (``loss.backward(inputs=drawn)``): autograd
        then skips the other tensors' weight-gradient kernels, which is the compute SWP saves, without
        touching ``requires_grad`` (``torch.compile`` guards on it, so toggling it would recompile every
        step). May be empty.
        """
        params = self._params()
        if self.beta >= 1.0:
            return [p for p in params if p.requires_grad]
        keep = (torch.rand(len(params), generator=self.generator) < self.beta).tolist()
        return [p for p, k in zip(params, keep) if p.requires_grad and k]

    @torch.no_grad()
    def perturb(self, skip_non_finite: bool = False) -> Dict[str, torch.Tensor]:
        """Move to the ascent point ``w + e`` from the gradients now in ``.grad``, saving ``w`` first.

        ``e = rho * g / (||g|| + 1e-7) / beta`` over the tensors that have a gradient (the SWP subset);
        the others have ``e = 0``. The gradients are consumed (overwritten by ``e``). The loss scale of
        an fp16 GradScaler cancels in ``g / ||g||``, so scaled gradients need no unscaling.

        With ``skip_non_finite`` (fp16 under a GradScaler, where overflow is expected) a non-finite
        gradient norm skips the ascent: this costs one host sync. Without it the step stays free of
        host syncs and a non-finite norm yields a zero ascent scale.

        Returns 0-dim tensors: ``grad_norm`` (of the ascent gradient), ``perturb_norm`` (||e||, in the
        ``|w|``-scaled metric when adaptive) and ``skipped_ascents`` (1 when no ascent was made).
        """
        self.ascent_taken = True
        all_params = self._params()
        params = [p for p in all_params if p.grad is not None]
        if not params:
            zero = torch.zeros((), device=all_params[0].device)
            return {'grad_norm': zero, 'perturb_norm': zero, 'skipped_ascents': torch.ones_like(zero)}
        grads = [p.grad for p in params]
        if self.adaptive:
            torch._foreach_mul_(grads, params)  # |w| g has the norm of w g
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
        finite = torch.isfinite(grad_norm)
        if skip_non_finite and not bool(finite):
            return {'grad_norm': grad_norm, 'perturb_norm': torch.zeros_like(grad_norm),
                    'skipped_ascents': torch.ones_like(grad_norm)}
        scale = torch.where(finite, self.rho / self.beta / (grad_norm + ASCENT_EPS), 0.0)
        if self.adaptive:
            torch._foreach_mul_(grads, params)  # e = scale * w^2 g
        torch._foreach_mul_(grads, scale)
        self._backup = torch._foreach_clone(params)
        self._perturbed = params
        torch._foreach_add_(params, grads)
        return {'grad_norm': grad_norm, 'perturb_norm': scale * grad_norm,
                'skipped_ascents': (~finite).float()}

    @torch.no_grad()
    def restore(self) -> None:
        """Return the perturbed tensors to the saved ``w`` bitwise (a copy, not ``w + e - e``)."""
        if self._perturbed:
            torch._foreach_copy_(self._perturbed, self._backup)
        self._perturbed, self._backup = [], []

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Apply the base optimizer's update; with a ``closure``, run a whole SAM step around it.

        Without a closure, the gradient now in ``.grad`` must come from the ascent point ``w + e`` and the
        weights must be restored (:func:`esam_timm.train_step`, or ``perturb()``/``restore()`` by hand);
        a step with no ascent since the last one raises instead of quietly training the base optimizer.

        With a closure (torch's convention: it computes the loss, calls ``backward()`` and returns the
        loss; it may zero the gradients itself): draw the SWP subset, call ``closure()`` at ``w``, keep
        the drawn tensors' gradients, perturb, call ``closure()`` at ``w + e``, restore, then step. The
        loss of the first call is returned. SWP's draw is honoured, but not its saving: the closure's
        backward computes every gradient and the undrawn ones are dropped. SDS is not possible here
        (gamma must be 1): selecting samples needs per-sample losses, which only ``train_step`` has.
        """
        found_inf = getattr(self, 'found_inf', None)  # set while a GradScaler runs this step (see below)
        if closure is not None:
            if found_inf is not None:
                raise RuntimeError(
                    'ESAM.step(closure) cannot run under an fp16 GradScaler: the closure\'s gradients would '
                    'be scaled and its overflow unchecked. Use esam_timm.train_step(..., scaler=scaler), or '
                    'bf16 autocast (no scaler) with the closure.')
            return self._closure_step(closure)
        if self._perturbed:
            raise RuntimeError('ESAM.step() called while the weights are perturbed: call restore() first.')
        if not self.ascent_taken and not self.allow_plain_steps:
            raise RuntimeError(
                f'ESAM.step() was called with no ascent since the last step, so it would apply a plain '
                f'{type(self.base_optimizer).__name__} update: a loop of loss.backward(); optimizer.step() '
                f'does not run ESAM. Run each update with esam_timm.train_step(model, optimizer, inputs, '
                f'targets, loss_fn), or pass a closure (optimizer.step(closure), gamma=1), or call '
                f'draw_swp() / perturb() / restore() before step(). An fp16 GradScaler cannot drive a '
                f'closure (scaler.step refuses closures): use train_step, or bf16. For sharpness-aware '
                f'training in a plain loop use msam (Momentum-SAM); for deliberate plain steps (e.g. '
                f'warm-up) set allow_plain_steps=True.')
        self.ascent_taken = False
        if found_inf is not None and not self._unscale_and_check(found_inf):
            return None  # an inf/nan gradient: skip the update, as GradScaler does
        self.base_optimizer.step()
        return None

    def _closure_step(self, closure: Callable[[], Any]) -> Any:
        """SAM with SWP around a closure: closure at w, perturb, closure at w + e, restore, step."""
        if self.gamma < 1.0:
            raise ValueError(
                f'ESAM.step(closure) cannot run sharpness-sensitive data selection (gamma={self.gamma}): '
                f'it needs per-sample losses, which a closure does not return. Use '
                f'esam_timm.train_step(model, optimizer, inputs, targets, loss_fn) for SDS, or gamma=1 '
                f'(SAM with SWP) with a closure.')
        drawn = {id(p) for p in self.draw_swp()}
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()  # at w
        for p in self._params():
            if id(p) not in drawn:
                p.grad = None  # SWP: undrawn tensors have no ascent
        self.perturb()
        try:
            self.zero_grad(set_to_none=True)  # drop e: the closure may not zero the gradients itself
            with torch.enable_grad():
                closure()  # at w + e
        finally:
            self.restore()
        self.step()
        return loss

    def state_dict(self) -> Dict[str, Any]:
        """The base optimizer's state dict plus ``'esam'``: the SWP generator state (a uint8 tensor,
        so it loads with ``torch.load(weights_only=True)``)."""
        state = self.base_optimizer.state_dict()
        state['esam'] = {'generator_state': self.generator.get_state()}
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state dict made by :meth:`state_dict` or by the plain base optimizer (the SWP
        generator then keeps its current state)."""
        state_dict = dict(state_dict)
        esam_state = state_dict.pop('esam', None)
        super().load_state_dict(state_dict)
        if esam_state is not None:
            self.generator.set_state(esam_state['generator_state'])


class SAM(ESAM):
    """Plain SAM (Foret et al. 2020): ESAM with beta = gamma = 1 (every tensor perturbed, full batch).

    ``momentum``, ``eps`` and ``betas`` are explicit, as for ESAM, so timm's factory can tell from the
    signature that they are taken (and passes them on to the base optimizer)."""

    def __init__(self, params: ParamsT, base_optimizer: Union[str, Type[Optimizer]] = 'sgd',
                 rho: float = DEFAULT_RHO, beta: float = 1.0, gamma: float = 1.0, momentum: Optional[float] = None,
                 eps: Optional[float] = None, betas: Optional[Tuple[float, ...]] = None, **kwargs: Any) -> None:
        if beta != 1.0 or gamma != 1.0:
            raise ValueError(
                f'SAM takes beta=1 and gamma=1 (got beta={beta!r}, gamma={gamma!r}); use ESAM for '
                f'other values.')
        super().__init__(params, base_optimizer, rho=rho, beta=1.0, gamma=1.0, momentum=momentum, eps=eps,
                         betas=betas, **kwargs)


def find_sam(optimizer: Optimizer) -> Optional[ESAM]:
    """Return the ESAM inside ``optimizer`` (itself, or under wrappers such as timm's Lookahead), else None."""
    while optimizer is not None:
        if isinstance(optimizer, ESAM):
            return optimizer
        optimizer = getattr(optimizer, '_base_optimizer', None)
    return None

"""The training step engine: one full parameter update for SGD-type, SAM and ESAM optimizers.

ESAM's passes for one batch of size B, with k = max(1, round(gamma * B)):

1. F1 + B1 on the full batch at ``w``; B1 computes only the SWP-drawn tensors' gradients
   (``backward(inputs=drawn)``: autograd skips the others' weight-gradient kernels).
2. perturb: ``w -> w + e`` (:meth:`ESAM.perturb`).
3. The SDS signal (the optimizer's ``sds`` mode, :mod:`esam_timm.selection`): ``'exact'`` runs F2, no
   grad, on the full batch at ``w + e`` for each sample's ``l_i(w+e) - l_i(w)``; ``'first-order'``
   computes the classifier layer's estimate from F1/B1; ``'loss'`` uses the clean losses. Nothing is
   needed when k == B (gamma = 1, i.e. SAM).
4. SDS: the mode's rule picks k samples (top-k of the signal).
5. F3 + B3 on the selected samples at ``w + e``; restore ``w`` by copy; base optimizer step.

Gradient accumulation (``accum_steps=N``) treats each of the N micro-batches as DDP treats a rank: it
runs its own ascent from its own gradient (F1/B1, perturb, selection of k of its own samples, F3/B3 at its
own ``w + e``); the B3 gradients are averaged; one base step follows. All micro-batches share one SWP draw.
Earlier micro-batches' B3 gradients wait outside ``.grad`` while the next ascent gradient is computed (the
one extra gradient-sized buffer) and are put back before its B3, so under DDP the last B3 all-reduces their
sum: one all-reduce per update.

What the engine gets right (see ``docs/esam-reference.md`` in the shared docs for why each matters):
every forward opens its own autocast context (autocast caches casts of the weights for the life of one
context); an fp16 GradScaler needs no unscale for the ascent, skips a non-finite ascent, and its
``step`` sees restored weights; under DDP, F1/B1/F2 run in ``no_sync()`` so only B3 is all-reduced;
F1 and F2 (and F3 when it covers the full batch) draw the same dropout / drop-path masks; BatchNorm
running stats end the step as F1 left them (``bn_mode='clean'``) or as all passes left them
(``bn_mode='all'``, the released code's behaviour); gradient clipping acts on the final gradient.
"""
import contextlib
from typing import Any, Callable, ContextManager, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parallel import DistributedDataParallel
from timm.utils import dispatch_clip_grad

from .head import ClassifierTap, classifier_tap
from .optim import ESAM, find_sam
from .selection import first_order_sharpness, logit_grad, num_selected

__all__ = ['train_step', 'BN_MODES', 'CLIP_MODES']

BN_MODES = ('clean', 'all')
CLIP_MODES = ('norm', 'value', 'agc')

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _RngFork:
    """Saves the generator that dropout uses on ``device`` so a later forward can replay its draws."""

    def __init__(self, device: torch.device) -> None:
        self.module = None if device.type == 'cpu' else torch.get_device_module(device.type)
        self.index = device.index if device.index is not None else (
            self.module.current_device() if self.module is not None else None)
        self.start = self.get()

    def get(self) -> torch.Tensor:
        return torch.get_rng_state() if self.module is None else self.module.get_rng_state(self.index)

    def set(self, state: torch.Tensor) -> None:
        if self.module is None:
            torch.set_rng_state(state)
        else:
            self.module.set_rng_state(state, self.index)


def _running_stat_buffers(model: nn.Module) -> List[torch.Tensor]:
    """Running-statistics buffers of the norm layers that update them in this forward."""
    buffers = []
    for module in model.modules():
        if isinstance(module, _NormBase) and module.training and module.track_running_stats:
            buffers += [b for b in (module.running_mean, module.running_var, module.num_batches_tracked)
                        if b is not None]
    return buffers


def _select(inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``inputs[index]`` in the input's memory format (channels-last stays channels-last)."""
    subset = inputs[index]
    if inputs.dim() == 4 and not inputs.is_contiguous() and inputs.is_contiguous(
            memory_format=torch.channels_last):
        subset = subset.contiguous(memory_format=torch.channels_last)
    return subset


def _check_options(amp_dtype: Optional[torch.dtype], clip_mode: str, bn_mode: str,
                   clip_grad: Optional[float]) -> None:
    if amp_dtype not in (None, torch.float16, torch.bfloat16):
        raise ValueError(f'amp_dtype={amp_dtype!r} is invalid: use None, torch.bfloat16 or torch.float16.')
    if clip_mode not in CLIP_MODES:
        raise ValueError(f'clip_mode={clip_mode!r} is invalid: valid modes are {CLIP_MODES}.')
    if bn_mode not in BN_MODES:
        raise ValueError(f'bn_mode={bn_mode!r} is invalid: valid modes are {BN_MODES}.')
    if clip_grad is not None and not clip_grad > 0:
        raise ValueError(f'clip_grad={clip_grad!r} is invalid: use None (no clipping) or a value > 0.')


class _Passes:
    """Shared plumbing of one step: autocast per forward, per-sample loss checks, scaled backward."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, device_type: str,
                 amp_dtype: Optional[torch.dtype], scaler: Optional[torch.amp.GradScaler],
                 accum_steps: int) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.device_type = device_type
        self.amp_dtype = amp_dtype
        self.scaler = scaler
        self.accum_steps = accum_steps
        self.is_ddp = isinstance(model, DistributedDataParallel)

    def sync_if(self, sync: bool) -> ContextManager:
        """DDP decides at forward time whether a backward all-reduces: wrap forward and backward."""
        return contextlib.nullcontext() if sync or not self.is_ddp else self.model.no_sync()

    def average(self, loss: torch.Tensor) -> torch.Tensor:
        """A micro-batch's share of the update's mean loss (the gradients add up over micro-batches)."""
        return loss / self.accum_steps if self.accum_steps > 1 else loss

    def losses(self, inputs: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses [B] (fp32) and the logits of one forward, in a fresh autocast context
        (never reuse one: autocast caches its casts of the weights)."""
        with torch.autocast(self.device_type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None):
            logits = self.model(inputs)
            losses = self.loss_fn(logits, targets)
        if losses.dim() != 1 or losses.shape[0] != inputs.shape[0]:
            raise ValueError(
                f'loss_fn must return per-sample losses of shape [{inputs.shape[0]}], got shape '
                f'{tuple(losses.shape)}: use esam_timm.losses (e.g. create_per_sample_loss) or a loss '
                f'with reduction="none".')
        return losses.float(), logits

    def backward(self, loss: torch.Tensor, inputs: Optional[Sequence[torch.Tensor]] = None) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward(inputs=inputs)

    def finish(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip_grad: Optional[float],
               clip_mode: str, guard_nonfinite: bool) -> Tuple[torch.Tensor, Dict[str, bool]]:
        """Unscale, measure and clip the final gradient, then step (through the scaler if any).

        With ``guard_nonfinite`` one host sync tells whether the loss and the final gradient are finite:
        a non-finite update is not applied (without a scaler) or is the scaler's own overflow skip.
        Returns the gradient norm (before clipping) and the guard's flags (empty without the guard).
        """
        params = [p for group in optimizer.param_groups for p in group['params']]
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        flags: Dict[str, bool] = {}
        if guard_nonfinite:
            finite = bool(torch.isfinite(grad_norm) & torch.isfinite(loss))
            flags = {'skipped_nonfinite': not finite and self.scaler is None,
                     'skipped_overflow': not finite and self.scaler is not None}
            if flags['skipped_nonfinite']:
                return grad_norm, flags
        if clip_grad is not None and clip_mode == 'norm':
            torch.nn.utils.clip_grads_with_norm_(params, clip_grad, grad_norm)  # the norm is computed once
        elif clip_grad is not None:
            dispatch_clip_grad(params, clip_grad, mode=clip_mode)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        return grad_norm, flags


def train_step(
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_fn: LossFn,
        *,
        accum_steps: int = 1,
        amp_dtype: Optional[torch.dtype] = None,
        scaler: Optional[torch.amp.GradScaler] = None,
        clip_grad: Optional[float] = None,
        clip_mode: str = 'norm',
        bn_mode: str = 'clean',
        guard_nonfinite: bool = False,
) -> Dict[str, Any]:
    """Run one full parameter update of ``model`` on a batch and return its statistics.

    Args:
        model: the model in train mode (plain, DDP-wrapped, channels-last or compiled).
        optimizer: an :class:`~esam_timm.ESAM` (also under timm's Lookahead) or any plain optimizer,
            which gets the ordinary single forward/backward step: one call benchmarks SGD, SAM and ESAM.
        inputs, targets: the batch; targets are class indices [B] or soft targets [B, C] (mixup).
        loss_fn: ``loss_fn(logits, targets)`` returning per-sample losses [B] (see :mod:`esam_timm.losses`).
        accum_steps: split the batch into this many equal micro-batches, one chain of passes each, and
            make one update from their averaged gradient (each micro-batch ascends and selects on its
            own, as a DDP rank does). B must be divisible by it.
        amp_dtype: autocast dtype (torch.bfloat16 or torch.float16), None for full precision.
        scaler: an fp16 ``torch.amp.GradScaler``; the step goes through ``scaler.step``/``update`` (once
            per update: an overflow in any micro-batch's final backward skips the whole update).
        clip_grad, clip_mode: clip the final gradient ('norm', 'value' or 'agc', as in timm).
        bn_mode: 'clean' (running stats end as the clean pass F1 left them) or 'all' (every pass
            updates them, as the authors' code did).
        guard_nonfinite: never apply an update whose loss or final gradient is not finite (costs one
            host sync per update). Without an fp16 scaler such an update is skipped and BatchNorm's running
            statistics are put back as they were before it; with a scaler, the scaler skips it as an
            overflow, as it always does. Under DDP the final gradient is all-reduced, so all ranks agree
            unless a rank's loss alone is non-finite with a finite gradient.

    Returns:
        Tensors (no host sync is made for them; call ``.item()`` when logging): ``loss`` (mean clean
        loss over the batch) and ``grad_norm`` (norm of the final, unscaled gradient). For SAM/ESAM also
        ``sharpness`` (mean of l_i(w+e) - l_i(w) over the batch; with SDS mode 'first-order' the mean
        of its estimate; absent with 'loss', which measures none), ``num_selected`` and
        ``selected_fraction`` (Python numbers, over the whole batch), ``perturb_norm`` (||e||) and
        ``ascent_grad_norm`` (means over the micro-batches) and ``skipped_ascents`` (the number of
        ascents a non-finite gradient skipped). An optimizer with ``step_stats()`` (``msam``) adds its
        own (``perturb_norm``). With ``guard_nonfinite``, two Python bools: ``skipped_nonfinite`` (no
        scaler; the update was not applied) and ``skipped_overflow`` (the fp16 scaler skipped it).
    """
    _check_options(amp_dtype, clip_mode, bn_mode, clip_grad)
    micro_batches = _micro_batches(inputs, targets, accum_steps)
    if scaler is not None and not scaler.is_enabled():
        scaler = None
    passes = _Passes(model, loss_fn, inputs.device.type, amp_dtype, scaler, len(micro_batches))
    optimizer.zero_grad(set_to_none=True)
    # a skipped non-finite update must leave no trace, also not in BatchNorm's running statistics
    guarded_buffers = _running_stat_buffers(model) if guard_nonfinite else []
    buffers_before = torch._foreach_clone(guarded_buffers) if guarded_buffers else []
    sam = find_sam(optimizer)
    if sam is None:
        clean = []
        for index, (x, y) in enumerate(micro_batches):
            with passes.sync_if(index == len(micro_batches) - 1):
                losses, _ = passes.losses(x, y)
                passes.backward(passes.average(losses.mean()))
            clean.append(losses.detach())
        loss = torch.cat(clean).mean()
        grad_norm, flags = passes.finish(optimizer, loss, clip_grad, clip_mode, guard_nonfinite)
        stats = {'loss': loss, 'grad_norm': grad_norm, **_optimizer_stats(optimizer), **flags}
    else:
        _refuse_sharded_model(model)
        try:
            stats = _sam_step(passes, sam, optimizer, micro_batches, clip_grad=clip_grad, clip_mode=clip_mode,
                              bn_mode=bn_mode, guard_nonfinite=guard_nonfinite)
        finally:
            sam.ascent_taken = False  # also when the scaler skipped the step: the next step needs a new ascent
    if stats.get('skipped_nonfinite') and guarded_buffers:
        torch._foreach_copy_(guarded_buffers, buffers_before)
    return stats


def _optimizer_stats(optimizer: torch.optim.Optimizer) -> Dict[str, torch.Tensor]:
    """Statistics an optimizer reports about its own last step (``step_stats()``, e.g. msam's
    ``perturb_norm``), found on it or inside wrappers such as timm's Lookahead."""
    while optimizer is not None:
        step_stats = getattr(optimizer, 'step_stats', None)
        if step_stats is not None:
            return step_stats()
        optimizer = getattr(optimizer, '_base_optimizer', None)
    return {}


def _micro_batches(inputs: torch.Tensor, targets: torch.Tensor,
                   accum_steps: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Split the batch into ``accum_steps`` equal micro-batches (views: channels-last stays so)."""
    batch_size = inputs.shape[0]
    if targets.shape[0] != batch_size:
        raise ValueError(f'inputs and targets disagree on the batch size: {batch_size} vs {targets.shape[0]}.')
    if not (isinstance(accum_steps, int) and accum_steps >= 1):
        raise ValueError(f'accum_steps={accum_steps!r} is invalid: it must be an integer >= 1.')
    if batch_size % accum_steps:
        divisors = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
        raise ValueError(f'accum_steps={accum_steps} does not divide the batch of {batch_size} into equal '
                         f'micro-batches; valid values for this batch: {divisors}.')
    size = batch_size // accum_steps
    return list(zip(inputs.split(size), targets.split(size)))


def _refuse_sharded_model(model: nn.Module) -> None:
    """FSDP (1 and 2) shard parameters and gradients; the ascent here needs them whole (docs/training.md).
    Both wrap the root module (FSDP2 requires ``fully_shard`` on the root), so the root is checked."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    if isinstance(model, (FSDPModule, FullyShardedDataParallel)):
        raise NotImplementedError(
            f'train_step got a model sharded with FSDP ({type(model).__name__}): ESAM\'s per-rank ascent '
            f'needs unsharded local gradients and the global ascent norm, which FSDP does not expose; it is '
            f'not supported yet. Use DistributedDataParallel (see docs/training.md, "FSDP2").')


def _stash_grads(params: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """Take the accumulated gradients out of ``.grad`` (by reference) so the next ascent starts clean."""
    stash = [p.grad for p in params]
    for p in params:
        p.grad = None
    return stash


def _unstash_grads(params: Sequence[torch.Tensor], stash: Sequence[Optional[torch.Tensor]]) -> None:
    """Put stashed gradients back; the next backward accumulates into them (and DDP reduces the sum)."""
    for p, grad in zip(params, stash):
        p.grad = grad


def _sam_step(passes: _Passes, sam: ESAM, optimizer: torch.optim.Optimizer,
              micro_batches: Sequence[Tuple[torch.Tensor, torch.Tensor]], *, clip_grad: Optional[float],
              clip_mode: str, bn_mode: str, guard_nonfinite: bool) -> Dict[str, Any]:
    micro_size = micro_batches[0][0].shape[0]
    k = num_selected(sam.gamma, micro_size)
    signal = None if k == micro_size else sam.sds_mode.signal
    stat_buffers = _running_stat_buffers(passes.model) if bn_mode == 'clean' else []
    drawn = sam.draw_swp()  # one draw per update, the paper's SWP
    head: List[torch.Tensor] = []
    tap = None
    if signal == 'first-order':
        classifier, tap = classifier_tap(passes.model)
        head = [p for p in (classifier.weight, classifier.bias) if p is not None]
        trainable = {id(p) for p in sam._params() if p.requires_grad}
        if id(head[0]) not in trainable:
            raise ValueError(f"SDS mode '{sam.sds}' needs the classifier's weight trainable and in the "
                             "optimizer (its ascent direction is the estimate's); use SDS mode 'exact' or "
                             "'loss'.")
    drawn_ids = {id(p) for p in drawn}
    head_only = [p for p in head if id(p) not in drawn_ids]
    plan = _AscentPlan(sam, signal, k, drawn, head, head_only, tap, stat_buffers)
    params = [p for group in optimizer.param_groups for p in group['params']]
    results = []
    for index, (inputs, targets) in enumerate(micro_batches):
        stash = _stash_grads(params) if index else [None] * len(params)
        results.append(_micro_step(passes, plan, inputs, targets, last=index == len(micro_batches) - 1,
                                   params=params, stash=stash))
    loss = torch.cat([r['clean'] for r in results]).mean()
    grad_norm, flags = passes.finish(optimizer, loss, clip_grad, clip_mode, guard_nonfinite)
    stats = {
        'loss': loss,
        'grad_norm': grad_norm,
        'num_selected': k * len(results),
        'selected_fraction': k / micro_size,
        'perturb_norm': _mean([r['perturb_norm'] for r in results]),
        'ascent_grad_norm': _mean([r['grad_norm'] for r in results]),
        'skipped_ascents': _sum([r['skipped_ascents'] for r in results]),
        **flags,
    }
    if signal != 'loss':
        stats['sharpness'] = torch.cat([r['sharpness'] for r in results]).mean()
    return stats


def _mean(values: Sequence[torch.Tensor]) -> torch.Tensor:
    return values[0] if len(values) == 1 else torch.stack(values).mean()


def _sum(values: Sequence[torch.Tensor]) -> torch.Tensor:
    return values[0] if len(values) == 1 else torch.stack(values).sum()


class _AscentPlan(NamedTuple):
    """What every micro-batch of one update shares: the SWP draw, k, the SDS signal, BN buffers."""
    sam: ESAM
    signal: Optional[str]  # None when k is the whole micro-batch (no selection)
    k: int
    drawn: List[torch.Tensor]
    head: List[torch.Tensor]  # the classifier's weight (and bias) for the first-order estimate
    head_only: List[torch.Tensor]  # those of them SWP did not draw: B1 computes their gradient, not perturbed
    tap: Optional[ClassifierTap]
    stat_buffers: List[torch.Tensor]  # BN running stats to keep as F1 left them (bn_mode='clean')


def _micro_step(passes: _Passes, plan: _AscentPlan, inputs: torch.Tensor, targets: torch.Tensor, *,
                last: bool, params: Sequence[torch.Tensor],
                stash: Sequence[Optional[torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """One micro-batch's ascent and final gradient: F1/B1, perturb, SDS, F3/B3 at ``w + e``, restore.

    The B3 gradient (scaled by 1 / accum_steps) accumulates into ``stash``, the earlier micro-batches'
    gradients, which go back into ``.grad`` just before B3. Only the last micro-batch's F3/B3 run outside
    DDP's ``no_sync``.
    """
    sam, signal = plan.sam, plan.signal
    rng = _RngFork(inputs.device)
    if plan.tap is not None:
        plan.tap.clear()
    with passes.sync_if(False):
        clean, logits = passes.losses(inputs, targets)  # F1
        if plan.drawn or plan.head_only:  # B1: the drawn tensors' gradients (and the classifier's)
            passes.backward(clean.mean(), inputs=plan.drawn + plan.head_only)
    clean = clean.detach()
    if plan.head:
        features, delta = _classifier_terms(passes, plan.tap, logits, targets)
        head_grads = _stash_grads(plan.head_only)  # a direction for the estimate, not part of the ascent
    del logits
    stats_after_clean = torch._foreach_clone(plan.stat_buffers) if plan.stat_buffers else []
    ascent = sam.perturb(skip_non_finite=passes.scaler is not None)
    try:
        if signal == 'exact':
            rng_after_clean = rng.get()
            rng.set(rng.start)  # F2 draws F1's dropout masks: delta_i measures sharpness, not noise
            with passes.sync_if(False), torch.no_grad():
                sharpness = passes.losses(inputs, targets)[0] - clean  # F2
            rng.set(rng_after_clean)
            score = sharpness
        elif signal == 'first-order':
            e_head = _classifier_ascent(sam, plan, head_grads, ascent)
            score = sharpness = first_order_sharpness(delta, features, e_head[0], e_head[1] if len(e_head) > 1 else None)
        elif signal == 'loss':
            score = clean
        if signal is not None:
            index = sam.sds_mode.select(score, clean, plan.k, targets)
            inputs, targets = _select(inputs, index), targets[index]
        _unstash_grads(params, stash)  # replaces e with the earlier micro-batches' gradients (or None)
        if signal is None:
            rng.set(rng.start)  # F3 covers F1's batch: same masks, so its losses give the sharpness
        with passes.sync_if(last):
            selected, _ = passes.losses(inputs, targets)  # F3
            passes.backward(passes.average(selected.mean()))  # B3, all-reduced under DDP when last
    finally:
        sam.restore()  # w is back bitwise before any step, also when a pass raised
        if plan.stat_buffers:
            torch._foreach_copy_(plan.stat_buffers, stats_after_clean)
    if signal is None:
        sharpness = selected.detach() - clean
    result = {'clean': clean, 'perturb_norm': ascent['perturb_norm'], 'grad_norm': ascent['grad_norm'],
              'skipped_ascents': ascent['skipped_ascents']}
    if signal != 'loss':
        result['sharpness'] = sharpness
    return result


def _classifier_ascent(sam: ESAM, plan: _AscentPlan, head_grads: Sequence[Optional[torch.Tensor]],
                       ascent: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
    """The classifier's ascent ``[e_W, e_b]`` for the first-order estimate, after ``perturb()``.

    A drawn classifier tensor's ``e`` is in its ``.grad``. One SWP did not draw gets the ascent it would
    have had from its own B1 gradient at the step's ascent scale (``rho / beta / ||g||``, read back from
    the ascent's statistics), used by the estimate only: the weights stay exactly at the paper's draw.
    """
    scale = torch.where(ascent['grad_norm'] > 0, ascent['perturb_norm'] / ascent['grad_norm'], 0.0)
    own = dict(zip(map(id, plan.head_only), head_grads))
    e_head = []
    for p in plan.head:
        if id(p) not in own:
            e_head.append(p.grad)
            continue
        grad = own[id(p)]
        if grad is None:
            e_head.append(torch.zeros_like(p))
            continue
        e = grad.float() * scale
        e_head.append(e * p.detach().float().square() if sam.adaptive else e)
    return e_head


def _classifier_terms(passes: _Passes, tap: ClassifierTap, logits: torch.Tensor,
                      targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first-order estimate's inputs from F1: the classifier's input ``h`` [B, D] and the logit
    gradients ``delta`` [B, C]. Checks, once per model, that the classifier's output is the model's."""
    features = tap.features
    if features is None or features.shape[0] != logits.shape[0]:
        raise RuntimeError(
            "SDS mode 'first-order' saw no classifier input in the first forward: the classifier hook "
            "is missing from the model's graph. With torch.compile, run the first ESAM step before any "
            "other call of the compiled model, or call esam_timm.head.classifier_tap(model) before "
            "compiling.")
    if not tap.verified:
        if tap.logits.shape != logits.shape or not torch.equal(tap.logits.float(), logits.detach().float()):
            raise ValueError(
                "SDS mode 'first-order' needs the classifier's output to be the model's output (the "
                f"logits), but the model changes it after its classifier ({tuple(tap.logits.shape)} -> "
                f"{tuple(logits.shape)}); use SDS mode 'exact' or 'loss'.")
        tap.verified = True
    return features, logit_grad(passes.loss_fn, logits, targets)

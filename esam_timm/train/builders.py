"""What a run is built from, each from the parsed flags: where it runs (device, ranks), the model (with
its EMA), the optimizer, the schedule, the compiled / DDP-wrapped model it trains, and the folder a new
run goes to. :class:`~esam_timm.train.trainer.Trainer` calls these once, in its setup; none of them
runs during training.
"""
import argparse
import inspect
import logging
import math
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from esam_timm.head import classifier_tap
from esam_timm.msam import find_msam
from esam_timm.optim import ESAM, find_sam
from esam_timm.registry import is_msam, is_sam_family, optimizer_kind

__all__ = ['Runtime', 'setup_runtime', 'resolve_lr', 'build_model', 'build_optimizer', 'build_scheduler',
           'wrap_model', 'describe_optimizer', 'run_location']

_logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Where this process runs: device, rank and world size, AMP dtype."""
    device: torch.device
    rank: int
    world_size: int
    amp_dtype: Optional[torch.dtype]

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(args: argparse.Namespace) -> Runtime:
    """Pick the device and join torchrun's process group (NCCL on GPUs, gloo on CPUs)."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    device = torch.device(args.device) if args.device else torch.device(
        'cuda' if torch.cuda.is_available() else 'cpu')
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', local_rank if world_size > 1 else 0)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    rank = 0
    if world_size > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
        rank = dist.get_rank()
        _logger.info('Process %d of %d on %s (%s)', rank, world_size, device, dist.get_backend())
    if args.sync_bn and world_size > 1 and device.type != 'cuda':
        raise ValueError('--sync-bn needs CUDA devices (torch SyncBatchNorm has no CPU kernel); '
                         'drop --sync-bn on the CPU')
    amp_dtype = {'bfloat16': torch.bfloat16, 'float16': torch.float16}[args.amp_dtype] if args.amp else None
    return Runtime(device=device, rank=rank, world_size=world_size, amp_dtype=amp_dtype)


def resolve_lr(args: argparse.Namespace, world_size: int) -> float:
    """``--lr`` if given, else ``--lr-base`` scaled to the global batch as timm does (linear, or sqrt
    for ada*/lamb optimizers, unless ``--lr-base-scale`` says otherwise)."""
    if args.lr is not None:
        return args.lr
    global_batch = args.batch_size * world_size * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    opt = (args.base_opt if is_sam_family(args.opt) or is_msam(args.opt) else args.opt).lower()
    scale = args.lr_base_scale or ('sqrt' if ('ada' in opt or 'lamb' in opt) else 'linear')
    if scale == 'sqrt':
        ratio = math.sqrt(ratio)
    return args.lr_base * ratio


def build_model(args: argparse.Namespace, num_classes: int, device: torch.device, *, distributed: bool,
                verbose: bool) -> Tuple[nn.Module, Dict[str, Any], Optional[nn.Module]]:
    """The timm model on ``device`` (pretrained or initial weights, head init, gradient checkpointing,
    SyncBatchNorm, channels-last), its data config (timm's ``resolve_data_config``) and the EMA (timm's
    ``ModelEmaV3``, or None)."""
    import timm
    from timm.data import resolve_data_config
    kwargs: Dict[str, Any] = dict(args.model_kwargs)
    if args.pretrained:
        if not os.path.isfile(args.pretrained_path):
            raise FileNotFoundError(f'--pretrained-path {args.pretrained_path!r} is not a file')
        kwargs['pretrained_cfg_overlay'] = dict(file=args.pretrained_path)
    if args.drop_block is not None:
        kwargs['drop_block_rate'] = args.drop_block
    if args.fast_norm:
        from timm.layers import set_fast_norm
        set_fast_norm()
    in_chans = args.input_size[0] if args.input_size else args.in_chans
    model = timm.create_model(
        args.model, pretrained=args.pretrained, num_classes=num_classes, in_chans=in_chans,
        drop_rate=args.drop, drop_path_rate=args.drop_path, global_pool=args.gp,
        bn_momentum=args.bn_momentum, bn_eps=args.bn_eps, **kwargs)
    if args.head_init_scale is not None or args.head_init_bias is not None:
        _init_head(model, args)
    if args.initial_checkpoint:
        from timm.models import load_checkpoint
        load_checkpoint(model, args.initial_checkpoint)
    if args.grad_checkpointing:
        try:
            model.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError, AttributeError) as e:
            raise ValueError(f'--grad-checkpointing: {args.model} does not support gradient checkpointing '
                             f'({type(e).__name__}: {e})') from e
    data_config = resolve_data_config(vars(args), model=model, verbose=verbose)
    if args.sync_bn and distributed:
        from timm.layers import convert_sync_batchnorm
        model = convert_sync_batchnorm(model)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    model_ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                               device='cpu' if args.model_ema_force_cpu else None)
    if verbose:
        n_params = sum(p.numel() for p in model.parameters())
        _logger.info('Model %s: %.2fM parameters, %d classes, input %s', args.model, n_params / 1e6, num_classes,
                     data_config['input_size'])
    return model, data_config, model_ema


def _init_head(model: nn.Module, args: argparse.Namespace) -> None:
    """timm's --head-init-scale / --head-init-bias on the classifier."""
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise ValueError(f'--head-init-scale/--head-init-bias need a linear classifier; {args.model}\'s '
                         f'is {type(head).__name__}')
    with torch.no_grad():
        if args.head_init_scale is not None:
            head.weight.mul_(args.head_init_scale)
            if head.bias is not None:
                head.bias.mul_(args.head_init_scale)
        if args.head_init_bias is not None and head.bias is not None:
            nn.init.constant_(head.bias, args.head_init_bias)


def build_optimizer(args: argparse.Namespace, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The optimizer from timm's factory: ``esam``/``sam``/``msam`` with their flags and ``--base-opt``,
    or any timm optimizer; ``--opt-kwargs`` last, so they override."""
    from timm.optim import create_optimizer_v2
    kwargs: Dict[str, Any] = {}
    if args.opt_eps is not None:
        kwargs['eps'] = args.opt_eps
    if args.opt_betas is not None:
        kwargs['betas'] = tuple(args.opt_betas)
    kind = optimizer_kind(args.opt)
    if is_sam_family(kind):
        kwargs.update(base_optimizer=args.base_opt, rho=args.rho, seed=args.seed)
        if kind == 'esam':
            kwargs.update(beta=args.esam_beta, gamma=args.esam_gamma, sds=args.esam_sds)
    elif is_msam(kind):
        kwargs.update(base_optimizer=args.base_opt, rho=args.rho)
    kwargs.update(args.opt_kwargs)
    return create_optimizer_v2(
        model, opt=args.opt, lr=lr, weight_decay=args.weight_decay, momentum=args.momentum,
        layer_decay=args.layer_decay, layer_decay_min_scale=args.layer_decay_min_scale,
        layer_decay_no_opt_scale=args.layer_decay_no_opt_scale, **kwargs)


def build_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer,
                    updates_per_epoch: int) -> Tuple[Optional[Any], int]:
    """timm's scheduler (None for ``--sched none``) and the number of epochs it runs (warm-up and
    cool-down included)."""
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    if args.sched == 'none':
        return None, args.epochs
    return create_scheduler_v2(optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
                               updates_per_epoch=updates_per_epoch)


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    """``ESAM(rho=..., beta=..., gamma=..., sds=..., base=SGD)``, ``MSAM(...)``, ``Lookahead(ESAM(...))``, or the
    class name of any other optimizer: the setup log's line."""
    sam: Optional[ESAM] = find_sam(optimizer)
    msam = find_msam(optimizer)
    if sam is not None:
        inner: Any = sam
        what = (f'{type(sam).__name__}(rho={sam.rho}, beta={sam.beta}, gamma={sam.gamma}, sds={sam.sds}, '
                f'base={type(sam.base_optimizer).__name__})')
    elif msam is not None:
        inner = msam
        what = f'MSAM(rho={msam.rho}, base={type(msam.base_optimizer).__name__})'
    else:
        return type(optimizer).__name__
    return what if optimizer is inner else f'{type(optimizer).__name__}({what})'


def wrap_model(args: argparse.Namespace, model: nn.Module, sam: Optional[ESAM], device: torch.device,
               distributed: bool) -> Tuple[nn.Module, nn.Module]:
    """torch.compile, then DDP around it (train_step finds DDP's no_sync on the outer module); returns the
    model to train and the one to evaluate."""
    if sam is not None and sam.sds_mode.signal == 'first-order':
        classifier_tap(model)  # checks the head now; a hook made before compiling is traced
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)
    if distributed:
        # torch >= 2.10 renames broadcast_buffers (same meaning after the init-time sync).
        sync_name = 'forward_sync_buffers' if 'forward_sync_buffers' in inspect.signature(
            DistributedDataParallel.__init__).parameters else 'broadcast_buffers'
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None,
                                        **{sync_name: not args.no_ddp_bb})
    return model, (model.module if isinstance(model, DistributedDataParallel) else model)


def run_location(args: argparse.Namespace) -> Tuple[str, str]:
    """(output root, experiment name) of a new run: ``--output`` and ``--experiment`` or date-model-size."""
    root = args.output or os.path.join('.', 'output', 'train')
    name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), args.model.replace('/', '_'),
        str(args.input_size[-1] if args.input_size else (args.img_size or 'default'))])
    return root, name

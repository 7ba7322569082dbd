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
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from esam_timm.head import classifier_tap
from esam_timm.msam import find_msam
from esam_timm.optim import ESAM, find_sam
from esam_timm.registry import is_msam, is_sam_family, optimizer_kind

__all__ = ['Launch', 'Runtime', 'pick_device', 'apply_speed_defaults', 'resolve_pin_memory', 'setup_runtime',
           'resolve_lr', 'build_model', 'build_optimizer', 'build_scheduler', 'wrap_model', 'describe_optimizer',
           'describe_lr', 'describe_placements', 'describe_precision', 'describe_data', 'run_location']

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Launch:
    """What torchrun (or SLURM through it) says about this process: its rank among all processes, its
    rank and the process count on this node, and the process count in all."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @classmethod
    def from_env(cls) -> 'Launch':
        """Read ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE`` (one process without them)."""
        world_size = int(os.environ.get('WORLD_SIZE', '1'))
        return cls(rank=int(os.environ.get('RANK', '0')), local_rank=int(os.environ.get('LOCAL_RANK', '0')),
                   world_size=world_size, local_world_size=int(os.environ.get('LOCAL_WORLD_SIZE', str(world_size))))


def pick_device(requested: str, launch: Launch, *, cuda_available: bool, cuda_count: int) -> Tuple[torch.device,
                                                                                                   Optional[str]]:
    """The device this process trains on, and a note for the log when it is not the one ``requested`` named.

    ``--device ''`` means cuda when available, else cpu. With one process a CUDA device keeps its index
    (``cuda`` is ``cuda:0``). With several, every process takes its own GPU, ``cuda:LOCAL_RANK``, as timm
    does, whatever index ``--device`` names (``cuda:0`` under torchrun would put every rank on GPU 0,
    where NCCL fails); when a scheduler shows each process only its own GPU (``CUDA_VISIBLE_DEVICES``
    per task, one visible device) that one is ``cuda:0``. Raises ValueError when the node has fewer
    visible GPUs than processes.
    """
    device = torch.device(requested or ('cuda' if cuda_available else 'cpu'))
    if device.type != 'cuda':
        return device, None
    if launch.world_size == 1:
        return torch.device('cuda', device.index or 0), None
    if cuda_count >= launch.local_world_size:
        index = launch.local_rank
    elif cuda_count == 1:
        index = 0
    else:
        raise ValueError(f'{launch.local_world_size} processes on this node, but it shows {cuda_count} CUDA '
                         f'device(s): start at most {cuda_count} processes per node (torchrun --nproc_per_node '
                         f'{cuda_count}), or give each process its own GPU')
    note = None
    if device.index is not None and device.index != index:
        note = (f'--device {requested} names one GPU, but {launch.world_size} processes train: each process uses '
                f'its own GPU, cuda:LOCAL_RANK (as timm does)')
    return torch.device('cuda', index), note


def apply_speed_defaults(device: torch.device, *, tf32: bool, cudnn_benchmark: bool) -> None:
    """timm's train.py defaults on CUDA: cuDNN picks the fastest convolution algorithms for each shape
    (``cudnn.benchmark``; ESAM's shapes are fixed per step) and fp32 matmuls and convolutions may run in
    TF32. ``--no-tf32`` / ``--no-cudnn-benchmark`` turn them off. Nothing changes on other devices."""
    if device.type != 'cuda':
        return
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def resolve_pin_memory(pin_mem: Optional[bool], device: torch.device) -> bool:
    """``--pin-mem``/``--no-pin-mem`` as given; by default pinned host memory when training on CUDA (faster,
    asynchronous host-to-device copies)."""
    return device.type == 'cuda' if pin_mem is None else pin_mem


@dataclass
class Runtime:
    """Where this process runs: device, rank and world size, AMP dtype, and where every process runs
    (``placements``: ``host device`` per rank, gathered once at start)."""
    device: torch.device
    rank: int
    world_size: int
    amp_dtype: Optional[torch.dtype]
    launch: Launch = Launch()
    placements: Tuple[str, ...] = ()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(args: argparse.Namespace) -> Runtime:
    """Pick this process's device (:func:`pick_device`), apply timm's CUDA speed defaults and join torchrun's
    process group (NCCL on GPUs, gloo on CPUs)."""
    launch = Launch.from_env()
    device, note = pick_device(args.device, launch, cuda_available=torch.cuda.is_available(),
                               cuda_count=torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if note and launch.rank == 0:
        _logger.warning('%s', note)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    apply_speed_defaults(device, tf32=args.tf32, cudnn_benchmark=args.cudnn_benchmark)
    rank = 0
    if launch.world_size > 1:
        if not dist.is_initialized():
            timeout = {} if args.dist_timeout is None else dict(timeout=timedelta(minutes=args.dist_timeout))
            dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo', **timeout)
        rank = dist.get_rank()
        _logger.info('Process %d of %d on %s (%s)', rank, launch.world_size, device, dist.get_backend())
    if args.sync_bn and launch.world_size > 1 and device.type != 'cuda':
        raise ValueError('--sync-bn needs CUDA devices (torch SyncBatchNorm has no CPU kernel); '
                         'drop --sync-bn on the CPU')
    amp_dtype = {'bfloat16': torch.bfloat16, 'float16': torch.float16}[args.amp_dtype] if args.amp else None
    placements = [f'{socket.gethostname()} {device}']
    if launch.world_size > 1:
        gathered: List[Any] = [None] * launch.world_size
        dist.all_gather_object(gathered, placements[0])
        placements = gathered
    return Runtime(device=device, rank=rank, world_size=launch.world_size, amp_dtype=amp_dtype, launch=launch,
                   placements=tuple(placements))


def describe_placements(placements: Sequence[str]) -> str:
    """``2 nodes: a cuda:0-7, b cuda:0-7``: each host with its processes' devices in rank order (runs of
    consecutive CUDA indices joined)."""
    hosts: Dict[str, List[str]] = {}
    for placement in placements:
        host, _, device = placement.partition(' ')
        hosts.setdefault(host, []).append(device)
    parts = []
    for host, devices in hosts.items():
        indices = [int(d.split(':')[1]) for d in devices if d.startswith('cuda:')]
        if len(indices) == len(devices) and len(devices) > 1 and indices == list(range(indices[0],
                                                                                       indices[0] + len(indices))):
            parts.append(f'{host} cuda:{indices[0]}-{indices[-1]}')
        else:
            parts.append(f'{host} {", ".join(devices)}')
    return f'{len(hosts)} node{"s" if len(hosts) > 1 else ""}: {"; ".join(parts)}'


def describe_lr(args: argparse.Namespace, world_size: int, lr: float) -> str:
    """How the run's lr came about: ``--lr`` as given, or ``--lr-base`` scaled to the global batch."""
    if args.lr is not None:
        return f'lr {lr:.4g} (--lr, used as given)'
    global_batch = args.batch_size * world_size * args.grad_accum_steps
    return (f'lr {lr:.4g} (--lr-base {args.lr_base:g} for {args.lr_base_size}, scaled {_lr_base_scale(args)} to '
            f'the global batch of {global_batch})')


def resolve_lr(args: argparse.Namespace, world_size: int) -> float:
    """``--lr`` if given, else ``--lr-base`` scaled to the global batch as timm does (linear, or sqrt
    for ada*/lamb optimizers, unless ``--lr-base-scale`` says otherwise)."""
    if args.lr is not None:
        return args.lr
    ratio = args.batch_size * world_size * args.grad_accum_steps / args.lr_base_size
    return args.lr_base * (math.sqrt(ratio) if _lr_base_scale(args) == 'sqrt' else ratio)


def _lr_base_scale(args: argparse.Namespace) -> str:
    """``--lr-base-scale``, or timm's choice for the (base) optimizer: sqrt for ada*/lamb, else linear."""
    opt = (args.base_opt if is_sam_family(args.opt) or is_msam(args.opt) else args.opt).lower()
    return args.lr_base_scale or ('sqrt' if ('ada' in opt or 'lamb' in opt) else 'linear')


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


def build_optimizer(args: argparse.Namespace, model: nn.Module, lr: float, *,
                    verbose: bool = True) -> torch.optim.Optimizer:
    """The optimizer from timm's factory: ``esam``/``sam``/``msam`` with their flags and ``--base-opt``,
    or any timm optimizer; ``--opt-kwargs`` last, so they override. ``verbose``: log advice (rank 0)."""
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
    kwargs.update(_layer_decay_kwargs(args, create_optimizer_v2))
    kwargs.update(args.opt_kwargs)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, layer_decay=args.layer_decay, **kwargs)
    if verbose:
        _warn_class_blind_selection(optimizer, model)
    return optimizer


def _warn_class_blind_selection(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Warn when ESAM selects the second pass's samples without keeping the class mix on a model cut into
    patches (ViT, DeiT, Swin, Mixer: timm gives them a ``patch_embed``): there the paper's top-k picked whole
    classes while the output did not yet depend on the input, and kept a small ViT near chance (issue 23)."""
    sam = find_sam(optimizer)
    if sam is None or sam.gamma >= 1.0 or sam.sds_mode.needs_labels or not hasattr(model, 'patch_embed'):
        return
    _logger.warning('ESAM selects by --esam-sds %s on %s, a patch-based model: on a small ViT this selection '
                    'took whole classes and held the model near chance (docs/benchmarks.md, "Vision Transformers"); '
                    '--esam-sds exact-balanced (or first-order-balanced) keeps each class\'s share of the batch',
                    sam.sds, type(model).__name__)


def _layer_decay_kwargs(args: argparse.Namespace, create_optimizer_v2: Any) -> Dict[str, Any]:
    """``--layer-decay-min-scale`` and ``--layer-decay-no-opt-scale`` for timm's factory, which has them only
    since a recent release: passed when set, and refused in one line when this timm lacks them."""
    import timm
    accepted = inspect.signature(create_optimizer_v2).parameters
    out: Dict[str, Any] = {}
    for name, default in (('layer_decay_min_scale', 0.0), ('layer_decay_no_opt_scale', None)):
        value = getattr(args, name)
        if value == default:
            continue
        if name not in accepted:
            raise ValueError(f'--{name.replace("_", "-")} {value}: timm {timm.__version__} has no {name} in '
                             f'create_optimizer_v2; drop the flag or use a newer timm')
        out[name] = value
    return out


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


def describe_precision(args: argparse.Namespace, amp_dtype: Optional[torch.dtype], device: torch.device) -> str:
    """``bf16 autocast, TF32 on, cudnn.benchmark on; channels-last; eager (no torch.compile)``."""
    text = {torch.bfloat16: 'bf16 autocast', torch.float16: 'fp16 autocast + GradScaler'}.get(amp_dtype, 'fp32')
    if device.type == 'cuda':
        text += f', TF32 {"on" if args.tf32 else "off"}, cudnn.benchmark {"on" if args.cudnn_benchmark else "off"}'
    layout = 'channels-last' if args.channels_last else 'contiguous (NCHW)'
    compiled = (f'torch.compile {args.torchcompile} (mode {args.torchcompile_mode or "default"})'
                if args.torchcompile else 'eager (no torch.compile)')
    return f'{text}; {layout}; {compiled}'


def describe_data(args: argparse.Namespace, data_dir: str, device: torch.device) -> str:
    """``'wds/' from DIR, decode fast, 8 workers per process, pinned host memory``."""
    pinned = ', pinned host memory' if resolve_pin_memory(args.pin_mem, device) else ''
    return f'{args.dataset!r} from {data_dir}, decode {args.decode}, {args.workers} workers per process{pinned}'


def run_location(args: argparse.Namespace) -> Tuple[str, str]:
    """(output root, experiment name) of a new run: ``--output`` and ``--experiment`` or date-model-size."""
    root = args.output or os.path.join('.', 'output', 'train')
    name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), args.model.replace('/', '_'),
        str(args.input_size[-1] if args.input_size else (args.img_size or 'default'))])
    return root, name

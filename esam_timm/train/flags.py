"""Every flag of ``train_esam.py``, declared once: how argparse reads it, which values are valid, which
optimizers read it, what it needs to have an effect, and whether a resumed run may change it.

:mod:`esam_timm.train.config` builds the parser, validates the values and warns about flags a run
ignores from this one table (:data:`FLAGS`). Flag names and meanings follow timm's ``train.py``; ESAM
adds ``--rho``, ``--esam-beta``, ``--esam-gamma``, ``--esam-sds`` and ``--esam-bn-mode``.
"""
import argparse
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, Optional, Sequence, Tuple, Union

import yaml

from esam_timm.data.backends import DECODES, backend_for
from esam_timm.msam import DEFAULT_RHO as MSAM_DEFAULT_RHO
from esam_timm.optim import DEFAULT_BETA, DEFAULT_GAMMA, WRAPPER_NAMES
from esam_timm.optim import DEFAULT_RHO as SAM_DEFAULT_RHO
from esam_timm.registry import is_msam, optimizer_kind
from esam_timm.selection import list_sds_modes
from esam_timm.step import BN_MODES, CLIP_MODES

__all__ = ['Flag', 'FLAGS', 'Range', 'Positive', 'OneOf', 'Finite', 'RESUME_AUTO', 'RESUME_FREE_FLAGS',
           'flag_for', 'kv_pair']

RESUME_AUTO = 'auto'
_CLASS_MAP_EXTS = ('.txt', '.pkl')  # what timm's load_class_map reads

# A check gets the flag's name (``--esam-beta``), its value and all arguments; it returns the error
# message, or None when the value is valid.
Check = Callable[[str, Any, argparse.Namespace], Optional[str]]


@dataclass(frozen=True)
class Range:
    """A number in [lo, hi] (either end open); None passes."""
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def __call__(self, option: str, value: Any, args: argparse.Namespace) -> Optional[str]:
        if value is None:
            return None
        ok = (self.lo < value if self.lo_open else self.lo <= value) and (
            value < self.hi if self.hi_open else value <= self.hi)
        if ok and math.isfinite(value):
            return None
        return (f'{option} must be in {"(" if self.lo_open else "["}{self.lo}, {self.hi}'
                f'{")" if self.hi_open else "]"}, got {value}')


@dataclass(frozen=True)
class Positive:
    """A finite number > 0 (>= 0 with ``or_zero``); None passes."""
    or_zero: bool = False

    def __call__(self, option: str, value: Any, args: argparse.Namespace) -> Optional[str]:
        if value is None:
            return None
        ok = value >= 0 if self.or_zero else value > 0
        return None if ok and math.isfinite(value) else \
            f'{option} must be {">= 0" if self.or_zero else "> 0"}, got {value}'


@dataclass(frozen=True)
class OneOf:
    """One of ``choices`` (a sequence, or a function giving one when asked: registries that grow); None
    passes."""
    choices: Union[Sequence[Any], Callable[[], Sequence[Any]]]

    def __call__(self, option: str, value: Any, args: argparse.Namespace) -> Optional[str]:
        if value is None:
            return None
        choices = list(self.choices() if callable(self.choices) else self.choices)
        return None if value in choices else f'{option} must be one of {choices}, got {value!r}'


@dataclass(frozen=True)
class Finite:
    """A finite number; None passes."""

    def __call__(self, option: str, value: Any, args: argparse.Namespace) -> Optional[str]:
        return None if value is None or math.isfinite(value) else f'{option} must be a finite number, got {value}'


@dataclass(frozen=True)
class Flag:
    """One flag: argparse's reading (``names``, ``default``, ``type``, ``nargs``, ``const``, ``action``,
    ``metavar``, ``help``), its ``checks``, the optimizer kinds that read it (``used_by``: 'esam', 'sam',
    'msam'; None = every optimizer), the flag without which it does nothing (``needs``), whether a resumed
    run may change it (``resume_free``), and for a None default the value the run takes instead
    (``resolve``, e.g. each optimizer's own ``--rho``)."""
    names: Tuple[str, ...]
    group: str
    default: Any = None
    type: Optional[Callable[[str], Any]] = None
    nargs: Union[int, str, None] = None
    const: Any = None
    action: Any = None  # an argparse action name or class
    metavar: Optional[str] = None
    help: Optional[str] = None
    checks: Tuple[Check, ...] = ()
    used_by: Optional[FrozenSet[str]] = None
    needs: Optional[str] = None
    resume_free: bool = False
    resolve: Optional[Callable[[argparse.Namespace], Any]] = None

    @property
    def dest(self) -> str:
        """The attribute argparse stores it under (its first long name)."""
        long = [n for n in self.names if n.startswith('--')]
        return (long[0] if long else self.names[0]).lstrip('-').replace('-', '_')

    @property
    def option(self) -> str:
        """The name messages use: ``--esam-beta`` (or ``data`` for the positional)."""
        return self.dest if not self.names[0].startswith('-') else '--' + self.dest.replace('_', '-')

    def argparse_kwargs(self) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = dict(default=self.default)
        for key in ('type', 'nargs', 'const', 'action', 'metavar', 'help'):
            value = getattr(self, key)
            if value is not None:
                kwargs[key] = value
        return kwargs


def kv_pair(text: str) -> Tuple[str, Any]:
    """Parse ``key=value`` for ``--opt-kwargs``/``--model-kwargs``; the value is read as YAML."""
    if '=' not in text:
        raise argparse.ArgumentTypeError(f'expected key=value, got {text!r}')
    key, value = text.split('=', 1)
    if not key:
        raise argparse.ArgumentTypeError(f'expected key=value with a non-empty key, got {text!r}')
    return key, yaml.safe_load(value)


# ----------------------------------------------------------------------- checks of one flag's kind
def _timm_model(option: str, value: Any, args: argparse.Namespace) -> Optional[str]:
    import timm
    return None if timm.is_model(value) else (f'{option} {value!r} is not a timm model; list them with '
                                               f'timm.list_models(), or register yours with timm.models.register_model')


def _known_optimizer(option: str, value: Any, args: argparse.Namespace) -> Optional[str]:
    from timm.optim import list_optimizers
    if optimizer_kind(value) in set(list_optimizers()) | set(WRAPPER_NAMES):
        return None
    return (f'{option} {value!r} is not an optimizer timm knows; use esam, sam, msam or one of '
            f'timm.optim.list_optimizers()')


def _not_a_wrapper(option: str, value: Any, args: argparse.Namespace) -> Optional[str]:
    return None if optimizer_kind(value) not in WRAPPER_NAMES else \
        f'{option} {value!r} cannot be esam/sam/msam itself; use e.g. sgd or adamw'


def _all_positive(option: str, value: Any, args: argparse.Namespace) -> Optional[str]:
    return None if value is None or all(v > 0 for v in value) else f'{option} values must be > 0, got {value}'


def _one_or_three(option: str, value: Any, args: argparse.Namespace) -> Optional[str]:
    return None if value is None or len(value) in (1, 3) else f'{option} needs 1 or 3 values, got {len(value)}'


def _scale_range(option: str, value: Any, args: argparse.Namespace) -> Optional[str]:
    return None if 0 < value[0] <= value[1] <= 1 else f'{option} must be two values 0 < lo <= hi <= 1, got {value}'


def _ratio_range(option: str, value: Any, args: argparse.Namespace) -> Optional[str]:
    return None if 0 < value[0] <= value[1] else f'{option} must be two values 0 < lo <= hi, got {value}'


def _torchcompile_mode(option: str, value: Any, args: argparse.Namespace) -> Optional[str]:
    if value is None:
        return None
    from torch._inductor import list_mode_options
    return OneOf(list(list_mode_options()))(option, value, args)


# ---------------------------------------------------------------- checks against other flags' values
def _needs_pretrained_path(option: str, value: Any, args: argparse.Namespace) -> Optional[str]:
    return None if not value or args.pretrained_path else (
        '--pretrained needs --pretrained-path FILE: weights are only loaded from a local file, never downloaded')


def _before_last_epoch(option: str, value: Any, args: argparse.Namespace) -> Optional[str]:
    return None if value is None or 0 <= value < args.epochs else \
        f'{option} must be in [0, --epochs={args.epochs}), got {value}'


def _auto_needs_experiment(option: str, value: Any, args: argparse.Namespace) -> Optional[str]:
    return None if value != RESUME_AUTO or args.experiment else (
        f'{option} {RESUME_AUTO} needs --experiment NAME: it resumes the newest run of that experiment (the '
        f'default folder name holds the start time, so no earlier run has it)')


def _dataset_name(option: str, value: Any, args: argparse.Namespace) -> Optional[str]:
    return None if value in ('', 'folder', 'imagefolder') or '/' in value else (
        f'{option} {value!r}: use wds/<name> for shards, an empty string for an ImageFolder, or a timm dataset '
        f'name like torch/cifar10')


def _some_data(option: str, value: Any, args: argparse.Namespace) -> Optional[str]:
    return None if value or args.demo else \
        'no data: give --data-dir DIR (or the positional DIR), or --demo for the built-in demo dataset'


def _demo_reads_shards(option: str, value: Any, args: argparse.Namespace) -> Optional[str]:
    return None if not value or backend_for(args.dataset) is backend_for('wds/') else \
        f'{option} trains on WebDataset shards; it needs --dataset wds/..., got {args.dataset!r}'


def _class_map_file(option: str, value: Any, args: argparse.Namespace) -> Optional[str]:
    if not value:
        return None
    if os.path.splitext(value)[1].lower() not in _CLASS_MAP_EXTS:
        return f'{option} {value!r}: timm reads {" or ".join(_CLASS_MAP_EXTS)} class maps'
    under_data_dir = bool(args.data_dir) and os.path.isfile(os.path.join(args.data_dir, value))
    if os.path.isfile(value) or under_data_dir:
        return None
    return f'{option} {value!r} is not a file, neither as given nor under --data-dir {args.data_dir!r}'


def _needs_log_wandb(option: str, value: Any, args: argparse.Namespace) -> Optional[str]:
    return None if not value or args.log_wandb else f'{option} needs --log-wandb'


def _rho_for(args: argparse.Namespace) -> float:
    """Each optimizer's own radius: msam's rho is ||w~ - w|| itself."""
    return MSAM_DEFAULT_RHO if is_msam(args.opt) else SAM_DEFAULT_RHO


_FRACTION = Range(0., 1.)
_SHARE = Range(0., 1., lo_open=True)
_POSITIVE = Positive()
_NON_NEGATIVE = Positive(or_zero=True)
_INTERPOLATIONS = ('', 'random', 'bilinear', 'bicubic', 'nearest', 'lanczos', 'box', 'hamming')
_SAM = frozenset({'esam', 'sam', 'msam'})
_ESAM = frozenset({'esam'})

_D, _M, _O, _L, _A, _S, _X = ('Dataset', 'Model', 'Optimizer', 'Learning rate schedule',
                              'Augmentation and regularization', 'Flatness (esam_timm.sharpness)', 'Misc')

FLAGS: Tuple[Flag, ...] = (
    # ------------------------------------------------------------------------------------ Dataset
    Flag(('data',), _D, nargs='?', metavar='DIR', help='path to dataset (positional, same as --data-dir)',
         resume_free=True),
    Flag(('--data-dir',), _D, metavar='DIR', checks=(_some_data,), resume_free=True,
         help='dataset root: a folder with _info.json + shards (wds), an ImageFolder root, or a shard pattern'),
    Flag(('--dataset',), _D, default='wds/', metavar='NAME', checks=(_dataset_name,),
         help="'wds/<name>' for WebDataset shards, '' for an ImageFolder, or any timm dataset name (e.g. "
              "torch/cifar10)"),
    Flag(('--train-split',), _D, default='train', metavar='NAME'),
    Flag(('--val-split',), _D, default='validation', metavar='NAME', help="validation split; '' skips validation"),
    Flag(('--train-num-samples',), _D, type=int, metavar='N', help='override the number of training samples (wds)'),
    Flag(('--max-bad-fraction',), _D, default=0.01, type=float, metavar='F', checks=(_FRACTION,), resume_free=True,
         help='stop when more than this share of an epoch\'s samples is unreadable (corrupt images, missing '
              'labels, broken shards); every epoch reports the counts (default 0.01)'),
    Flag(('--val-num-samples',), _D, type=int, metavar='N', help='override the number of validation samples (wds)'),
    Flag(('--dataset-download',), _D, default=False, action='store_true', help='let timm download torch/* datasets'),
    Flag(('--class-map',), _D, default='', metavar='FILE', checks=(_class_map_file,),
         help='class name -> label index map, timm\'s format: .txt (one class name per line, index = line '
              'number) or .pkl (a dict); found as given or under --data-dir'),
    Flag(('--decode',), _D, default='pil', metavar='HOW', checks=(OneOf(DECODES),), resume_free=True,
         help="how training images are decoded (WebDataset shards): 'pil' (timm's transform in the loader "
              "workers), 'fast' (the same crops, flips and jitter, decoded by TorchCodec or at reduced size in "
              "the workers; on a GPU the jitter runs on the batch there) or 'gpu' (TorchCodec's nvJPEG on the "
              "CUDA device, a batch ahead of the step; the workers only parse headers and draw crops); fast and "
              "gpu need TorchCodec"),
    Flag(('--demo',), _D, default=False, action='store_true', checks=(_demo_reads_shards,),
         help='build the built-in demo dataset in <output>/demo-data and train on it'),
    # -------------------------------------------------------------------------------------- Model
    Flag(('--model',), _M, default='resnet50', metavar='NAME', checks=(_timm_model,), help='any timm model name'),
    Flag(('--pretrained',), _M, default=False, action='store_true', checks=(_needs_pretrained_path,),
         help='start from pretrained weights (needs --pretrained-path; no hub downloads)'),
    Flag(('--pretrained-path',), _M, metavar='FILE', help='local file with pretrained weights for --pretrained'),
    Flag(('--initial-checkpoint',), _M, default='', metavar='FILE',
         help='load these model weights before training (no optimizer state)'),
    Flag(('--resume',), _M, default='', metavar='FILE', checks=(_auto_needs_experiment,), resume_free=True,
         help='resume the full training state from a checkpoint and continue its run in that checkpoint\'s '
              'folder; "auto": the newest checkpoint of --experiment (suffixed folders <name>-N included) whose '
              'run had the same settings, or a new run when there is none'),
    Flag(('--no-resume-opt',), _M, default=False, action='store_true', resume_free=True,
         help='with --resume, do not restore optimizer, scaler and scheduler state'),
    Flag(('--num-classes',), _M, type=int, metavar='N', checks=(_POSITIVE,)),
    Flag(('--gp',), _M, metavar='POOL', help='global pool type'),
    Flag(('--img-size',), _M, type=int, metavar='N', checks=(_POSITIVE,), help='image size'),
    Flag(('--in-chans',), _M, type=int, metavar='N', checks=(_POSITIVE,)),
    Flag(('--input-size',), _M, nargs=3, type=int, metavar='N', checks=(_all_positive,),
         help='input size C H W (overrides --img-size and --in-chans)'),
    Flag(('--crop-pct',), _M, type=float, metavar='PCT', checks=(_SHARE,), help='validation center crop fraction'),
    Flag(('--mean',), _M, type=float, nargs='+', metavar='MEAN', checks=(_one_or_three,)),
    Flag(('--std',), _M, type=float, nargs='+', metavar='STD', checks=(_one_or_three, _all_positive)),
    Flag(('--interpolation',), _M, default='', type=str, metavar='NAME', checks=(OneOf(_INTERPOLATIONS),),
         help='resize interpolation (default: the model\'s)'),
    Flag(('-b', '--batch-size'), _M, default=128, type=int, metavar='N', checks=(_POSITIVE,), resume_free=True,
         help='batch size per process'),
    Flag(('-vb', '--validation-batch-size'), _M, type=int, metavar='N', checks=(_POSITIVE,)),
    Flag(('--channels-last',), _M, default=False, action='store_true'),
    Flag(('--grad-accum-steps',), _M, default=1, type=int, metavar='N', checks=(_POSITIVE,), resume_free=True,
         help='micro-batches of --batch-size per update; each does its own ESAM ascent and selection, as a DDP '
              'rank does (global batch = b x processes x N)'),
    Flag(('--grad-checkpointing',), _M, default=False, action='store_true',
         help='recompute activations in the backward pass through the model\'s blocks '
              '(model.set_grad_checkpointing): less memory, more compute'),
    Flag(('--fast-norm',), _M, default=False, action='store_true',
         help='timm\'s fast, lower-precision LayerNorm/GroupNorm (timm.layers.set_fast_norm)'),
    Flag(('--model-kwargs',), _M, default={}, nargs='*', type=kv_pair, metavar='K=V',
         help='extra timm.create_model keyword arguments'),
    Flag(('--head-init-scale',), _M, type=float, metavar='SCALE', checks=(Finite(),),
         help='multiply the classifier\'s initial weight and bias by this'),
    Flag(('--head-init-bias',), _M, type=float, metavar='BIAS', checks=(Finite(),),
         help='set the classifier\'s initial bias to this value'),
    Flag(('--torchcompile',), _M, nargs='?', type=str, const='inductor', metavar='BACKEND',
         help='torch.compile the model (default backend inductor)'),
    Flag(('--torchcompile-mode',), _M, type=str, metavar='MODE', checks=(_torchcompile_mode,), needs='torchcompile',
         help='torch.compile mode with --torchcompile: default, reduce-overhead, max-autotune, ... '
              '(torch._inductor.list_mode_options()); default: torch\'s'),
    # ---------------------------------------------------------------------------------- Optimizer
    Flag(('--opt',), _O, default='esam', metavar='NAME', checks=(_known_optimizer,),
         help="optimizer: esam, sam, msam (Momentum-SAM: one pass, SGD's cost), or any timm optimizer (sgd, "
              "adamw, ...); esam/sam/msam use --base-opt"),
    Flag(('--base-opt',), _O, default='sgd', metavar='NAME', checks=(_known_optimizer, _not_a_wrapper),
         help='base optimizer that ESAM/SAM/MSAM wraps (msam: sgd, nesterov, momentum, adam, adamw)'),
    Flag(('--opt-eps',), _O, type=float, metavar='EPS'),
    Flag(('--opt-betas',), _O, type=float, nargs='+', metavar='BETA'),
    Flag(('--momentum',), _O, default=0.9, type=float, metavar='M', checks=(_NON_NEGATIVE,)),
    Flag(('--weight-decay',), _O, default=2e-5, type=float, checks=(_NON_NEGATIVE,)),
    Flag(('--clip-grad',), _O, type=float, metavar='NORM', checks=(_POSITIVE,),
         help='clip the final gradient (off by default)'),
    Flag(('--clip-mode',), _O, default='norm', type=str, checks=(OneOf(CLIP_MODES),), help="'norm', 'value' or 'agc'"),
    Flag(('--layer-decay',), _O, type=float, metavar='RATE'),
    Flag(('--layer-decay-min-scale',), _O, default=0.0, type=float, metavar='SCALE', checks=(_FRACTION,),
         needs='layer_decay', help='with --layer-decay: lower bound of a layer\'s lr scale'),
    Flag(('--layer-decay-no-opt-scale',), _O, type=float, metavar='SCALE', checks=(_FRACTION,), needs='layer_decay',
         help='with --layer-decay: freeze the layers whose lr scale is below this'),
    Flag(('--opt-kwargs',), _O, default={}, nargs='*', type=kv_pair, metavar='K=V',
         help='extra optimizer keyword arguments'),
    Flag(('--rho',), _O, type=float, checks=(_POSITIVE,), used_by=_SAM, resolve=_rho_for,
         help=f'perturbation radius (default: {SAM_DEFAULT_RHO} for esam/sam, {MSAM_DEFAULT_RHO} for msam, '
              f'whose ||w~ - w|| is rho)'),
    Flag(('--esam-beta',), _O, default=DEFAULT_BETA, type=float, checks=(_SHARE,), used_by=_ESAM,
         help='ESAM share of weight tensors perturbed (SWP); 1 = all; the default is the paper\'s, shared with '
              'ESAM() and create_optimizer_v2(model, \'esam\')'),
    Flag(('--esam-gamma',), _O, default=DEFAULT_GAMMA, type=float, checks=(_SHARE,), used_by=_ESAM,
         help='ESAM share of samples kept for the second pass (SDS); 1 = all; the default is the paper\'s'),
    Flag(('--esam-sds',), _O, default='exact', type=str, metavar='MODE', checks=(OneOf(list_sds_modes),),
         used_by=_ESAM,
         help="how ESAM picks the samples of its second pass: a signal, 'exact' (the paper: an extra no-grad "
              "forward measures each sample's sharpness), 'first-order' (an estimate from the classifier layer, "
              "no extra forward) or 'loss' (highest clean loss); the first two take a rule for noisy labels: "
              "'-relative' (sharpness over clean loss) or '-trim' (the highest-loss 20%% never selected), "
              "e.g. 'first-order-relative'"),
    Flag(('--esam-bn-mode',), _O, default='clean', type=str, checks=(OneOf(BN_MODES),),
         used_by=frozenset({'esam', 'sam'}),
         help="BatchNorm running stats under ESAM: 'clean' (from the clean pass only) or 'all' (every pass, as the "
              "authors' code)"),
    # --------------------------------------------------------------------------- Learning rate schedule
    Flag(('--sched',), _L, default='cosine', type=str, metavar='NAME',
         checks=(OneOf(('cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', 'wsd', 'none')),),
         help='timm scheduler: cosine, tanh, step, multistep, plateau, poly, none'),
    Flag(('--sched-on-updates',), _L, default=False, action='store_true',
         help='step the schedule every optimizer update instead of every epoch'),
    Flag(('--lr',), _L, type=float, metavar='LR', checks=(_POSITIVE,),
         help='learning rate; default: --lr-base scaled by the global batch size'),
    Flag(('--lr-base',), _L, default=0.1, type=float, metavar='LR', checks=(_POSITIVE,),
         help='base learning rate for a global batch of --lr-base-size'),
    Flag(('--lr-base-size',), _L, default=256, type=int, metavar='N', checks=(_POSITIVE,)),
    Flag(('--lr-base-scale',), _L, default='', type=str, checks=(OneOf(('', 'linear', 'sqrt')),),
         help="'linear' or 'sqrt' (default: sqrt for ada*/lamb, else linear)"),
    Flag(('--lr-noise',), _L, type=float, nargs='+', metavar='PCT'),
    Flag(('--lr-noise-pct',), _L, default=0.67, type=float),
    Flag(('--lr-noise-std',), _L, default=1.0, type=float),
    Flag(('--lr-cycle-mul',), _L, default=1.0, type=float),
    Flag(('--lr-cycle-decay',), _L, default=0.5, type=float),
    Flag(('--lr-cycle-limit',), _L, default=1, type=int),
    Flag(('--lr-k-decay',), _L, default=1.0, type=float),
    Flag(('--warmup-lr',), _L, default=1e-5, type=float, checks=(_NON_NEGATIVE,)),
    Flag(('--min-lr',), _L, default=0.0, type=float, checks=(_NON_NEGATIVE,)),
    Flag(('--epochs',), _L, default=300, type=int, checks=(_POSITIVE,), resume_free=True),
    Flag(('--start-epoch',), _L, type=int, metavar='N', checks=(_before_last_epoch,), resume_free=True,
         help='epoch to start at (also overrides the resumed epoch)'),
    Flag(('--decay-milestones',), _L, default=[90, 180, 270], type=int, nargs='+'),
    Flag(('--decay-epochs',), _L, default=90.0, type=float),
    Flag(('--warmup-epochs',), _L, default=5, type=int, checks=(_NON_NEGATIVE,)),
    Flag(('--warmup-prefix',), _L, default=False, action='store_true'),
    Flag(('--cooldown-epochs',), _L, default=0, type=int),
    Flag(('--patience-epochs',), _L, default=10, type=int),
    Flag(('--decay-rate', '--dr'), _L, default=0.1, type=float),
    # ------------------------------------------------------------------ Augmentation and regularization
    Flag(('--no-aug',), _A, default=False, action='store_true',
         help='no training augmentation (resize + center crop only)'),
    Flag(('--scale',), _A, default=[0.08, 1.0], type=float, nargs=2, metavar='PCT', checks=(_scale_range,),
         help='random resized crop area range'),
    Flag(('--ratio',), _A, default=[3. / 4., 4. / 3.], type=float, nargs=2, metavar='RATIO', checks=(_ratio_range,),
         help='random resized crop aspect ratio range'),
    Flag(('--hflip',), _A, default=0.5, type=float, checks=(_FRACTION,)),
    Flag(('--vflip',), _A, default=0.0, type=float, checks=(_FRACTION,)),
    Flag(('--color-jitter',), _A, default=0.4, type=float, metavar='PCT', checks=(_NON_NEGATIVE,)),
    Flag(('--aa',), _A, type=str, metavar='NAME', help='auto augment policy, e.g. rand-m9-mstd0.5-inc1'),
    Flag(('--reprob',), _A, default=0.0, type=float, metavar='PCT', checks=(_FRACTION,), help='random erase prob'),
    Flag(('--remode',), _A, default='pixel', type=str, checks=(OneOf(('const', 'rand', 'pixel')),),
         help='random erase mode'),
    Flag(('--recount',), _A, default=1, type=int, checks=(_POSITIVE,), help='random erase count'),
    Flag(('--mixup',), _A, default=0.0, type=float, checks=(_NON_NEGATIVE,), help='mixup alpha (0 = off)'),
    Flag(('--cutmix',), _A, default=0.0, type=float, checks=(_NON_NEGATIVE,), help='cutmix alpha (0 = off)'),
    Flag(('--cutmix-minmax',), _A, type=float, nargs=2),
    Flag(('--mixup-prob',), _A, default=1.0, type=float, checks=(_FRACTION,)),
    Flag(('--mixup-switch-prob',), _A, default=0.5, type=float, checks=(_FRACTION,)),
    Flag(('--mixup-mode',), _A, default='batch', type=str, checks=(OneOf(('batch', 'pair', 'elem')),)),
    Flag(('--mixup-off-epoch',), _A, default=0, type=int, metavar='N', checks=(_NON_NEGATIVE,),
         help='turn mixup off after this epoch (0 = never)'),
    Flag(('--smoothing',), _A, default=0.1, type=float, checks=(Range(0, 1, hi_open=True),), help='label smoothing'),
    Flag(('--bce-loss',), _A, default=False, action='store_true'),
    Flag(('--bce-sum',), _A, default=False, action='store_true'),
    Flag(('--bce-target-thresh',), _A, type=float),
    Flag(('--bce-pos-weight',), _A, type=float),
    Flag(('--train-interpolation',), _A, default='random', type=str, checks=(OneOf(_INTERPOLATIONS),)),
    Flag(('--drop',), _A, default=0.0, type=float, metavar='PCT', checks=(_FRACTION,), help='dropout rate'),
    Flag(('--drop-path',), _A, type=float, metavar='PCT', checks=(_FRACTION,), help='drop path rate'),
    Flag(('--drop-block',), _A, type=float, metavar='PCT', checks=(_FRACTION,),
         help='drop block rate (models that take drop_block_rate, e.g. ResNets)'),
    Flag(('--bn-momentum',), _A, type=float),
    Flag(('--bn-eps',), _A, type=float),
    Flag(('--sync-bn',), _A, default=False, action='store_true', help='SyncBatchNorm (DDP only)'),
    Flag(('--dist-bn',), _A, default='', type=str, metavar='MODE', checks=(OneOf(('', 'broadcast', 'reduce')),),
         help="after each epoch make BatchNorm running stats equal across DDP ranks: 'reduce' (average them), "
              "'broadcast' (rank 0's) or '' (leave each rank's; timm's default is 'reduce'); off with --sync-bn"),
    Flag(('--model-ema',), _A, default=False, action='store_true', help='keep an EMA of the weights'),
    Flag(('--model-ema-decay',), _A, default=0.9998, type=float, checks=(_FRACTION,), needs='model_ema'),
    Flag(('--model-ema-warmup',), _A, default=False, action='store_true', needs='model_ema'),
    Flag(('--model-ema-force-cpu',), _A, default=False, action='store_true', needs='model_ema',
         help='keep the EMA weights on the CPU and do not validate them'),
    # ----------------------------------------------------------------------------------- Flatness
    Flag(('--sharpness-interval',), _S, default=0, type=int, metavar='N', checks=(_NON_NEGATIVE,), resume_free=True,
         help='every N epochs (and after the last) measure the top Hessian eigenvalue and m-sharpness on fixed '
              'validation batches, shared by all processes (0 = off)'),
    Flag(('--sharpness-batches',), _S, default=2, type=int, metavar='N', checks=(_POSITIVE,), resume_free=True,
         help='validation batches the flatness measurements use, in all (the same ones every time; dealt over '
              'the processes, which share the work)'),
    Flag(('--sharpness-rho',), _S, default=0.05, type=float, metavar='RHO', checks=(_POSITIVE,), resume_free=True,
         help='ascent radius of the m-sharpness measurement (m = the validation batch)'),
    Flag(('--sharpness-iters',), _S, default=20, type=int, metavar='N', checks=(_POSITIVE,), resume_free=True,
         help='power iterations for the top Hessian eigenvalue'),
    # --------------------------------------------------------------------------------------- Misc
    Flag(('--seed',), _X, default=42, type=int),
    Flag(('--log-interval',), _X, default=50, type=int, metavar='N', checks=(_POSITIVE,), resume_free=True,
         help='updates between console/W&B log lines'),
    Flag(('--val-interval',), _X, default=1, type=int, metavar='N', checks=(_POSITIVE,), resume_free=True,
         help='validate and rank checkpoints every N epochs (and after the last one)'),
    Flag(('--recovery-interval',), _X, default=0, type=int, metavar='N', checks=(_NON_NEGATIVE,), resume_free=True,
         help='write a recovery checkpoint every N updates (0 = off; SIGINT/SIGTERM always write one)'),
    Flag(('--max-nonfinite',), _X, default=5, type=int, metavar='N', checks=(_NON_NEGATIVE,), resume_free=True,
         help='an update whose loss or gradient is not finite is skipped, never applied; stop the run after N such '
              'updates in a row (0 turns the check off, saving its host sync per update)'),
    Flag(('--checkpoint-hist',), _X, default=10, type=int, metavar='N', checks=(_POSITIVE,), resume_free=True,
         help='number of best checkpoints to keep'),
    Flag(('-j', '--workers'), _X, default=4, type=int, metavar='N', checks=(_NON_NEGATIVE,), resume_free=True,
         help='data loader workers'),
    Flag(('--pin-mem',), _X, action=argparse.BooleanOptionalAction, resume_free=True,
         help='pinned host memory for the loaders\' batches (default: on when training on CUDA, as the device '
              'copies then overlap the step)'),
    Flag(('--amp',), _X, default=False, action='store_true', help='mixed precision (autocast)'),
    Flag(('--amp-dtype',), _X, default='float16', type=str, checks=(OneOf(('bfloat16', 'float16')),),
         help="'bfloat16' or 'float16'"),
    Flag(('--no-ddp-bb',), _X, default=False, action='store_true', help='DDP without broadcast_buffers'),
    Flag(('--tf32',), _X, default=True, action=argparse.BooleanOptionalAction, resume_free=True,
         help='on CUDA, let fp32 matmuls and convolutions use TF32 (timm\'s train.py default); --no-tf32 keeps '
              'full fp32'),
    Flag(('--cudnn-benchmark',), _X, default=True, action=argparse.BooleanOptionalAction, resume_free=True,
         help='on CUDA, let cuDNN time its convolution algorithms per shape and keep the fastest (timm\'s '
              'train.py default); --no-cudnn-benchmark for repeatable kernel choices'),
    Flag(('--dist-timeout',), _X, type=float, metavar='MIN', checks=(_POSITIVE,), resume_free=True,
         help='minutes a collective may wait for the slowest process before the run fails (default: torch\'s, '
              '10 for NCCL, 30 for gloo); raise it when a first torch.compile (max-autotune) takes longer'),
    Flag(('--device',), _X, default='', type=str, resume_free=True,
         help="cpu, cuda or cuda:N; default: cuda if available, else cpu. Under torchrun every process uses its "
              "own GPU, cuda:LOCAL_RANK, whatever index is given"),
    Flag(('--output',), _X, default='', type=str, metavar='PATH', resume_free=True,
         help='output root (default ./output/train)'),
    Flag(('--experiment',), _X, default='', type=str, metavar='NAME', resume_free=True,
         help='output sub-folder name (default: date-model-size)'),
    Flag(('--eval-metric',), _X, default='top1', type=str, checks=(OneOf(('top1', 'top5', 'loss')),),
         help="'top1', 'top5' or 'loss'"),
    Flag(('--log-wandb',), _X, default=False, action='store_true', resume_free=True, help='log to Weights & Biases'),
    Flag(('--wandb-project',), _X, type=str, resume_free=True),
    Flag(('--wandb-tags',), _X, default=[], type=str, nargs='+', resume_free=True),
    Flag(('--wandb-resume-id',), _X, default='', type=str, checks=(_needs_log_wandb,), resume_free=True,
         help='W&B run id to continue (with --resume)'),
    Flag(('--no-progress',), _X, default=False, action='store_true', resume_free=True,
         help='no progress bar even on a terminal'),
)

# Flags a resumed run may set differently from the run it continues (where it runs, what it logs, how
# long it goes on, how the global batch is split over processes and accumulation: the checkpoint checks the
# global batch itself): --resume auto compares every other flag with the candidate run's args.yaml.
RESUME_FREE_FLAGS: Tuple[str, ...] = tuple(f.dest for f in FLAGS if f.resume_free)

_BY_DEST = {f.dest: f for f in FLAGS}


def flag_for(dest: str) -> Flag:
    """The declaration of the flag stored as ``dest``."""
    return _BY_DEST[dest]

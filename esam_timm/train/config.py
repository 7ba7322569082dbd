"""Command line and YAML configuration of the ESAM training script.

Flag names and meanings follow timm's ``train.py`` so that timm users can carry their command lines
over; ESAM adds ``--rho``, ``--esam-beta``, ``--esam-gamma``, ``--esam-sds`` and ``--esam-bn-mode``
(``--opt msam``, Momentum-SAM, reads ``--rho`` and ``--base-opt``).

A ``-c/--config`` YAML file supplies defaults (keys are the argparse destinations, ``batch_size``
or ``batch-size``); flags given on the command line override it. A YAML value passes the checks the
same flag's text would on the command line (type, number of values; booleans only as YAML booleans).
An ``args.yaml`` written by timm's ``train.py`` loads too: its keys that are flags here keep timm's
meaning, the timm keys this script does not implement (``_TIMM_IGNORED``) are dropped with one
warning, and any other key is an error. Unknown keys and invalid values are argparse errors (exit
code 2) naming the key or flag, the value and what would be valid.
"""
import argparse
import difflib
import logging
import math
import os
from typing import Any, Dict, List, NoReturn, Optional, Sequence, Set, Tuple

import yaml

from esam_timm.optim import DEFAULT_BETA, DEFAULT_GAMMA
from esam_timm.msam import DEFAULT_RHO as MSAM_DEFAULT_RHO
from esam_timm.optim import DEFAULT_RHO as SAM_DEFAULT_RHO, WRAPPER_NAMES
from esam_timm.registry import is_msam, is_sam_family, optimizer_kind
from esam_timm.selection import list_sds_modes
from esam_timm.step import BN_MODES, CLIP_MODES

__all__ = ['build_parser', 'parse_args', 'validate_args', 'args_to_yaml', 'RESUME_AUTO', 'RESUME_FREE_FLAGS']

_AMP_DTYPES = ('bfloat16', 'float16')
_EVAL_METRICS = ('top1', 'top5', 'loss')
_INTERPOLATIONS = ('', 'random', 'bilinear', 'bicubic', 'nearest', 'lanczos', 'box', 'hamming')
_RE_MODES = ('const', 'rand', 'pixel')
_MIXUP_MODES = ('batch', 'pair', 'elem')
_LR_BASE_SCALES = ('', 'linear', 'sqrt')
_DIST_BN_MODES = ('', 'broadcast', 'reduce')
_CLASS_MAP_EXTS = ('.txt', '.pkl')  # what timm's load_class_map reads

_logger = logging.getLogger(__name__)

# Keys of an args.yaml written by timm's train.py that this script does not implement, with timm's
# defaults: the current train.py's (huggingface/pytorch-image-models aa4b585, 1.0.29.dev0) and, last
# four, keys that only older releases wrote (0.5-0.9). A config holding them loads with one warning,
# which also names those set to something other than timm's default (their effect is lost).
_TIMM_IGNORED: Dict[str, Any] = {
    'aug_repeats': 0, 'aug_splits': 0, 'color_jitter_prob': None, 'dataset_trust_remote_code': False,
    'device_modules': None, 'distill_loss_weight': None, 'drop_connect': None, 'epoch_repeats': 0.0,
    'fuser': '', 'gaussian_blur_prob': None, 'grayscale_prob': None, 'input_img_mode': None,
    'input_key': None, 'jsd_loss': False, 'kd_distill_type': 'logit', 'kd_loss_type': 'kl',
    'kd_model_name': None, 'kd_student_feature_dim': None, 'kd_teacher_feature_dim': None,
    'kd_temperature': 4.0, 'kd_token_distill_type': 'soft', 'local_rank': 0, 'model_dtype': None,
    'naflex_loader': False, 'naflex_loss_scale': 'linear', 'naflex_max_seq_len': 576,
    'naflex_patch_size_probs': None, 'naflex_patch_sizes': None, 'naflex_patchify_channels_first': False,
    'naflex_train_seq_lens': [128, 256, 576, 784, 1024], 'no_prefetcher': False, 'resplit': False,
    'save_images': False, 'split_bn': False, 'synchronize_step': False, 'target_key': None,
    'task_loss_weight': None, 'torchscript': False, 'train_batch_sizes': None,
    'train_batches_per_epoch': None, 'train_crop_mode': None, 'train_img_sizes': None,
    'train_size_probs': None, 'train_size_random_mix': 0.1, 'train_size_schedule': 'constant',
    'train_size_schedule_spread': 0.65, 'tta': 0, 'use_multi_epochs_loader': False,
    'variable_batch_loss_scale': 'none', 'worker_seeding': 'all',
    'amp_impl': 'native', 'aot_autograd': False, 'apex_amp': False, 'native_amp': False,
}

RESUME_AUTO = 'auto'
# Flags a resumed run may set differently from the run it continues (where it runs, what it logs, how
# long it goes on): --resume auto compares every other flag with the candidate run's args.yaml.
RESUME_FREE_FLAGS = (
    'resume', 'no_resume_opt', 'start_epoch', 'epochs', 'experiment', 'output', 'data', 'data_dir', 'device',
    'workers', 'pin_mem', 'no_progress', 'log_interval', 'recovery_interval', 'checkpoint_hist', 'val_interval',
    'max_bad_fraction', 'max_nonfinite', 'log_wandb', 'wandb_project', 'wandb_tags', 'wandb_resume_id',
    'sharpness_interval', 'sharpness_batches', 'sharpness_rho', 'sharpness_iters',
)

# Flags that do nothing unless another is on: (flag dest, the dest it needs).
_NEEDS = (
    ('torchcompile_mode', 'torchcompile'),
    ('model_ema_decay', 'model_ema'),
    ('model_ema_warmup', 'model_ema'),
    ('model_ema_force_cpu', 'model_ema'),
    ('layer_decay_min_scale', 'layer_decay'),
    ('layer_decay_no_opt_scale', 'layer_decay'),
)
# ESAM/SAM flags and the optimizers that read them: every non-SAM optimizer ignores all five; plain
# SAM (beta = gamma = 1) ignores the ESAM-only three; msam reads only --rho (and --base-opt).
_SAM_FLAGS = ('rho', 'esam_beta', 'esam_gamma', 'esam_sds', 'esam_bn_mode')
_ESAM_ONLY_FLAGS = ('esam_beta', 'esam_gamma', 'esam_sds')
_NOT_MSAM_FLAGS = ('esam_beta', 'esam_gamma', 'esam_sds', 'esam_bn_mode')
MSAM_SMALL_RHO = 0.5  # below this an msam radius is almost surely an ESAM-sized rho from a config


def _kv_pair(text: str) -> Tuple[str, Any]:
    """Parse ``key=value`` for ``--opt-kwargs``/``--model-kwargs``; the value is read as YAML."""
    if '=' not in text:
        raise argparse.ArgumentTypeError(f'expected key=value, got {text!r}')
    key, value = text.split('=', 1)
    if not key:
        raise argparse.ArgumentTypeError(f'expected key=value with a non-empty key, got {text!r}')
    return key, yaml.safe_load(value)


def build_parser() -> argparse.ArgumentParser:
    """Return the argparse parser with timm's flag names plus the ESAM flags."""
    parser = argparse.ArgumentParser(
        description='Train a timm model with ESAM / SAM / any timm optimizer',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument('-c', '--config', default='', metavar='FILE',
                        help='YAML file whose values become the defaults (command line overrides)')

    group = parser.add_argument_group('Dataset')
    group.add_argument('data', nargs='?', metavar='DIR', default=None,
                       help='path to dataset (positional, same as --data-dir)')
    group.add_argument('--data-dir', metavar='DIR', default=None,
                       help='dataset root: a folder with _info.json + shards (wds), an ImageFolder root, '
                            'or a shard pattern')
    group.add_argument('--dataset', metavar='NAME', default='wds/',
                       help="'wds/<name>' for WebDataset shards, '' for an ImageFolder, "
                            "or any timm dataset name (e.g. torch/cifar10)")
    group.add_argument('--train-split', metavar='NAME', default='train')
    group.add_argument('--val-split', metavar='NAME', default='validation',
                       help="validation split; '' skips validation")
    group.add_argument('--train-num-samples', type=int, default=None, metavar='N',
                       help='override the number of training samples (wds)')
    group.add_argument('--max-bad-fraction', type=float, default=0.01, metavar='F',
                       help='stop when more than this share of an epoch\'s samples is unreadable (corrupt images, '
                            'missing labels, broken shards); every epoch reports the counts (default 0.01)')
    group.add_argument('--val-num-samples', type=int, default=None, metavar='N',
                       help='override the number of validation samples (wds)')
    group.add_argument('--dataset-download', action='store_true', default=False,
                       help='let timm download torch/* datasets')
    group.add_argument('--class-map', default='', metavar='FILE',
                       help='class name -> label index map, timm\'s format: .txt (one class name per line, '
                            'index = line number) or .pkl (a dict); found as given or under --data-dir')
    group.add_argument('--demo', action='store_true', default=False,
                       help='build the built-in demo dataset in <output>/demo-data and train on it')

    group = parser.add_argument_group('Model')
    group.add_argument('--model', default='resnet50', metavar='NAME', help='any timm model name')
    group.add_argument('--pretrained', action='store_true', default=False,
                       help='start from pretrained weights (needs --pretrained-path; no hub downloads)')
    group.add_argument('--pretrained-path', default=None, metavar='FILE',
                       help='local file with pretrained weights for --pretrained')
    group.add_argument('--initial-checkpoint', default='', metavar='FILE',
                       help='load these model weights before training (no optimizer state)')
    group.add_argument('--resume', default='', metavar='FILE',
                       help='resume the full training state from a checkpoint and continue its run in that '
                            'checkpoint\'s folder; "auto": the newest checkpoint of --experiment (suffixed folders '
                            '<name>-N included) whose run had the same settings, or a new run when there is none')
    group.add_argument('--no-resume-opt', action='store_true', default=False,
                       help='with --resume, do not restore optimizer, scaler and scheduler state')
    group.add_argument('--num-classes', type=int, default=None, metavar='N')
    group.add_argument('--gp', default=None, metavar='POOL', help='global pool type')
    group.add_argument('--img-size', type=int, default=None, metavar='N', help='image size')
    group.add_argument('--in-chans', type=int, default=None, metavar='N')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N',
                       help='input size C H W (overrides --img-size and --in-chans)')
    group.add_argument('--crop-pct', default=None, type=float, metavar='PCT',
                       help='validation center crop fraction')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME',
                       help='resize interpolation (default: the model\'s)')
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N',
                       help='batch size per process')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N')
    group.add_argument('--channels-last', action='store_true', default=False)
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='micro-batches of --batch-size per update; each does its own ESAM ascent and '
                            'selection, as a DDP rank does (global batch = b x processes x N)')
    group.add_argument('--grad-checkpointing', action='store_true', default=False,
                       help='recompute activations in the backward pass through the model\'s blocks '
                            '(model.set_grad_checkpointing): less memory, more compute')
    group.add_argument('--fast-norm', action='store_true', default=False,
                       help='timm\'s fast, lower-precision LayerNorm/GroupNorm (timm.layers.set_fast_norm)')
    group.add_argument('--model-kwargs', nargs='*', default={}, type=_kv_pair, metavar='K=V',
                       help='extra timm.create_model keyword arguments')
    group.add_argument('--head-init-scale', default=None, type=float, metavar='SCALE',
                       help='multiply the classifier\'s initial weight and bias by this')
    group.add_argument('--head-init-bias', default=None, type=float, metavar='BIAS',
                       help='set the classifier\'s initial bias to this value')
    group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                       metavar='BACKEND', help='torch.compile the model (default backend inductor)')
    group.add_argument('--torchcompile-mode', type=str, default=None, metavar='MODE',
                       help='torch.compile mode with --torchcompile: default, reduce-overhead, max-autotune, '
                            '... (torch._inductor.list_mode_options()); default: torch\'s')

    group = parser.add_argument_group('Optimizer')
    group.add_argument('--opt', default='esam', metavar='NAME',
                       help="optimizer: esam, sam, msam (Momentum-SAM: one pass, SGD's cost), or any timm "
                            "optimizer (sgd, adamw, ...); esam/sam/msam use --base-opt")
    group.add_argument('--base-opt', default='sgd', metavar='NAME',
                       help='base optimizer that ESAM/SAM/MSAM wraps (msam: sgd, nesterov, momentum, adam, adamw)')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPS')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M')
    group.add_argument('--weight-decay', type=float, default=2e-5)
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM',
                       help='clip the final gradient (off by default)')
    group.add_argument('--clip-mode', type=str, default='norm', help="'norm', 'value' or 'agc'")
    group.add_argument('--layer-decay', type=float, default=None, metavar='RATE')
    group.add_argument('--layer-decay-min-scale', type=float, default=0.0, metavar='SCALE',
                       help='with --layer-decay: lower bound of a layer\'s lr scale')
    group.add_argument('--layer-decay-no-opt-scale', type=float, default=None, metavar='SCALE',
                       help='with --layer-decay: freeze the layers whose lr scale is below this')
    group.add_argument('--opt-kwargs', nargs='*', default={}, type=_kv_pair, metavar='K=V',
                       help='extra optimizer keyword arguments')
    group.add_argument('--rho', type=float, default=None,
                       help=f'perturbation radius (default: {SAM_DEFAULT_RHO} for esam/sam, '
                            f'{MSAM_DEFAULT_RHO} for msam, whose ||w~ - w|| is rho)')
    group.add_argument('--esam-beta', type=float, default=DEFAULT_BETA,
                       help='ESAM share of weight tensors perturbed (SWP); 1 = all; the default is the paper\'s, '
                            'shared with ESAM() and create_optimizer_v2(model, \'esam\')')
    group.add_argument('--esam-gamma', type=float, default=DEFAULT_GAMMA,
                       help='ESAM share of samples kept for the second pass (SDS); 1 = all; the default is the '
                            'paper\'s')
    group.add_argument('--esam-sds', type=str, default='exact', metavar='MODE',
                       help="how ESAM picks the samples of its second pass: 'exact' (the paper: an extra "
                            "no-grad forward measures each sample's sharpness), 'first-order' (an estimate "
                            "from the classifier layer, no extra forward) or 'loss' (highest clean loss)")
    group.add_argument('--esam-bn-mode', type=str, default='clean',
                       help="BatchNorm running stats under ESAM: 'clean' (from the clean pass only) or 'all' "
                            "(every pass, as the authors' code)")

    group = parser.add_argument_group('Learning rate schedule')
    group.add_argument('--sched', type=str, default='cosine', metavar='NAME',
                       help='timm scheduler: cosine, tanh, step, multistep, plateau, poly, none')
    group.add_argument('--sched-on-updates', action='store_true', default=False,
                       help='step the schedule every optimizer update instead of every epoch')
    group.add_argument('--lr', type=float, default=None, metavar='LR',
                       help='learning rate; default: --lr-base scaled by the global batch size')
    group.add_argument('--lr-base', type=float, default=0.1, metavar='LR',
                       help='base learning rate for a global batch of --lr-base-size')
    group.add_argument('--lr-base-size', type=int, default=256, metavar='N')
    group.add_argument('--lr-base-scale', type=str, default='',
                       help="'linear' or 'sqrt' (default: sqrt for ada*/lamb, else linear)")
    group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='PCT')
    group.add_argument('--lr-noise-pct', type=float, default=0.67)
    group.add_argument('--lr-noise-std', type=float, default=1.0)
    group.add_argument('--lr-cycle-mul', type=float, default=1.0)
    group.add_argument('--lr-cycle-decay', type=float, default=0.5)
    group.add_argument('--lr-cycle-limit', type=int, default=1)
    group.add_argument('--lr-k-decay', type=float, default=1.0)
    group.add_argument('--warmup-lr', type=float, default=1e-5)
    group.add_argument('--min-lr', type=float, default=0.0)
    group.add_argument('--epochs', type=int, default=300)
    group.add_argument('--start-epoch', type=int, default=None, metavar='N',
                       help='epoch to start at (also overrides the resumed epoch)')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+')
    group.add_argument('--decay-epochs', type=float, default=90.0)
    group.add_argument('--warmup-epochs', type=int, default=5)
    group.add_argument('--warmup-prefix', action='store_true', default=False)
    group.add_argument('--cooldown-epochs', type=int, default=0)
    group.add_argument('--patience-epochs', type=int, default=10)
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1)

    group = parser.add_argument_group('Augmentation and regularization')
    group.add_argument('--no-aug', action='store_true', default=False,
                       help='no training augmentation (resize + center crop only)')
    group.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0], metavar='PCT',
                       help='random resized crop area range')
    group.add_argument('--ratio', type=float, nargs=2, default=[3. / 4., 4. / 3.], metavar='RATIO',
                       help='random resized crop aspect ratio range')
    group.add_argument('--hflip', type=float, default=0.5)
    group.add_argument('--vflip', type=float, default=0.0)
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT')
    group.add_argument('--aa', type=str, default=None, metavar='NAME',
                       help='auto augment policy, e.g. rand-m9-mstd0.5-inc1')
    group.add_argument('--reprob', type=float, default=0.0, metavar='PCT', help='random erase prob')
    group.add_argument('--remode', type=str, default='pixel', help='random erase mode')
    group.add_argument('--recount', type=int, default=1, help='random erase count')
    group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha (0 = off)')
    group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha (0 = off)')
    group.add_argument('--cutmix-minmax', type=float, nargs=2, default=None)
    group.add_argument('--mixup-prob', type=float, default=1.0)
    group.add_argument('--mixup-switch-prob', type=float, default=0.5)
    group.add_argument('--mixup-mode', type=str, default='batch')
    group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N',
                       help='turn mixup off after this epoch (0 = never)')
    group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    group.add_argument('--bce-loss', action='store_true', default=False)
    group.add_argument('--bce-sum', action='store_true', default=False)
    group.add_argument('--bce-target-thresh', type=float, default=None)
    group.add_argument('--bce-pos-weight', type=float, default=None)
    group.add_argument('--train-interpolation', type=str, default='random')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='drop path rate')
    group.add_argument('--drop-block', type=float, default=None, metavar='PCT',
                       help='drop block rate (models that take drop_block_rate, e.g. ResNets)')
    group.add_argument('--bn-momentum', type=float, default=None)
    group.add_argument('--bn-eps', type=float, default=None)
    group.add_argument('--sync-bn', action='store_true', default=False, help='SyncBatchNorm (DDP only)')
    group.add_argument('--dist-bn', type=str, default='', metavar='MODE',
                       help="after each epoch make BatchNorm running stats equal across DDP ranks: 'reduce' "
                            "(average them), 'broadcast' (rank 0's) or '' (leave each rank's; timm's default "
                            "is 'reduce'); off with --sync-bn")
    group.add_argument('--model-ema', action='store_true', default=False, help='keep an EMA of the weights')
    group.add_argument('--model-ema-decay', type=float, default=0.9998)
    group.add_argument('--model-ema-warmup', action='store_true', default=False)
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False,
                       help='keep the EMA weights on the CPU and do not validate them')

    group = parser.add_argument_group('Flatness (esam_timm.sharpness)')
    group.add_argument('--sharpness-interval', type=int, default=0, metavar='N',
                       help='every N epochs (and after the last) measure the top Hessian eigenvalue and '
                            'm-sharpness on fixed validation batches, on rank 0 (0 = off)')
    group.add_argument('--sharpness-batches', type=int, default=2, metavar='N',
                       help='validation batches the flatness measurements use (the same ones every time)')
    group.add_argument('--sharpness-rho', type=float, default=0.05, metavar='RHO',
                       help='ascent radius of the m-sharpness measurement (m = the validation batch)')
    group.add_argument('--sharpness-iters', type=int, default=20, metavar='N',
                       help='power iterations for the top Hessian eigenvalue')

    group = parser.add_argument_group('Misc')
    group.add_argument('--seed', type=int, default=42)
    group.add_argument('--log-interval', type=int, default=50, metavar='N',
                       help='updates between console/W&B log lines')
    group.add_argument('--val-interval', type=int, default=1, metavar='N',
                       help='validate and rank checkpoints every N epochs (and after the last one)')
    group.add_argument('--recovery-interval', type=int, default=0, metavar='N',
                       help='write a recovery checkpoint every N updates (0 = off; SIGINT/SIGTERM always write one)')
    group.add_argument('--max-nonfinite', type=int, default=5, metavar='N',
                       help='an update whose loss or gradient is not finite is skipped, never applied; stop the run '
                            'after N such updates in a row (0 turns the check off, saving its host sync per update)')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N',
                       help='number of best checkpoints to keep')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='data loader workers')
    group.add_argument('--pin-mem', action='store_true', default=False)
    group.add_argument('--amp', action='store_true', default=False, help='mixed precision (autocast)')
    group.add_argument('--amp-dtype', default='float16', type=str, help="'bfloat16' or 'float16'")
    group.add_argument('--no-ddp-bb', action='store_true', default=False,
                       help='DDP without broadcast_buffers')
    group.add_argument('--device', default='', type=str,
                       help="cpu, cuda or cuda:N; default: cuda if available, else cpu")
    group.add_argument('--output', default='', type=str, metavar='PATH',
                       help='output root (default ./output/train)')
    group.add_argument('--experiment', default='', type=str, metavar='NAME',
                       help='output sub-folder name (default: date-model-size)')
    group.add_argument('--eval-metric', default='top1', type=str, help="'top1', 'top5' or 'loss'")
    group.add_argument('--log-wandb', action='store_true', default=False, help='log to Weights & Biases')
    group.add_argument('--wandb-project', default=None, type=str)
    group.add_argument('--wandb-tags', default=[], type=str, nargs='+')
    group.add_argument('--wandb-resume-id', default='', type=str,
                       help='W&B run id to continue (with --resume)')
    group.add_argument('--no-progress', action='store_true', default=False,
                       help='no progress bar even on a terminal')
    return parser


_VALUE_NAMES = {int: ('an integer', 'integers'), float: ('a number', 'numbers'), str: ('a string', 'strings'),
                _kv_pair: ("a 'key=value' string", "'key=value' strings")}


def _fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """Exit with code 2 and argparse's error line, without the usage: the value parsed, it is invalid."""
    parser.exit(2, f'{parser.prog}: error: {message}\n')


def _expected(action: argparse.Action) -> str:
    """The YAML value a flag takes, in words, for error messages."""
    if action.nargs == 0:
        return 'true or false (a YAML boolean, unquoted)'
    one, many = _VALUE_NAMES[action.type or str]
    if action.type is _kv_pair:
        return f'a mapping or a list of {many}'
    if isinstance(action.nargs, int):
        what = f'a list of {action.nargs} {many}'
    elif action.nargs == '+':
        what = f'a list of one or more {many}'
    elif action.nargs == '*':
        what = f'a list of {many}'
    else:
        what = one
    if action.default is None:
        what += ' or null'
    if action.nargs == '?' and action.const is not None:
        what += f' (the bare flag means {action.const!r})'
    return what


def _coerce(action: argparse.Action, value: Any, key: str, parser: argparse.ArgumentParser) -> Any:
    """Check a YAML value as argparse checks the same flag's command-line text, and convert it.

    A flag without a value (``--amp``) takes only a YAML boolean, so the string ``'false'`` is an error
    rather than a true value; a flag with several values takes a list of that many; an integer flag
    refuses 2.5; null only where the flag's default is null (no command line can set None otherwise).
    """
    expected = _expected(action)

    def fail(detail: str = '') -> NoReturn:
        _fail(parser, f'config key {key!r}: expected {expected}, got {value!r} ({type(value).__name__}){detail}')

    def one(item: Any) -> Any:
        convert = action.type or str
        if convert is _kv_pair:
            if isinstance(item, tuple):  # an item of a YAML mapping
                return item
            if not isinstance(item, str):
                fail()
            try:
                return _kv_pair(item)
            except argparse.ArgumentTypeError as e:
                fail(f': {e}')
        if isinstance(item, bool) or not isinstance(item, (str, int, float)) or (
                convert is int and isinstance(item, float)):
            fail()
        try:
            return convert(item)
        except ValueError:
            _fail(parser, f'config key {key!r}: cannot read {item!r} as {convert.__name__} (expected {expected})')

    if value is None:
        if action.default is not None:
            fail()
        return None
    if action.nargs == 0:
        if not isinstance(value, bool):
            fail()
        return value
    if not (action.nargs in ('+', '*') or isinstance(action.nargs, int)):
        return one(value)
    items = list(value.items()) if action.type is _kv_pair and isinstance(value, dict) else value
    if not isinstance(items, list):
        fail()
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        fail()
    if action.nargs == '+' and not items and action.default != []:  # [] only restates an empty default
        fail()
    return [one(item) for item in items]


def _did_you_mean(dest: str, flags: Sequence[str]) -> str:
    """A hint naming the keys closest to an unknown one (or sharing its first word), if any."""
    close = (difflib.get_close_matches(dest, list(flags) + list(_TIMM_IGNORED), n=5)
             or sorted(d for d in flags if d.split('_')[0] == dest.split('_')[0]))
    return f' (did you mean one of {close}?)' if close else ''


def _warn_ignored_timm_keys(path: str, ignored: Dict[str, Any]) -> None:
    """One warning listing the timm train.py keys of the config file that this script drops."""
    changed = [f'{k}={v!r}' for k, v in ignored.items() if v != _TIMM_IGNORED[k]]
    lost = (f'; set away from timm\'s default, so their effect is lost: {", ".join(changed)}'
            if changed else '')
    _logger.warning('config file %r: ignoring %d timm train.py keys this script does not implement: %s%s',
                    path, len(ignored), ', '.join(sorted(ignored)), lost)


def _load_yaml_defaults(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """Read the config file; return {dest: checked value}.

    timm train.py keys this script does not implement are dropped with one warning (so a timm
    args.yaml loads); any other unknown key is an error (a typo must not pass silently).
    """
    try:
        with open(path, 'r') as f:
            cfg = yaml.safe_load(f)
    except OSError as e:
        _fail(parser, f'cannot read config file {path!r}: {e.strerror}')
    except yaml.YAMLError as e:
        _fail(parser, f'config file {path!r} is not valid YAML: {e}')
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        _fail(parser, f'config file {path!r} must hold a mapping of option names to values')
    actions = {a.dest: a for a in parser._actions if a.dest not in ('help', 'config')}
    defaults, ignored = {}, {}
    for key, value in cfg.items():
        dest = str(key).replace('-', '_')
        if dest in actions:
            defaults[dest] = _coerce(actions[dest], value, str(key), parser)
        elif dest in _TIMM_IGNORED:
            ignored[dest] = value
        else:
            _fail(parser, f'config file {path!r}: unknown key {key!r}{_did_you_mean(dest, list(actions))}; '
                         f'valid keys are the flag names of train_esam.py --help (with _ or -) and timm '
                         f'train.py\'s')
    if ignored:
        _warn_ignored_timm_keys(path, ignored)
    return defaults


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def validate_args(args: argparse.Namespace) -> None:
    """Check values that argparse cannot; raise ValueError naming the flag and what is valid."""
    import timm
    from timm.optim import list_optimizers

    def in_range(name: str, value: Optional[float], lo: float, hi: float, lo_open: bool = False) -> None:
        if value is None:
            return
        ok = (lo < value if lo_open else lo <= value) and value <= hi
        bracket = '(' if lo_open else '['
        _check(ok and math.isfinite(value),
               f'--{name} must be in {bracket}{lo}, {hi}], got {value}')

    def positive(name: str, value: Optional[float], allow_zero: bool = False) -> None:
        if value is None:
            return
        ok = value >= 0 if allow_zero else value > 0
        _check(ok and math.isfinite(value), f'--{name} must be {">= 0" if allow_zero else "> 0"}, got {value}')

    def choice(name: str, value: Any, choices: Sequence[Any]) -> None:
        _check(value in choices, f'--{name} must be one of {list(choices)}, got {value!r}')

    _check(timm.is_model(args.model), f'--model {args.model!r} is not a timm model; list them with '
                        f'timm.list_models(), or register yours with timm.models.register_model')
    if args.pretrained:
        _check(bool(args.pretrained_path),
               '--pretrained needs --pretrained-path FILE: weights are only loaded from a local file, '
               'never downloaded')
    known_opts = set(list_optimizers()) | set(WRAPPER_NAMES)
    for flag, name in (('opt', args.opt), ('base-opt', args.base_opt)):
        _check(optimizer_kind(name) in known_opts, f'--{flag} {name!r} is not an optimizer timm knows; '
                                                   f'use esam, sam, msam or one of timm.optim.list_optimizers()')
    _check(optimizer_kind(args.base_opt) not in WRAPPER_NAMES,
           f'--base-opt {args.base_opt!r} cannot be esam/sam/msam itself; use e.g. sgd or adamw')
    positive('rho', args.rho)
    in_range('esam-beta', args.esam_beta, 0., 1., lo_open=True)
    in_range('esam-gamma', args.esam_gamma, 0., 1., lo_open=True)
    choice('esam-sds', args.esam_sds, list_sds_modes())
    choice('esam-bn-mode', args.esam_bn_mode, BN_MODES)
    in_range('layer-decay-min-scale', args.layer_decay_min_scale, 0., 1.)
    in_range('layer-decay-no-opt-scale', args.layer_decay_no_opt_scale, 0., 1.)
    positive('lr', args.lr)
    positive('lr-base', args.lr_base)
    positive('lr-base-size', args.lr_base_size)
    choice('lr-base-scale', args.lr_base_scale, _LR_BASE_SCALES)
    positive('weight-decay', args.weight_decay, allow_zero=True)
    positive('momentum', args.momentum, allow_zero=True)
    positive('warmup-lr', args.warmup_lr, allow_zero=True)
    positive('min-lr', args.min_lr, allow_zero=True)
    positive('warmup-epochs', args.warmup_epochs, allow_zero=True)
    positive('epochs', args.epochs)
    if args.start_epoch is not None:
        _check(0 <= args.start_epoch < args.epochs,
               f'--start-epoch must be in [0, --epochs={args.epochs}), got {args.start_epoch}')
    choice('sched', args.sched, ('cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', 'wsd', 'none'))
    positive('batch-size', args.batch_size)
    positive('validation-batch-size', args.validation_batch_size)
    positive('grad-accum-steps', args.grad_accum_steps)
    if args.torchcompile_mode is not None:
        from torch._inductor import list_mode_options
        choice('torchcompile-mode', args.torchcompile_mode, list(list_mode_options()))
    positive('clip-grad', args.clip_grad)
    choice('clip-mode', args.clip_mode, CLIP_MODES)
    choice('amp-dtype', args.amp_dtype, _AMP_DTYPES)
    choice('eval-metric', args.eval_metric, _EVAL_METRICS)
    choice('interpolation', args.interpolation, _INTERPOLATIONS)
    choice('train-interpolation', args.train_interpolation, _INTERPOLATIONS)
    positive('img-size', args.img_size)
    positive('in-chans', args.in_chans)
    if args.input_size is not None:
        _check(all(v > 0 for v in args.input_size), f'--input-size values must be > 0, got {args.input_size}')
    in_range('crop-pct', args.crop_pct, 0., 1., lo_open=True)
    in_range('max-bad-fraction', args.max_bad_fraction, 0., 1.)
    positive('num-classes', args.num_classes)
    for name, value in (('head-init-scale', args.head_init_scale), ('head-init-bias', args.head_init_bias)):
        _check(value is None or math.isfinite(value), f'--{name} must be a finite number, got {value}')
    for name, value in (('mean', args.mean), ('std', args.std)):
        if value is not None:
            _check(len(value) in (1, 3), f'--{name} needs 1 or 3 values, got {len(value)}')
    if args.std is not None:
        _check(all(v > 0 for v in args.std), f'--std values must be > 0, got {args.std}')
    _check(0 < args.scale[0] <= args.scale[1] <= 1,
           f'--scale must be two values 0 < lo <= hi <= 1, got {args.scale}')
    _check(0 < args.ratio[0] <= args.ratio[1], f'--ratio must be two values 0 < lo <= hi, got {args.ratio}')
    in_range('hflip', args.hflip, 0., 1.)
    in_range('vflip', args.vflip, 0., 1.)
    positive('color-jitter', args.color_jitter, allow_zero=True)
    in_range('reprob', args.reprob, 0., 1.)
    choice('remode', args.remode, _RE_MODES)
    positive('recount', args.recount)
    positive('mixup', args.mixup, allow_zero=True)
    positive('cutmix', args.cutmix, allow_zero=True)
    in_range('mixup-prob', args.mixup_prob, 0., 1.)
    in_range('mixup-switch-prob', args.mixup_switch_prob, 0., 1.)
    choice('mixup-mode', args.mixup_mode, _MIXUP_MODES)
    positive('mixup-off-epoch', args.mixup_off_epoch, allow_zero=True)
    _check(0 <= args.smoothing < 1, f'--smoothing must be in [0, 1), got {args.smoothing}')
    in_range('drop', args.drop, 0., 1.)
    in_range('drop-path', args.drop_path, 0., 1.)
    in_range('drop-block', args.drop_block, 0., 1.)
    choice('dist-bn', args.dist_bn, _DIST_BN_MODES)
    in_range('model-ema-decay', args.model_ema_decay, 0., 1.)
    positive('log-interval', args.log_interval)
    positive('sharpness-interval', args.sharpness_interval, allow_zero=True)
    positive('sharpness-batches', args.sharpness_batches)
    positive('sharpness-rho', args.sharpness_rho)
    positive('sharpness-iters', args.sharpness_iters)
    positive('val-interval', args.val_interval)
    positive('recovery-interval', args.recovery_interval, allow_zero=True)
    positive('max-nonfinite', args.max_nonfinite, allow_zero=True)
    if args.resume == RESUME_AUTO:
        _check(bool(args.experiment), f'--resume {RESUME_AUTO} needs --experiment NAME: it resumes the newest run '
                                      f'of that experiment (the default folder name holds the start time, so no '
                                      f'earlier run has it)')
    positive('checkpoint-hist', args.checkpoint_hist)
    positive('workers', args.workers, allow_zero=True)
    ds = args.dataset
    _check(ds in ('', 'folder', 'imagefolder') or '/' in ds,
           f'--dataset {ds!r}: use wds/<name> for shards, an empty string for an ImageFolder, or a '
           f'timm dataset name like torch/cifar10')
    _check(bool(args.data_dir) or args.demo,
           'no data: give --data-dir DIR (or the positional DIR), or --demo for the built-in demo dataset')
    if args.demo:
        _check(ds.startswith('wds/'), f'--demo trains on WebDataset shards; it needs --dataset wds/..., '
                                      f'got {ds!r}')
    if args.class_map:
        _check(os.path.splitext(args.class_map)[1].lower() in _CLASS_MAP_EXTS,
               f'--class-map {args.class_map!r}: timm reads {" or ".join(_CLASS_MAP_EXTS)} class maps')
        under_data_dir = bool(args.data_dir) and os.path.isfile(os.path.join(args.data_dir, args.class_map))
        _check(os.path.isfile(args.class_map) or under_data_dir,
               f'--class-map {args.class_map!r} is not a file, neither as given nor under --data-dir '
               f'{args.data_dir!r}')
    if args.wandb_resume_id:
        _check(args.log_wandb, '--wandb-resume-id needs --log-wandb')


def _check_device(device: str, origin: str) -> None:
    """Refuse a ``--device`` torch does not know or this machine does not have; ``origin`` names where the
    value came from in the message (``--device 'cuda'``, or the config file key)."""
    import torch
    if not device:
        return
    valid = 'use cpu, cuda or cuda:N, or leave --device out (cuda when available, else cpu)'
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f'{origin} is not a device torch knows: {valid}') from None
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            why = 'this torch build has no CUDA' if torch.version.cuda is None else 'no CUDA device or driver found'
            raise ValueError(f'{origin}: CUDA is not available on this machine ({why}): use --device cpu, '
                             f'or leave --device out (cuda when available, else cpu)')
        count = torch.cuda.device_count()
        _check(dev.index is None or dev.index < count,
               f'{origin}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}')
    elif dev.type != 'cpu':
        backend = getattr(torch, dev.type, None)
        _check(backend is not None and hasattr(backend, 'is_available') and backend.is_available(),
               f'{origin}: {dev.type} is not available on this machine: {valid}')


def parse_args(argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, str]:
    """Parse the command line (and the YAML named by -c); return (args, args as YAML text).

    Errors exit with code 2 and a message naming the bad flag, key or value; argparse's usage comes only
    with errors in the command line's syntax, not with values that parse but are invalid.
    """
    parser = build_parser()
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='')
    known, remaining = config_parser.parse_known_args(argv)
    explicit: Set[str] = set()
    if known.config:
        file_values = _load_yaml_defaults(known.config, parser)
        explicit = {dest for dest, value in file_values.items() if value != parser.get_default(dest)}
        parser.set_defaults(**file_values)
    args = parser.parse_args(remaining)
    on_command_line = _given_on_command_line(remaining)
    explicit |= on_command_line
    args.config = known.config
    if args.data and not args.data_dir:
        args.data_dir = args.data
    args.opt_kwargs = dict(args.opt_kwargs)
    args.model_kwargs = dict(args.model_kwargs)
    if args.rho is None:  # each optimizer's own radius: msam's rho is ||w~ - w|| itself
        args.rho = MSAM_DEFAULT_RHO if is_msam(args.opt) else SAM_DEFAULT_RHO
    device_origin = (f'--device {args.device!r}' if 'device' in on_command_line or not known.config
                     else f'device: {args.device} in config file {known.config!r}')
    try:
        validate_args(args)
        _check_device(args.device, device_origin)
    except ValueError as e:
        _fail(parser, str(e))
    _warn_inert_flags(args, explicit)
    return args, args_to_yaml(args)


def _given_on_command_line(argv: List[str]) -> Set[str]:
    """Destinations of the flags argv sets, abbreviations included (argv parsed with no defaults)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _warn_inert_flags(args: argparse.Namespace, explicit: Set[str]) -> None:
    """Warn about flags set (on the command line, or in the config file away from their default) that
    this run ignores: ESAM/SAM flags with an optimizer that does not read them, options of a feature
    that is off. They are likely a mistake, but harmless, so not an error."""
    def flags(dests: Sequence[str]) -> str:
        return ', '.join('--' + d.replace('_', '-') for d in dests)

    if is_msam(args.opt):
        unused = [d for d in _NOT_MSAM_FLAGS if d in explicit]
        if unused:
            _logger.warning('--opt %s is Momentum-SAM (one pass at w - rho v / ||v||) and ignores %s (use '
                            '--opt esam to apply them)', args.opt, flags(unused))
        if 'rho' in explicit and args.rho < MSAM_SMALL_RHO:
            _logger.warning('--rho %g is an ESAM/SAM-sized radius, but msam moves the weights by exactly rho '
                            '(along the unit momentum direction): its authors use 2-3 (default %g); with a '
                            'config made for esam, pass --rho for msam explicitly', args.rho, MSAM_DEFAULT_RHO)
    elif not is_sam_family(args.opt):
        unused = [d for d in _SAM_FLAGS if d in explicit]
        if unused:
            _logger.warning('--opt %s is not ESAM/SAM and ignores %s (use --opt esam or sam to apply them)',
                            args.opt, flags(unused))
    elif optimizer_kind(args.opt) == 'sam':
        unused = [d for d in _ESAM_ONLY_FLAGS if d in explicit]
        if unused:
            _logger.warning('--opt %s is plain SAM (beta = gamma = 1, no data selection) and ignores %s '
                            '(use --opt esam to apply them)', args.opt, flags(unused))
    for dest, needed in _NEEDS:
        if dest in explicit and not getattr(args, needed):
            _logger.warning('%s has no effect without %s', flags([dest]), flags([needed]))


def args_to_yaml(args: argparse.Namespace) -> str:
    """The resolved arguments as YAML, loadable again with -c (written to args.yaml)."""
    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    values.pop('config', None)
    return yaml.safe_dump(values, default_flow_style=False, sort_keys=True)

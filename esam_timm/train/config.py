"""Command line and YAML configuration of the ESAM training script: the parser, the checks and the
warnings, all built from the flag table of :mod:`esam_timm.train.flags` (one declaration per flag).

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
from typing import Any, Dict, List, NoReturn, Optional, Sequence, Set, Tuple

import torch
import yaml

from esam_timm.data.backends import check_decode
from esam_timm.msam import DEFAULT_RHO as MSAM_DEFAULT_RHO
from esam_timm.registry import is_msam, optimizer_kind

from .flags import FLAGS, RESUME_AUTO, RESUME_FREE_FLAGS, flag_for, kv_pair

__all__ = ['build_parser', 'parse_args', 'validate_args', 'args_to_yaml', 'RESUME_AUTO', 'RESUME_FREE_FLAGS']

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

MSAM_SMALL_RHO = 0.5  # below this an msam radius is almost surely an ESAM-sized rho from a config
# What an optimizer kind is, for the warning about the ESAM/SAM flags it ignores (flags.Flag.used_by).
_IGNORING = {
    'msam': '--opt {opt} is Momentum-SAM (one pass at w - rho v / ||v||) and ignores {flags} (use --opt esam to '
            'apply them)',
    'sam': '--opt {opt} is plain SAM (beta = gamma = 1, no data selection) and ignores {flags} (use --opt esam to '
           'apply them)',
    'other': '--opt {opt} is not ESAM/SAM and ignores {flags} (use --opt esam or sam to apply them)',
}


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every flag in :data:`esam_timm.train.flags.FLAGS` (timm's names plus ESAM's)."""
    parser = argparse.ArgumentParser(
        description='Train a timm model with ESAM / SAM / any timm optimizer',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument('-c', '--config', default='', metavar='FILE',
                        help='YAML file whose values become the defaults (command line overrides)')
    groups: Dict[str, Any] = {}
    for flag in FLAGS:
        if flag.group not in groups:
            groups[flag.group] = parser.add_argument_group(flag.group)
        groups[flag.group].add_argument(*flag.names, **flag.argparse_kwargs())
    return parser


_VALUE_NAMES = {int: ('an integer', 'integers'), float: ('a number', 'numbers'), str: ('a string', 'strings'),
                kv_pair: ("a 'key=value' string", "'key=value' strings")}


def _fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """Exit with code 2 and argparse's error line, without the usage: the value parsed, it is invalid."""
    parser.exit(2, f'{parser.prog}: error: {message}\n')


def _expected(action: argparse.Action) -> str:
    """The YAML value a flag takes, in words, for error messages."""
    if action.nargs == 0:
        return 'true or false (a YAML boolean, unquoted)'
    one, many = _VALUE_NAMES[action.type or str]
    if action.type is kv_pair:
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
        if convert is kv_pair:
            if isinstance(item, tuple):  # an item of a YAML mapping
                return item
            if not isinstance(item, str):
                fail()
            try:
                return kv_pair(item)
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
    items = list(value.items()) if action.type is kv_pair and isinstance(value, dict) else value
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


def validate_args(args: argparse.Namespace) -> None:
    """Check values that argparse cannot (each flag's declared checks, in the table's order); raise
    ValueError naming the flag and what is valid."""
    for flag in FLAGS:
        value = getattr(args, flag.dest)
        for check in flag.checks:
            message = check(flag.option, value, args)
            if message:
                raise ValueError(message)


def _check_device(device: str, origin: str) -> None:
    """Refuse a ``--device`` torch does not know or this machine does not have; ``origin`` names where the
    value came from in the message (``--device 'cuda'``, or the config file key)."""
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
        if dev.index is not None and dev.index >= count:
            raise ValueError(f'{origin}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}')
    elif dev.type != 'cpu':
        backend = getattr(torch, dev.type, None)
        if not (backend is not None and hasattr(backend, 'is_available') and backend.is_available()):
            raise ValueError(f'{origin}: {dev.type} is not available on this machine: {valid}')


def parse_args(argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, str]:
    """Parse the command line (and the YAML named by -c); return (args, args as YAML text).

    Errors exit with code 2 and a message naming the bad flag, key or value; argparse's usage comes only
    with errors in the command line's syntax, not with values that parse but are invalid.
    """
    parser = build_parser()
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='')
    known, remaining = config_parser.parse_known_args(argv)
    file_values: Dict[str, Any] = {}
    if known.config:
        file_values = _load_yaml_defaults(known.config, parser)
        parser.set_defaults(**file_values)
    args = parser.parse_args(remaining)
    on_command_line = _given_on_command_line(remaining)
    args.config = known.config
    if args.data and not args.data_dir:
        args.data_dir = args.data
    args.opt_kwargs = dict(args.opt_kwargs)
    args.model_kwargs = dict(args.model_kwargs)
    for flag in FLAGS:
        if flag.resolve is not None and getattr(args, flag.dest) is None:
            setattr(args, flag.dest, flag.resolve(args))
    explicit = on_command_line | {dest for dest, value in file_values.items() if _set_away_from_default(dest, value,
                                                                                                          args)}
    device_origin = (f'--device {args.device!r}' if 'device' in on_command_line or not known.config
                     else f'device: {args.device} in config file {known.config!r}')
    try:
        validate_args(args)
        _check_device(args.device, device_origin)
        check_decode(args.dataset, args.decode, args.device or ('cuda' if torch.cuda.is_available() else 'cpu'),
                     None if args.no_aug else args.aa)
    except ValueError as e:
        _fail(parser, str(e))
    _warn_inert_flags(args, explicit)
    return args, args_to_yaml(args)


def _set_away_from_default(dest: str, value: Any, args: argparse.Namespace) -> bool:
    """Whether a config file's value differs from what the run would take without it: the flag's default,
    or for a flag that resolves its default per run (``--rho``) the value it resolves to."""
    flag = flag_for(dest)
    if flag.resolve is not None:
        return value is not None and value != flag.resolve(args)
    return value != flag.default


def _given_on_command_line(argv: List[str]) -> Set[str]:
    """Destinations of the flags argv sets, abbreviations included (argv parsed with no defaults)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _warn_inert_flags(args: argparse.Namespace, explicit: Set[str]) -> None:
    """Warn about flags set (on the command line, or in the config file away from their default) that
    this run ignores: ESAM/SAM flags with an optimizer that does not read them (``Flag.used_by``), options
    of a feature that is off (``Flag.needs``). They are likely a mistake, but harmless, so not an error."""
    kind = optimizer_kind(args.opt)
    kind = kind if kind in ('esam', 'sam', 'msam') else 'other'
    unused = [f.option for f in FLAGS if f.used_by is not None and kind not in f.used_by and f.dest in explicit]
    if unused:
        _logger.warning('%s', _IGNORING[kind].format(opt=args.opt, flags=', '.join(unused)))
    if is_msam(args.opt) and 'rho' in explicit and args.rho < MSAM_SMALL_RHO:
        _logger.warning('--rho %g is an ESAM/SAM-sized radius, but msam moves the weights by exactly rho (along the '
                        'unit momentum direction): its authors use 2-3 (default %g); with a config made for esam, '
                        'pass --rho for msam explicitly', args.rho, MSAM_DEFAULT_RHO)
    for flag in FLAGS:
        if flag.needs is not None and flag.dest in explicit and not getattr(args, flag.needs):
            _logger.warning('%s has no effect without %s', flag.option, flag_for(flag.needs).option)


def args_to_yaml(args: argparse.Namespace) -> str:
    """The resolved arguments as YAML, loadable again with -c (written to args.yaml)."""
    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    values.pop('config', None)
    return yaml.safe_dump(values, default_flow_style=False, sort_keys=True)

"""``python -m esam_timm.sharpness CHECKPOINT [CHECKPOINT ...]``: measure and plot the sharpness of
trained checkpoints on the same fixed batches of the training data.

For each checkpoint: the report of :func:`~esam_timm.sharpness.measure_sharpness` (loss, top Hessian
eigenvalue, m-sharpness, Hessian trace), the 1D loss curve along a filter-normalised random direction
and the 2D loss surface over two; with two or more checkpoints also the loss along the straight line
from the first checkpoint to each other one. Prints a table and writes ``sharpness.json``,
``landscape_1d.png`` (all checkpoints overlaid), ``landscape_2d_<name>.png`` per checkpoint and
``interpolation.png`` into ``--output``; ``--log-wandb`` adds the numbers and images to a W&B run.

The data flags are the trainer's; the model, class count and image size default to what the
checkpoint's training flags recorded. Inputs that cannot work (a missing file, a checkpoint that does
not fit the model, an unknown split) end with one line and exit code 2.
"""
import argparse
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from esam_timm.console import setup_logging
from esam_timm.data.backends import DataBackend, ImageConfig, LoaderConfig, Split, open_data
from esam_timm.fileio import atomic_write_text
from esam_timm.wandb_logger import WandbLogger

from .checkpoints import CheckpointState, load_into, load_model_state
from .core import Batch
from .landscape import (Landscape1D, Landscape2D, interpolate_checkpoints, linspace, loss_landscape_1d,
                        loss_landscape_2d)
from .measure import SharpnessReport, measure_sharpness
from .plots import plot_interpolations, plot_landscape_2d, plot_landscapes_1d

__all__ = ['PROG', 'UsageError', 'build_parser', 'main', 'run', 'format_table']

_logger = logging.getLogger(__name__)

PROG = 'python -m esam_timm.sharpness'
_CHECKPOINT_SUFFIXES = ('.pth.tar', '.pth', '.pt', '.ckpt', '.bin')


class UsageError(ValueError):
    """Input the command cannot work with; printed as one line with exit code 2."""


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f'{value} is invalid: give an integer >= {minimum}')
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f'{value} is invalid: give a positive number')
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command's flags; the data and model flags have the trainer's names and meanings."""
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description='Measure the sharpness of trained checkpoints (top Hessian eigenvalue, Hessian trace, SAM '
                    'm-sharpness, loss landscapes) on the same fixed training batches.')
    parser.add_argument('checkpoints', nargs='+', metavar='CHECKPOINT',
                        help='trainer/timm checkpoints (state_dict entry) or plain timm state dicts')
    parser.add_argument('--names', nargs='+', default=None, metavar='NAME',
                        help='one label per checkpoint for the table, plots and W&B (default: from the file paths); '
                             'give it after the checkpoints')
    parser.add_argument('--ema', action='store_true', help='measure the EMA weights (state_dict_ema)')

    group = parser.add_argument_group('Data (the trainer\'s flags)')
    group.add_argument('--data-dir', metavar='DIR', required=True,
                       help='the training data: a folder with _info.json + shards (wds), an ImageFolder root, or a '
                            'shard pattern')
    group.add_argument('--dataset', metavar='NAME', default='wds/',
                       help="'wds/<name>' for WebDataset shards, '' for an ImageFolder, or a timm dataset name")
    group.add_argument('--train-split', metavar='NAME', default='train')
    group.add_argument('--val-split', metavar='NAME', default='validation')
    group.add_argument('--split', choices=('train', 'val'), default='train',
                       help='which split the batches come from (sharpness is a property of the training loss)')
    group.add_argument('-b', '--batch-size', type=_int_at_least(1), default=64, metavar='N')
    group.add_argument('--num-batches', type=_int_at_least(1), default=4, metavar='N',
                       help='the first N batches of the split (eval transforms) are the data of every measurement')
    group.add_argument('-j', '--workers', type=_int_at_least(0), default=2, metavar='N')

    group = parser.add_argument_group('Model (default: the checkpoint\'s training flags)')
    group.add_argument('--model', default=None, metavar='NAME', help='timm model name')
    group.add_argument('--num-classes', type=_int_at_least(1), default=None, metavar='N')
    group.add_argument('--img-size', type=_int_at_least(1), default=None, metavar='N')
    group.add_argument('--crop-pct', type=_positive_float, default=None, metavar='PCT')
    group.add_argument('--device', default='', help="e.g. cuda:0 or cpu (default: cuda when available)")

    group = parser.add_argument_group('Measurements')
    group.add_argument('--rho', type=_positive_float, default=0.05, help='ascent radius of the m-sharpness')
    group.add_argument('--m', type=_int_at_least(1), default=None,
                       help='samples per ascent of the m-sharpness (default: the batch size)')
    group.add_argument('--eig-iters', type=_int_at_least(1), default=20, metavar='N',
                       help='most power iterations for the top Hessian eigenvalue')
    group.add_argument('--eig-tol', type=_positive_float, default=1e-3, metavar='TOL',
                       help='relative change at which the power iteration stops')
    group.add_argument('--trace-samples', type=_int_at_least(0), default=10, metavar='N',
                       help='Hutchinson probes for the Hessian trace (0 skips it, else at least 2)')
    group.add_argument('--seed', type=int, default=0, help='seed of the random vectors and directions')

    group = parser.add_argument_group('Loss landscapes')
    group.add_argument('--landscape-range', type=_positive_float, default=1.0, metavar='R',
                       help='landscapes span [-R, R] along each filter-normalised direction')
    group.add_argument('--landscape-points', type=_int_at_least(0), default=21, metavar='N',
                       help='points of the 1D landscape (0 skips it)')
    group.add_argument('--contour-points', type=_int_at_least(0), default=11, metavar='N',
                       help='points per side of the 2D landscape (0 skips it)')
    group.add_argument('--interp-range', type=float, nargs=2, default=(-0.25, 1.25), metavar=('LOW', 'HIGH'),
                       help='alphas of the interpolation (0 = first checkpoint, 1 = the other)')
    group.add_argument('--interp-points', type=_int_at_least(2), default=13, metavar='N')

    group = parser.add_argument_group('Output')
    group.add_argument('--output', default=None, metavar='DIR',
                       help='output folder (default: ./output/sharpness/<date-time>)')
    group.add_argument('--no-progress', action='store_true', help='no progress bars')
    group.add_argument('--log-wandb', action='store_true', help='log the numbers and plots to Weights & Biases')
    group.add_argument('--wandb-project', default=None)
    group.add_argument('--wandb-tags', default=[], nargs='+')
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if args.trace_samples == 1:
        raise UsageError('--trace-samples 1 is invalid: give 0 (no trace) or at least 2 probes (the standard error '
                         'needs two)')
    for flag, points in (('--landscape-points', args.landscape_points), ('--contour-points', args.contour_points)):
        if points == 1:
            raise UsageError(f'{flag} 1 is invalid: give 0 (skip) or at least 2 points')
    if args.names is not None and len(args.names) != len(args.checkpoints):
        raise UsageError(f'--names gives {len(args.names)} names for {len(args.checkpoints)} checkpoints: give one '
                         f'per checkpoint')
    if args.names is not None and len(set(args.names)) != len(args.names):
        raise UsageError(f'--names {" ".join(args.names)} repeats a name: give each checkpoint its own')
    low, high = args.interp_range
    if not low < high:
        raise UsageError(f'--interp-range {low} {high} is invalid: LOW must be below HIGH')


def checkpoint_names(paths: Sequence[str]) -> List[str]:
    """Short unique labels for checkpoint files: the file name without its suffix, led, when file names
    repeat, by the folders in which the paths differ (``sgd-last`` and ``esam-last`` for
    ``sgd/run/last.pth.tar`` and ``esam/run/last.pth.tar``)."""
    parts = []
    for path in paths:
        pieces = [p for p in os.path.normpath(os.path.abspath(path)).split(os.sep) if p]
        stem = pieces[-1]
        for suffix in _CHECKPOINT_SUFFIXES:
            if stem.endswith(suffix) and len(stem) > len(suffix):
                stem = stem[:-len(suffix)]
                break
        parts.append(pieces[:-1][::-1] + [stem])  # folders nearest first, then the stem
    stems = [p[-1] for p in parts]
    if len(set(stems)) == len(stems):
        return stems
    depth = max(len(p) for p in parts) - 1
    differing = [d for d in range(depth) if len({p[d] if d < len(p) - 1 else '' for p in parts}) > 1]
    names = ['-'.join([p[d] for d in reversed(differing) if d < len(p) - 1] + [p[-1]]) for p in parts]
    if len(set(names)) == len(names):
        return names
    return [f'{i}-{name}' for i, name in enumerate(names)]


def _slug(name: str) -> str:
    return re.sub(r'[^A-Za-z0-9._-]+', '_', name)


@dataclass
class _Setup:
    model: nn.Module
    model_name: str
    data_config: Dict[str, Any]
    num_classes: int
    checkpoints: List[CheckpointState]
    names: List[str]
    batches: List[Batch]
    device: torch.device
    split: str


def _device(spec: str) -> torch.device:
    device = torch.device(spec) if spec else torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if device.type == 'cuda':
        # measure in true fp32: cuDNN convolutions otherwise default to TF32 (this process is ours to set)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return device


def _open_split(args: argparse.Namespace, split: str) -> Tuple[DataBackend, Split]:
    """The data backend of ``--dataset`` and the split's ``-b`` x ``--num-batches`` samples that every
    measurement uses, the same every time (shards: the first ones, shuffled when written; folders: a
    fixed random subset drawn with ``--seed``, as a folder sorted by class starts with one class)."""
    backend = open_data(args.dataset, args.data_dir, seed=args.seed, batch_size=args.batch_size)
    return backend, backend.subset(split, args.batch_size * args.num_batches, args.seed)


def _first_batches(args: argparse.Namespace, backend: DataBackend, split: Split, data_config: Dict[str, Any],
                   num_classes: int, device: torch.device) -> List[Batch]:
    """The split's samples (eval transforms, normalised on the device as in training) in batches of
    ``-b``: the data of every measurement, the same for every checkpoint."""
    config = LoaderConfig(batch_size=args.batch_size, image=ImageConfig.from_timm(data_config), device=device,
                          workers=args.workers, num_classes=num_classes)
    loader = backend.eval_loader(split, config)
    wanted = args.batch_size * args.num_batches
    inputs_seen: List[torch.Tensor] = []
    targets_seen: List[torch.Tensor] = []
    for inputs, targets in loader:
        targets = targets.to(device=device, dtype=torch.long)
        if targets.numel() and int(targets.max()) >= num_classes:
            raise UsageError(f'the data holds label {int(targets.max())}, outside the {num_classes} classes of the '
                             f'model: pass the --num-classes the checkpoints were trained with')
        inputs_seen.append(inputs.to(device=device, dtype=torch.float32))
        targets_seen.append(targets)
        if sum(len(t) for t in targets_seen) >= wanted:
            break
    if not targets_seen:
        raise UsageError(f'split {args.split!r} of {args.data_dir!r} gave no samples')
    # loader workers each end on a short batch: re-batch so that every batch but the last is full
    images = torch.cat(inputs_seen)[:wanted].contiguous()
    labels = torch.cat(targets_seen)[:wanted]
    if len(labels) < wanted:
        _logger.warning('Split %r holds only %d of the %d samples asked for (%d batches of %d)', args.split,
                        len(labels), wanted, args.num_batches, args.batch_size)
    return list(zip(images.split(args.batch_size), labels.split(args.batch_size)))


def _create_model(name: str, num_classes: int, in_chans: int, train_args: Dict[str, Any]) -> nn.Module:
    import timm
    kwargs: Dict[str, Any] = {}
    if train_args.get('model') == name:  # the architecture options it was trained with
        kwargs.update(train_args.get('model_kwargs') or {})
        for flag, key in (('gp', 'global_pool'), ('bn_eps', 'bn_eps'), ('bn_momentum', 'bn_momentum')):
            if train_args.get(flag) is not None:
                kwargs[key] = train_args[flag]
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except RuntimeError as e:  # timm's "Unknown model (...)"
        raise UsageError(f'--model {name!r}: {e}') from None


def _setup(args: argparse.Namespace) -> _Setup:
    """Everything that can fail on bad input, before any measurement: checkpoints, model, data."""
    from timm.data import resolve_data_config
    _check_args(args)
    checkpoints = [load_model_state(path, ema=args.ema) for path in args.checkpoints]
    names = list(args.names) if args.names is not None else checkpoint_names(args.checkpoints)
    reference = next((c for c in checkpoints if c.args), None)
    train_args: Dict[str, Any] = dict(reference.args) if reference is not None else {}
    model_name = args.model or train_args.get('model') or next((c.arch for c in checkpoints if c.arch), None)
    if not model_name:
        raise UsageError(f'{args.checkpoints[0]!r} records no architecture (a plain state dict): pass --model, '
                         f'--num-classes and --img-size')
    if args.img_size is None and reference is None:
        raise UsageError('no checkpoint records its image size (plain state dicts): pass --img-size')
    split = args.train_split if args.split == 'train' else args.val_split
    if not split:
        raise UsageError(f'--{args.split}-split is empty: name the split to read the batches from')
    backend, subset = _open_split(args, split)
    num_classes = args.num_classes or train_args.get('num_classes') or subset.num_classes
    if not num_classes:
        raise UsageError(f'cannot tell the number of classes: the checkpoints do not record it and {args.data_dir!r} '
                         f'does not say: pass --num-classes')
    input_size = train_args.get('input_size')
    in_chans = int(input_size[0]) if input_size else int(train_args.get('in_chans') or 3)
    model = _create_model(model_name, num_classes, in_chans, train_args)
    for checkpoint in checkpoints:  # all must fit before the data is read
        load_into(model, checkpoint, model_name)
    config_args = dict(train_args)
    if args.img_size is not None:
        config_args.update(img_size=args.img_size, input_size=None)
    if args.crop_pct is not None:
        config_args['crop_pct'] = args.crop_pct
    data_config = resolve_data_config(config_args, model=model)
    device = _device(args.device)
    model.to(device)
    batches = _first_batches(args, backend, subset, data_config, num_classes, device)
    return _Setup(model=model, model_name=model_name, data_config=data_config, num_classes=num_classes,
                  checkpoints=checkpoints, names=names, batches=batches, device=device, split=split)


def format_table(reports: Dict[str, SharpnessReport]) -> str:
    """The reports as a plain-text table, one row per checkpoint."""
    def num(value: Optional[float], spec: str = '.4f') -> str:
        return '-' if value is None else format(value, spec)

    header = ['checkpoint', 'loss', 'top_eig', 'iters', 'converged', 'trace', 'trace_se', 'm_sharpness']
    rows = [[name, num(r.loss), num(r.top_eigenvalue), str(r.eig_iterations), 'yes' if r.eig_converged else 'no',
             num(r.hessian_trace, '.2f'), num(r.trace_std_error, '.2f'), num(r.m_sharpness)]
            for name, r in reports.items()]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ['  '.join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    return '\n'.join(lines)


def _finite(value: Any) -> Any:
    """JSON-safe copy: non-finite floats (a diverged loss far out on a landscape) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _log_wandb(args: argparse.Namespace, output: str, config: Dict[str, Any], names: Sequence[str],
               reports: Dict[str, SharpnessReport], images: Dict[str, str]) -> None:
    logger = WandbLogger(True, project=args.wandb_project, tags=args.wandb_tags, config=config, output_dir=output,
                         name=f'sharpness-{os.path.basename(os.path.normpath(output))}')
    if not logger.active:
        return
    metrics: Dict[str, Any] = {f'sharpness/{_slug(name)}/{key}': value
                               for name in names for key, value in reports[name].to_dict().items()}
    try:
        import wandb
        metrics.update({f'sharpness/{key}': wandb.Image(path) for key, path in images.items()})
    except Exception as e:  # an image W&B cannot take must not lose the numbers
        _logger.warning('W&B: the plots are not logged (%s: %s)', type(e).__name__, e)
    logger.log(metrics, step=0)
    logger.finish()


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Measure every checkpoint, write the JSON and plots, log to W&B; returns what sharpness.json holds."""
    try:
        setup = _setup(args)
    except UsageError:
        raise
    except (ValueError, FileNotFoundError) as e:  # bad checkpoints, flags or data: not a bug to trace back
        raise UsageError(str(e)) from e
    progress = not args.no_progress
    output = args.output or os.path.join('.', 'output', 'sharpness', datetime.now().strftime('%Y%m%d-%H%M%S'))
    os.makedirs(output, exist_ok=True)
    num_samples = sum(inputs.shape[0] for inputs, _ in setup.batches)
    _logger.info('Measuring %d checkpoint(s) of %s on %d batches (%d samples) of split %r, input %s, on %s',
                 len(setup.checkpoints), setup.model_name, len(setup.batches), num_samples, setup.split,
                 tuple(setup.data_config['input_size']), setup.device)
    span = args.landscape_range
    reports: Dict[str, SharpnessReport] = {}
    curves: Dict[str, Landscape1D] = {}
    grids: Dict[str, Landscape2D] = {}
    loss_fn = F.cross_entropy
    for name, checkpoint in zip(setup.names, setup.checkpoints):
        _logger.info('Checkpoint %s (%s)', name, checkpoint.path)
        load_into(setup.model, checkpoint, setup.model_name)
        reports[name] = measure_sharpness(setup.model, setup.batches, loss_fn, rho=args.rho, m=args.m,
                                          eig_iters=args.eig_iters, eig_tol=args.eig_tol,
                                          trace_samples=args.trace_samples, seed=args.seed, progress=progress)
        if args.landscape_points:
            curves[name] = loss_landscape_1d(setup.model, setup.batches, loss_fn, seed=args.seed, progress=progress,
                                             alphas=linspace(-span, span, args.landscape_points))
        if args.contour_points:
            grids[name] = loss_landscape_2d(setup.model, setup.batches, loss_fn, seed=args.seed, progress=progress,
                                            alphas=linspace(-span, span, args.contour_points))
    interpolations = []
    first = setup.checkpoints[0]
    for name, checkpoint in zip(setup.names[1:], setup.checkpoints[1:]):
        curve = interpolate_checkpoints(setup.model, first.state_dict, checkpoint.state_dict, setup.batches, loss_fn,
                                        alphas=linspace(args.interp_range[0], args.interp_range[1], args.interp_points),
                                        progress=progress)
        interpolations.append((f'{setup.names[0]} -> {name}', setup.names[0], name, curve))

    config = {
        'model': setup.model_name, 'num_classes': setup.num_classes,
        'input_size': list(setup.data_config['input_size']), 'data_dir': args.data_dir, 'dataset': args.dataset,
        'split': setup.split, 'batch_size': args.batch_size, 'num_batches': len(setup.batches),
        'num_samples': num_samples, 'ema': args.ema, 'rho': args.rho, 'm': args.m or args.batch_size,
        'eig_iters': args.eig_iters, 'eig_tol': args.eig_tol, 'trace_samples': args.trace_samples, 'seed': args.seed,
        'landscape_range': span, 'device': str(setup.device), 'torch': torch.__version__,
    }
    result: Dict[str, Any] = {'config': config, 'checkpoints': {}}
    for name, checkpoint in zip(setup.names, setup.checkpoints):
        entry: Dict[str, Any] = {'path': os.path.abspath(checkpoint.path), 'report': reports[name].to_dict()}
        if name in curves:
            entry['landscape_1d'] = curves[name].to_dict()
        if name in grids:
            entry['landscape_2d'] = grids[name].to_dict()
        result['checkpoints'][name] = entry
    if interpolations:
        result['interpolation'] = [dict(curve.to_dict(), **{'from': a, 'to': b}) for _, a, b, curve in interpolations]
    atomic_write_text(os.path.join(output, 'sharpness.json'), json.dumps(_finite(result), indent=2) + '\n')

    images: Dict[str, str] = {}
    if curves:
        images['landscape_1d'] = os.path.join(output, 'landscape_1d.png')
        plot_landscapes_1d(curves, images['landscape_1d'])
    for name, grid in grids.items():
        images[f'landscape_2d/{_slug(name)}'] = os.path.join(output, f'landscape_2d_{_slug(name)}.png')
        plot_landscape_2d(grid, images[f'landscape_2d/{_slug(name)}'], f'Loss landscape of {name}')
    if interpolations:
        images['interpolation'] = os.path.join(output, 'interpolation.png')
        plot_interpolations([(label, curve) for label, _, _, curve in interpolations], images['interpolation'])
    if args.log_wandb:
        _log_wandb(args, output, config, setup.names, reports, images)

    m = args.m or args.batch_size
    print(format_table(reports))
    print(f'{num_samples} samples ({len(setup.batches)} batches of split {setup.split!r}); m-sharpness at rho '
          f'{args.rho}, m {m}; trace from {args.trace_samples} probes')
    _logger.info('Wrote sharpness.json and %d plot(s) to %s', len(images), output)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit code (2 with one error line for input it cannot work with)."""
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        run(args)
    except UsageError as e:
        sys.stderr.write(f'{PROG}: error: {e}\n')
        return 2
    return 0

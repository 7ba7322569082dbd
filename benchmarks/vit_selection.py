"""What ESAM's data selection picks while a Vision Transformer trains (issue 23: ESAM over AdamW collapses on
``test_vit``), step by step.

Trains one arm on one task of ``benchmarks/accuracy.py`` (default: ``vit-mnist-noisy``, i.e. ``test_vit`` at
32 px, patch 4, drop-path 0.1, AdamW lr 1e-3 wd 0.05, 2,000 MNIST digits with 30% flipped labels) through
``esam_timm.train_step``. The arm's SDS rule is wrapped by a probe that sees every step's per-sample signal,
clean losses and k, lets the rule choose, and records for that choice and for the paper's top-k on the same
signal:

- the mislabelled share of the batch and of the selection;
- the class balance: distinct classes selected, the largest class share of the selection (and of the batch);
- the mean clean loss and signal of the selection against the batch's;
- ``label_eta2``: the share of the signal's variance across the batch that the (given) labels explain
  (between-label variance / total). Near 1 the signal is a function of the label alone;
- from the first forward's logits (a hook on the classifier): the share of the batch the most frequent
  prediction takes (``pred_mode_share``; 1 = the same class for every input) and ``logit_eta2``, the
  share of the logits' variance (over samples and classes) explained by the class alone, i.e. how little
  the output depends on the input;
- what the base optimizer's update did to the batch's logits (eval mode, before and after its step; each
  sample's change centred over the classes): ``prior_shift``, the norm of the change common to all
  samples of the batch (a shift of the class prior), and ``specific_change``, the RMS over samples of the
  rest (what tells inputs apart); ``prior_ratio`` is their quotient.

Per epoch: the mean training loss (clean loss of F1) and the test top-1. The probe only reads; training
is the arm's, unchanged. ``--sds random`` selects k samples uniformly (its own generator), the half batch
without the sharpness; ``--sds balanced`` and the others are the library's modes.

    python benchmarks/vit_selection.py --arm esam --epochs 6               # the collapse
    python benchmarks/vit_selection.py --arm esam --sds random --epochs 6  # a half batch, not chosen
    python benchmarks/vit_selection.py --arm esam --base momentum --lr 0.05 --weight-decay 5e-4
    python benchmarks/vit_selection.py --table benchmarks/results/vit-probe-*.json  # the table of several runs
"""
import argparse
import json
import statistics
import time
from typing import Any, Dict, List, Optional

import timm
import torch
import torch.nn as nn

import esam_timm
from esam_timm.selection import SDSMode, get_sds_mode, top_k

from accuracy import TASKS, add_recipe_args, create_model, evaluate, make_tasks, train  # same recipe


class RandomRule:
    """k samples drawn uniformly from the batch with its own generator (training's RNG untouched)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, score: torch.Tensor, clean_loss: torch.Tensor, k: int) -> torch.Tensor:
        return torch.randperm(score.shape[0], generator=self.generator)[:k]


class WarmupRule:
    """k uniformly drawn samples for the first ``steps`` calls, then ``rule``: selection starting late."""

    needs_labels = True

    def __init__(self, steps: int, rule, seed: int) -> None:
        self.steps, self.rule, self.random, self.calls = steps, rule, RandomRule(seed), 0

    def __call__(self, score: torch.Tensor, clean_loss: torch.Tensor, k: int, *, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls <= self.steps:
            return self.random(score, clean_loss, k)
        if getattr(self.rule, 'needs_labels', False):
            return self.rule(score, clean_loss, k, labels=labels)
        return self.rule(score, clean_loss, k)


def eta2(values: torch.Tensor, groups: torch.Tensor) -> float:
    """Share of the variance of ``values`` [N] explained by the group means (between-group / total)."""
    values = values.double()
    total = ((values - values.mean()) ** 2).sum()
    if total <= 0:
        return 0.0
    between = sum(((values[groups == g].mean() - values.mean()) ** 2) * (groups == g).sum()
                  for g in groups.unique())
    return float(between / total)


def class_stats(labels: torch.Tensor, num_classes: int) -> Dict[str, float]:
    counts = torch.bincount(labels, minlength=num_classes).double()
    return {'classes': int((counts > 0).sum()), 'max_share': float(counts.max() / counts.sum())}


class SelectionProbe:
    """Records, per step, how much the first forward's output depends on the input and, when it wraps an
    SDS rule, what that rule and the paper's top-k pick (the rule's choice is returned unchanged).

    Call :meth:`start_step` with the epoch, the given labels and the mislabelled flags before each step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, rule, num_classes: int) -> None:
        self.model = model
        self.rule = rule
        self.num_classes = num_classes
        model.get_classifier().register_forward_hook(self._hook)
        sam = esam_timm.find_sam(optimizer)
        base = sam.base_optimizer if sam is not None else optimizer
        base.register_step_pre_hook(self._before_update)
        base.register_step_post_hook(self._after_update)
        self.logits: Optional[torch.Tensor] = None
        self.epoch = 0
        self.inputs: Optional[torch.Tensor] = None
        self.labels: Optional[torch.Tensor] = None
        self.mislabelled: Optional[torch.Tensor] = None
        self.eval_logits: Optional[torch.Tensor] = None
        self.records: List[Dict[str, Any]] = []

    def start_step(self, epoch: int, inputs: torch.Tensor, labels: torch.Tensor, mislabelled: torch.Tensor) -> None:
        self.epoch, self.inputs, self.labels, self.mislabelled = epoch, inputs, labels, mislabelled
        self.logits = None

    @torch.no_grad()
    def _eval_logits(self) -> torch.Tensor:
        self.model.eval()  # no drop-path: no RNG drawn, training's masks untouched
        logits = self.model(self.inputs).float()
        self.model.train()
        return logits

    def _before_update(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.eval_logits = self._eval_logits()

    def _after_update(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        change = self._eval_logits() - self.eval_logits
        change = change - change.mean(1, keepdim=True)  # a shift of every logit alike changes nothing
        prior = change.mean(0)
        specific = float((change - prior).square().sum(1).mean().sqrt())
        self.records[-1].update({'prior_shift': float(prior.norm()), 'specific_change': specific,
                                 'prior_ratio': float(prior.norm()) / max(specific, 1e-12)})

    def _hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if torch.is_grad_enabled() and module.training and self.logits is None:  # the step's first forward, F1
            self.logits = output.detach().float()
            preds = self.logits.argmax(1)
            classes = torch.arange(self.logits.shape[1]).expand_as(self.logits).reshape(-1)
            self.records.append({
                'epoch': self.epoch, 'loss_batch': float(nn.functional.cross_entropy(self.logits, self.labels)),
                'mislabelled_batch': float(self.mislabelled.float().mean()),
                'batch_max_share': class_stats(self.labels, self.num_classes)['max_share'],
                'pred_mode_share': float(torch.bincount(preds, minlength=self.num_classes).max() / preds.numel()),
                'logit_eta2': eta2(self.logits.reshape(-1), classes)})

    needs_labels = True  # so the step hands the batch's labels to the wrapped rule too

    @torch.no_grad()
    def __call__(self, score: torch.Tensor, clean_loss: torch.Tensor, k: int, *, labels: torch.Tensor) -> torch.Tensor:
        if not torch.equal(labels, self.labels):
            raise RuntimeError('the step selected from other labels than the probe was given')
        chosen = (self.rule(score, clean_loss, k, labels=labels) if getattr(self.rule, 'needs_labels', False)
                  else self.rule(score, clean_loss, k))
        paper = top_k(score, clean_loss, k)
        record = self.records[-1]
        record.update({'k': k, 'score_batch': float(score.mean()),
                       'label_eta2': eta2(score, self.labels)})
        for name, index in (('chosen', chosen), ('topk', paper)):
            stats = class_stats(self.labels[index], self.num_classes)
            record.update({f'{name}_classes': stats['classes'], f'{name}_max_share': stats['max_share'],
                           f'{name}_mislabelled': float(self.mislabelled[index].float().mean()),
                           f'{name}_loss': float(clean_loss[index].mean()),
                           f'{name}_score': float(score[index].mean())})
        return chosen


METRICS = ['pred_mode_share', 'logit_eta2', 'prior_shift', 'specific_change', 'prior_ratio', 'loss_batch', 'chosen_loss', 'topk_loss', 'mislabelled_batch',
           'chosen_mislabelled', 'topk_mislabelled',
           'batch_max_share', 'chosen_max_share', 'topk_max_share', 'chosen_classes', 'topk_classes', 'label_eta2',
           'score_batch', 'chosen_score']


def epoch_summary(records: List[Dict[str, Any]]) -> Dict[str, float]:
    """Mean of every metric the epoch's steps recorded."""
    return {key: statistics.mean(r[key] for r in records) for key in METRICS if key in records[0]}


TABLE_EPOCHS = (0, 1, 2, 5)


def table(paths: List[str]) -> str:
    """Markdown table of recorded runs: per run and epoch, test top-1, how input-dependent the output is
    (first step of the run, then epoch medians), what the selection held, and the update's prior share."""
    lines = ['| run | epoch | test top-1 | pred. mode share | logit var. by class | sharpness var. by label '
             '| classes in selection (batch: 10) | largest class: selection / batch | mislabelled: selection / '
             'batch | clean loss: selection / batch | update: prior / per-sample (median) |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        config = run['config']
        name = f"{config['arm']}" + (f" ({config['sds']})" if config['arm'] == 'esam' else '') + \
            f", {run['base']}, {config['task']}" + (f", noise {config['noise']}" if config.get('noise') is not None else '') + \
            (f", warm-up {config['warmup_steps']} steps" if config.get('warmup_steps') else '') + \
            (f", beta {config['beta']}" if config['arm'] == 'esam' and config['beta'] != 0.5 else '') + \
            (f", drop-path {config['drop_path']}" if config.get('drop_path') is not None else '')
        first = run['steps'][0]
        lines.append(f"| {name} | first step | | {first['pred_mode_share']:.2f} | {first['logit_eta2']:.2f} | "
                     + (f"{first['label_eta2']:.2f} |" if 'label_eta2' in first else '- |') + ' | | | | |')
        for epoch in TABLE_EPOCHS:
            rows = [r for r in run['steps'] if r['epoch'] == epoch]
            row = next((e for e in run['epochs'] if e['epoch'] == epoch), None)
            if not rows or row is None:
                continue

            def med(key: str, fmt: str = '.2f') -> str:
                values = [r[key] for r in rows if key in r]
                return format(statistics.median(values), fmt) if values else '-'
            selected = 'chosen_classes' in rows[0]
            lines.append(
                f"| | {epoch} | {row['test_top1']:.1f} | {med('pred_mode_share')} | {med('logit_eta2')} | "
                f"{med('label_eta2')} | {med('chosen_classes', '.1f') if selected else '-'} | "
                + (f"{med('chosen_max_share')} / {med('batch_max_share')} | {med('chosen_mislabelled')} / "
                   f"{med('mislabelled_batch')} | {med('chosen_loss')} / {med('loss_batch')} |" if selected
                   else f"- / {med('batch_max_share')} | - / {med('mislabelled_batch')} | - / {med('loss_batch')} |")
                + f" {med('prior_ratio', '.1f')} |")
    return '\n'.join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--task', default='vit-mnist-noisy', choices=list(TASKS))
    parser.add_argument('--arm', default='esam', choices=['esam', 'sam', 'plain'],
                        help='esam (beta, gamma, sds), sam, or the plain base optimizer')
    parser.add_argument('--base', default=None, help="base optimizer (default: the task's, e.g. adamw)")
    parser.add_argument('--sds', default='exact', help="SDS mode, or 'random' (k uniform samples)")
    parser.add_argument('--warmup-steps', type=int, default=0,
                        help='select k uniformly drawn samples for this many steps before the SDS rule starts')
    parser.add_argument('--beta', type=float, default=0.5)
    parser.add_argument('--gamma', type=float, default=0.5)
    parser.add_argument('--esam-kwargs', default='{}', help='extra ESAM keyword arguments as JSON')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--train-size', type=int, default=None)
    parser.add_argument('--noise', type=float, default=None)
    parser.add_argument('--epochs', type=int, default=None)
    parser.add_argument('--drop-path', type=float, default=None, help='override the task\'s drop-path rate')
    add_recipe_args(parser)
    parser.add_argument('--out', default=None, help='JSON file for the per-step records and per-epoch rows')
    parser.add_argument('--table', nargs='+', default=None, metavar='JSON',
                        help='print the markdown table of these recorded runs and exit (no training)')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.table:
        print(table(args.table))
        return
    torch.set_num_threads(args.threads)
    task = make_tasks([args.task], args)[args.task]
    if task.augment != 'none':
        raise SystemExit(f'--augment {task.augment}: the probe measures the update on the un-augmented batch; '
                         f'use --augment none')
    if args.base is not None:
        task.base = args.base
    if args.drop_path is not None:
        task.model_kwargs = dict(task.model_kwargs or {}, drop_path_rate=args.drop_path)
    torch.manual_seed(args.seed)
    model = create_model(task, args.num_classes)
    kwargs: Dict[str, Any] = dict(lr=task.lr, weight_decay=task.weight_decay, momentum=0.9)
    if args.arm == 'plain':
        optimizer = timm.optim.create_optimizer_v2(model, task.base, **kwargs)
        probe = SelectionProbe(model, optimizer, None, args.num_classes)
    else:
        extra = json.loads(args.esam_kwargs)
        shares = dict(beta=1.0, gamma=1.0) if args.arm == 'sam' else dict(beta=args.beta, gamma=args.gamma)
        optimizer = timm.optim.create_optimizer_v2(model, 'esam', base_optimizer=task.base, rho=args.rho,
                                                   seed=args.seed, **shares, **kwargs, **extra)
        probe = SelectionProbe(model, optimizer, None, args.num_classes)
        if optimizer.gamma < 1:
            mode = SDSMode('exact', RandomRule(args.seed)) if args.sds == 'random' else get_sds_mode(args.sds)
            probe.rule = WarmupRule(args.warmup_steps, mode.rule, args.seed) if args.warmup_steps else mode.rule
            optimizer.sds = SDSMode(mode.signal, probe)
    epoch_rows: List[Dict[str, Any]] = []
    start = time.perf_counter()
    losses: List[float] = []

    def report(epoch: int) -> None:
        row: Dict[str, Any] = {'epoch': epoch, 'test_top1': evaluate(model, task.test_x, task.test_y)}
        row.update(epoch_summary([r for r in probe.records if r['epoch'] == epoch]))
        epoch_rows.append(row)
        shown = ', '.join(f'{k} {v:.2f}' for k, v in row.items() if k != 'epoch')
        print(f'epoch {epoch}: {shown}; {time.perf_counter() - start:.0f} s', flush=True)

    def before_step(epoch: int, index: torch.Tensor) -> None:
        if epoch != probe.epoch:
            report(probe.epoch)
        probe.start_step(epoch, task.train_x[index], task.train_y[index], task.mislabelled[index])

    stats = train(model, optimizer, task.train_x, task.train_y, epochs=task.epochs, batch_size=task.batch_size,
                  lr=task.lr, pad=args.pad, augment_mode=task.augment, seed=args.seed, before_step=before_step)
    report(task.epochs - 1)
    print(f'{args.arm} ({args.sds}) over {task.base} on {task.name}: last-epoch loss {stats["last_epoch_loss"]:.3f}, '
          f'test top-1 {epoch_rows[-1]["test_top1"]:.1f}%', flush=True)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump({'config': vars(args), 'base': task.base, 'last_epoch_loss': stats['last_epoch_loss'],
                       'epochs': epoch_rows, 'steps': probe.records,
                       'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, f, indent=1)
        print(f'wrote {args.out}')


if __name__ == '__main__':
    main()

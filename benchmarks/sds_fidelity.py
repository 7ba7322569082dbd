"""How well the F2-free SDS signals recover exact ESAM's sample selection, over a training run.

Trains with exact ESAM (the paper's SDS: an extra no-grad forward F2 measures each sample's sharpness
``s_i = l_i(w+e) - l_i(w)`` and the top-k get the second pass) on the demo shapes, by default with
30% symmetric label noise on the train labels (the recipe of ``benchmarks/accuracy.py``). An
intercepting SDS rule ``SDSMode('exact', rule)`` sees ``s`` every step and returns ``topk(s, k)``, so
training is exact ESAM unchanged; at that moment the weights sit at ``w + e`` and each perturbed
tensor's ``.grad`` holds its ascent ``e``, so the rule also scores, for the SAME perturbation:

- first-order: ``delta_i . (e_W h_i + e_b)``, the classifier layer's first-order loss rise, with
  ``h_i`` (classifier input) and the logits of the first forward F1 caught by a forward hook, and
  ``delta_i = dl_i/dz_i`` from ``esam_timm.selection.logit_grad`` (the training step's own). On steps
  where SWP drew the classifier, ``e`` is its ascent; on the others (probability 1 - beta) it is the
  ascent the classifier would have had, along its own gradient ``sum_i delta_i h_i^T`` (the direction
  ``sds='first-order'`` uses there; a positive scale does not change a ranking), while the exact
  sharpness then saw no classifier perturbation at all. ``recall_first-order_undrawn`` reports those
  steps alone.
- loss: the clean loss ``l_i(w)`` of F1;
- random: k samples drawn uniformly (recall@k expected gamma).

With label noise it also reports the share of mislabelled samples in the batch and among the top-k
of the exact sharpness, of the first-order estimate and of the clean loss, and among the k samples the
noise-robust rules pick from the exact sharpness (``exact-relative``: top-k of sharpness / clean loss;
``exact-trim``: top-k after dropping the highest-loss 20%): how much of each mode's second pass is
spent on flipped labels.

Per step: recall@k = |top-k of the signal & top-k of s| / k, and the Spearman rank correlation of the
signal with ``s`` (ranks by argsort; float ties are broken by order). Every step is measured; a row
of the table averages the steps of one epoch (first-order over the steps where it is defined).

    python benchmarks/sds_fidelity.py                 # 30% label noise, 15 epochs (~45 s on 2 quiet cores)
    python benchmarks/sds_fidelity.py --noise 0       # clean labels
    python benchmarks/sds_fidelity.py --quick         # smoke run: 2 epochs, tiny sets
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
from esam_timm.selection import SDSMode, TrimHighLoss, first_order_sharpness, logit_grad, relative_to_loss

from accuracy import add_recipe_args, evaluate, make_tasks, train  # benchmarks/accuracy.py, same recipe

SIGNALS = ('first-order', 'loss', 'random')
RULES = {'relative': relative_to_loss, 'trim': TrimHighLoss()}  # the noise-robust rules, on the exact sharpness


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Rank of each entry (0 = smallest), as float64."""
    return torch.argsort(torch.argsort(x)).double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation: the Pearson correlation of the ranks."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def recall_at_k(chosen: torch.Tensor, reference: torch.Tensor, size: int) -> float:
    """Share of ``reference`` (k indices out of ``size``) that ``chosen`` (k indices) also holds."""
    mask = torch.zeros(size, dtype=torch.bool)
    mask[reference] = True
    return float(mask[chosen].float().mean())


class FidelityProbe:
    """An exact-SDS rule that keeps the paper's choice and scores the F2-free signals at the same ``e``.

    Set :attr:`epoch`, :attr:`targets` and :attr:`mislabelled` (the batch's flags) before each
    training step; :attr:`records` gets one dict per step.
    """

    def __init__(self, model: nn.Module, seed: int) -> None:
        self.classifier = model.get_classifier()
        self.classifier.register_forward_hook(self._hook)
        self.loss_fn = esam_timm.losses.PerSampleCrossEntropy()
        self.generator = torch.Generator().manual_seed(seed)  # the random baseline; training RNG untouched
        self.features: Optional[torch.Tensor] = None
        self.logits: Optional[torch.Tensor] = None
        self.epoch = 0
        self.targets: Optional[torch.Tensor] = None
        self.mislabelled: Optional[torch.Tensor] = None
        self.records: List[Dict[str, Any]] = []

    def _hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        # The rule runs after F1 (grad on), perturb and F2 (no grad), before F3: the last forward with
        # grad enabled that the rule can see is this step's F1.
        if torch.is_grad_enabled():
            self.features, self.logits = args[0].detach(), output.detach()

    def _first_order(self) -> torch.Tensor:
        """The first-order estimate at this step's ``e``; when the classifier was not drawn, along the
        classifier's own gradient (what ``sds='first-order'`` does; the scale does not change a ranking)."""
        delta = logit_grad(self.loss_fn, self.logits, self.targets)
        e_weight = self.classifier.weight.grad
        if e_weight is None:
            e_weight = delta.t() @ self.features.flatten(1).float()
        e_bias = None
        if self.classifier.bias is not None:
            e_bias = self.classifier.bias.grad if self.classifier.weight.grad is not None else delta.sum(0)
        return first_order_sharpness(delta, self.features, e_weight, e_bias)

    @torch.no_grad()
    def __call__(self, score: torch.Tensor, clean_loss: torch.Tensor, k: int) -> torch.Tensor:
        size = score.shape[0]
        if self.features is None or self.features.shape[0] != size:
            raise RuntimeError('the classifier hook did not see this step\'s first forward')
        exact = torch.topk(score, k).indices
        signals = {'first-order': self._first_order(), 'loss': clean_loss}
        record: Dict[str, Any] = {'epoch': self.epoch, 'k': k, 'batch': size,
                                  'classifier_drawn': self.classifier.weight.grad is not None,
                                  'recall_random': recall_at_k(torch.randperm(size, generator=self.generator)[:k],
                                                               exact, size),
                                  'mislabelled_batch': float(self.mislabelled.float().mean()),
                                  'mislabelled_exact': float(self.mislabelled[exact].float().mean())}
        for name, rule in RULES.items():
            record[f'mislabelled_exact-{name}'] = float(self.mislabelled[rule(score, clean_loss, k)].float().mean())
        for name, signal in signals.items():
            record[f'recall_{name}'] = recall_at_k(torch.topk(signal, k).indices, exact, size)
            record[f'spearman_{name}'] = spearman(signal, score)
            record[f'mislabelled_{name}'] = float(self.mislabelled[torch.topk(signal, k).indices].float().mean())
        if not record['classifier_drawn']:
            record['recall_first-order_undrawn'] = record['recall_first-order']
        self.records.append(record)
        return exact


METRICS = [f'recall_{s}' for s in SIGNALS] + ['recall_first-order_undrawn', 'spearman_first-order', 'spearman_loss',
                                               'mislabelled_batch', 'mislabelled_exact', 'mislabelled_first-order',
                                               'mislabelled_loss', 'mislabelled_exact-relative',
                                               'mislabelled_exact-trim']


def summary_row(label: str, records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Step counts and the mean of every metric over ``records`` (None where a metric has no step)."""
    row: Dict[str, Any] = dict(epoch=label, steps=len(records),
                               classifier_drawn=sum(r['classifier_drawn'] for r in records))
    for key in METRICS:
        values = [r[key] for r in records if key in r]
        row[key] = statistics.mean(values) if values else None
    return row


def fmt(value: Optional[float]) -> str:
    return '-' if value is None else f'{value:.2f}'


def markdown(rows: List[Dict[str, Any]]) -> str:
    """Markdown table of summary rows."""
    lines = ['| epoch | steps | classifier drawn | recall@k first-order | recall@k loss | recall@k random '
             '| recall@k first-order, classifier not drawn | Spearman first-order | Spearman loss '
             '| mislabelled: batch | mislabelled in top-k: exact | first-order | loss | exact-relative '
             '| exact-trim |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f'| {r["epoch"]} | {r["steps"]} | {r["classifier_drawn"]} | '
                     + ' | '.join(fmt(r[key]) for key in METRICS) + ' |')
    return '\n'.join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--noise', type=float, default=0.3, help='symmetric label-noise rate of the train labels')
    parser.add_argument('--beta', type=float, default=0.5)
    parser.add_argument('--gamma', type=float, default=0.5)
    parser.add_argument('--seed', type=int, default=0, help='model init, data order, augmentation, SWP draws')
    parser.add_argument('--train-size', type=int, default=1280)
    parser.add_argument('--epochs', type=int, default=15)
    add_recipe_args(parser)
    parser.add_argument('--out', default='benchmarks/sds_fidelity.json', help='JSON file for per-step records')
    parser.add_argument('--quick', action='store_true', help='smoke run: 2 epochs, 256 train / 128 test')
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.train_size, args.test_size = 2, 256, 128
    if esam_timm.num_selected(args.gamma, args.batch_size or 64) == (args.batch_size or 64):
        parser.error(f'gamma {args.gamma} keeps the whole batch: ESAM then makes no selection to measure')
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    task_name = 'noisy' if args.noise > 0 else 'small'  # train size, epochs and noise: this script's flags
    task = make_tasks([task_name], args)[task_name]
    print(f'{task.name}: {len(task.train_y)} train ({task.noisy_labels} noisy labels), {len(task.test_y)} test, '
          f'{task.model}, {args.img_size} px', flush=True)
    torch.manual_seed(args.seed)
    model = timm.create_model(task.model, num_classes=args.num_classes)
    optimizer = timm.optim.create_optimizer_v2(
        model, 'esam', lr=task.lr, weight_decay=task.weight_decay, momentum=0.9, base_optimizer='momentum',
        rho=args.rho, beta=args.beta, gamma=args.gamma, sds='exact', seed=args.seed)
    probe = FidelityProbe(model, args.seed)
    optimizer.sds = SDSMode('exact', probe)

    def epoch_row(epoch: int) -> Dict[str, Any]:
        return summary_row(str(epoch), [r for r in probe.records if r['epoch'] == epoch])

    def before_step(epoch: int, index: torch.Tensor) -> None:
        if epoch != probe.epoch:  # the previous epoch is complete: report it
            row = epoch_row(probe.epoch)
            print(f'epoch {probe.epoch}: recall@k first-order {fmt(row["recall_first-order"])} '
                  f'(classifier drawn {row["classifier_drawn"]}/{row["steps"]}), loss {fmt(row["recall_loss"])}, '
                  f'random {fmt(row["recall_random"])}; {time.perf_counter() - start:.0f} s', flush=True)
        probe.epoch, probe.targets, probe.mislabelled = epoch, task.train_y[index], task.mislabelled[index]

    stats = train(model, optimizer, task.train_x, task.train_y, epochs=args.epochs, batch_size=task.batch_size,
                  lr=task.lr, pad=args.pad, augment_mode=task.augment, seed=args.seed, before_step=before_step)
    top1 = evaluate(model, task.test_x, task.test_y)
    rows = [epoch_row(e) for e in range(args.epochs)] + [summary_row('all', probe.records)]
    print(f'\nexact ESAM (beta {args.beta}, gamma {args.gamma}, k {probe.records[0]["k"]} of {task.batch_size}, '
          f'rho {args.rho}), {task.model}, {args.img_size} px, {task.name} ({args.noise:.0%} label noise), '
          f'{args.train_size} train, {args.epochs} epochs x {stats["steps"] // args.epochs} steps, '
          f'lr {task.lr} cosine: test top-1 {top1:.1f}%, {stats["train_s"]:.0f} s of training\n')
    print(markdown(rows), flush=True)
    with open(args.out, 'w') as f:
        json.dump({'config': vars(args), 'top1': top1, 'summary': rows, 'steps': probe.records}, f, indent=1)
    print(f'\nwrote {len(probe.records)} step records to {args.out}', flush=True)


if __name__ == '__main__':
    main()

"""How much of a Vision Transformer ESAM's per-tensor SWP draw perturbs, by parameter count and by the cost of
the first backward B1 it saves (issue 23, point 3).

SWP keeps each parameter TENSOR with probability beta (the released code's draw, :meth:`esam_timm.ESAM.draw_swp`).
A ViT has ~150 tensors, most of them small norms and biases; B1's saving comes from skipping the weight-gradient
kernels of the tensors not drawn, and those costs sit in the large matrices. This script draws the SWP subset
many times with the optimizer's own generator and reports, per beta, the share of the drawn tensors

- by count: drawn parameters / all trainable parameters;
- by B1 cost: the weight-gradient FLOPs of the drawn tensors / those of all tensors, from the shapes one forward
  records: a linear or convolution weight costs 2 x (its multiply-adds per sample), a bias, norm weight,
  position embedding or class token one FLOP per element it touches (the rest of B1, the gradients of the
  activations, runs whatever the draw, as does F1);

as mean, standard deviation and 5th-95th percentile over the draws, with ``N_eff = (sum c)^2 / sum c^2``, the
number of equally costly tensors the draw behaves like. The mean is beta by construction (each tensor is kept
with probability beta whatever its size); what the per-tensor draw costs is the spread from step to step.
With ``--time`` it also times B1 (``backward(inputs=drawn)``) for some draws at each beta and fits the time
against the cost share, to check the FLOP model on this machine.

    python benchmarks/swp_share.py                                   # vit_small_patch16_224 and test_vit
    python benchmarks/swp_share.py --models vit_small_patch16_224 --time --batch-size 8
"""
import argparse
import json
import statistics
import time
from typing import Any, Dict, List

import timm
import torch
import torch.nn as nn

import esam_timm

BETAS = (0.2, 0.4, 0.5, 0.6, 0.8)
MODEL_KWARGS = {'test_vit': dict(img_size=32, patch_size=4)}  # the benchmark's ViT; others at their own size


def weight_grad_flops(model: nn.Module, image_size: int) -> Dict[int, float]:
    """Weight-gradient FLOPs per sample of every parameter tensor (id -> FLOPs), from one forward's shapes."""
    flops: Dict[int, float] = {}

    def record(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        positions = output.numel() // output.shape[-1] if isinstance(module, nn.Linear) else output[0, 0].numel()
        if isinstance(module, nn.Linear):
            flops[id(module.weight)] = 2.0 * positions * module.weight.numel()
            if module.bias is not None:
                flops[id(module.bias)] = float(positions * module.bias.numel())
        elif isinstance(module, nn.Conv2d):
            flops[id(module.weight)] = 2.0 * positions * module.weight.numel()
            if module.bias is not None:
                flops[id(module.bias)] = float(positions * module.bias.numel())
        elif isinstance(module, nn.LayerNorm):
            for p in (module.weight, module.bias):
                if p is not None:
                    flops[id(p)] = float(output[0].numel())

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d,
                                                                                      nn.LayerNorm))]
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for hook in hooks:
        hook.remove()
    for p in model.parameters():  # position embedding, class token: one add per element per sample
        flops.setdefault(id(p), float(p.numel()))
    return flops


def quantile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: List[float]) -> Dict[str, float]:
    return {'mean': statistics.mean(values), 'std': statistics.pstdev(values), 'p05': quantile(values, 0.05),
            'p95': quantile(values, 0.95)}


def draw_shares(model: nn.Module, flops: Dict[int, float], beta: float, draws: int, seed: int) -> Dict[str, Any]:
    optimizer = esam_timm.ESAM(model.parameters(), 'sgd', lr=0.1, beta=beta, gamma=1.0, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    total_count = sum(p.numel() for p in params)
    total_flops = sum(flops[id(p)] for p in params)
    by_count, by_cost, tensors = [], [], []
    for _ in range(draws):
        drawn = optimizer.draw_swp()
        by_count.append(sum(p.numel() for p in drawn) / total_count)
        by_cost.append(sum(flops[id(p)] for p in drawn) / total_flops)
        tensors.append(len(drawn) / len(params))
    return {'beta': beta, 'by_count': summary(by_count), 'by_cost': summary(by_cost), 'by_tensors': summary(tensors)}


def time_b1(model: nn.Module, flops: Dict[int, float], image_size: int, batch_size: int, beta: float, draws: int,
            seed: int) -> List[Dict[str, float]]:
    """B1 (backward restricted to the drawn tensors) seconds for ``draws`` draws at ``beta``, with each draw's
    cost share; F1 is run before each timing and not timed."""
    optimizer = esam_timm.ESAM(model.parameters(), 'sgd', lr=0.1, beta=beta, gamma=1.0, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    total_flops = sum(flops[id(p)] for p in params)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (batch_size,), generator=torch.Generator().manual_seed(1))
    rows = []
    for _ in range(draws):
        drawn = optimizer.draw_swp()
        if not drawn:
            continue
        loss = nn.functional.cross_entropy(model(x), y)
        start = time.perf_counter()
        loss.backward(inputs=drawn)
        rows.append({'beta': beta, 'cost_share': sum(flops[id(p)] for p in drawn) / total_flops,
                     'b1_s': time.perf_counter() - start})
        for p in params:
            p.grad = None
    return rows


def fit(rows: List[Dict[str, float]]) -> Dict[str, float]:
    """Least squares b1_s = a + b * cost_share: a is the part of B1 no draw saves, b the drawn part."""
    xs, ys = [r['cost_share'] for r in rows], [r['b1_s'] for r in rows]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {'fixed_s': my - b * mx, 'per_full_share_s': b,
            'r2': 1 - sum((y - (my - b * mx) - b * x) ** 2 for x, y in zip(xs, ys)) / sum((y - my) ** 2 for y in ys)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['vit_small_patch16_224', 'test_vit'])
    parser.add_argument('--draws', type=int, default=2000)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--time', action='store_true', help='also time B1 against the cost share')
    parser.add_argument('--time-draws', type=int, default=6)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--out', default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for name in args.models:
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10, **MODEL_KWARGS.get(name, {}))
        image_size = model.patch_embed.img_size[0]
        flops = weight_grad_flops(model, image_size)
        params = [p for p in model.parameters() if p.requires_grad]
        costs = [flops[id(p)] for p in params]
        counts = [p.numel() for p in params]
        n_eff_cost = sum(costs) ** 2 / sum(c * c for c in costs)
        n_eff_count = sum(counts) ** 2 / sum(c * c for c in counts)
        small = sum(1 for c in counts if c < 0.001 * sum(counts))
        print(f'\n{name} ({image_size} px): {len(params)} tensors, {sum(counts) / 1e6:.2f} M parameters; '
              f'{small} tensors hold < 0.1% of the parameters each; N_eff by count {n_eff_count:.1f}, '
              f'by B1 cost {n_eff_cost:.1f}')
        print('| beta | share by count: mean +- std (5-95%) | by B1 weight-gradient cost | share of tensors |')
        print('|---|---|---|---|')
        rows = [draw_shares(model, flops, beta, args.draws, args.seed) for beta in BETAS]
        for r in rows:
            c, f, t = r['by_count'], r['by_cost'], r['by_tensors']
            print(f"| {r['beta']} | {c['mean']:.3f} +- {c['std']:.3f} ({c['p05']:.2f}-{c['p95']:.2f}) | "
                  f"{f['mean']:.3f} +- {f['std']:.3f} ({f['p05']:.2f}-{f['p95']:.2f}) | {t['mean']:.3f} |")
        result: Dict[str, Any] = {'tensors': len(params), 'parameters': sum(counts), 'n_eff_count': n_eff_count,
                                  'n_eff_cost': n_eff_cost, 'draws': args.draws, 'shares': rows}
        if args.time:
            model.train()
            timed = [row for beta in (0.25, 0.5, 0.75, 1.0)
                     for row in time_b1(model, flops, image_size, args.batch_size, beta, args.time_draws, args.seed)]
            result['b1_timing'] = {'batch_size': args.batch_size, 'rows': timed, 'fit': fit(timed)}
            line = result['b1_timing']['fit']
            print(f"B1 seconds = {line['fixed_s']:.3f} + {line['per_full_share_s']:.3f} x cost share "
                  f"(R^2 {line['r2']:.2f}, {len(timed)} timed draws, batch {args.batch_size}, "
                  f"{torch.get_num_threads()} thread(s))")
        results[name] = result
    if args.out:
        with open(args.out, 'w') as f:
            json.dump({'config': vars(args), 'results': results, 'torch': torch.__version__, 'timm': timm.__version__,
                       'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, f, indent=1)
        print(f'wrote {args.out}')


if __name__ == '__main__':
    main()

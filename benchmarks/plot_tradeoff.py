"""Plot what each method buys against what it costs: top-1 gain over SGD (``accuracy.py`` runs, mean +- std
over seeds) against step time x SGD (``step_cost.py --out``, measured side by side on one machine), one
panel per task. Also prints the gains as a markdown table (task columns) for docs and README.

    python benchmarks/plot_tradeoff.py --accuracy benchmarks/results/main-*.json \\
        --cost benchmarks/results/step_cost.json --out docs/tradeoff.png

An accuracy arm takes the step time of the ``step_cost.py`` arm that runs the same passes (ARM_COST): the
selection rules (trim, relative) cost what their signal costs, one top-k over the batch more.
"""
import argparse
import json
import math
import statistics
from typing import Any, Dict, List, Sequence, Tuple

ARM_COST = {
    'sgd': 'sgd', 'sam': 'sam', 'msam': 'msam', 'msam(rho=1)': 'msam', 'msam(rho=2)': 'msam',
    'esam-exact': 'esam(0.5,0.5)', 'esam-exact-trim': 'esam-trim(0.5,0.5)',
    'esam-exact-relative': 'esam-trim(0.5,0.5)',
    'esam-first-order': 'esam-fo(0.5,0.5)', 'esam-first-order-forced': 'esam-fo(0.5,0.5)',
    'esam-first-order-trim': 'esam-fo-trim(0.5,0.5)', 'esam-first-order-relative': 'esam-fo-trim(0.5,0.5)',
    'esam-loss': 'esam-loss(0.5,0.5)', 'esam-swp-only': 'esam-swp-only(0.5)', 'esam-sds-only': 'esam-sds-only(0.5)',
}
STYLE = {  # arm -> (marker, colour): one colour per family, one marker per selection rule
    'sam': ('s', 'tab:red'), 'msam': ('d', 'tab:purple'), 'msam(rho=1)': ('P', 'tab:purple'),
    'msam(rho=2)': ('D', 'tab:purple'),
    'esam-exact': ('o', 'tab:blue'), 'esam-exact-trim': ('v', 'tab:blue'), 'esam-exact-relative': ('^', 'tab:blue'),
    'esam-first-order': ('o', 'tab:green'), 'esam-first-order-forced': ('x', 'tab:green'),
    'esam-first-order-trim': ('v', 'tab:green'), 'esam-first-order-relative': ('^', 'tab:green'),
    'esam-loss': ('o', 'tab:orange'), 'esam-swp-only': ('<', 'tab:gray'), 'esam-sds-only': ('>', 'tab:gray'),
}


def load_runs(paths: Sequence[str]) -> List[Dict[str, Any]]:
    runs = []
    for path in paths:
        with open(path) as f:
            runs += json.load(f)['runs']
    return runs


def task_label(run: Dict[str, Any]) -> str:
    return run['task'] + (f' [{run["variant"]}]' if run.get('variant') else '')


def gains(runs: List[Dict[str, Any]]) -> Dict[str, Dict[str, Tuple[float, float, int]]]:
    """{task: {arm: (mean gain over SGD's mean, std of the arm's top-1, seeds)}} in first-seen order."""
    table: Dict[str, Dict[str, Tuple[float, float, int]]] = {}
    for label in dict.fromkeys(task_label(r) for r in runs):
        of_task = [r for r in runs if task_label(r) == label]
        sgd = [r['top1'] for r in of_task if r['arm'] == 'sgd']
        if not sgd:
            continue
        base = statistics.mean(sgd)
        table[label] = {}
        for arm in dict.fromkeys(r['arm'] for r in of_task):
            top1 = [r['top1'] for r in of_task if r['arm'] == arm]
            std = statistics.stdev(top1) if len(top1) > 1 else 0.0
            table[label][arm] = (statistics.mean(top1) - base, std, len(top1))
    return table


def markdown(table: Dict[str, Dict[str, Tuple[float, float, int]]], cost: Dict[str, float],
             runs: List[Dict[str, Any]]) -> str:
    """Rows: arms; columns: step time x SGD, then each task's gain over SGD (+- the arm's seed std)."""
    tasks = list(table)
    arms = list(dict.fromkeys(arm for row in table.values() for arm in row))
    head = '| arm | step time x SGD | ' + ' | '.join(tasks) + ' |'
    lines = [head, '|---|---:|' + '---:|' * len(tasks)]
    for arm in arms:
        cells = []
        for task in tasks:
            if arm not in table[task]:
                cells.append('')
            elif arm == 'sgd':
                top1 = [r['top1'] for r in runs if task_label(r) == task and r['arm'] == 'sgd']
                std = statistics.stdev(top1) if len(top1) > 1 else 0.0
                cells.append(f'{statistics.mean(top1):.1f} +- {std:.1f}')
            else:
                gain, std, seeds = table[task][arm]
                cells.append(f'{gain:+.1f} +- {std:.1f}' if seeds > 1 else f'{gain:+.1f} (1 seed)')
        x = cost.get(ARM_COST.get(arm, ''))
        lines.append(f'| {arm} | {"" if x is None else f"{x:.2f}"} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def plot(table: Dict[str, Dict[str, Tuple[float, float, int]]], cost: Dict[str, float], out: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    tasks = list(table)
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        ax.axhline(0.0, color='black', lw=0.8)
        ax.axvline(1.0, color='black', lw=0.5, ls=':')
        for arm, (gain, std, _) in table[task].items():
            x = cost.get(ARM_COST.get(arm, ''))
            if arm == 'sgd' or x is None or arm not in STYLE:
                continue
            marker, colour = STYLE[arm]
            ax.errorbar(x, gain, yerr=std, fmt=marker, color=colour, ms=7, capsize=3, label=arm)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel('step time x SGD')
        ax.set_ylabel('top-1 gain over SGD (points)')
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis('off')
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc='lower center', ncol=min(6, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08 if len(labels) > 6 else 0.05, 1, 1))
    fig.savefig(out, dpi=110)
    print(f'wrote {out}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--accuracy', nargs='+', required=True, help='accuracy.py JSON files')
    parser.add_argument('--cost', required=True, help='step_cost.py --out JSON')
    parser.add_argument('--tasks', nargs='*', default=None, help='task labels to plot (default: all)')
    parser.add_argument('--out', default='docs/tradeoff.png')
    args = parser.parse_args()
    runs = load_runs(args.accuracy)
    with open(args.cost) as f:
        cost = {arm: row['x_sgd'] for arm, row in json.load(f)['arms'].items()}
    table = gains(runs)
    if args.tasks:
        table = {task: table[task] for task in args.tasks}
    print(markdown(table, cost, runs))
    plot(table, cost, args.out)


if __name__ == '__main__':
    main()

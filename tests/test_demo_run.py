"""The CPU demo: the data --demo builds (noisy, rebuilt over an older demo's, never over real data) and
the line it ends with (its top-1 next to the figures recorded for the same command)."""
import json
import os
import shutil
import statistics

from esam_timm.data import make_demo_dataset, read_info
from esam_timm.train import parse_args
from esam_timm.train.demo import DEMO_DATASET, RECORDED_TOP1, demo_summary
from esam_timm.train.loaders import resolve_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = ['-c', os.path.join(REPO, 'configs', 'demo.yaml')]


def _recorded(opt):
    values = RECORDED_TOP1[opt]
    return f'{statistics.mean(values):.1f} +- {statistics.stdev(values):.1f}'


def test_the_recorded_figures_are_three_seeds_and_esam_leads_by_more_than_the_spread():
    esam, sgd = RECORDED_TOP1['esam'], RECORDED_TOP1['momentum']
    assert len(esam) == len(sgd) == 3
    gap = statistics.mean(esam) - statistics.mean(sgd)
    assert gap > max(statistics.stdev(esam), statistics.stdev(sgd))


def test_the_demo_line_puts_the_run_next_to_both_recorded_figures():
    args, _ = parse_args(DEMO)
    line = demo_summary(args, 76.43)
    assert line.startswith('Demo: top-1 76.4 with ESAM; recorded for this command over seeds 42-44: ')
    assert f'ESAM {_recorded("esam")}, its SGD twin (--opt momentum) {_recorded("momentum")}' in line
    args, _ = parse_args(DEMO + ['--opt', 'momentum', '--experiment', 'demo-sgd'])
    assert demo_summary(args, 70.0).startswith('Demo: top-1 70.0 with its SGD twin; recorded for this command')


def test_the_demo_line_says_when_the_run_is_not_the_recorded_recipe():
    args, _ = parse_args(DEMO + ['--epochs', '3', '--rho', '0.1'])
    line = demo_summary(args, None)
    assert line.startswith('Demo: top-1 - with --opt esam; the recorded figures (3 seeds: ESAM ')
    assert line.endswith('not this run (--epochs 3 (recorded: 20), --rho 0.1 (recorded: 0.05))')
    args, _ = parse_args(DEMO + ['--opt', 'sam'])
    assert demo_summary(args, 50.0).endswith('not this run (--opt sam)')
    args, _ = parse_args(DEMO + ['--opt', 'msam', '--epochs', '1'])
    assert demo_summary(args, 27.8).endswith('not this run (--opt msam, --epochs 1 (recorded: 20))')


def test_demo_builds_its_noisy_data_rebuilds_an_older_demo_and_leaves_real_data_alone(tmp_path):
    data_dir = tmp_path / 'demo-data'
    make_demo_dataset(data_dir, image_size=16, train_per_class=2, val_per_class=1)  # an older, clean demo
    args, _ = parse_args(DEMO + ['--data-dir', str(data_dir)])
    run = resolve_data(args, world_size=1, is_primary=True, barrier=lambda: None)
    config = read_info(str(data_dir))['demo']
    assert {k: config[k] for k in DEMO_DATASET} == DEMO_DATASET
    assert run.train.num_samples == 1000 and run.val.num_samples == 500 and run.num_classes == 10

    real = tmp_path / 'real'
    shutil.copytree(data_dir, real)
    info = json.loads((real / '_info.json').read_text())
    del info['demo']
    (real / '_info.json').write_text(json.dumps(info))
    before = {p.name: p.stat().st_mtime_ns for p in real.iterdir()}
    args, _ = parse_args(DEMO + ['--data-dir', str(real)])
    resolve_data(args, world_size=1, is_primary=True, barrier=lambda: None)
    assert {p.name: p.stat().st_mtime_ns for p in real.iterdir()} == before

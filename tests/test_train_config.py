"""CLI and YAML config of train_esam.py: timm flag names, YAML defaults, overrides and clear errors."""
import glob
import os

import pytest
import yaml

from esam_timm.train import parse_args, resolve_lr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ['--data-dir', '/nonexistent-data-is-fine-for-parsing', '--model', 'resnet10t']


def _error(capsys, argv):
    """Parse argv expecting an argparse error; return its stderr message."""
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def _write(tmp_path, text, name='cfg.yaml'):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_timm_flag_names_parse():
    args, _ = parse_args(BASE + [
        '-b', '48', '--opt', 'esam', '--base-opt', 'adamw', '--opt-kwargs', 'adaptive=true', 'foo=3',
        '--rho', '0.1', '--esam-beta', '0.5', '--esam-gamma', '0.25', '--sched', 'step', '--lr', '0.3',
        '--amp', '--amp-dtype', 'bfloat16', '--channels-last', '--torchcompile', '--model-ema',
        '--mixup', '0.2', '--cutmix', '1.0', '--smoothing', '0.0', '--bce-loss', '--no-aug',
        '--scale', '0.5', '1.0', '--ratio', '0.8', '1.25', '--hflip', '0.3', '--vflip', '0.1',
        '--color-jitter', '0.2', '--aa', 'rand-m9-mstd0.5', '--reprob', '0.25', '--mean', '0.5', '0.5', '0.5',
        '--std', '0.25', '0.25', '0.25', '--interpolation', 'bicubic', '--drop', '0.1', '--drop-path', '0.05',
        '--sync-bn', '--seed', '7', '-j', '3', '--log-interval', '5', '--output', 'o', '--experiment', 'e',
        '--input-size', '3', '40', '40', '--clip-grad', '1.5', '--clip-mode', 'value',
        '--log-wandb', '--wandb-project', 'proj', '--wandb-tags', 'a', 'b', '--wandb-resume-id', 'abc123'])
    assert args.batch_size == 48 and args.base_opt == 'adamw'
    assert args.opt_kwargs == {'adaptive': True, 'foo': 3}
    assert (args.rho, args.esam_beta, args.esam_gamma) == (0.1, 0.5, 0.25)
    assert args.torchcompile == 'inductor' and args.amp_dtype == 'bfloat16'
    assert args.scale == [0.5, 1.0] and args.input_size == [3, 40, 40]
    assert args.wandb_tags == ['a', 'b'] and args.workers == 3 and args.clip_mode == 'value'


def test_positional_data_dir():
    args, _ = parse_args(['/some/dir', '--model', 'resnet10t'])
    assert args.data_dir == '/some/dir'


def test_yaml_values_become_defaults_and_cli_overrides(tmp_path):
    cfg = _write(tmp_path, 'model: test_resnet\nbatch-size: 16\nlr: 1e-3\nepochs: 3\nscale: [0.5, 1]\n'
                           'opt_kwargs: {adaptive: true}\n')
    args, text = parse_args(['-c', cfg, '--data-dir', 'd', '--epochs', '5'])
    assert args.model == 'test_resnet' and args.batch_size == 16
    assert args.lr == 0.001 and isinstance(args.lr, float)  # PyYAML reads '1e-3' as a string
    assert args.epochs == 5
    assert args.scale == [0.5, 1.0]
    assert args.opt_kwargs == {'adaptive': True}
    assert yaml.safe_load(text)['epochs'] == 5


def test_args_yaml_round_trips(tmp_path):
    args, text = parse_args(BASE + ['--opt-kwargs', 'adaptive=true', '--epochs', '9', '--scale', '0.3', '0.9'])
    again, text2 = parse_args(['-c', _write(tmp_path, text)])
    assert vars(again) | {'config': ''} == vars(args) | {'config': ''}
    assert text2 == text


def test_unknown_yaml_key_names_the_key(tmp_path, capsys):
    err = _error(capsys, ['-c', _write(tmp_path, 'model: resnet10t\nlr_bse: 0.1\n'), '--data-dir', 'd'])
    assert "unknown key 'lr_bse'" in err and 'lr_base' in err


def test_yaml_value_of_wrong_type(tmp_path, capsys):
    err = _error(capsys, ['-c', _write(tmp_path, 'epochs: many\n'), '--data-dir', 'd'])
    assert "config key 'epochs': cannot read 'many' as int" in err


def test_yaml_must_be_a_mapping(tmp_path, capsys):
    err = _error(capsys, ['-c', _write(tmp_path, '- a\n- b\n'), '--data-dir', 'd'])
    assert 'must hold a mapping' in err


def test_missing_config_file(tmp_path, capsys):
    err = _error(capsys, ['-c', str(tmp_path / 'nope.yaml'), '--data-dir', 'd'])
    assert 'cannot read config file' in err and 'nope.yaml' in err


def test_unknown_flag(capsys):
    err = _error(capsys, BASE + ['--esam-betta', '0.5'])
    assert 'unrecognized arguments: --esam-betta' in err


@pytest.mark.parametrize('argv, message', [
    (['--esam-beta', '1.5'], '--esam-beta must be in (0.0, 1.0], got 1.5'),
    (['--esam-gamma', '0'], '--esam-gamma must be in (0.0, 1.0], got 0.0'),
    (['--rho', '-0.1'], '--rho must be > 0, got -0.1'),
    (['--lr', '0'], '--lr must be > 0, got 0.0'),
    (['--amp-dtype', 'float8'], "--amp-dtype must be one of ['bfloat16', 'float16'], got 'float8'"),
    (['--clip-mode', 'l3'], "--clip-mode must be one of ['norm', 'value', 'agc'], got 'l3'"),
    (['--esam-bn-mode', 'none'], "--esam-bn-mode must be one of ['clean', 'all'], got 'none'"),
    (['--esam-sds', 'fast'], "--esam-sds must be one of ['exact', 'first-order', 'loss'], got 'fast'"),
    (['--sched', 'linear'], "--sched must be one of"),
    (['--model', 'resnet9000'], "--model 'resnet9000' is not a timm model"),
    (['--opt', 'sgdd'], "--opt 'sgdd' is not an optimizer timm knows"),
    (['--opt', 'esam', '--base-opt', 'sam'], "--base-opt 'sam' cannot be esam/sam itself"),
    (['--pretrained'], '--pretrained needs --pretrained-path FILE'),
    (['--grad-accum-steps', '0'], '--grad-accum-steps must be > 0, got 0'),
    (['--scale', '0.9', '0.5'], '--scale must be two values 0 < lo <= hi <= 1, got [0.9, 0.5]'),
    (['--reprob', '2'], '--reprob must be in [0.0, 1.0], got 2.0'),
    (['--smoothing', '1'], '--smoothing must be in [0, 1), got 1.0'),
    (['--batch-size', '0'], '--batch-size must be > 0, got 0'),
    (['--epochs', '0'], '--epochs must be > 0, got 0'),
    (['--mean', '0.5', '0.5'], '--mean needs 1 or 3 values, got 2'),
    (['--wandb-resume-id', 'x'], '--wandb-resume-id needs --log-wandb'),
    (['--opt-kwargs', 'novalue'], "expected key=value, got 'novalue'"),
])
def test_bad_values_are_clear_errors(capsys, argv, message):
    assert message in _error(capsys, BASE + argv)


def test_no_data_is_an_error(capsys):
    err = _error(capsys, ['--model', 'resnet10t'])
    assert 'no data: give --data-dir DIR' in err


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(REPO, 'configs', '*.yaml'))),
                         ids=os.path.basename)
def test_shipped_configs_parse(path, capsys):
    """Every recipe parses; those naming models timm lacks fail with exactly that message."""
    with open(path) as f:
        model = yaml.safe_load(f)['model']
    argv = ['-c', path, '--data-dir', 'd']
    if model in ('wide_resnet28_10', 'pyramidnet110_a270'):
        assert f'--model {model!r} is not a timm model' in _error(capsys, argv)
        return
    args, _ = parse_args(argv)
    assert args.model == model


def test_demo_config_values():
    args, _ = parse_args(['-c', os.path.join(REPO, 'configs', 'demo.yaml')])
    assert args.demo and args.opt == 'esam' and args.dataset.startswith('wds/')


def test_resolve_lr_scaling():
    args, _ = parse_args(BASE + ['-b', '64', '--lr-base', '0.1', '--lr-base-size', '256', '--opt', 'sgd'])
    assert resolve_lr(args, world_size=2) == pytest.approx(0.05)
    args, _ = parse_args(BASE + ['-b', '64', '--lr-base', '0.1', '--opt', 'esam', '--base-opt', 'adamw'])
    assert resolve_lr(args, world_size=1) == pytest.approx(0.05)  # sqrt(64 / 256) for ada*
    args, _ = parse_args(BASE + ['-b', '64', '--lr', '0.3'])
    assert resolve_lr(args, world_size=8) == 0.3
    args, _ = parse_args(BASE + ['-b', '64', '--lr-base', '0.1', '--opt', 'esam', '--grad-accum-steps', '4'])
    assert resolve_lr(args, world_size=2) == pytest.approx(0.2)  # global batch 64 x 2 x 4 = 512

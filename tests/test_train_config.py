"""CLI and YAML config of train_esam.py: timm flag names, YAML defaults, overrides and clear errors."""
import glob
import logging
import os

import pytest
import yaml

from esam_timm.selection import list_sds_modes
from esam_timm.train import parse_args, resolve_lr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ['--data-dir', '/nonexistent-data-is-fine-for-parsing', '--model', 'resnet10t']
TIMM_ARGS = os.path.join(REPO, 'tests', 'fixtures', 'timm_train_args.yaml')
CONFIG_LOGGER = 'esam_timm.train.config'


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


def _timm_config(tmp_path, **changes):
    """timm train.py's default args.yaml with some values changed or keys added; returns its path."""
    with open(TIMM_ARGS) as f:
        cfg = yaml.safe_load(f)
    cfg.update(changes)
    return _write(tmp_path, yaml.safe_dump(cfg), name='timm_args.yaml')


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


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
    (['--esam-sds', 'fast'], f"--esam-sds must be one of {list_sds_modes()}, got 'fast'"),
    (['--sched', 'linear'], "--sched must be one of"),
    (['--model', 'resnet9000'], "--model 'resnet9000' is not a timm model"),
    (['--opt', 'sgdd'], "--opt 'sgdd' is not an optimizer timm knows"),
    (['--opt', 'esam', '--base-opt', 'sam'], "--base-opt 'sam' cannot be esam/sam/msam itself"),
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
    (['--dist-bn', 'sum'], "--dist-bn must be one of ['', 'broadcast', 'reduce'], got 'sum'"),
    (['--val-interval', '0'], '--val-interval must be > 0, got 0'),
    (['--torchcompile', '--torchcompile-mode', 'fast'], "--torchcompile-mode must be one of ['default', "),
    (['--class-map', 'classes.csv'], "--class-map 'classes.csv': timm reads .txt or .pkl class maps"),
    (['--class-map', 'missing.txt'], "--class-map 'missing.txt' is not a file, neither as given nor under "
                                     "--data-dir '/nonexistent-data-is-fine-for-parsing'"),
    (['--drop-block', '1.5'], '--drop-block must be in [0.0, 1.0], got 1.5'),
    (['--layer-decay-min-scale', '2'], '--layer-decay-min-scale must be in [0.0, 1.0], got 2.0'),
    (['--head-init-scale', 'nan'], '--head-init-scale must be a finite number, got nan'),
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


@pytest.mark.parametrize('text, message', [
    ("amp: 'false'", "config key 'amp': expected true or false (a YAML boolean, unquoted), got 'false' (str)"),
    ('channels_last: 1', "config key 'channels_last': expected true or false (a YAML boolean, unquoted), got 1"),
    ('scale: 0.5', "config key 'scale': expected a list of 2 numbers, got 0.5 (float)"),
    ('scale: [0.5]', "config key 'scale': expected a list of 2 numbers, got [0.5] (list)"),
    ('input_size: 64', "config key 'input_size': expected a list of 3 integers or null, got 64 (int)"),
    ('epochs: 2.5', "config key 'epochs': expected an integer, got 2.5 (float)"),
    ('epochs: 3.0', "config key 'epochs': expected an integer, got 3.0 (float)"),
    ("epochs: '2.5'", "config key 'epochs': cannot read '2.5' as int (expected an integer)"),
    ('epochs: null', "config key 'epochs': expected an integer, got None (NoneType)"),
    ('lr: true', "config key 'lr': expected a number or null, got True (bool)"),
    ('model: [resnet50]', "config key 'model': expected a string, got ['resnet50'] (list)"),
    ('mean: [0.5, x, 0.5]', "config key 'mean': cannot read 'x' as float (expected a list of one or more numbers"),
    ('decay_milestones: []', "config key 'decay_milestones': expected a list of one or more integers, got []"),
    ('wandb_tags: mytag', "config key 'wandb_tags': expected a list of one or more strings, got 'mytag'"),
    ('torchcompile: true', "config key 'torchcompile': expected a string or null (the bare flag means "
                           "'inductor'), got True (bool)"),
    ('opt_kwargs: [novalue]', "config key 'opt_kwargs': expected a mapping or a list of 'key=value' strings, "
                              "got ['novalue'] (list): expected key=value, got 'novalue'"),
    ('amp_dtype: float8', "--amp-dtype must be one of ['bfloat16', 'float16'], got 'float8'"),
    ('dist_bn: sum', "--dist-bn must be one of ['', 'broadcast', 'reduce'], got 'sum'"),
])
def test_yaml_values_are_checked_like_the_command_line(tmp_path, capsys, text, message):
    """Type, count, boolean and choice checks apply to YAML values as to the same flags' text."""
    assert message in _error(capsys, ['-c', _write(tmp_path, text + '\n')] + BASE)


def test_yaml_values_that_the_command_line_would_take(tmp_path):
    cfg = _write(tmp_path, "amp: true\nchannels_last: false\nepochs: '7'\ndecay_epochs: 30\nexperiment: 2024\n"
                           "input_size: [3, 64, 64]\nopt_kwargs: ['adaptive=true']\ntorchcompile: eager\n"
                           "wandb_tags: []\nlr: null\n")
    args, _ = parse_args(['-c', cfg] + BASE)
    assert args.amp is True and args.channels_last is False
    assert args.epochs == 7 and args.decay_epochs == 30.0 and isinstance(args.decay_epochs, float)
    assert args.experiment == '2024' and args.input_size == [3, 64, 64]
    assert args.opt_kwargs == {'adaptive': True} and args.torchcompile == 'eager'
    assert args.wandb_tags == [] and args.lr is None


def test_new_timm_flags_parse(tmp_path):
    (tmp_path / 'classes.txt').write_text('cat\ndog\n')
    args, _ = parse_args(['--data-dir', str(tmp_path), '--model', 'resnet10t', '--dist-bn', 'broadcast',
                          '--val-interval', '3', '--torchcompile', '--torchcompile-mode', 'max-autotune',
                          '--grad-checkpointing', '--class-map', 'classes.txt', '--model-ema',
                          '--model-ema-force-cpu', '--drop-block', '0.1', '--head-init-scale', '0.5',
                          '--head-init-bias', '-2', '--layer-decay', '0.7', '--layer-decay-min-scale', '0.1',
                          '--layer-decay-no-opt-scale', '0.05', '--fast-norm'])
    assert (args.dist_bn, args.val_interval, args.torchcompile_mode) == ('broadcast', 3, 'max-autotune')
    assert args.grad_checkpointing and args.model_ema_force_cpu and args.fast_norm
    assert args.class_map == 'classes.txt' and args.drop_block == 0.1
    assert (args.head_init_scale, args.head_init_bias) == (0.5, -2.0)
    assert (args.layer_decay_min_scale, args.layer_decay_no_opt_scale) == (0.1, 0.05)
    defaults, _ = parse_args(BASE)
    assert (defaults.dist_bn, defaults.val_interval, defaults.torchcompile_mode) == ('', 1, None)
    assert defaults.class_map == ''
    assert not (defaults.grad_checkpointing or defaults.model_ema_force_cpu or defaults.fast_norm)
    assert (defaults.drop_block, defaults.head_init_scale, defaults.head_init_bias) == (None, None, None)
    assert (defaults.layer_decay_min_scale, defaults.layer_decay_no_opt_scale) == (0.0, None)


def test_timm_args_yaml_loads_with_one_warning(caplog):
    """timm train.py's own args.yaml: its keys that are ours land on our flags with timm's values,
    the others are dropped with one warning that lists them all."""
    with open(TIMM_ARGS) as f:
        timm_args = yaml.safe_load(f)
    with caplog.at_level(logging.WARNING, logger=CONFIG_LOGGER):
        args, _ = parse_args(['-c', TIMM_ARGS, '--data-dir', 'd', '--device', 'cpu'])  # its device: cuda may be absent
    ours = set(vars(args))
    ignored = sorted(set(timm_args) - ours)
    assert len(ignored) == 50
    honoured = {'dist_bn', 'val_interval', 'torchcompile_mode', 'grad_checkpointing', 'class_map',
                'model_ema_force_cpu', 'drop_block', 'head_init_scale', 'head_init_bias', 'layer_decay_min_scale',
                'layer_decay_no_opt_scale', 'fast_norm'}
    assert honoured <= ours and not honoured & set(ignored)
    for key in sorted(set(timm_args) & ours - {'data_dir', 'device'}):
        assert getattr(args, key) == timm_args[key], key
    assert (args.dist_bn, args.opt, args.dataset) == ('reduce', 'sgd', '')
    (warning,) = _warnings(caplog)
    assert f"config file {TIMM_ARGS!r}: ignoring 50 timm train.py keys this script does not implement: " \
           f"{', '.join(ignored)}" == warning


def test_timm_config_with_changed_values_and_old_keys(tmp_path, caplog):
    """Honoured timm keys take effect; ignored ones set away from timm's default are named as lost,
    keys only older timm releases wrote load too."""
    (tmp_path / 'classes.txt').write_text('cat\ndog\n')
    cfg = _timm_config(tmp_path, dist_bn='broadcast', val_interval=5, torchcompile='inductor',
                       torchcompile_mode='reduce-overhead', grad_checkpointing=True, class_map='classes.txt',
                       model_ema=True, model_ema_force_cpu=True, drop_block=0.1, layer_decay=0.65,
                       layer_decay_min_scale=0.05, aug_repeats=3, native_amp=True, apex_amp=False)
    with caplog.at_level(logging.WARNING, logger=CONFIG_LOGGER):
        args, _ = parse_args(['-c', cfg, '--data-dir', str(tmp_path), '--val-interval', '2', '--device', 'cpu'])
    assert (args.dist_bn, args.val_interval, args.torchcompile, args.torchcompile_mode) == \
           ('broadcast', 2, 'inductor', 'reduce-overhead')
    assert args.grad_checkpointing and args.model_ema_force_cpu and args.class_map == 'classes.txt'
    assert (args.drop_block, args.layer_decay, args.layer_decay_min_scale) == (0.1, 0.65, 0.05)
    (warning,) = _warnings(caplog)
    assert 'ignoring 52 timm train.py keys' in warning and 'apex_amp, aug_repeats' in warning
    assert warning.endswith("so their effect is lost: aug_repeats=3, native_amp=True")


@pytest.mark.parametrize('typo, hint', [('lr_bse', "'lr_base'"), ('aug_repeat', "'aug_repeats'"),
                                        ('esam_betta', "'esam_beta'")])
def test_typo_in_a_timm_config_is_still_an_error(tmp_path, capsys, typo, hint):
    err = _error(capsys, ['-c', _timm_config(tmp_path, **{typo: 1}), '--data-dir', 'd'])
    assert f"unknown key {typo!r} (did you mean one of [" in err and hint in err


@pytest.mark.parametrize('argv, text, message', [
    (['--opt', 'adamw', '--rho', '0.1', '--esam-beta', '0.5'], '',
     '--opt adamw is not ESAM/SAM and ignores --rho, --esam-beta (use --opt esam or sam to apply them)'),
    (['--opt', 'momentum'], 'rho: 0.1\nesam_sds: loss\nesam_bn_mode: all\n',
     '--opt momentum is not ESAM/SAM and ignores --rho, --esam-sds, --esam-bn-mode'),
    (['--opt', 'sgd', '--esam-gamma', '0.5'], '', '--opt sgd is not ESAM/SAM and ignores --esam-gamma'),
    (['--opt', 'sam', '--rho', '0.1', '--esam-beta', '0.5', '--esam-gamma', '0.5', '--esam-bn-mode', 'all'], '',
     '--opt sam is plain SAM (beta = gamma = 1, no data selection) and ignores --esam-beta, --esam-gamma '
     '(use --opt esam to apply them)'),
    (['--opt', 'lookahead_sam'], 'esam_sds: first-order\n',
     '--opt lookahead_sam is plain SAM (beta = gamma = 1, no data selection) and ignores --esam-sds'),
    (['--torchcompile-mode', 'max-autotune'], '', '--torchcompile-mode has no effect without --torchcompile'),
    ([], 'model_ema_force_cpu: true\n', '--model-ema-force-cpu has no effect without --model-ema'),
    (['--layer-decay-no-opt-scale', '0.1'], '', '--layer-decay-no-opt-scale has no effect without --layer-decay'),
], ids=['adamw-cli', 'momentum-yaml', 'sgd-default-value', 'sam', 'lookahead_sam', 'compile-mode', 'ema-cpu',
        'layer-decay'])
def test_flags_the_run_ignores_are_warned_about(tmp_path, caplog, argv, text, message):
    with caplog.at_level(logging.WARNING, logger=CONFIG_LOGGER):
        parse_args(['-c', _write(tmp_path, text or '{}\n')] + BASE + argv)
    (warning,) = _warnings(caplog)
    assert warning.startswith(message)


@pytest.mark.parametrize('argv', [
    ['--opt', 'esam', '--rho', '0.1', '--esam-beta', '0.5', '--esam-gamma', '0.5', '--esam-sds', 'loss'],
    ['--opt', 'lookahead_esam', '--esam-beta', '0.5'],
    ['--opt', 'sam', '--rho', '0.1', '--esam-bn-mode', 'all'],
    ['--opt', 'adamw', '--base-opt', 'adamw'],
    ['-c', os.path.join(REPO, 'configs', 'demo.yaml'), '--opt', 'momentum'],  # README's SGD twin of the demo
    ['--torchcompile', '--torchcompile-mode', 'default', '--model-ema', '--model-ema-force-cpu'],
])
def test_no_warning_when_every_flag_given_is_used(caplog, argv):
    with caplog.at_level(logging.WARNING, logger=CONFIG_LOGGER):
        parse_args(BASE + argv)
    assert _warnings(caplog) == []


def test_reloading_args_yaml_of_a_plain_optimizer_run_does_not_warn(tmp_path, caplog):
    _, text = parse_args(BASE + ['--opt', 'adamw'])
    with caplog.at_level(logging.WARNING, logger=CONFIG_LOGGER):
        parse_args(['-c', _write(tmp_path, text)])
    assert _warnings(caplog) == []


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(REPO, 'configs', '*.yaml'))),
                         ids=os.path.basename)
def test_shipped_configs_load_without_warnings(path, caplog, capsys):
    with caplog.at_level(logging.WARNING, logger=CONFIG_LOGGER):
        try:
            parse_args(['-c', path, '--data-dir', 'd'])
        except SystemExit:  # recipes for models timm lacks: test_shipped_configs_parse checks the message
            capsys.readouterr()
    assert _warnings(caplog) == []


def test_esam_defaults_are_the_optimizers():
    """--esam-beta/--esam-gamma, ESAM() and create_optimizer_v2(model, 'esam') share one definition."""
    from esam_timm.optim import DEFAULT_BETA, DEFAULT_GAMMA
    from esam_timm.train import build_parser
    parser = build_parser()
    assert parser.get_default('esam_beta') is DEFAULT_BETA and parser.get_default('esam_gamma') is DEFAULT_GAMMA


def test_msam_flags(caplog):
    """msam gets its own radius by default, ESAM/SAM theirs; an ESAM-sized --rho for msam and ESAM-only
    flags are warned about; msam cannot be a base optimizer."""
    args, _ = parse_args(['--demo', '--opt', 'msam'])
    assert args.rho == 3.0
    args, _ = parse_args(['--demo', '--opt', 'esam'])
    assert args.rho == 0.05
    with caplog.at_level(logging.WARNING):
        args, _ = parse_args(['--demo', '--opt', 'msam', '--rho', '0.05', '--esam-gamma', '0.4'])
    assert args.rho == 0.05
    assert 'ESAM/SAM-sized radius' in caplog.text and 'ignores --esam-gamma' in caplog.text
    with pytest.raises(SystemExit):
        parse_args(['--demo', '--base-opt', 'msam'])


def test_every_flag_is_declared_once_in_the_flag_table():
    """The parser, the checks and the warnings come from esam_timm.train.flags.FLAGS: one entry per flag,
    whose cross-references (needs, used_by, the resume-free list) name flags and optimizer kinds that exist."""
    from esam_timm.train import build_parser
    from esam_timm.train.flags import FLAGS, RESUME_FREE_FLAGS
    dests = [flag.dest for flag in FLAGS]
    assert len(dests) == len(set(dests))
    assert {action.dest for action in build_parser()._actions} - {'help', 'config'} == set(dests)
    assert all(flag.needs in dests for flag in FLAGS if flag.needs)
    assert all(flag.used_by <= {'esam', 'sam', 'msam'} for flag in FLAGS if flag.used_by is not None)
    assert set(RESUME_FREE_FLAGS) <= set(dests) and 'decode' in RESUME_FREE_FLAGS


def test_a_config_made_for_esam_keeps_quiet_for_sgd_but_not_for_msam(tmp_path, caplog):
    """A file's rho counts as set only when it differs from the radius the --opt takes by itself: the
    ESAM radius is silent for SGD (nothing to warn about) and named for msam (whose radius is 3)."""
    cfg = _write(tmp_path, 'rho: 0.05\n')
    with caplog.at_level(logging.WARNING, logger=CONFIG_LOGGER):
        parse_args(['-c', cfg] + BASE + ['--opt', 'momentum'])
    assert _warnings(caplog) == []
    with caplog.at_level(logging.WARNING, logger=CONFIG_LOGGER):
        args, _ = parse_args(['-c', cfg] + BASE + ['--opt', 'msam'])
    assert args.rho == 0.05 and 'ESAM/SAM-sized radius' in ' '.join(_warnings(caplog))

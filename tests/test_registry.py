"""timm factory registration: names, kwargs routing to the base optimizer, errors."""
import inspect

import pytest
import timm
import torch
import torch.nn as nn
from timm.optim import Lamb, Lion, Lookahead

import esam_timm
from esam_timm import DEFAULT_BETA, DEFAULT_GAMMA, ESAM, MSAM, SAM
from esam_timm.registry import check_timm_version, is_msam, is_sam_family


def model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_list_optimizers_shows_all_three_with_descriptions():
    listed = dict(timm.optim.list_optimizers('*sam*', with_description=True))
    assert set(listed) == {'esam', 'sam', 'msam'}
    assert 'Efficient SAM' in listed['esam'] and 'Sharpness-Aware' in listed['sam']
    assert 'Momentum-SAM' in listed['msam']
    assert is_sam_family('lookahead_esam') and not is_sam_family('msam')
    assert is_msam('lookahead_msam') and not is_msam('sam')


def test_esam_means_the_papers_esam_everywhere():
    """Issue 17: the factory's 'esam' is ESAM (beta, gamma < 1), not SAM at twice SGD's cost."""
    opt = timm.optim.create_optimizer_v2(model(), 'esam', lr=0.1)
    assert (opt.beta, opt.gamma) == (DEFAULT_BETA, DEFAULT_GAMMA) and opt.beta < 1 and opt.gamma < 1
    direct = ESAM(model().parameters(), lr=0.1)
    assert (direct.beta, direct.gamma) == (opt.beta, opt.gamma)
    sam = timm.optim.create_optimizer_v2(model(), 'sam', lr=0.1)
    assert (sam.beta, sam.gamma) == (1.0, 1.0)


@pytest.mark.parametrize('name', ['esam', 'sam', 'msam'])
def test_common_kwarg_flags_match_the_signature(name):
    """timm's test_optim_factory_common_kwargs: the OptimInfo flags say which of eps/betas/momentum the
    class takes; the wrappers take all three (and pass them on to the base optimizer)."""
    info = timm.optim.get_optimizer_info(name)
    parameters = inspect.signature(timm.optim.get_optimizer_class(name, bind_defaults=False).__init__).parameters
    for flag, kwarg in (('has_eps', 'eps'), ('has_betas', 'betas'), ('has_momentum', 'momentum')):
        assert getattr(info, flag) is True and kwarg in parameters, (flag, kwarg)


@pytest.mark.parametrize('name', ['esam', 'sam', 'msam'])
def test_common_kwargs_reach_a_base_that_takes_them_and_are_dropped_otherwise(name):
    adamw = timm.optim.create_optimizer_v2(model(), name, lr=0.01, eps=1e-6, betas=(0.5, 0.6), momentum=0.5,
                                           base_optimizer='adamw')
    assert all(g['betas'] == (0.5, 0.6) and g['eps'] == 1e-6 and 'momentum' not in g for g in adamw.param_groups)
    sgd = timm.optim.create_optimizer_v2(model(), name, lr=0.01, eps=1e-6, betas=(0.5, 0.6), momentum=0.5)
    assert all(g['momentum'] == 0.5 and 'betas' not in g and 'eps' not in g for g in sgd.param_groups)
    cls = timm.optim.get_optimizer_class(name, bind_defaults=False)
    direct = cls(model().parameters(), torch.optim.AdamW, lr=0.01, betas=(0.5, 0.6), momentum=0.5)
    assert direct.param_groups[0]['betas'] == (0.5, 0.6)  # a class gets only what its signature takes


def test_msam_and_lookahead_msam_from_the_factory():
    opt = timm.optim.create_optimizer_v2(model(), 'msam', lr=0.1, weight_decay=1e-3, rho=2.0)
    assert isinstance(opt, MSAM) and opt.rho == 2.0 and type(opt.base_optimizer) is torch.optim.SGD
    assert sorted(g['weight_decay'] for g in opt.param_groups) == [0.0, 1e-3]
    assert all(g['nesterov'] and g['momentum'] == 0.9 for g in opt.param_groups)
    lookahead = timm.optim.create_optimizer_v2(model(), 'lookahead_msam', lr=0.1)
    assert isinstance(lookahead, Lookahead) and esam_timm.find_msam(lookahead).rho == 3.0


def test_create_optimizer_v2_builds_esam_over_nesterov_sgd_with_weight_decay_groups():
    opt = timm.optim.create_optimizer_v2(model(), 'esam', lr=0.1, weight_decay=1e-3, momentum=0.9,
                                         rho=0.05, beta=0.6, gamma=0.5, base_optimizer='sgd')
    assert isinstance(opt, ESAM) and type(opt.base_optimizer) is torch.optim.SGD
    assert (opt.rho, opt.beta, opt.gamma) == (0.05, 0.6, 0.5)
    assert opt.param_groups is opt.base_optimizer.param_groups
    decays = sorted(g['weight_decay'] for g in opt.param_groups)
    assert decays == [0.0, 1e-3]
    assert all(g['nesterov'] and g['momentum'] == 0.9 and g['lr'] == 0.1 for g in opt.param_groups)
    no_decay = next(g for g in opt.param_groups if g['weight_decay'] == 0.0)
    assert all(p.ndim <= 1 for p in no_decay['params'])


@pytest.mark.parametrize('name,cls,check', [
    ('momentum', torch.optim.SGD, lambda g: not g['nesterov'] and g['momentum'] == 0.9),
    ('nesterov', torch.optim.SGD, lambda g: g['nesterov']),
    ('adamw', torch.optim.AdamW, lambda g: g['betas'] == (0.8, 0.99) and 'momentum' not in g),
    ('lamb', Lamb, lambda g: g['betas'] == (0.8, 0.99)),
    ('lion', Lion, lambda g: g['betas'] == (0.8, 0.99)),
])
def test_any_timm_base_optimizer_with_timm_kwargs_filtering(name, cls, check):
    opt = timm.optim.create_optimizer_v2(model(), 'esam', lr=0.01, momentum=0.9, betas=(0.8, 0.99),
                                         base_optimizer=name)
    assert type(opt.base_optimizer) is cls
    assert all(check(g) for g in opt.param_groups)


def test_lookahead_esam_and_sam():
    opt = timm.optim.create_optimizer_v2(model(), 'lookahead_esam', lr=0.1, beta=0.5, gamma=0.5)
    assert isinstance(opt, Lookahead) and esam_timm.find_sam(opt).beta == 0.5
    sam = timm.optim.create_optimizer_v2(model(), 'sam', lr=0.1, rho=0.1)
    assert isinstance(sam, SAM) and (sam.beta, sam.gamma, sam.rho) == (1.0, 1.0, 0.1)
    assert esam_timm.find_sam(torch.optim.SGD(model().parameters(), lr=0.1)) is None


@pytest.mark.parametrize('kwargs,match', [
    (dict(rho=0.0), r'rho=0\.0 is invalid: it must be a finite number > 0'),
    (dict(rho=float('nan')), r'rho=nan'),
    (dict(rho=float('inf')), r'rho=inf'),
    (dict(beta=0.0), r'beta=0\.0 is invalid: it must be a share in \(0, 1\]'),
    (dict(beta=1.5), r'beta=1\.5'),
    (dict(gamma=-0.5), r'gamma=-0\.5'),
    (dict(base_optimizer='sgdd'), r"Unknown ESAM base_optimizer 'sgdd'.*adamw"),
    (dict(base_optimizer='esam'), r"Unknown ESAM base_optimizer 'esam'"),
    (dict(base_optimizer='msam'), r"Unknown ESAM base_optimizer 'msam'"),
    (dict(base_optimizer=42), r'base_optimizer=42 is invalid'),
])
def test_bad_values_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ESAM(model().parameters(), **{'lr': 0.1, **kwargs})


def test_sam_refuses_beta_or_gamma_below_one():
    with pytest.raises(ValueError, match=r'SAM takes beta=1 and gamma=1 \(got beta=0\.5'):
        timm.optim.create_optimizer_v2(model(), 'sam', lr=0.1, beta=0.5)


def test_torch_optimizer_class_as_base():
    opt = ESAM(model().parameters(), torch.optim.RMSprop, lr=0.01, alpha=0.9)
    assert type(opt.base_optimizer) is torch.optim.RMSprop and opt.param_groups[0]['alpha'] == 0.9


def test_old_timm_is_refused_with_the_needed_version():
    with pytest.raises(ImportError, match=r'needs timm>=1\.0\.12.*timm 1\.0\.11 is installed'):
        check_timm_version('1.0.11')
    check_timm_version('1.0.12')
    check_timm_version('1.1.0.dev0')

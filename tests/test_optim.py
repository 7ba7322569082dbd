"""ESAM as a torch optimizer: shared param_groups, schedulers, state_dict round trip, perturb/restore, copies."""
import copy
import io
import pickle

import pytest
from timm.scheduler import create_scheduler_v2
import torch
import torch.nn as nn
import torch.nn.functional as F

from esam_timm import DEFAULT_BETA, DEFAULT_GAMMA, ESAM, SAM, train_step
from esam_timm.losses import PerSampleCrossEntropy


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def data(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_round_trip_resumes_identically():
    net = model()
    opt = ESAM(net.parameters(), 'sgd', lr=0.1, momentum=0.9, beta=0.5, gamma=0.5, seed=5)
    for i in range(3):
        train_step(net, opt, *data(i), PerSampleCrossEntropy())
    saved_model, saved_opt = roundtrip(net.state_dict()), roundtrip(opt.state_dict())
    assert 'esam' in saved_opt and saved_opt['state'], 'generator state and momentum buffers must be saved'
    for i in range(3, 6):
        train_step(net, opt, *data(i), PerSampleCrossEntropy())

    resumed = model()
    resumed.load_state_dict(saved_model)
    opt2 = ESAM(resumed.parameters(), 'sgd', lr=0.1, momentum=0.9, beta=0.5, gamma=0.5, seed=99)
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups is opt2.base_optimizer.param_groups and opt2.state is opt2.base_optimizer.state
    for i in range(3, 6):
        train_step(resumed, opt2, *data(i), PerSampleCrossEntropy())
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), resumed.parameters()))


def test_schedulers_drive_the_base_optimizer_lr():
    net = model()
    opt = ESAM(net.parameters(), 'sgd', lr=0.1)
    torch_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train_step(net, opt, *data(0), PerSampleCrossEntropy())
    torch_sched.step()
    assert opt.base_optimizer.param_groups[0]['lr'] == pytest.approx(0.05)
    opt = ESAM(model().parameters(), 'sgd', lr=0.1)
    timm_sched = create_scheduler_v2(opt, 'cosine', num_epochs=10, warmup_epochs=2, warmup_lr=0.01)[0]
    timm_sched.step(1)
    assert opt.base_optimizer.param_groups[0]['lr'] == pytest.approx(0.01 + (0.1 - 0.01) / 2)


def test_swp_draws_are_reproducible_from_the_seed():
    draws = []
    for _ in range(2):
        opt = ESAM(model().parameters(), 'sgd', lr=0.1, beta=0.5, seed=123)
        run = []
        for _ in range(5):
            drawn = opt.draw_swp()
            run.append([id_ for id_, p in enumerate(opt.param_groups[0]['params']) if any(p is d for d in drawn)])
        draws.append(run)
    assert draws[0] == draws[1] and len({tuple(r) for r in draws[0]}) > 1


def test_restore_is_bitwise_and_step_needs_it():
    net = model()
    opt = ESAM(net.parameters(), 'sgd', lr=0.1, rho=0.3, beta=1.0, gamma=1.0)
    w = [p.detach().clone() for p in net.parameters()]
    x, y = data(0)
    F.cross_entropy(net(x), y).backward()
    stats = opt.perturb()
    assert stats['perturb_norm'].item() == pytest.approx(0.3, rel=1e-5)
    assert not any(torch.equal(p, w0) for p, w0 in zip(net.parameters(), w))
    with pytest.raises(RuntimeError, match='call restore'):
        opt.step()
    opt.restore()
    assert all(torch.equal(p, w0) for p, w0 in zip(net.parameters(), w))


def test_plain_base_state_dict_loads_into_esam():
    net = model()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = data(0)
    F.cross_entropy(net(x), y).backward()
    sgd.step()
    opt = ESAM(net.parameters(), 'momentum', lr=0.1)
    opt.load_state_dict(sgd.state_dict())
    assert torch.equal(opt.state[next(net.parameters())]['momentum_buffer'],
                       sgd.state[next(net.parameters())]['momentum_buffer'])


def test_defaults_are_the_papers_esam():
    opt = ESAM(model().parameters())
    assert (opt.beta, opt.gamma) == (DEFAULT_BETA, DEFAULT_GAMMA) == (0.6, 0.5)
    sam = SAM(model().parameters())
    assert (sam.beta, sam.gamma) == (1.0, 1.0)


@pytest.mark.parametrize('copy_fn', ['deepcopy', 'pickle'])
@pytest.mark.parametrize('cls,kwargs', [(ESAM, dict(beta=0.5, gamma=0.5, sds='loss', seed=3)),
                                        (SAM, dict(adaptive=True))])
def test_copies_keep_every_attribute_and_continue_exactly(cls, kwargs, copy_fn):
    """torch's Optimizer.__getstate__ keeps only defaults/state/param_groups; a copied ESAM must keep rho,
    beta, gamma, the SWP generator, the base optimizer... and continue as the original (both copied
    together with their parameters)."""
    net = model()
    opt = cls(net.parameters(), 'adamw', lr=0.01, rho=0.1, **kwargs)
    for i in range(2):
        train_step(net, opt, *data(i), PerSampleCrossEntropy())
    copier = copy.deepcopy if copy_fn == 'deepcopy' else (lambda obj: pickle.loads(pickle.dumps(obj)))
    net_copy, opt_copy = copier((net, opt))
    assert {k for k in vars(opt_copy) if not k.startswith('_')} == {k for k in vars(opt) if not k.startswith('_')}
    assert (opt_copy.rho, opt_copy.beta, opt_copy.gamma, opt_copy.adaptive, opt_copy.sds) == \
        (opt.rho, opt.beta, opt.gamma, opt.adaptive, opt.sds)
    assert type(opt_copy.base_optimizer) is torch.optim.AdamW
    assert opt_copy.param_groups is opt_copy.base_optimizer.param_groups
    assert opt_copy.state is opt_copy.base_optimizer.state
    assert torch.equal(opt_copy.generator.get_state(), opt.generator.get_state())
    for i in range(2, 4):
        train_step(net, opt, *data(i), PerSampleCrossEntropy())
        train_step(net_copy, opt_copy, *data(i), PerSampleCrossEntropy())
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), net_copy.parameters()))


def test_allow_plain_steps_takes_a_base_step_without_an_ascent():
    net, twin = model(), model()
    opt = ESAM(net.parameters(), 'momentum', lr=0.1, allow_plain_steps=True)
    reference = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    x, y = data(0)
    for n, o in ((net, opt), (twin, reference)):
        F.cross_entropy(n(x), y).backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), twin.parameters()))

"""Momentum-SAM (msam): the rule against a hand-written reference, plain loops shaped like timm's train.py,
accumulation, torch.compile, copies, refusals and DDP."""
import copy
import gc
import math
import os
import pickle
import weakref
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import CheckpointSaver, ModelEmaV3, NativeScaler
from torch._dynamo.utils import counters
from torch.nn.parallel import DistributedDataParallel

import esam_timm
from esam_timm import MSAM, find_msam, train_step
from esam_timm.losses import PerSampleCrossEntropy
from esam_timm.msam import _LIVE, _STATE

RHO, LR, MOMENTUM = 0.5, 0.1, 0.9


def mlp(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def data(steps: int, batch: int = 10, dtype: torch.dtype = torch.float64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 6, generator=g).to(dtype), torch.randint(0, 3, (batch,), generator=g))
            for _ in range(steps)]


def two_groups(model: nn.Module, lr_bias: float = LR):
    """Weights with weight decay, biases without and with their own lr (as timm's decay/no-decay groups)."""
    return [{'params': [model[0].weight, model[2].weight], 'weight_decay': 0.05},
            {'params': [model[0].bias, model[2].bias], 'weight_decay': 0.0, 'lr': lr_bias}]


def snapshot(model: nn.Module):
    return [p.detach().clone() for p in model.parameters()]


def assert_equal(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


# --------------------------------------------------------------------------- the rule, written plainly

def reference_msam(model: nn.Module, batches, base: str, rho: float, groups_cfg):
    """Momentum-SAM by hand: w~ = w - rho v / ||v|| (v the momentum, one norm over all tensors; none on
    the first step), gradient at w~ on an unrelated copy of the model, then the base step from w.
    Returns the weights after each step and the w~ of each step, in the model's parameter order."""
    twin = copy.deepcopy(model)  # not in any optimizer: MSAM's hooks leave it alone
    names = [n for n, _ in model.named_parameters()]
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = {n: c for c in groups_cfg for n in c['names']}
    state = {n: {} for n in names}
    history, perturbed = [], []
    for t, (x, y) in enumerate(batches, start=1):
        key = 'buf' if base in ('sgd', 'momentum') else 'm'
        momenta = [state[n][key] for n in names if key in state[n]]
        w_tilde = dict(w)
        if momenta and rho > 0:
            norm = math.sqrt(sum(float((v * v).sum()) for v in momenta))
            for n in names:
                w_tilde[n] = w[n] - rho * state[n][key] / (norm + 1e-12)
        perturbed.append([w_tilde[n].clone() for n in names])
        with torch.no_grad():
            for n, p in twin.named_parameters():
                p.copy_(w_tilde[n])
        loss = F.cross_entropy(twin(x), y)
        grads = dict(zip(names, torch.autograd.grad(loss, list(twin.parameters()))))
        for n in names:
            lr, wd, g = cfg[n]['lr'], cfg[n]['weight_decay'], grads[n]
            s = state[n]
            if base in ('sgd', 'momentum'):  # torch.optim.SGD, dampening 0
                d = g + wd * w[n]
                s['buf'] = d.clone() if 'buf' not in s else MOMENTUM * s['buf'] + d
                d = d + MOMENTUM * s['buf'] if base == 'sgd' else s['buf']  # timm's 'sgd' is Nesterov
                w[n] = w[n] - lr * d
            else:  # torch.optim.AdamW
                b1, b2, eps = 0.9, 0.999, 1e-8
                s.setdefault('m', torch.zeros_like(g))
                s.setdefault('v', torch.zeros_like(g))
                s['m'] = b1 * s['m'] + (1 - b1) * g
                s['v'] = b2 * s['v'] + (1 - b2) * g * g
                w[n] = w[n] * (1 - lr * wd)
                m_hat, v_hat = s['m'] / (1 - b1 ** t), s['v'] / (1 - b2 ** t)
                w[n] = w[n] - lr * m_hat / (v_hat.sqrt() + eps)
        history.append([w[n].clone() for n in names])
    return history, perturbed


@pytest.mark.parametrize('base', ['sgd', 'momentum', 'adamw'])
def test_k_steps_equal_the_hand_written_rule_with_two_param_groups(base):
    model = mlp()
    lr = 0.01 if base == 'adamw' else LR
    names = dict((id(p), n) for n, p in model.named_parameters())
    groups = two_groups(model, lr_bias=lr / 2)
    groups_cfg = [{'names': [names[id(p)] for p in g['params']], 'weight_decay': g['weight_decay'],
                   'lr': g.get('lr', lr)} for g in groups]
    batches = data(4)
    expected, expected_tilde = reference_msam(model, batches, base, RHO, groups_cfg)

    optimizer = MSAM(groups, base, rho=RHO, lr=lr, momentum=MOMENTUM)
    assert [len(g['params']) for g in optimizer.param_groups] == [2, 2]
    seen = []
    model[0].register_forward_pre_hook(lambda m, a: seen.append([p.detach().clone() for p in model.parameters()]))
    for step, (x, y) in enumerate(batches):
        w = snapshot(model)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()  # a plain loop: nothing else
        assert_equal(snapshot(model), w)  # w is back bitwise once the backward has finished
        optimizer.step()
        for a, e in zip(seen[-1], expected_tilde[step]):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
        for a, e in zip(model.parameters(), expected[step]):
            torch.testing.assert_close(a.detach(), e, rtol=1e-12, atol=1e-12)
        norm = optimizer.step_stats()['perturb_norm']
        assert norm.item() == (0.0 if step == 0 else pytest.approx(RHO))  # the first step is a plain one


def test_rho_zero_is_the_plain_base_optimizer():
    model, twin = mlp(), mlp()
    optimizer = MSAM(model.parameters(), 'momentum', rho=0.0, lr=LR, momentum=MOMENTUM)
    reference = torch.optim.SGD(twin.parameters(), lr=LR, momentum=MOMENTUM)
    for x, y in data(3):
        for net, opt in ((model, optimizer), (twin, reference)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    assert_equal(snapshot(model), snapshot(twin))
    assert optimizer.step_stats()['perturb_norm'].item() == 0.0


def test_closure_step_perturbs_around_a_raw_tensor_closure():
    """timm's optimizer tests drive step(closure) with raw tensors (no module, so no hook)."""
    weight = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    inputs = torch.randn(3, dtype=torch.float64)
    optimizer = MSAM([weight], 'momentum', rho=RHO, lr=LR, momentum=MOMENTUM)
    seen = []

    def closure():
        optimizer.zero_grad()
        seen.append(weight.detach().clone())
        loss = (weight.mv(inputs) ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)  # no momentum yet: a plain step
    w = weight.detach().clone()
    v = optimizer.state[weight]['momentum_buffer'].clone()
    loss = optimizer.step(closure)
    torch.testing.assert_close(seen[-1], w - RHO * v / v.norm())
    assert torch.is_tensor(loss) and not optimizer.perturbed
    g = 2 * torch.outer(seen[-1].mv(inputs), inputs)
    torch.testing.assert_close(weight.detach(), w - LR * (MOMENTUM * v + g))


# --------------------------------------------------------------------------- timm's train.py, shaped

def test_timm_train_loop_fp16_native_scaler_agc_ema_checkpoint_and_eval_see_w(tmp_path, monkeypatch):
    """The loop of timm's train.py, built from timm's own utilities: autocast fp16, NativeScaler (backward,
    unscale, AGC clipping, scaler.step, update in one call), ModelEmaV3 after each step, eval between
    epochs, CheckpointSaver. Everything outside the training forward/backward sees w bitwise, and the
    overflow step leaves w untouched."""
    import timm.utils.clip_grad as clip_grad_module
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=10)
    optimizer = timm.optim.create_optimizer_v2(model, 'msam', lr=0.05, weight_decay=1e-4, rho=RHO)
    loss_scaler = NativeScaler(device='cpu')
    ema = ModelEmaV3(model, decay=0.9)
    saver = CheckpointSaver(model, optimizer, model_ema=ema, amp_scaler=loss_scaler, checkpoint_dir=str(tmp_path),
                            recovery_dir=str(tmp_path), max_history=1)
    params = list(model.parameters())
    steps = {'before': [], 'after': []}  # the weights the base step started from and produced
    base_step = optimizer.base_optimizer.step

    def recording_step(*args, **kwargs):
        steps['before'].append([p.detach().clone() for p in params])
        result = base_step(*args, **kwargs)
        steps['after'].append([p.detach().clone() for p in params])
        return result

    optimizer.base_optimizer.step = recording_step
    agc_saw = []
    adaptive_clip_grad = clip_grad_module.adaptive_clip_grad

    def recording_agc(parameters, *args, **kwargs):
        parameters = list(parameters)
        agc_saw.append([p.detach().clone() for p in parameters])
        return adaptive_clip_grad(parameters, *args, **kwargs)

    monkeypatch.setattr(clip_grad_module, 'adaptive_clip_grad', recording_agc)
    forward_saw = []
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))  # the first parameter
    stem.register_forward_pre_hook(lambda m, a: forward_saw.append((m.training, m.weight.detach().clone())))
    overflow_at, step = 3, 0
    model.get_classifier().weight.register_hook(lambda g: g * float('inf') if step == overflow_at else g)
    g = torch.Generator().manual_seed(3)
    val = torch.randn(8, 3, 32, 32, generator=g)
    for epoch in range(2):
        model.train()
        for _ in range(3):
            step += 1
            x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
            w = snapshot(model)
            with torch.autocast('cpu', dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            scale = loss_scaler._scaler.get_scale()
            loss_scaler(loss, optimizer, clip_grad=0.05, clip_mode='agc', parameters=model.parameters())
            assert_equal(agc_saw[-1], w)  # clipping read w, not w~
            if step == overflow_at:
                assert loss_scaler._scaler.get_scale() == scale / 2  # the scaler saw the overflow
                assert_equal(snapshot(model), w)  # ... and w is untouched, bitwise
                assert len(steps['after']) == step - 1  # no base step was taken
            else:
                assert_equal(steps['before'][-1], w)  # the base step started from w
                assert_equal(snapshot(model), steps['after'][-1])
            if step > 1:
                training, seen = forward_saw[-1]
                assert training and not torch.equal(seen, w[0])  # the training forward ran at w~
            optimizer.zero_grad()
            ema_input = snapshot(model)
            ema.update(model, step=step)
            assert_equal(ema_input, steps['after'][-1] if step != overflow_at else w)
        model.eval()
        with torch.no_grad():
            model(val)
        training, seen = forward_saw[-1]
        assert not training and torch.equal(seen, steps['after'][-1][0])
        saver.save_checkpoint(epoch, metric=float(epoch))
        saved = torch.load(tmp_path / 'last.pth.tar', weights_only=False)['state_dict']
        for (name, p), w_after in zip(model.named_parameters(), steps['after'][-1]):
            assert torch.equal(saved[name], w_after), name
    assert len(steps['after']) == step - 1


def test_forward_without_backward_is_undone_by_eval_and_by_step():
    model = mlp()
    optimizer = MSAM(model.parameters(), 'sgd', rho=RHO, lr=LR, momentum=MOMENTUM)
    (x, y), (x2, y2) = data(2)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    w = snapshot(model)
    model(x)  # train mode, grad enabled, no backward: w~ stays ...
    assert optimizer.perturbed and not torch.equal(model[0].weight, w[0])
    with torch.no_grad():
        model(x)  # ... until a forward under no_grad (or in eval mode)
    assert not optimizer.perturbed
    assert_equal(snapshot(model), w)
    model(x)
    model.eval()
    model(x)
    assert not optimizer.perturbed
    model.train()
    model(x2)
    optimizer.zero_grad()
    optimizer.step()  # no gradient at all: step() still restores, and the base step does nothing
    assert_equal(snapshot(model), w)


def test_forwards_it_cannot_see_give_plain_steps_and_one_warning(caplog):
    model = mlp()
    optimizer = MSAM(model.parameters(), 'sgd', rho=RHO, lr=LR, momentum=MOMENTUM)
    model.eval()  # training in eval mode (e.g. to freeze BatchNorm): MSAM treats it as evaluation
    for x, y in data(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        assert optimizer.step_stats()['perturb_norm'].item() == 0.0
    warnings = [r for r in caplog.records if 'MSAM stepped without perturbing' in r.getMessage()]
    assert len(warnings) == 1 and 'plain SGD step' in warnings[0].getMessage()


def test_two_forwards_then_two_backwards_fail_loudly():
    """Documented limit: the first backward's end restores w under the second graph, which autograd sees."""
    model = mlp()
    optimizer = MSAM(model.parameters(), 'sgd', rho=RHO, lr=LR, momentum=MOMENTUM)
    (x, y), (x2, y2) = data(2)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    first, second = F.cross_entropy(model(x), y), F.cross_entropy(model(x2), y2)
    first.backward()
    with pytest.raises(RuntimeError, match='modified by an inplace operation'):
        second.backward()


def test_gradient_accumulation_sees_one_w_tilde_and_steps_on_the_summed_gradient():
    model = mlp()
    optimizer = MSAM(model.parameters(), 'momentum', rho=RHO, lr=LR, momentum=MOMENTUM)
    batches = data(4)
    x, y = batches[0]
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    seen = []
    model[0].register_forward_pre_hook(lambda m, a: seen.append(snapshot(model)))
    w = snapshot(model)
    v = [optimizer.state[p]['momentum_buffer'].clone() for p in model.parameters()]
    for x, y in batches[1:]:
        (F.cross_entropy(model(x), y) / 3).backward()
        assert_equal(snapshot(model), w)  # restored after each micro-batch's backward
    assert_equal(seen[1], seen[0])
    assert_equal(seen[2], seen[0])  # every micro-batch ran at the same w~, bitwise
    assert not torch.equal(seen[0][0], w[0])
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p, q in zip(twin.parameters(), seen[0]):
            p.copy_(q)
    g = torch.autograd.grad(sum(F.cross_entropy(twin(x), y) / 3 for x, y in batches[1:]), list(twin.parameters()))
    optimizer.step()
    for p, w0, v0, g0 in zip(model.parameters(), w, v, g):
        torch.testing.assert_close(p.detach(), w0 - LR * (MOMENTUM * v0 + g0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('use_reentrant', [False, True])
def test_activation_checkpointing_recomputes_at_w_tilde(use_reentrant):
    """Recomputation inside the backward must find w~ in place (and not restore it mid-backward)."""
    class Checkpointed(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            from torch.utils.checkpoint import checkpoint
            return checkpoint(self.net, x, use_reentrant=use_reentrant)

    model = Checkpointed(mlp())
    twin = mlp()
    optimizer = MSAM(model.parameters(), 'sgd', rho=RHO, lr=LR, momentum=MOMENTUM)
    reference = MSAM(twin.parameters(), 'sgd', rho=RHO, lr=LR, momentum=MOMENTUM)
    for x, y in data(3):
        x = x.requires_grad_(use_reentrant)  # reentrant checkpointing needs an input that requires grad
        for net, opt in ((model, optimizer), (twin, reference)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            assert not opt.perturbed
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.slow
@pytest.mark.parametrize('how', ['torch.compile(model)', 'model.compile()'])
def test_compiled_model_trains_at_w_tilde_without_recompiles(how):
    torch._dynamo.reset()
    counters.clear()

    def make():
        torch.manual_seed(0)
        return SmallNet()

    model, eager, plain = make(), make(), make()
    if how == 'model.compile()':
        model.compile(backend='inductor')
        compiled = model
    else:
        compiled = torch.compile(model, backend='inductor')
    runs = [(compiled, MSAM(model.parameters(), 'sgd', rho=RHO, lr=LR, momentum=MOMENTUM)),
            (eager, MSAM(eager.parameters(), 'sgd', rho=RHO, lr=LR, momentum=MOMENTUM)),
            (plain, torch.optim.SGD(plain.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True))]
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(5)]

    def train(batch):
        for net, opt in runs:
            opt.zero_grad()
            F.cross_entropy(net(batch[0]), batch[1]).backward()
            assert not getattr(opt, 'perturbed', False)
            opt.step()
        with torch.no_grad():
            compiled.eval()
            compiled(batch[0])
            compiled.train()

    train(batches[0])  # warm-up: the train graph (no perturbation yet) and the eval graph
    train(batches[1])  # the first step at w~
    graphs = counters['stats']['unique_graphs']
    with torch._dynamo.config.patch(error_on_recompile=True):  # any recompilation raises here
        for batch in batches[2:]:
            train(batch)
    assert counters['stats']['unique_graphs'] == graphs
    # torch.compile(model) runs the hooks eagerly around the compiled call: no graph break. module.compile()
    # runs a module's hooks inside the compiled code: MSAM's two run eagerly there (a graph break each).
    breaks = dict(counters['graph_break'])
    if how == 'torch.compile(model)':
        assert not breaks, breaks
    else:
        assert breaks and all('_pre_hook' in reason or '_post_hook' in reason for reason in breaks), breaks
    assert runs[0][1].step_stats()['perturb_norm'].item() == pytest.approx(RHO)
    for p, q, r in zip(model.parameters(), eager.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert sum((p - r).abs().sum() for p, r in zip(model.parameters(), plain.parameters())) > 1e-2


# --------------------------------------------------------------------------- the optimizer API

@pytest.mark.parametrize('copy_fn', ['deepcopy', 'pickle'])
def test_copies_of_model_and_optimizer_continue_exactly(copy_fn):
    model = mlp()
    optimizer = timm.optim.create_optimizer_v2(model, 'msam', lr=LR, weight_decay=1e-3, rho=RHO)
    batches = data(5)

    def run(net, opt, part):
        for x, y in part:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        return snapshot(net)

    run(model, optimizer, batches[:2])
    copier = copy.deepcopy if copy_fn == 'deepcopy' else (lambda obj: pickle.loads(pickle.dumps(obj)))
    model_copy, optimizer_copy = copier((model, optimizer))
    public = {k for k in optimizer.__dict__ if not k.startswith('_')}
    assert {k for k in optimizer_copy.__dict__ if not k.startswith('_')} == public
    assert optimizer_copy.rho == RHO and type(optimizer_copy.base_optimizer) is torch.optim.SGD
    assert optimizer_copy.param_groups is optimizer_copy.base_optimizer.param_groups
    assert_equal(run(model_copy, optimizer_copy, batches[2:]), run(model, optimizer, batches[2:]))
    assert optimizer_copy.step_stats()['perturb_norm'].item() == pytest.approx(RHO)


def test_state_dict_resume_continues_bitwise(tmp_path):
    batches = data(6)
    model = mlp()
    optimizer = timm.optim.create_optimizer_v2(model, 'msam', lr=LR, rho=RHO)
    for x, y in batches[:3]:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict()}, tmp_path / 'ckpt.pth')
    for x, y in batches[3:]:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    resumed = mlp()
    resumed_optimizer = timm.optim.create_optimizer_v2(resumed, 'msam', lr=LR, rho=RHO)
    checkpoint = torch.load(tmp_path / 'ckpt.pth', weights_only=True)
    resumed.load_state_dict(checkpoint['model'])
    resumed_optimizer.load_state_dict(checkpoint['optimizer'])
    assert resumed_optimizer.state is resumed_optimizer.base_optimizer.state
    for x, y in batches[3:]:
        resumed_optimizer.zero_grad()
        F.cross_entropy(resumed(x), y).backward()
        resumed_optimizer.step()
    assert_equal(snapshot(resumed), snapshot(model))


def test_factory_names_lookahead_and_train_step_stats():
    optimizer = timm.optim.create_optimizer_v2(mlp(torch.float32), 'msam', lr=LR, rho=2.5, base_optimizer='adamw',
                                               betas=(0.8, 0.99), eps=1e-6)
    assert isinstance(optimizer, MSAM) and type(optimizer.base_optimizer) is torch.optim.AdamW
    assert optimizer.momentum_key == 'exp_avg' and optimizer.rho == 2.5
    assert all(g['betas'] == (0.8, 0.99) and g['eps'] == 1e-6 for g in optimizer.param_groups)
    assert repr(optimizer).startswith('MSAM(rho=2.5, base_optimizer=AdamW (')
    model = mlp(torch.float32)
    lookahead = timm.optim.create_optimizer_v2(model, 'lookahead_msam', lr=LR, rho=RHO)
    assert isinstance(lookahead, timm.optim.Lookahead) and find_msam(lookahead).rho == RHO
    assert find_msam(torch.optim.SGD(model.parameters(), lr=LR)) is None
    for x, y in data(3, dtype=torch.float32):
        stats = train_step(model, lookahead, x, y, PerSampleCrossEntropy())
    assert stats['perturb_norm'].item() == pytest.approx(RHO)


@pytest.mark.parametrize('kwargs,match', [
    (dict(base_optimizer='lamb'), r"MSAM base optimizer Lamb is not supported.*momentum SGD.*'adamw'"),
    (dict(base_optimizer=torch.optim.RMSprop), r'MSAM base optimizer RMSprop is not supported'),
    (dict(base_optimizer='sgd', momentum=0.0), r"momentum=0\.0 was given for its SGD base 'sgd': use momentum > 0"),
    (dict(base_optimizer=torch.optim.SGD), r'SGD parameter group 0 has momentum=0: use momentum > 0'),
    (dict(base_optimizer='msam'), r"Unknown MSAM base_optimizer 'msam'"),
    (dict(base_optimizer='sgdd'), r"Unknown MSAM base_optimizer 'sgdd'.*adamw"),
    (dict(rho=-1.0), r'MSAM rho=-1\.0 is invalid: it must be a finite number >= 0'),
    (dict(rho=float('nan')), r'rho=nan is invalid'),
    (dict(rho=float('inf')), r'rho=inf is invalid'),
    (dict(rho='3'), r"rho='3' is invalid"),
])
def test_refusals_name_the_bad_value_and_what_works(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MSAM(mlp().parameters(), **{'lr': LR, **kwargs})


def test_rho_is_checked_when_changed_and_a_group_without_momentum_is_refused():
    model = mlp()
    optimizer = MSAM([model[0].weight], 'momentum', lr=LR)
    optimizer.rho = 0.0  # e.g. a warm-up
    with pytest.raises(ValueError, match=r'rho=-0\.5 is invalid'):
        optimizer.rho = -0.5
    optimizer.add_param_group({'params': [model[0].bias], 'lr': 0.5})
    assert optimizer.param_groups is optimizer.base_optimizer.param_groups and len(optimizer.param_groups) == 2
    with pytest.raises(ValueError, match='group 2 has momentum=0'):
        optimizer.add_param_group({'params': [model[2].weight], 'momentum': 0})


def test_grad_scaler_closure_is_refused():
    model = mlp(torch.float32)
    optimizer = MSAM(model.parameters(), 'sgd', lr=LR)
    scaler = torch.amp.GradScaler('cpu')
    x, y = data(1, dtype=torch.float32)[0]
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    with pytest.raises(RuntimeError, match='cannot run under an fp16 GradScaler'):
        scaler.step(optimizer, lambda: 0.0)


def test_optimizers_are_collected_and_the_hooks_go_with_them():
    model = mlp()
    optimizer = MSAM(model.parameters(), 'sgd', lr=LR)
    F.cross_entropy(model(data(1)[0][0]), data(1)[0][1]).backward()
    optimizer.step()
    ref = weakref.ref(optimizer)
    assert _STATE.handles is not None
    del optimizer
    gc.collect()
    assert ref() is None
    assert not list(_LIVE) and _STATE.handles is None  # modules run torch's hook-free path again
    assert esam_timm.ESAM  # (the package stays usable)


# --------------------------------------------------------------------------- DDP, 2 gloo ranks

WORLD, DDP_STEPS = 2, 4


def ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DistributedDataParallel(timm.create_model('test_resnet', num_classes=10))
    optimizer = timm.optim.create_optimizer_v2(model.module, 'msam', lr=0.05, weight_decay=1e-4, rho=RHO)
    seen = []
    stem = next(m for m in model.module.modules() if isinstance(m, nn.Conv2d))
    stem.register_forward_pre_hook(
        lambda m, a: seen.append([p.detach().clone() for p in model.module.parameters()]))
    g = torch.Generator().manual_seed(100 + rank)  # every rank its own data
    weights = []
    for step in range(DDP_STEPS):
        optimizer.zero_grad()
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        with model.no_sync():  # accumulation: the first micro-batch stays local
            F.cross_entropy(model(x[:4]), y[:4]).backward()
        F.cross_entropy(model(x[4:]), y[4:]).backward()
        optimizer.step()
        weights.append([p.detach().clone() for p in model.module.parameters()])
    torch.save({'seen': seen, 'weights': weights, 'norm': optimizer.step_stats()['perturb_norm']},
               os.path.join(out_dir, f'rank{rank}.pt'))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_agree_bitwise_on_w_and_w_tilde(tmp_path: Path):
    mp.spawn(ddp_worker, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(WORLD)]
    assert len(ranks[0]['seen']) == 2 * DDP_STEPS
    for step in range(DDP_STEPS):
        assert_equal(ranks[0]['weights'][step], ranks[1]['weights'][step])
    for seen0, seen1 in zip(ranks[0]['seen'], ranks[1]['seen']):
        assert_equal(seen0, seen1)  # every forward of every rank at the same w~
    assert not torch.equal(ranks[0]['seen'][2][0], ranks[0]['weights'][0][0])  # and w~ is not w
    assert ranks[0]['norm'].item() == pytest.approx(RHO)

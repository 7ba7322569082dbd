"""train_step against independent computations: SAM equivalence, ESAM passes, AMP, BN, dropout."""
import copy
from typing import List

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import esam_timm
from esam_timm import ESAM, train_step
from esam_timm.losses import PerSampleCrossEntropy
from reference_sam import esam_gradient, nesterov_sgd_step, swp_keep_mask

LR, MOMENTUM, WD = 0.05, 0.9, 1e-3


def tiny_resnet() -> nn.Module:
    return timm.create_model('test_resnet', num_classes=10)


def batches(n: int, batch: int = 16, size: int = 32, classes: int = 10, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, size, size, generator=g).to(dtype),
             torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)]


def float64_resnet() -> nn.Module:
    """The comparisons with the hand-written references run in float64: over several steps in fp32, a
    1e-7 difference in summation order grows to 1e-2 on some CPUs (a chaotic trajectory), which would
    hide a real difference as well as invent one."""
    return tiny_resnet().double()


def sgd_esam(model: nn.Module, **kwargs) -> ESAM:
    return ESAM(model.parameters(), 'sgd', lr=LR, momentum=MOMENTUM, weight_decay=WD, **kwargs)


def run_reference(model: nn.Module, data, rho: float, beta: float, gamma: float, seed: int = 0,
                  clip=None) -> nn.Module:
    params = list(model.parameters())
    bufs: List = [None] * len(params)
    generator = torch.Generator().manual_seed(seed)
    for x, y in data:
        keep = swp_keep_mask(generator, len(params), beta)
        grads = esam_gradient(model, params, x, y, rho, beta, gamma, keep, clip=clip)
        nesterov_sgd_step(params, grads, bufs, LR, MOMENTUM, WD)
    return model


@pytest.mark.parametrize('clip', [None, 0.5])
def test_sam_matches_hand_written_sam(clip):
    model = float64_resnet()
    reference = run_reference(copy.deepcopy(model), batches(4, dtype=torch.float64), rho=0.05, beta=1.0, gamma=1.0, clip=clip)
    optimizer = sgd_esam(model, rho=0.05, beta=1.0, gamma=1.0)
    for x, y in batches(4, dtype=torch.float64):
        stats = train_step(model, optimizer, x, y, PerSampleCrossEntropy(), clip_grad=clip)
        assert stats['num_selected'] == 16
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_esam_matches_hand_written_esam():
    model = float64_resnet()
    reference = run_reference(copy.deepcopy(model), batches(4, dtype=torch.float64), rho=0.05, beta=0.5, gamma=0.5, seed=3)
    optimizer = sgd_esam(model, rho=0.05, beta=0.5, gamma=0.5, seed=3)
    for x, y in batches(4, dtype=torch.float64):
        stats = train_step(model, optimizer, x, y, PerSampleCrossEntropy())
        assert stats['num_selected'] == 8 and stats['selected_fraction'] == 0.5
        assert stats['perturb_norm'].item() == pytest.approx(0.05 / 0.5, rel=1e-5)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_timm_factory_sam_equals_sam_reference():
    model = float64_resnet()
    reference = run_reference(copy.deepcopy(model), batches(2, dtype=torch.float64), rho=0.1, beta=1.0, gamma=1.0)
    # weight decay on every tensor, as in the reference (timm would exclude 1-d tensors by default)
    optimizer = timm.optim.create_optimizer_v2(model, 'sam', lr=LR, momentum=MOMENTUM, weight_decay=WD,
                                               rho=0.1, filter_bias_and_bn=False)
    for x, y in batches(2, dtype=torch.float64):
        train_step(model, optimizer, x, y, PerSampleCrossEntropy())
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


class Recorder(nn.Module):
    """Linear model that records every forward: batch size, grad mode, input memory format."""

    def __init__(self, features: int = 12, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, classes)
        self.calls = []

    def forward(self, x):
        self.calls.append((x.shape[0], torch.is_grad_enabled(),
                           x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
                           [p.requires_grad for p in self.parameters()]))
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize('gamma,expected', [(0.5, [(10, True), (10, False), (5, True)]),
                                            (1.0, [(10, True), (10, True)])])
def test_pass_order_and_f2_only_when_selecting(gamma, expected):
    model = Recorder()
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, beta=1.0, gamma=gamma)
    train_step(model, optimizer, torch.randn(10, 3, 4, 4), torch.randint(0, 5, (10,)), PerSampleCrossEntropy())
    assert [c[:2] for c in model.calls] == expected


def test_exact_top_k_selection_on_soft_targets_keeps_channels_last():
    model = Recorder()
    x = torch.randn(10, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    soft = torch.softmax(torch.randn(10, 5), -1)
    seen = {}

    def rule(sharpness, clean_loss, k):
        seen['sharpness'], seen['k'] = sharpness.clone(), k
        seen['index'] = esam_timm.selection.top_k(sharpness, clean_loss, k)
        return seen['index']

    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, rho=0.5, beta=1.0, gamma=0.3,
                     sds=esam_timm.SDSMode('exact', rule))

    def loss_fn(logits, targets):
        seen.setdefault('targets', []).append(targets)
        return PerSampleCrossEntropy()(logits, targets)

    # hand computation of the sharpness the rule must see
    with torch.no_grad():
        clean = PerSampleCrossEntropy()(model(x), soft)
    model.calls.clear()
    stats = train_step(model, optimizer, x, soft, loss_fn)
    assert seen['k'] == 3 == stats['num_selected']  # round(0.3 * 10)
    expected_order = torch.argsort(seen['sharpness'], descending=True)[:3]
    assert sorted(seen['index'].tolist()) == sorted(expected_order.tolist())
    torch.testing.assert_close(seen['targets'][-1], soft[seen['index']])
    assert model.calls[-1][0] == 3 and model.calls[-1][2], 'F3 subset lost channels-last'
    torch.testing.assert_close(stats['loss'], clean.mean())
    torch.testing.assert_close(stats['sharpness'], seen['sharpness'].mean())


@pytest.mark.parametrize('gamma,batch,k', [(0.5, 16, 8), (0.5, 5, 2), (0.5, 7, 4), (0.01, 16, 1),
                                           (0.3, 10, 3), (1.0, 3, 3), (0.99, 4, 4)])
def test_num_selected_rule(gamma, batch, k):
    assert esam_timm.num_selected(gamma, batch) == k


def test_swp_restricts_b1_to_drawn_tensors_without_touching_requires_grad():
    model = Recorder()
    model.conv.bias.requires_grad_(False)  # a frozen tensor inside the optimizer
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, beta=0.5, gamma=0.5, seed=7)
    expected_keep = swp_keep_mask(torch.Generator().manual_seed(7), 4, 0.5)
    trainable = [True, False, True, True]
    frozen_before = model.conv.bias.detach().clone()
    seen = []
    original_perturb = optimizer.perturb

    def perturb(**kwargs):  # the gradients B1 produced, just before they become the ascent
        seen.append([p.grad is not None for p in model.parameters()])
        return original_perturb(**kwargs)

    optimizer.perturb = perturb
    train_step(model, optimizer, torch.randn(8, 3, 4, 4), torch.randint(0, 5, (8,)), PerSampleCrossEntropy())
    assert seen == [[k and t for k, t in zip(expected_keep, trainable)]]
    # no pass sees a toggled flag (torch.compile guards on requires_grad), and frozen stays frozen
    assert all(call[3] == trainable for call in model.calls)
    assert [p.requires_grad for p in model.parameters()] == trainable
    assert torch.equal(model.conv.bias, frozen_before)


def test_ascent_uses_only_drawn_tensors_with_norm_rho_over_beta():
    model = Recorder()
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, rho=0.2, beta=0.5, gamma=1.0, seed=11)
    keep = swp_keep_mask(torch.Generator().manual_seed(11), 4, 0.5)
    w = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 5, (8,))
    original_perturb, moved = optimizer.perturb, {}

    def spy(**kwargs):
        result = original_perturb(**kwargs)
        moved['e'] = [p.detach() - w0 for p, w0 in zip(model.parameters(), w)]
        return result

    optimizer.perturb = spy
    train_step(model, optimizer, x, y, PerSampleCrossEntropy())
    assert any(keep) and not all(keep)
    assert [bool(e.abs().sum() > 0) for e in moved['e']] == keep
    assert torch.sqrt(sum((e ** 2).sum() for e in moved['e'])).item() == pytest.approx(0.2 / 0.5, rel=1e-4)


def test_adaptive_ascent_matches_asam_formula():
    model = Recorder()
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, rho=0.3, beta=1.0, gamma=1.0, adaptive=True)
    x, y = torch.randn(6, 3, 4, 4), torch.randint(0, 5, (6,))
    F.cross_entropy(model(x), y).backward()
    params = list(model.parameters())
    g = [p.grad.clone() for p in params]
    w = [p.detach().clone() for p in params]
    norm = torch.sqrt(sum(((p.abs() * gi) ** 2).sum() for p, gi in zip(w, g)))
    optimizer.perturb()
    for p, w0, gi in zip(params, w, g):
        torch.testing.assert_close(p.detach() - w0, 0.3 * w0 ** 2 * gi / (norm + 1e-7), rtol=1e-4, atol=1e-7)
    optimizer.restore()
    assert all(torch.equal(p, w0) for p, w0 in zip(params, w))


def first_bn(model: nn.Module) -> nn.BatchNorm2d:
    return next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_bn_clean_mode_keeps_f1_stats_and_all_mode_keeps_every_pass():
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    results = {}
    for mode in ('clean', 'all'):
        model = tiny_resnet()
        bn = first_bn(model)
        probe = copy.deepcopy(model)
        optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, rho=0.05, beta=1.0, gamma=0.5)
        train_step(model, optimizer, x, y, PerSampleCrossEntropy(), bn_mode=mode)
        results[mode] = (bn.running_mean.clone(), bn.num_batches_tracked.item())
        with torch.no_grad():
            probe(x)
        results[mode + '_f1'] = first_bn(probe).running_mean.clone()
    assert torch.equal(results['clean'][0], results['clean_f1']) and results['clean'][1] == 1
    assert results['all'][1] == 3 and not torch.allclose(results['all'][0], results['all_f1'])


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(8, 32), nn.Dropout(0.5), nn.Linear(32, 4)
        self.masks = []
        self.drop.register_forward_hook(lambda m, i, o: self.masks.append(o == 0))

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x)) + 1.0))


@pytest.mark.parametrize('gamma', [0.5, 1.0])
def test_dropout_masks_replayed_in_perturbed_forward(gamma):
    model = DropoutNet()
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, beta=1.0, gamma=gamma)
    train_step(model, optimizer, torch.randn(12, 8), torch.randint(0, 4, (12,)), PerSampleCrossEntropy())
    f1, second = model.masks[0], model.masks[1]
    assert f1.float().mean() > 0.3  # dropout did drop
    assert torch.equal(f1, second)  # F2 (gamma<1) or full-batch F3 (gamma=1) reuse F1's masks
    train_step(model, optimizer, torch.randn(12, 8), torch.randint(0, 4, (12,)), PerSampleCrossEntropy())
    assert not torch.equal(model.masks[0], model.masks[-1 if gamma == 1.0 else 3])  # next step: new masks


def test_bf16_autocast_perturbed_forward_sees_perturbed_weights():
    model = Recorder()
    x, y = torch.randn(16, 3, 4, 4), torch.randint(0, 5, (16,))
    rho = 1.0
    # the trap itself: one autocast block reuses its cached bf16 weights after they change
    with torch.autocast('cpu', dtype=torch.bfloat16):
        before = model(x)
        with torch.no_grad():
            model.fc.weight.add_(1.0)
        after = model(x)
    assert torch.equal(before, after)
    with torch.no_grad():
        model.fc.weight.sub_(1.0)
    # hand sharpness with one autocast context per forward
    probe = copy.deepcopy(model)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        clean = F.cross_entropy(probe(x), y, reduction='none').float()
    clean.mean().backward()
    grads = [p.grad for p in probe.parameters()]
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(probe.parameters(), grads):
            p.add_(g * rho / (norm + 1e-7))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        perturbed = F.cross_entropy(probe(x), y, reduction='none').float()
    hand_sharpness = (perturbed - clean).mean()

    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, rho=rho, beta=1.0, gamma=0.5)
    stats = train_step(model, optimizer, x, y, PerSampleCrossEntropy(), amp_dtype=torch.bfloat16)
    assert hand_sharpness.item() > 0.05
    assert stats['sharpness'].item() == pytest.approx(hand_sharpness.item(), rel=0.05)


class InfGrad:
    """Parameter hook that turns the gradient of the chosen backward (0 = B1, 1 = B3) into inf."""

    def __init__(self, which: int) -> None:
        self.which, self.calls = which, 0

    def __call__(self, grad):
        self.calls += 1
        return grad * float('inf') if self.calls - 1 == self.which else grad


def fp16_setup():
    model = Recorder()
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, rho=0.05, beta=1.0, gamma=0.5)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 8)
    return model, optimizer, scaler, torch.randn(8, 3, 4, 4), torch.randint(0, 5, (8,))


def test_fp16_non_finite_ascent_skips_perturbation_but_steps():
    model, optimizer, scaler, x, y = fp16_setup()
    model.fc.weight.register_hook(InfGrad(0))
    w = [p.detach().clone() for p in model.parameters()]
    stats = train_step(model, optimizer, x, y, PerSampleCrossEntropy(), amp_dtype=torch.float16, scaler=scaler)
    assert stats['skipped_ascents'].item() == 1
    assert stats['sharpness'].item() == 0.0  # no ascent: F2 ran at w
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model.fc.weight, w[2])  # the B3 gradient was finite: the step happened
    assert scaler.get_scale() == 2.0 ** 8


def test_fp16_overflow_in_final_backward_leaves_weights_bitwise_and_lowers_scale():
    model, optimizer, scaler, x, y = fp16_setup()
    model.fc.weight.register_hook(InfGrad(1))
    w = [p.detach().clone() for p in model.parameters()]
    stats = train_step(model, optimizer, x, y, PerSampleCrossEntropy(), amp_dtype=torch.float16, scaler=scaler)
    assert stats['skipped_ascents'].item() == 0
    assert all(torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))
    assert scaler.get_scale() == 2.0 ** 7
    assert not optimizer.state  # the base optimizer never stepped: no momentum buffers


def output_nan(model: nn.Module) -> None:
    """Make every later output of the model NaN (a diverging run)."""
    model.register_forward_hook(lambda module, args, output: output * float('nan'))


@pytest.mark.parametrize('opt', ['momentum', 'esam'])
def test_guard_never_applies_a_non_finite_update(opt):
    """A NaN loss leaves weights and optimizer state bitwise as they were, and says so; without the
    guard the same step writes NaN into the weights (what the guard is for)."""
    kwargs = dict(beta=0.5, gamma=0.5, rho=0.05) if opt == 'esam' else {}
    results = {}
    for guard in (True, False):
        torch.manual_seed(0)
        model = Recorder()
        optimizer = timm.optim.create_optimizer_v2(model, opt, lr=0.1, **kwargs)
        x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 5, (8,))
        stats = train_step(model, optimizer, x, y, PerSampleCrossEntropy(), guard_nonfinite=guard)
        if guard:
            assert stats['skipped_nonfinite'] is False and stats['skipped_overflow'] is False
        before = [p.detach().clone() for p in model.parameters()]
        state = copy.deepcopy(optimizer.state_dict()['state'])
        output_nan(model)
        stats = train_step(model, optimizer, x, y, PerSampleCrossEntropy(), guard_nonfinite=guard)
        assert not torch.isfinite(stats['loss'])
        results[guard] = [p.detach().clone() for p in model.parameters()]
        if guard:
            assert stats['skipped_nonfinite'] is True and stats['skipped_overflow'] is False
            assert all(torch.equal(p, b) for p, b in zip(results[guard], before))
            torch.testing.assert_close(optimizer.state_dict()['state'], state, rtol=0, atol=0)
        else:
            assert 'skipped_nonfinite' not in stats
    assert not all(torch.isfinite(p).all() for p in results[False])


def test_guard_under_fp16_scaler_reports_the_scalers_skip():
    model, optimizer, scaler, x, y = fp16_setup()
    model.fc.weight.register_hook(InfGrad(1))
    w = [p.detach().clone() for p in model.parameters()]
    stats = train_step(model, optimizer, x, y, PerSampleCrossEntropy(), amp_dtype=torch.float16, scaler=scaler,
                       guard_nonfinite=True)
    assert stats['skipped_overflow'] is True and stats['skipped_nonfinite'] is False
    assert all(torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))
    assert scaler.get_scale() == 2.0 ** 7  # the scaler's own skip, as without the guard
    stats = train_step(model, optimizer, x, y, PerSampleCrossEntropy(), amp_dtype=torch.float16, scaler=scaler,
                       guard_nonfinite=True)
    assert stats['skipped_overflow'] is False and not torch.equal(model.fc.weight, w[2])


def test_plain_optimizer_gets_single_pass_step():
    model = Recorder()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 5, (8,))
    stats = train_step(model, optimizer, x, y, PerSampleCrossEntropy(), clip_grad=0.1, clip_mode='value')
    assert [c[0] for c in model.calls] == [8] and set(stats) == {'loss', 'grad_norm'}
    loss = F.cross_entropy(reference(x), y)
    loss.backward()
    expected_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in reference.parameters()))
    with torch.no_grad():
        for p in reference.parameters():
            p.sub_(0.1 * p.grad.clamp(-0.1, 0.1))
    torch.testing.assert_close(stats['loss'], loss.detach())
    torch.testing.assert_close(stats['grad_norm'], expected_norm)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


def test_lookahead_esam_steps_through_lookahead():
    model = Recorder()
    optimizer = timm.optim.create_optimizer_v2(model, 'lookahead_esam', lr=0.1, gamma=0.5)
    train_step(model, optimizer, torch.randn(8, 3, 4, 4), torch.randint(0, 5, (8,)), PerSampleCrossEntropy())
    assert [g['lookahead_step'] for g in optimizer.param_groups] == [1] * len(optimizer.param_groups)
    assert [c[0] for c in model.calls] == [8, 8, 4]


def test_a_failing_pass_leaves_the_weights_restored():
    model = Recorder()
    def rule(sharpness, clean_loss, k):
        raise RuntimeError('boom')

    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, rho=0.5, beta=1.0, gamma=0.5,
                     sds=esam_timm.SDSMode('exact', rule))
    w = [p.detach().clone() for p in model.parameters()]

    with pytest.raises(RuntimeError, match='boom'):
        train_step(model, optimizer, torch.randn(8, 3, 4, 4), torch.randint(0, 5, (8,)), PerSampleCrossEntropy())
    assert all(torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize('options,match', [
    (dict(bn_mode='eval'), "bn_mode='eval'"),
    (dict(clip_mode='l1'), "clip_mode='l1'"),
    (dict(clip_grad=-1.0), 'clip_grad=-1.0'),
    (dict(amp_dtype=torch.float64), 'amp_dtype=torch.float64'),
])
def test_bad_options_are_named(options, match):
    model = Recorder()
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, beta=1.0, gamma=0.5)
    with pytest.raises(ValueError, match=match):
        train_step(model, optimizer, torch.randn(4, 3, 4, 4), torch.randint(0, 5, (4,)), PerSampleCrossEntropy(),
                   **options)


def test_mean_loss_fn_is_refused_with_a_clear_message():
    model = Recorder()
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, beta=1.0, gamma=1.0)
    with pytest.raises(ValueError, match=r'per-sample losses of shape \[4\], got shape \(\)'):
        train_step(model, optimizer, torch.randn(4, 3, 4, 4), torch.randint(0, 5, (4,)), nn.CrossEntropyLoss())


def test_esam_step_is_unchanged_by_gradient_checkpointing():
    """--grad-checkpointing recomputes activations in the backward passes (B1 restricted to the drawn
    tensors, B3 at w + e): the ESAM update must stay the same."""
    torch.manual_seed(0)
    model = timm.create_model('resnet10t', num_classes=10)
    twin = copy.deepcopy(model)
    twin.set_grad_checkpointing(True)
    optimizers = [sgd_esam(m, rho=0.05, beta=0.5, gamma=0.5, seed=2) for m in (model, twin)]
    for x, y in batches(2, batch=8):
        for m, opt in zip((model, twin), optimizers):
            train_step(m, opt, x, y, PerSampleCrossEntropy())
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_guard_leaves_batchnorm_statistics_of_a_skipped_update_untouched():
    torch.manual_seed(0)
    model = tiny_resnet()
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, rho=0.05, beta=0.5, gamma=0.5)
    x, y = batches(1, batch=8)[0]
    train_step(model, optimizer, x, y, PerSampleCrossEntropy(), guard_nonfinite=True)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if 'running' in k or 'num_batches' in k}
    x[0, 0, 0, 0] = float('nan')  # one bad pixel: every BN statistic downstream becomes NaN
    stats = train_step(model, optimizer, x, y, PerSampleCrossEntropy(), guard_nonfinite=True)
    assert stats['skipped_nonfinite'] is True
    assert all(torch.equal(model.state_dict()[k], v) for k, v in buffers.items())

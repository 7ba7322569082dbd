"""SDS modes: the F2-free first-order estimate against a brute-force per-sample computation, selection by
clean loss, the pass structure, the classifier in the SWP draw, clear errors, and the exact mode
bitwise equal to the step as it was built before (requires_grad toggled around B1)."""
import copy

import pytest
import timm
import torch
import torch.nn as nn

import esam_timm
from esam_timm import ESAM, SDSMode, train_step
from esam_timm.losses import PerSampleBinaryCrossEntropy, PerSampleCrossEntropy
from reference_sam import swp_keep_mask

RHO, BETA, GAMMA, SEED = 0.1, 0.5, 0.5, 5


def batch(n: int = 12, classes: int = 10, size: int = 32):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def recording_mode(signal: str, seen: dict) -> SDSMode:
    def rule(score, clean_loss, k):
        seen['score'], seen['clean'], seen['k'] = score.clone(), clean_loss.clone(), k
        seen['index'] = torch.topk(score, k).indices
        return seen['index']
    return SDSMode(signal, rule)


def brute_force_first_order(model: nn.Module, x, targets, loss_fn, keep) -> torch.Tensor:
    """delta_i . (e_W h_i + e_b), one sample at a time, with e from a hand-made SWP ascent."""
    params = list(model.parameters())
    fc = model.get_classifier()
    keep = [k or p is fc.weight or p is fc.bias for p, k in zip(params, keep)]
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    logits = fc(features)
    losses = loss_fn(logits, targets)
    grads = torch.autograd.grad(losses.mean(), params, retain_graph=True)
    norm = torch.sqrt(sum((g ** 2).sum() for g, k in zip(grads, keep) if k))
    e = {id(p): g * (RHO / (norm + 1e-7) / BETA) for p, g, k in zip(params, grads, keep) if k}
    e_w, e_b = e[id(fc.weight)], e[id(fc.bias)]
    estimates = []
    for i in range(x.shape[0]):
        delta_i = torch.autograd.grad(losses[i], logits, retain_graph=True)[0][i]
        shift = torch.stack([torch.dot(e_w[c], features[i]) + e_b[c] for c in range(e_w.shape[0])])
        estimates.append(torch.dot(delta_i, shift))
    return torch.stack(estimates).detach()


@pytest.mark.parametrize('loss_fn, targets', [
    (PerSampleCrossEntropy(smoothing=0.1), 'index'),
    (PerSampleCrossEntropy(), 'soft'),  # mixup / cutmix targets
    (PerSampleBinaryCrossEntropy(smoothing=0.1), 'index'),
])
def test_first_order_estimate_equals_brute_force_per_sample(loss_fn, targets):
    model = timm.create_model('test_resnet', num_classes=10)
    x, y = batch()
    if targets == 'soft':
        y = torch.softmax(3 * torch.randn(12, 10, generator=torch.Generator().manual_seed(3)), -1)
    keep = swp_keep_mask(torch.Generator().manual_seed(SEED), len(list(model.parameters())), BETA)
    expected = brute_force_first_order(copy.deepcopy(model), x, y, loss_fn, keep)
    seen = {}
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, rho=RHO, beta=BETA, gamma=GAMMA, seed=SEED,
                     sds=recording_mode('first-order', seen))
    stats = train_step(model, optimizer, x, y, loss_fn)
    torch.testing.assert_close(seen['score'], expected, rtol=1e-4, atol=1e-7)
    assert seen['k'] == 6 == stats['num_selected']
    assert sorted(seen['index'].tolist()) == sorted(torch.topk(expected, 6).indices.tolist())
    torch.testing.assert_close(stats['sharpness'], expected.mean(), rtol=1e-4, atol=1e-7)


def test_first_order_estimate_is_the_classifier_loss_rise_to_first_order():
    """With only the classifier perturbed, l_i(w + e) - l_i(w) -> the estimate as rho -> 0."""
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=10).eval()  # BN fixed: one function of w
    x, y = batch()
    loss_fn = PerSampleCrossEntropy()
    seen = {}
    fc = model.get_classifier()
    body = [p for p in model.parameters() if p is not fc.weight and p is not fc.bias]
    w_body = [p.detach().clone() for p in body]

    def rule(score, clean_loss, k):  # at w + e, where only the classifier moved (no other tensor drawn)
        seen['body_unmoved'] = all(torch.equal(p, w) for p, w in zip(body, w_body))
        with torch.no_grad():
            seen['rise'] = loss_fn(model(x), y) - clean_loss
        seen['score'] = score.clone()
        return torch.topk(score, k).indices

    # beta tiny: no tensor is drawn but the classifier; ||e|| = rho / beta = 1e-3
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, rho=1e-9, beta=1e-6, gamma=0.5, seed=0,
                     sds=SDSMode('first-order', rule))
    train_step(model, optimizer, x, y, loss_fn)
    assert seen['body_unmoved']
    torch.testing.assert_close(seen['score'], seen['rise'], rtol=2e-2, atol=1e-6)


class Head(nn.Module):
    """Tiny timm-like classifier that records each forward's batch size and grad mode."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, classes)
        self.calls = []

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x):
        self.calls.append((x.shape[0], torch.is_grad_enabled()))
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize('sds', ['first-order', 'loss'])
def test_f2_free_modes_run_no_extra_forward(sds):
    model = Head()
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, gamma=0.5, sds=sds)
    train_step(model, optimizer, torch.randn(10, 3, 4, 4), torch.randint(0, 5, (10,)), PerSampleCrossEntropy())
    assert model.calls == [(10, True), (5, True)]


def test_loss_mode_selects_the_highest_clean_losses():
    model = Head()
    x, y = torch.randn(10, 3, 4, 4), torch.randint(0, 5, (10,))
    with torch.no_grad():
        clean = PerSampleCrossEntropy()(model(x), y)
    targets_seen = []

    def loss_fn(logits, targets):
        targets_seen.append(targets)
        return PerSampleCrossEntropy()(logits, targets)

    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, rho=0.5, gamma=0.3, sds='loss')
    stats = train_step(model, optimizer, x, y, loss_fn)
    top3 = torch.topk(clean, 3).indices
    assert torch.equal(targets_seen[-1], y[top3])
    assert 'sharpness' not in stats and stats['num_selected'] == 3


def test_first_order_always_perturbs_the_classifier_and_keeps_the_draw_of_the_others():
    model = Head()
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, rho=0.2, beta=0.3, gamma=0.5, seed=11, sds='first-order')
    keep = swp_keep_mask(torch.Generator().manual_seed(11), 4, 0.3)
    seen = []
    original = optimizer.perturb

    def perturb(**kwargs):
        seen.append([p.grad is not None for p in model.parameters()])
        return original(**kwargs)

    optimizer.perturb = perturb
    stats = train_step(model, optimizer, torch.randn(8, 3, 4, 4), torch.randint(0, 5, (8,)), PerSampleCrossEntropy())
    assert seen == [keep[:2] + [True, True]]  # conv weight/bias as drawn; fc weight/bias always
    assert stats['perturb_norm'].item() == pytest.approx(0.2 / 0.3, rel=1e-5)


class NoHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


class ConvHead(NoHead):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 5, 1)

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return self.head(x).mean((2, 3))


class ScaledHead(NoHead):
    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return 2 * self.fc(x.mean((2, 3)))


@pytest.mark.parametrize('model, match', [
    (NoHead(), "NoHead has none. Use SDS mode 'exact' or 'loss'"),
    (ConvHead(), r"ConvHead.get_classifier\(\) is Conv2d"),
    (ScaledHead(), "classifier's output to be the model's output"),
])
def test_first_order_refuses_heads_it_cannot_read(model, match):
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, gamma=0.5, sds='first-order')
    w = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        train_step(model, optimizer, torch.randn(4, 3, 4, 4), torch.randint(0, 5, (4,)), PerSampleCrossEntropy())
    assert all(torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))


def test_unknown_sds_mode_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown SDS mode 'fast': valid modes are \['exact', 'first-order', 'loss'\]"):
        ESAM(Head().parameters(), 'sgd', lr=0.1, sds='fast')
    with pytest.raises(ValueError, match="SDS signal 'f2' is invalid"):
        SDSMode('f2')


def test_sds_through_timm_factory():
    optimizer = timm.optim.create_optimizer_v2(Head(), 'esam', lr=0.1, gamma=0.5, sds='first-order')
    assert optimizer.sds == 'first-order' and optimizer.sds_mode.signal == 'first-order'
    assert not optimizer.sds_mode.needs_f2 and esam_timm.get_sds_mode('exact').needs_f2


def test_exact_mode_is_bitwise_the_step_with_requires_grad_toggled_around_b1():
    """The exact mode now restricts B1 with backward(inputs=...); the step it replaced hid the undrawn
    tensors with requires_grad=False. Both must give the same weights, bit for bit."""
    model = timm.create_model('test_resnet', num_classes=10, drop_rate=0.0)
    twin = copy.deepcopy(model)
    loss_fn = PerSampleCrossEntropy(smoothing=0.1)
    opt = ESAM(model.parameters(), 'sgd', lr=0.1, rho=RHO, beta=BETA, gamma=GAMMA, seed=SEED)
    twin_opt = ESAM(twin.parameters(), 'sgd', lr=0.1, rho=RHO, beta=BETA, gamma=GAMMA, seed=SEED)
    params = list(twin.parameters())
    g = torch.Generator().manual_seed(9)
    for _ in range(3):
        x, y = torch.randn(12, 3, 32, 32, generator=g), torch.randint(0, 10, (12,), generator=g)
        train_step(model, opt, x, y, loss_fn, bn_mode='all')
        twin_opt.zero_grad(set_to_none=True)
        drawn = {id(p) for p in twin_opt.draw_swp()}
        hidden = [p for p in params if id(p) not in drawn]
        for p in hidden:
            p.requires_grad_(False)
        clean = loss_fn(twin(x), y)
        clean.mean().backward()
        for p in hidden:
            p.requires_grad_(True)
        twin_opt.perturb()
        with torch.no_grad():
            index = torch.topk(loss_fn(twin(x), y) - clean.detach(), 6).indices
        twin_opt.zero_grad(set_to_none=True)
        loss_fn(twin(x[index]), y[index]).mean().backward()
        twin_opt.restore()
        twin_opt.step()
    for p, q in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(p, q)

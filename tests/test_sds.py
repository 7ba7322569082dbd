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
    """delta_i . (e_W h_i + e_b), one sample at a time, with e from a hand-made SWP ascent: the scale
    rho / beta / ||g_drawn|| of the paper's draw, applied to the classifier's own gradient whether or
    not the draw took the classifier (the estimate's direction either way)."""
    params = list(model.parameters())
    fc = model.get_classifier()
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    logits = fc(features)
    losses = loss_fn(logits, targets)
    grads = torch.autograd.grad(losses.mean(), params, retain_graph=True)
    norm = torch.sqrt(sum((g ** 2).sum() for g, k in zip(grads, keep) if k))
    e = {id(p): g * (RHO / (norm + 1e-7) / BETA) for p, g in zip(params, grads)}
    e_w, e_b = e[id(fc.weight)], e[id(fc.bias)]
    estimates = []
    for i in range(x.shape[0]):
        delta_i = torch.autograd.grad(losses[i], logits, retain_graph=True)[0][i]
        shift = torch.stack([torch.dot(e_w[c], features[i]) + e_b[c] for c in range(e_w.shape[0])])
        estimates.append(torch.dot(delta_i, shift))
    return torch.stack(estimates).detach()


@pytest.mark.parametrize('seed', [SEED, 0])  # the draw leaves the classifier out (5) or takes it (0)
@pytest.mark.parametrize('loss_fn, targets', [
    (PerSampleCrossEntropy(smoothing=0.1), 'index'),
    (PerSampleCrossEntropy(), 'soft'),  # mixup / cutmix targets
    (PerSampleBinaryCrossEntropy(smoothing=0.1), 'index'),
])
def test_first_order_estimate_equals_brute_force_per_sample(loss_fn, targets, seed):
    model = timm.create_model('test_resnet', num_classes=10)
    x, y = batch()
    if targets == 'soft':
        y = torch.softmax(3 * torch.randn(12, 10, generator=torch.Generator().manual_seed(3)), -1)
    keep = swp_keep_mask(torch.Generator().manual_seed(seed), len(list(model.parameters())), BETA)
    expected = brute_force_first_order(copy.deepcopy(model), x, y, loss_fn, keep)
    seen = {}
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, rho=RHO, beta=BETA, gamma=GAMMA, seed=seed,
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
    for p in body:
        p.requires_grad_(False)  # only the classifier is trainable, so the only tensor perturbed

    def rule(score, clean_loss, k):  # at w + e, where only the classifier moved (no other tensor drawn)
        seen['body_unmoved'] = all(torch.equal(p, w) for p, w in zip(body, w_body))
        with torch.no_grad():
            seen['rise'] = loss_fn(model(x), y) - clean_loss
        seen['score'] = score.clone()
        return torch.topk(score, k).indices

    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, rho=1e-3, beta=1.0, gamma=0.5, seed=0,
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
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, beta=1.0, gamma=0.5, sds=sds)
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

    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, rho=0.5, beta=1.0, gamma=0.3, sds='loss')
    stats = train_step(model, optimizer, x, y, loss_fn)
    top3 = torch.topk(clean, 3).indices
    assert torch.equal(targets_seen[-1], y[top3])
    assert 'sharpness' not in stats and stats['num_selected'] == 3


def test_first_order_perturbs_exactly_the_swp_draw():
    """The classifier joins B1 (its gradient gives the estimate's direction) but not the ascent: the
    tensors perturbed are the draw's, and ||e|| = rho / beta over them."""
    model = Head()
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, rho=0.2, beta=0.3, gamma=0.5, seed=11, sds='first-order')
    keep = swp_keep_mask(torch.Generator().manual_seed(11), 4, 0.3)
    assert not keep[2]  # this seed does not draw the classifier's weight
    seen = []
    original = optimizer.perturb

    def perturb(**kwargs):
        seen.append([p.grad is not None for p in model.parameters()])
        return original(**kwargs)

    optimizer.perturb = perturb
    stats = train_step(model, optimizer, torch.randn(8, 3, 4, 4), torch.randint(0, 5, (8,)), PerSampleCrossEntropy())
    assert seen == [keep]
    assert stats['perturb_norm'].item() == pytest.approx(0.2 / 0.3, rel=1e-5)


def perturbed_weights(model: nn.Module, optimizer: ESAM, x, y) -> list:
    """The weights at w + e of one train_step (read just before restore)."""
    seen = []
    original = optimizer.restore

    def restore():
        seen.append([p.detach().clone() for p in model.parameters()])
        original()

    optimizer.restore = restore
    train_step(model, optimizer, x, y, PerSampleCrossEntropy())
    return seen[0]


@pytest.mark.parametrize('seed', [SEED, 0])
def test_first_order_perturbation_is_bitwise_the_papers_swp_draw(seed):
    """w + e in first-order mode is bit for bit the paper's (exact mode's) w + e on the same draw, whether
    the draw took the classifier (seed 0) or not (seed 5)."""
    model = timm.create_model('test_resnet', num_classes=10)
    names, fc_name = [n for n, _ in model.named_parameters()], 'fc.weight'
    keep = swp_keep_mask(torch.Generator().manual_seed(seed), len(names), BETA)
    assert keep[names.index(fc_name)] == (seed == 0)
    x, y = batch()
    results = {}
    for sds in ('exact', 'first-order'):
        twin = copy.deepcopy(model)
        optimizer = ESAM(twin.parameters(), 'sgd', lr=0.1, rho=RHO, beta=BETA, gamma=GAMMA, seed=seed, sds=sds)
        results[sds] = perturbed_weights(twin, optimizer, x, y)
    assert all(torch.equal(p, q) for p, q in zip(results['exact'], results['first-order']))
    moved = [not torch.equal(p, w) for p, w in zip(results['first-order'], model.parameters())]
    assert all(k for m, k in zip(moved, keep) if m)  # only drawn tensors move (some drawn get e = 0)
    assert moved[names.index(fc_name)] == keep[names.index(fc_name)]


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
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, beta=1.0, gamma=0.5, sds='first-order')
    w = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        train_step(model, optimizer, torch.randn(4, 3, 4, 4), torch.randint(0, 5, (4,)), PerSampleCrossEntropy())
    assert all(torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))


def test_unknown_sds_mode_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown SDS mode 'fast': valid modes are \['exact', 'first-order', 'loss', "
                                         r"'exact-trim', 'exact-relative', 'exact-balanced', 'exact-relative-balanced', "
                                         r"'first-order-trim', 'first-order-relative', 'first-order-balanced', "
                                         r"'first-order-relative-balanced'\]"):
        ESAM(Head().parameters(), 'sgd', lr=0.1, beta=1.0, gamma=1.0, sds='fast')
    with pytest.raises(ValueError, match="SDS signal 'f2' is invalid"):
        SDSMode('f2')


def test_sds_through_timm_factory():
    optimizer = timm.optim.create_optimizer_v2(Head(), 'esam', lr=0.1, beta=1.0, gamma=0.5, sds='first-order')
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


# --------------------------------------------------------------------------- noise-robust selection rules
def brute_force_trim(score, clean_loss, k, drop):
    """Exclude the round(drop * B) highest clean losses (at most B - k), then the k largest scores."""
    b = len(score)
    excluded = sorted(range(b), key=lambda i: -clean_loss[i])[:min(round(drop * b), b - k)]
    kept = [i for i in range(b) if i not in excluded]
    return sorted(sorted(kept, key=lambda i: -score[i])[:k]), sorted(excluded)


# the two highest scores (samples 1 and 6) carry the two highest clean losses: a mislabelled pair
HAND_SCORE = [0.10, 0.90, 0.30, -0.05, 0.50, 0.20, 0.80, 0.40, 0.00, 0.35]
HAND_LOSS = [0.50, 4.00, 0.90, 0.10, 1.20, 0.30, 3.00, 0.60, 0.05, 2.00]


@pytest.mark.parametrize('drop, k, excluded, selected', [
    (0.2, 5, [1, 6], [2, 4, 5, 7, 9]),
    (0.3, 5, [1, 6, 9], [0, 2, 4, 5, 7]),
    (0.0, 5, [], [1, 4, 6, 7, 9]),  # the paper's top-k
    (0.5, 8, [1, 6], [0, 2, 3, 4, 5, 7, 8, 9]),  # at most B - k excluded: k stays fixed
])
def test_trim_rule_equals_brute_force_and_excludes_the_highest_losses(drop, k, excluded, selected):
    score, loss = torch.tensor(HAND_SCORE), torch.tensor(HAND_LOSS)
    assert brute_force_trim(HAND_SCORE, HAND_LOSS, k, drop) == (selected, excluded)
    index = esam_timm.selection.TrimHighLoss(drop)(score, loss, k)
    assert sorted(index.tolist()) == selected and len(index) == k
    assert not set(index.tolist()) & set(excluded)


def test_relative_rule_equals_brute_force():
    score, loss = torch.tensor(HAND_SCORE), torch.tensor(HAND_LOSS)
    ratio = [sc / lo for sc, lo in zip(HAND_SCORE, HAND_LOSS)]
    expected = sorted(sorted(range(10), key=lambda i: -ratio[i])[:4])
    assert expected == [2, 4, 5, 7]
    index = esam_timm.selection.relative_to_loss(score, loss, 4)
    assert sorted(index.tolist()) == expected
    assert not {1, 6} & set(index.tolist())  # the largest rises, with the largest losses, are not taken


def test_relative_rule_keeps_a_zero_loss_finite():
    index = esam_timm.selection.relative_to_loss(torch.tensor([0.0, 0.2, 0.1]), torch.tensor([0.0, 1.0, 0.2]), 1)
    assert index.tolist() == [2]


def test_trim_rule_refuses_a_bad_share():
    with pytest.raises(ValueError, match=r'drop=1.0 is invalid: it must be a share of the batch in \[0, 1\)'):
        esam_timm.selection.TrimHighLoss(1.0)


@pytest.mark.parametrize('mode', ['exact-trim', 'exact-relative', 'first-order-trim', 'first-order-relative'])
def test_robust_modes_select_by_brute_force_through_train_step(mode):
    """The second pass gets exactly the samples the rule picks from the mode's signal, computed here by
    hand: exact sharpness from a hand-made ascent (or the first-order estimate), the clean losses."""
    model = timm.create_model('test_resnet', num_classes=10)
    x, y = batch()
    loss_fn = PerSampleCrossEntropy()
    keep = swp_keep_mask(torch.Generator().manual_seed(SEED), len(list(model.parameters())), BETA)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        clean = loss_fn(twin(x), y)
    if mode.startswith('exact'):
        params = list(twin.parameters())
        grads = torch.autograd.grad(loss_fn(twin(x), y).mean(), params)
        norm = torch.sqrt(sum((g ** 2).sum() for g, k in zip(grads, keep) if k))
        with torch.no_grad():
            for p, g, k in zip(params, grads, keep):
                if k:
                    p.add_(g * (RHO / (norm + 1e-7) / BETA))
            signal = loss_fn(twin(x), y) - clean
    else:
        signal = brute_force_first_order(twin, x, y, loss_fn, keep)
    k = 6
    if mode.endswith('trim'):
        expected, excluded = brute_force_trim(signal.tolist(), clean.tolist(), k, 0.2)
        assert len(excluded) == 2
    else:
        ratio = (signal / clean).tolist()
        expected = sorted(sorted(range(12), key=lambda i: -ratio[i])[:k])
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, rho=RHO, beta=BETA, gamma=GAMMA, seed=SEED, sds=mode)
    train_step(model, optimizer, x, y, loss_fn)
    f3 = seen[-1]
    assert f3.shape[0] == k
    picked = sorted(next(i for i in range(12) if torch.equal(x[i], row)) for row in f3)
    assert picked == expected


def brute_force_balanced(score, classes, k):
    """Class-balanced selection by hand: Sainte-Lague's highest averages hand out the k seats one at a time
    (the class with the largest n_c / (2 s_c + 1) gets the next; a tie goes to the class whose next sample
    has the larger score), then each class fills its seats with its highest scores."""
    members = {c: sorted((i for i in range(len(score)) if classes[i] == c), key=lambda i: -score[i])
               for c in set(classes)}
    seats = dict.fromkeys(members, 0)
    for _ in range(k):
        open_classes = [c for c in members if seats[c] < len(members[c])]
        best = max(open_classes, key=lambda c: (len(members[c]) / (2 * seats[c] + 1), score[members[c][seats[c]]]))
        seats[best] += 1
    return sorted(i for c in members for i in members[c][:seats[c]]), seats


@pytest.mark.parametrize('k', [1, 4, 5, 7, 9])
def test_balanced_rule_equals_brute_force(k):
    classes = [0, 1, 0, 2, 1, 0, 1, 2, 0, 0]  # 5, 3 and 2 samples
    score, loss = torch.tensor(HAND_SCORE), torch.tensor(HAND_LOSS)
    expected, seats = brute_force_balanced(HAND_SCORE, classes, k)
    index = esam_timm.selection.ClassBalanced()(score, loss, k, labels=torch.tensor(classes))
    assert sorted(index.tolist()) == expected and len(set(index.tolist())) == k
    assert all(abs(seats[c] - k * n / 10) < 1 for c, n in {0: 5, 1: 3, 2: 2}.items())  # shares kept
    relative = [s / lo for s, lo in zip(HAND_SCORE, HAND_LOSS)]
    index = esam_timm.selection.ClassBalanced(relative=True)(score, loss, k, labels=torch.tensor(classes))
    assert sorted(index.tolist()) == brute_force_balanced(relative, classes, k)[0]


def test_balanced_rule_keeps_the_class_mix_where_the_paper_takes_whole_classes():
    """A score set by the label alone (a model whose output ignores its input): the paper's top-k takes
    whole classes, the balanced rule each class's share, in random batches of 64 over 10 classes."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        labels = torch.randint(0, 10, (64,), generator=g)
        rise = torch.rand(10, generator=g)[labels] + 1e-4 * torch.rand(64, generator=g)
        paper = esam_timm.selection.top_k(rise, rise, 32)
        balanced = esam_timm.selection.ClassBalanced()(rise, rise, 32, labels=labels)
        batch_counts = torch.bincount(labels, minlength=10)
        assert torch.bincount(labels[paper], minlength=10).gt(0).sum() < batch_counts.gt(0).sum()
        assert (torch.bincount(labels[balanced], minlength=10) - batch_counts / 2).abs().max() < 1


def test_balanced_rule_refuses_labels_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r'one class index per sample, shape \[3\]; got labels of shape \(3, 2\)'):
        esam_timm.selection.ClassBalanced()(torch.zeros(3), torch.ones(3), 1, labels=torch.zeros(3, 2))


@pytest.mark.parametrize('mode', ['exact-balanced', 'first-order-relative-balanced'])
@pytest.mark.parametrize('targets', ['index', 'soft'])
def test_balanced_modes_select_by_brute_force_through_train_step(mode, targets):
    """The second pass gets the balanced selection of the mode's signal (computed here by hand), with the
    classes read from class-index targets or from soft (mixup) targets by their largest entry."""
    model = timm.create_model('test_resnet', num_classes=10)
    x, y = batch(16)
    classes = y
    if targets == 'soft':
        mix = torch.softmax(torch.randn(16, 10, generator=torch.Generator().manual_seed(4)), -1)
        y = 0.6 * nn.functional.one_hot(y, 10).float() + 0.4 * mix  # the largest entry is still y's
    loss_fn = PerSampleCrossEntropy()
    keep = swp_keep_mask(torch.Generator().manual_seed(SEED), len(list(model.parameters())), BETA)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        clean = loss_fn(twin(x), y)
    if mode.startswith('exact'):
        params = list(twin.parameters())
        grads = torch.autograd.grad(loss_fn(twin(x), y).mean(), params)
        norm = torch.sqrt(sum((g ** 2).sum() for g, k in zip(grads, keep) if k))
        with torch.no_grad():
            for p, g, k in zip(params, grads, keep):
                if k:
                    p.add_(g * (RHO / (norm + 1e-7) / BETA))
            signal = (loss_fn(twin(x), y) - clean).tolist()
    else:
        signal = (brute_force_first_order(twin, x, y, loss_fn, keep) / clean).tolist()
    expected = brute_force_balanced(signal, classes.tolist(), 8)[0]
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, rho=RHO, beta=BETA, gamma=GAMMA, seed=SEED, sds=mode)
    train_step(model, optimizer, x, y, loss_fn)
    picked = sorted(next(i for i in range(16) if torch.equal(x[i], row)) for row in seen[-1])
    assert picked == expected

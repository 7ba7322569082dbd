"""ESAM on Vision Transformers (issue 23), each piece against an independent computation: the whole ESAM step
over AdamW with drop-path and dropout (the masks of the clean pass replayed in the perturbed one), per-sample
losses on mixup/cutmix soft targets, layer-wise lr decay groups and gradient clipping under ESAM and msam,
fused attention (SDPA) in every pass, bf16 autocast, and the first-order estimate reading a ViT's classifier
(class-token and average pooling) or refusing one it cannot read.

The comparisons run in float64 on timm's ``test_vit`` cut to 2 blocks at 16 px with patch 4 (17 tokens)."""
import copy
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.scheduler import CosineLRScheduler

import esam_timm
from esam_timm import ESAM, SDSMode, train_step
from esam_timm.losses import PerSampleCrossEntropy
from reference_sam import swp_keep_mask

LR, WD, RHO = 1e-3, 0.05, 0.05
BETAS, EPS = (0.9, 0.999), 1e-8


def tiny_vit(**kwargs) -> nn.Module:
    return timm.create_model('test_vit', img_size=16, patch_size=4, depth=2, num_classes=10, **kwargs)


def batches(n: int, size: int = 12, dtype: torch.dtype = torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 16, 16, generator=g).to(dtype), torch.randint(0, 10, (size,), generator=g))
            for _ in range(n)]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy written out (class indices or soft targets)."""
    if targets.dim() == 1:
        targets = F.one_hot(targets, logits.shape[-1]).to(logits.dtype)
    return -(targets * logits.log_softmax(-1)).sum(-1)


def reference_esam_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rho: float, beta: float,
                            gamma: float, keep: Sequence[bool]) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
    """ESAM's final gradient by hand, with the random masks of drop-path and dropout handled as the method
    needs: the perturbed full-batch forward F2 draws the clean forward's masks (the global RNG state is
    rewound to where F1 started), F3 continues from where F1 left the RNG and gets the selected samples
    sharpest first (the order decides which sample draws which mask). Returns the gradient at w + e
    (weights back at w) and the per-sample sharpness (None without selection)."""
    params = list(model.parameters())
    start = torch.get_rng_state()
    clean = soft_cross_entropy(model(x), y)
    after_clean = torch.get_rng_state()
    grads = torch.autograd.grad(clean.mean(), params)
    norm = math.sqrt(sum(float((g ** 2).sum()) for g, k in zip(grads, keep) if k))
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g, k in zip(params, grads, keep):
            if k:
                p.add_(g * (rho / (norm + 1e-7) / beta))
    batch = x.shape[0]
    k = max(1, round(gamma * batch))
    sharpness = None
    if k < batch:
        torch.set_rng_state(start)
        with torch.no_grad():
            sharpness = soft_cross_entropy(model(x), y) - clean.detach()
        torch.set_rng_state(after_clean)
        index = torch.tensor(sorted(range(batch), key=lambda i: -float(sharpness[i]))[:k])
        x, y = x[index], y[index]
    else:
        torch.set_rng_state(start)  # F3 is the full batch: F1's masks
    final = torch.autograd.grad(soft_cross_entropy(model(x), y).mean(), params)
    with torch.no_grad():
        for p, w in zip(params, saved):
            p.copy_(w)
    return list(final), sharpness


class HandAdamW:
    """torch's AdamW written out, one tensor at a time, with each group's own lr and weight decay."""

    def __init__(self, groups: Sequence[Dict]) -> None:
        self.groups = groups
        self.state: Dict[int, Dict[str, torch.Tensor]] = {}
        self.steps = 0

    def momentum(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        return self.state.get(id(p), {}).get('m')

    @torch.no_grad()
    def step(self, grads: Dict[int, torch.Tensor]) -> None:
        self.steps += 1
        t = self.steps
        for group in self.groups:
            for p in group['params']:
                g = grads[id(p)]
                s = self.state.setdefault(id(p), {'m': torch.zeros_like(p), 'v': torch.zeros_like(p)})
                s['m'] = BETAS[0] * s['m'] + (1 - BETAS[0]) * g
                s['v'] = BETAS[1] * s['v'] + (1 - BETAS[1]) * g * g
                m_hat = s['m'] / (1 - BETAS[0] ** t)
                v_hat = s['v'] / (1 - BETAS[1] ** t)
                p.mul_(1 - group['lr'] * group['weight_decay'])
                p.sub_(group['lr'] * m_hat / (v_hat.sqrt() + EPS))


def clipped(grads: Sequence[torch.Tensor], max_norm: Optional[float]) -> List[torch.Tensor]:
    if max_norm is None:
        return list(grads)
    total = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
    return [g * min(1.0, max_norm / (total + 1e-6)) for g in grads]


# --------------------------------------------------------------------------------------- the whole ESAM step

@pytest.mark.parametrize('gamma', [0.5, 1.0])  # ESAM with selection (F1, F2, F3) and SAM with SWP (F1, F3)
def test_esam_over_adamw_on_a_vit_with_drop_path_and_dropout_equals_an_independent_step(gamma):
    torch.manual_seed(0)
    model = tiny_vit(drop_path_rate=0.3, proj_drop_rate=0.2, attn_drop_rate=0.2).double()
    reference = copy.deepcopy(model)
    data = batches(3)
    optimizer = ESAM(model.parameters(), 'adamw', lr=LR, weight_decay=WD, rho=RHO, beta=0.5, gamma=gamma, seed=3)
    torch.manual_seed(11)
    for x, y in data:
        stats = train_step(model, optimizer, x, y, PerSampleCrossEntropy())
    params = list(reference.parameters())
    hand = HandAdamW([{'params': params, 'lr': LR, 'weight_decay': WD}])
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(11)
    for x, y in data:
        keep = swp_keep_mask(generator, len(params), 0.5)
        grads, sharpness = reference_esam_gradient(reference, x, y, RHO, 0.5, gamma, keep)
        hand.step({id(p): g for p, g in zip(params, grads)})
    if sharpness is not None:
        # the step keeps per-sample losses in float32
        torch.testing.assert_close(stats['sharpness'], sharpness.mean().float(), rtol=1e-5, atol=1e-7)
    for p, q in zip(model.parameters(), reference.parameters()):  # the ascent norm is taken in fp32
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


class MaskRecorder:
    """Records, per forward, which elements every Dropout and which samples every DropPath zeroed."""

    def __init__(self, model: nn.Module) -> None:
        self.passes: List[List[torch.Tensor]] = []
        first = next(m for m in model.modules() if isinstance(m, (nn.Dropout, timm.layers.DropPath)))
        first.register_forward_pre_hook(lambda module, args: self.passes.append([]))
        for module in model.modules():
            if isinstance(module, nn.Dropout) and module.p > 0:
                module.register_forward_hook(self._dropout)
            elif isinstance(module, timm.layers.DropPath) and module.drop_prob > 0:
                module.register_forward_hook(self._drop_path)

    def _dropout(self, module: nn.Module, args, output: torch.Tensor) -> None:
        self.passes[-1].append((output == 0) & (args[0] != 0))

    def _drop_path(self, module: nn.Module, args, output: torch.Tensor) -> None:
        self.passes[-1].append(output.flatten(1).abs().sum(1) == 0)


def test_clean_and_perturbed_passes_of_a_vit_draw_the_same_drop_path_and_dropout_masks():
    model = tiny_vit(drop_path_rate=0.5, drop_rate=0.3, pos_drop_rate=0.3, proj_drop_rate=0.3)
    recorder = MaskRecorder(model)
    optimizer = ESAM(model.parameters(), 'adamw', lr=LR, rho=RHO, beta=0.5, gamma=0.5, seed=1)
    x, y = batches(1, size=16, dtype=torch.float32)[0]
    train_step(model, optimizer, x, y, PerSampleCrossEntropy())
    f1, f2, f3 = recorder.passes
    assert len(f1) == len(f2) == len(f3) > 5
    assert any(mask.any() for mask in f1), 'no mask dropped anything: the test would prove nothing'
    for clean, perturbed in zip(f1, f2):
        assert torch.equal(clean, perturbed)
    assert f3[0].shape[0] == 8  # F3 runs on the selected half: its own masks


# --------------------------------------------------------------------------- soft targets (mixup / cutmix)

def test_selection_on_mixup_cutmix_soft_targets_equals_per_sample_losses_by_hand():
    """The sharpness ESAM ranks on a ViT batch mixed by timm's Mixup (mixup or cutmix, label smoothing) is
    each sample's own soft-target loss rise, computed here one sample at a time; F3 gets those samples'
    soft rows; the step's loss is timm's SoftTargetCrossEntropy."""
    torch.manual_seed(0)
    model = tiny_vit().double()
    twin = copy.deepcopy(model)
    x, y = batches(1, size=12)[0]
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1, num_classes=10)
    torch.manual_seed(5)
    x, soft = mixup(x, y)
    soft = soft.double()
    assert not torch.equal(soft.max(1).values, torch.ones(12, dtype=torch.float64))
    seen, targets_seen = {}, []

    def rule(score, clean_loss, k):
        seen['score'] = score.clone()
        return torch.topk(score, k).indices

    def loss_fn(logits, targets):
        targets_seen.append(targets)
        return esam_timm.create_per_sample_loss(mixup_active=True)(logits, targets)

    optimizer = ESAM(model.parameters(), 'adamw', lr=LR, rho=0.5, beta=1.0, gamma=0.5, sds=SDSMode('exact', rule))
    with torch.no_grad():
        expected_loss = SoftTargetCrossEntropy()(twin(x), soft)
    stats = train_step(model, optimizer, x, soft, loss_fn)
    # by hand: every sample alone, its loss written out, the ascent of the batch mean
    params = list(twin.parameters())
    clean = [soft_cross_entropy(twin(x[i:i + 1]), soft[i:i + 1])[0] for i in range(12)]
    grads = torch.autograd.grad(torch.stack(clean).mean(), params)
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(g * 0.5 / (norm + 1e-7))
        rise = torch.stack([soft_cross_entropy(twin(x[i:i + 1]), soft[i:i + 1])[0] - clean[i] for i in range(12)])
    torch.testing.assert_close(seen['score'], rise.float(), rtol=1e-5, atol=1e-7)  # the step's losses are fp32
    torch.testing.assert_close(stats['loss'], expected_loss.float(), rtol=1e-6, atol=1e-7)
    chosen = torch.topk(rise, 6).indices
    torch.testing.assert_close(targets_seen[-1], soft[chosen])


# ------------------------------------------------------------ layer-wise lr decay, clipping, ESAM and msam

@pytest.mark.parametrize('opt', ['esam', 'msam'])
def test_layer_decay_groups_and_clipping_over_adamw_equal_an_independent_computation(opt):
    """timm's layer-wise lr decay groups under ESAM and msam over AdamW: the groups are AdamW's own (lr scale,
    weight decay, members), timm's scheduler sets every group's lr to its scale, and three steps with the
    final gradient clipped to a global norm (as the ViT recipes do) equal a hand-written computation."""
    torch.manual_seed(0)
    model = tiny_vit(drop_path_rate=0.2).double()
    reference = copy.deepcopy(model)
    extra = dict(rho=RHO, beta=0.5, gamma=0.5, seed=2) if opt == 'esam' else dict(rho=0.5)
    optimizer = timm.optim.create_optimizer_v2(model, opt, base_optimizer='adamw', lr=LR, weight_decay=WD,
                                               layer_decay=0.75, **extra)
    plain = timm.optim.create_optimizer_v2(copy.deepcopy(model), 'adamw', lr=LR, weight_decay=WD, layer_decay=0.75)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [(g['lr_scale'], g['weight_decay'], len(g['params'])) for g in optimizer.param_groups] == \
        [(g['lr_scale'], g['weight_decay'], len(g['params'])) for g in plain.param_groups]
    assert len({g['lr_scale'] for g in optimizer.param_groups}) == 4  # embedding, 2 blocks, head
    scheduler = CosineLRScheduler(optimizer, t_initial=10)
    scheduler.step(3)
    lr_now = LR * 0.5 * (1 + math.cos(math.pi * 3 / 10))
    for group in optimizer.param_groups:
        assert group['lr'] == pytest.approx(lr_now * group['lr_scale'], rel=1e-12)
    # the hand computation with the same groups (by parameter name) and lrs
    ref_params = dict(reference.named_parameters())
    groups = [{'params': [ref_params[names[id(p)]] for p in g['params']], 'lr': g['lr'],
               'weight_decay': g['weight_decay']} for g in optimizer.param_groups]
    ordered = [ref_params[names[id(p)]] for g in optimizer.param_groups for p in g['params']]
    hand = HandAdamW(groups)
    data = batches(3)
    clip = 0.05
    torch.manual_seed(7)
    for x, y in data:
        stats = train_step(model, optimizer, x, y, PerSampleCrossEntropy(), clip_grad=clip)
        assert stats['grad_norm'] > clip  # the clipping acted
    generator = torch.Generator().manual_seed(2)
    torch.manual_seed(7)
    for x, y in data:
        if opt == 'esam':
            keep = swp_keep_mask(generator, len(ordered), 0.5)
            grads, _ = reference_esam_gradient(_Ordered(reference, ordered), x, y, RHO, 0.5, 0.5, keep)
        else:  # msam: the gradient at w - rho m / ||m|| (m: AdamW's first moment; none before the first step)
            moments = [hand.momentum(p) for p in ordered]
            saved = [p.detach().clone() for p in ordered]
            if moments[0] is not None:
                norm = math.sqrt(sum(float((m ** 2).sum()) for m in moments))
                with torch.no_grad():
                    for p, m in zip(ordered, moments):
                        p.sub_(m * (0.5 / (norm + 1e-12)))
            grads = torch.autograd.grad(soft_cross_entropy(reference(x), y).mean(), ordered)
            with torch.no_grad():
                for p, w in zip(ordered, saved):
                    p.copy_(w)
        hand.step({id(p): g for p, g in zip(ordered, clipped(grads, clip))})
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[name], rtol=1e-5, atol=1e-7, msg=name)


class _Ordered(nn.Module):
    """A model whose ``parameters()`` come in the optimizer's group order (the SWP draw follows it)."""

    def __init__(self, model: nn.Module, ordered: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.ordered = list(ordered)

    def parameters(self, recurse: bool = True):
        return iter(self.ordered)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


# ------------------------------------------------------------------------------------- fused attention, bf16

def test_every_pass_runs_fused_attention_and_equals_the_unfused_step(monkeypatch):
    """timm's ViT attention goes through scaled_dot_product_attention in F1, F2 and F3 (2 blocks each),
    and the step equals the same step with attention written out (fused_attn off)."""
    torch.manual_seed(0)
    model = tiny_vit().double()
    unfused = copy.deepcopy(model)
    for block in unfused.blocks:
        block.attn.fused_attn = False
    assert all(block.attn.fused_attn for block in model.blocks)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append((args[0].shape[0], torch.is_grad_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, 'scaled_dot_product_attention', counting)
    kwargs = dict(lr=LR, weight_decay=WD, rho=RHO, beta=0.5, gamma=0.5, seed=4)
    optimizer = ESAM(model.parameters(), 'adamw', **kwargs)
    unfused_optimizer = ESAM(unfused.parameters(), 'adamw', **kwargs)
    for x, y in batches(2):
        train_step(model, optimizer, x, y, PerSampleCrossEntropy())
        train_step(unfused, unfused_optimizer, x, y, PerSampleCrossEntropy())
    assert calls == [(12, True)] * 2 + [(12, False)] * 2 + [(6, True)] * 2 + \
        [(12, True)] * 2 + [(12, False)] * 2 + [(6, True)] * 2
    for p, q in zip(model.parameters(), unfused.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_bf16_perturbed_forward_of_a_vit_sees_the_perturbed_weights():
    """Under bf16 autocast the sharpness ESAM measures on a ViT is the loss rise computed with one fresh
    autocast context per forward, not the rise one shared context gives (the trap: that context keeps
    its bf16 copies of the linear layers' weights from before the ascent)."""
    torch.manual_seed(0)
    model = tiny_vit()
    x, y = batches(1, size=16, dtype=torch.float32)[0]
    rho = 2.0

    def rise(shared_context: bool) -> float:
        probe = copy.deepcopy(model)
        params = list(probe.parameters())
        with torch.autocast('cpu', dtype=torch.bfloat16):
            clean = soft_cross_entropy(probe(x).float(), y)
            grads = torch.autograd.grad(clean.mean(), params)
            clean = clean.detach()
            norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.add_(g * rho / (norm + 1e-7))
            if shared_context:
                return float((soft_cross_entropy(probe(x).float(), y) - clean).mean().detach())
        with torch.autocast('cpu', dtype=torch.bfloat16):
            return float((soft_cross_entropy(probe(x).float(), y) - clean).mean().detach())

    fresh, stale = rise(False), rise(True)
    assert fresh > 0.05 and abs(stale - fresh) > 0.2 * fresh  # the two differ: the test can tell them apart
    optimizer = ESAM(model.parameters(), 'adamw', lr=LR, rho=rho, beta=1.0, gamma=0.5)
    stats = train_step(model, optimizer, x, y, PerSampleCrossEntropy(), amp_dtype=torch.bfloat16)
    assert stats['sharpness'].item() == pytest.approx(fresh, rel=0.05)


# --------------------------------------------------------------------- the first-order estimate on a ViT head

@pytest.mark.parametrize('global_pool', ['token', 'avg'])  # class token; average pooling through fc_norm
@pytest.mark.parametrize('seed', [0, 1])  # SWP draws the head, or leaves it out
def test_first_order_estimate_reads_a_vit_head_after_its_norm(global_pool, seed):
    """The estimate delta_i . (e_W h_i + e_b) equals a computation one sample at a time, with h_i the input
    timm's ViT hands its ``head`` (after pooling, ``fc_norm`` and ``head_drop``) and e the classifier's part
    of the paper's ascent (its own gradient at the ascent's scale when the draw left it out)."""
    torch.manual_seed(0)
    model = tiny_vit(global_pool=global_pool).double()
    assert isinstance(model.fc_norm, nn.LayerNorm) == (global_pool == 'avg')
    twin = copy.deepcopy(model)
    x, y = batches(1)[0]
    params = list(twin.parameters())
    keep = swp_keep_mask(torch.Generator().manual_seed(seed), len(params), 0.5)
    grads = torch.autograd.grad(soft_cross_entropy(twin(x), y).mean(), params)
    norm = math.sqrt(sum(float((g ** 2).sum()) for g, k in zip(grads, keep) if k))
    by_id = {id(p): g * (RHO / (norm + 1e-7) / 0.5) for p, g in zip(params, grads)}
    e_w, e_b = by_id[id(twin.head.weight)], by_id[id(twin.head.bias)]
    expected = []
    for i in range(12):
        features = twin.forward_head(twin.forward_features(x[i:i + 1]), pre_logits=True)[0]
        logits = twin.head(features).detach().requires_grad_(True)
        delta = torch.autograd.grad(soft_cross_entropy(logits[None], y[i:i + 1])[0], logits)[0]
        expected.append(torch.dot(delta, e_w @ features.detach() + e_b))
    seen = {}

    def rule(score, clean_loss, k):
        seen['score'] = score.clone()
        return torch.topk(score, k).indices

    optimizer = ESAM(model.parameters(), 'adamw', lr=LR, rho=RHO, beta=0.5, gamma=0.5, seed=seed,
                     sds=SDSMode('first-order', rule))
    train_step(model, optimizer, x, y, PerSampleCrossEntropy())
    assert keep[[id(p) for p in params].index(id(twin.head.weight))] == (seed == 0)
    torch.testing.assert_close(seen['score'], torch.stack(expected).float(), rtol=1e-5, atol=1e-9)


class SeparateHead(nn.Module):
    """A ViT without its own classifier (num_classes=0) and a linear layer outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = timm.create_model('test_vit', img_size=16, patch_size=4, depth=1, num_classes=0)
        self.fc = nn.Linear(64, 10)

    def get_classifier(self) -> nn.Module:
        return self.vit.get_classifier()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.vit(x))


@pytest.mark.parametrize('make, match', [
    (lambda: timm.create_model('deit_tiny_distilled_patch16_224', img_size=16, patch_size=4, depth=1, num_classes=10),
     r"VisionTransformerDistilled.get_classifier\(\) is tuple"),
    (SeparateHead, r"SeparateHead.get_classifier\(\) is Identity"),
])
def test_first_order_refuses_a_vit_whose_classifier_it_cannot_read(make, match):
    model = make()
    optimizer = ESAM(model.parameters(), 'adamw', lr=LR, beta=1.0, gamma=0.5, sds='first-order')
    w = [p.detach().clone() for p in model.parameters()]
    x, y = batches(1, size=4, dtype=torch.float32)[0]
    with pytest.raises(ValueError, match=match + r".*Use SDS mode 'exact' or 'loss'"):
        train_step(model, optimizer, x, y, PerSampleCrossEntropy())
    assert all(torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))


@pytest.mark.parametrize('argv, model_name, warned', [
    (['--opt', 'esam'], 'test_vit', True),
    (['--opt', 'esam', '--esam-sds', 'first-order'], 'test_vit', True),
    (['--opt', 'esam', '--esam-sds', 'exact-balanced'], 'test_vit', False),
    (['--opt', 'esam', '--esam-gamma', '1'], 'test_vit', False),  # no selection
    (['--opt', 'sam'], 'test_vit', False),
    (['--opt', 'esam'], 'test_resnet', False),
])
def test_the_script_warns_when_esam_selects_class_blind_on_a_patch_model(argv, model_name, warned, caplog):
    """The paper's top-k held a small ViT near chance (issue 23); the script says so, and names the balanced
    rule, when ESAM selects without keeping the class mix on a patch-based model, and only then."""
    from esam_timm.train.builders import build_optimizer
    from esam_timm.train import parse_args
    args, _ = parse_args(['--data-dir', 'x', '--model', model_name] + argv)
    model = timm.create_model(model_name, num_classes=10)
    with caplog.at_level('WARNING', logger='esam_timm.train.builders'):
        build_optimizer(args, model, 1e-3)
        build_optimizer(args, model, 1e-3, verbose=False)  # another rank than the first: nothing logged
    messages = [r.getMessage() for r in caplog.records if 'patch-based model' in r.getMessage()]
    assert len(messages) == int(warned)
    if warned:
        assert f'--esam-sds {args.esam_sds} on VisionTransformer' in messages[0]
        assert '--esam-sds exact-balanced' in messages[0]

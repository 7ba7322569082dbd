"""esam_timm.sharpness against closed forms and exact Hessians: power iteration, Hutchinson's trace,
m-sharpness, filter-normalised landscapes, checkpoint interpolation, and the promise to leave the model
exactly as found."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from esam_timm.sharpness import (SharpnessReport, evaluate_loss, filter_normalized_direction, hessian_top_eigenvalue,
                                 hessian_trace, hessian_vector_product, interpolate_checkpoints, linspace,
                                 loss_landscape_1d, loss_landscape_2d, m_sharpness, measure_sharpness)
from esam_timm.sharpness.core import measuring

SPECTRUM = [4.0, 2.5, 1.0, 0.5, 0.2, 0.1]


def _half_mse(out, target):
    return 0.5 * ((out.squeeze(-1) - target) ** 2).mean()


def _quadratic(num_samples=64, sizes=(40, 24)):
    """Least squares in float64: L(w) = |Xw - y|^2 / 2N, so H = X^T X / N, whose spectrum is SPECTRUM.

    Two batches of unequal size: the measurements must weight them by size to get this H."""
    gen = torch.Generator().manual_seed(1)
    dim = len(SPECTRUM)
    u, _ = torch.linalg.qr(torch.randn(num_samples, dim, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    x = math.sqrt(num_samples) * u @ torch.diag(torch.tensor(SPECTRUM, dtype=torch.float64).sqrt()) @ v.T
    y = torch.randn(num_samples, generator=gen, dtype=torch.float64)
    model = nn.Linear(dim, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, dim, generator=gen, dtype=torch.float64))
    batches = list(zip(x.split(list(sizes)), y.split(list(sizes))))
    return model, batches, x, y


def _quadratic_terms(model, x, y):
    """Loss, gradient and Hessian of the quadratic at the model's weights, in closed form."""
    w = model.weight.detach().reshape(-1)
    residual = x @ w - y
    return 0.5 * (residual ** 2).mean(), x.T @ residual / len(y), x.T @ x / len(y)


class _Net(nn.Module):
    """A tiny CNN with BatchNorm and dropout: what eval mode must switch and what must be restored."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.drop(F.relu(self.bn(self.conv(x))))
        return self.head(x.mean((2, 3)))


def _net(seed):
    torch.manual_seed(seed)
    net = _Net()
    with torch.no_grad():  # running statistics that differ from the fresh 0 / 1
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2.0)
    return net


def _image_batches(sizes=(6, 4)):
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(n, 3, 5, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in sizes]


def test_power_iteration_recovers_top_eigenvalue_of_quadratic():
    model, batches, x, _ = _quadratic()
    exact = torch.linalg.eigvalsh(x.T @ x / len(x))[-1].item()
    assert exact == pytest.approx(SPECTRUM[0], rel=1e-12)
    result = hessian_top_eigenvalue(model, batches, _half_mse, iters=100, tol=1e-6)
    assert result.converged and result.iterations < 100
    assert result.value == pytest.approx(exact, rel=1e-3)
    report = measure_sharpness(model, batches, _half_mse, eig_iters=100, eig_tol=1e-6, rho=None)
    assert report.top_eigenvalue == result.value and report.eig_converged
    assert report.eig_iterations == result.iterations


def test_power_iteration_reports_when_it_did_not_settle():
    model, batches, _, _ = _quadratic()
    result = hessian_top_eigenvalue(model, batches, _half_mse, iters=2, tol=1e-12)
    assert (result.iterations, result.converged) == (2, False)
    with pytest.raises(ValueError, match=r'tol=0 is invalid: give a positive relative tolerance'):
        hessian_top_eigenvalue(model, batches, _half_mse, tol=0)


def test_top_eigenvalue_is_the_largest_one_when_a_negative_one_dominates():
    """At a saddle power iteration first meets the most negative eigenvalue; the top one is asked for."""
    spectrum = torch.tensor([-3.0, 2.0, 1.0, 0.5, -0.5, -1.0], dtype=torch.float64)
    v, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64))
    x = (6 * spectrum.abs()).sqrt()[:, None] * v.T  # one sample per eigenvector: H = sum_k lambda_k v_k v_k^T
    batches = [(x, spectrum.sign())]
    model = nn.Linear(6, 1, bias=False).double()

    def signed_square(out, sign):
        return 0.5 * (sign * out.squeeze(-1) ** 2).mean()

    result = hessian_top_eigenvalue(model, batches, signed_square, iters=300, tol=1e-9)
    assert result.converged and result.value == pytest.approx(2.0, rel=1e-3)
    short = hessian_top_eigenvalue(model, batches, signed_square, iters=3, tol=1e-9)
    assert (short.iterations, short.converged) == (3, False)


def _exact_hessian(model, batches, loss_fn):
    """The full Hessian of the size-weighted mean loss, built with torch.autograd.functional.hessian."""
    names, params = zip(*model.named_parameters())
    sizes = [p.numel() for p in params]
    total = sum(inputs.shape[0] for inputs, _ in batches)

    def loss_of(flat):
        state = {n: chunk.view(p.shape) for n, chunk, p in zip(names, flat.split(sizes), params)}
        return sum(loss_fn(functional_call(model, state, (inputs,)), targets) * inputs.shape[0] / total
                   for inputs, targets in batches)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    return torch.autograd.functional.hessian(loss_of, flat)


def _mlp_problem():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    gen = torch.Generator().manual_seed(4)
    batches = [(torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen))
               for n in (10, 6)]
    return model, batches


def test_hutchinson_trace_matches_exact_hessian_within_its_error():
    model, batches = _mlp_problem()
    exact = _exact_hessian(model, batches, F.cross_entropy)
    samples = 64
    result = hessian_trace(model, batches, F.cross_entropy, samples=samples, seed=5)
    assert result.samples == samples
    assert abs(result.value - exact.trace().item()) <= 3 * result.std_error
    # z^T H z over Rademacher z has variance 2 * sum_{i != j} H_ij^2: the reported error estimates it
    expected_error = math.sqrt(2 * ((exact ** 2).sum() - (exact.diagonal() ** 2).sum()).item() / samples)
    assert 0.5 < result.std_error / expected_error < 2.0
    with pytest.raises(ValueError, match=r'samples=1 is invalid: .*at least 2 probes'):
        hessian_trace(model, batches, F.cross_entropy, samples=1)


def test_hessian_vector_product_and_top_eigenvalue_match_exact_hessian():
    model, batches = _mlp_problem()
    exact = _exact_hessian(model, batches, F.cross_entropy)
    params = list(model.parameters())
    vector = [torch.randn_like(p) for p in params]
    product = hessian_vector_product(model, batches, F.cross_entropy, vector)
    expected = exact @ torch.cat([v.reshape(-1) for v in vector])
    torch.testing.assert_close(torch.cat([h.reshape(-1) for h in product]), expected)
    eigenvalues = torch.linalg.eigvalsh(exact)
    dominant = eigenvalues[eigenvalues.abs().argmax()].item()
    result = hessian_top_eigenvalue(model, batches, F.cross_entropy, iters=300, tol=1e-9)
    assert result.converged and result.value == pytest.approx(dominant, rel=1e-3)


def test_only_trainable_parameters_are_measured():
    """A frozen copy of the weights doubles the full Hessian's top eigenvalue; measured, it is left out."""
    model, batches, x, y = _quadratic()

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(x.shape[1], 1, bias=False).double()
            self.b = nn.Linear(x.shape[1], 1, bias=False).double()

        def forward(self, inputs):
            return self.a(inputs) + self.b(inputs)

    twin = Twin()
    both = hessian_top_eigenvalue(twin, batches, _half_mse, iters=200, tol=1e-9).value
    twin.b.weight.requires_grad_(False)
    one = hessian_top_eigenvalue(twin, batches, _half_mse, iters=200, tol=1e-9).value
    assert both == pytest.approx(2 * SPECTRUM[0], rel=1e-3) and one == pytest.approx(SPECTRUM[0], rel=1e-3)


def test_m_sharpness_of_quadratic_matches_closed_form():
    model, batches, x, y = _quadratic()
    rho = 0.1

    def closed_form(chunks):
        total = sum(len(cy) for _, cy in chunks)
        rise = 0.0
        for cx, cy in chunks:
            _, grad, hessian = _quadratic_terms(model, cx, cy)
            unit = grad / grad.norm()
            rise += (rho * grad.norm() + 0.5 * rho ** 2 * unit @ hessian @ unit).item() * len(cy) / total
        return rise

    whole = m_sharpness(model, batches, _half_mse, rho=rho)
    assert whole == pytest.approx(closed_form(batches), rel=1e-9)
    chunks = [(cx, cy) for bx, by in batches for cx, cy in zip(bx.split(16), by.split(16))]  # 16, 16, 8 | 16, 8
    assert m_sharpness(model, batches, _half_mse, rho=rho, m=16) == pytest.approx(closed_form(chunks), rel=1e-9)
    with pytest.raises(ValueError, match=r'm=0 is invalid'):
        m_sharpness(model, batches, _half_mse, m=0)
    with pytest.raises(ValueError, match=r'rho=-1.0 is invalid'):
        m_sharpness(model, batches, _half_mse, rho=-1.0)


def test_filter_normalized_direction_scales_each_filter_to_its_weights():
    net = _net(0)
    before = torch.get_rng_state()
    direction = filter_normalized_direction(net, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert set(direction) == {n for n, _ in net.named_parameters()}
    for name, param in net.named_parameters():
        if param.dim() == 1:
            assert not direction[name].any(), name  # biases and BN: no move (Li et al.'s default)
        else:
            torch.testing.assert_close(direction[name].flatten(1).norm(dim=1), param.detach().flatten(1).norm(dim=1))
    again = filter_normalized_direction(net, seed=7)
    assert all(torch.equal(direction[n], again[n]) for n in direction)
    other = filter_normalized_direction(net, seed=8)
    assert not torch.equal(direction['conv.weight'], other['conv.weight'])


def test_landscapes_of_quadratic_match_closed_form():
    model, batches, x, y = _quadratic()
    loss, grad, hessian = _quadratic_terms(model, x, y)
    d1 = filter_normalized_direction(model, seed=1)
    d2 = filter_normalized_direction(model, seed=2)
    u, v = d1['weight'].reshape(-1), d2['weight'].reshape(-1)

    def expected(a, b=0.0):
        step = a * u + b * v
        return (loss + grad @ step + 0.5 * step @ hessian @ step).item()

    alphas = linspace(-1.0, 1.0, 21)
    assert alphas[10] == 0.0 and alphas[0] == -1.0 and alphas[-1] == 1.0
    curve = loss_landscape_1d(model, batches, _half_mse, direction=d1, alphas=alphas)
    assert curve.alphas == alphas
    assert curve.losses == pytest.approx([expected(a) for a in alphas], rel=1e-10)
    assert curve.losses[10] == evaluate_loss(model, batches, _half_mse).item()
    default = loss_landscape_1d(model, batches, _half_mse, seed=1)
    assert default.losses == pytest.approx(curve.losses, rel=1e-12)  # same seed, same direction
    grid = loss_landscape_2d(model, batches, _half_mse, directions=(d1, d2), alphas=[-0.5, 0.0, 1.0],
                             betas=[-1.0, 0.5])
    assert len(grid.losses) == 2 and len(grid.losses[0]) == 3
    for j, b in enumerate(grid.betas):
        assert grid.losses[j] == pytest.approx([expected(a, b) for a in grid.alphas], rel=1e-10)


def test_interpolation_endpoints_equal_the_checkpoints_losses():
    batches = _image_batches()
    state_a, state_b = _net(10).state_dict(), _net(11).state_dict()
    probe = _net(12)
    losses = {}
    for label, state in (('a', state_a), ('b', state_b)):
        probe.load_state_dict(state)
        with measuring(probe):
            losses[label] = evaluate_loss(probe, batches, F.cross_entropy).item()
    model = _net(13)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    curve = interpolate_checkpoints(model, state_a, state_b, batches, F.cross_entropy)
    assert curve.alphas[0] == -0.25 and curve.alphas[2] == 0.0 and curve.alphas[10] == 1.0
    assert curve.losses[2] == losses['a'] and curve.losses[10] == losses['b']
    assert all(math.isfinite(v) for v in curve.losses)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    del state_b['head.bias']
    with pytest.raises(ValueError, match=r'state_b does not fit the model: 1 missing keys \(e.g. head.bias\)'):
        interpolate_checkpoints(model, state_a, state_b, batches, F.cross_entropy)


def test_measurements_leave_the_model_exactly_as_found():
    net = _net(20)
    net.train()
    net.drop.eval()  # mixed modes must come back per module
    net.conv.bias.requires_grad_(False)
    net.conv.weight.grad = torch.randn_like(net.conv.weight)
    net.head.weight.grad = torch.randn_like(net.head.weight)  # head.bias.grad stays None
    grads = {n: p.grad for n, p in net.named_parameters()}
    grad_values = {n: g.clone() for n, g in grads.items() if g is not None}
    state = {k: v.clone() for k, v in net.state_dict().items()}
    modes = {n: m.training for n, m in net.named_modules()}
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    rng = torch.get_rng_state()
    batches = _image_batches()
    report = measure_sharpness(net, batches, F.cross_entropy, rho=0.05, m=3, eig_iters=3, trace_samples=2, seed=4)
    loss_landscape_1d(net, batches, F.cross_entropy, alphas=[-1.0, 0.0, 1.0])
    loss_landscape_2d(net, batches, F.cross_entropy, alphas=[-1.0, 1.0])
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert {n: m.training for n, m in net.named_modules()} == modes
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
    for name, param in net.named_parameters():
        assert param.grad is grads[name], name
        if param.grad is not None:
            assert torch.equal(param.grad, grad_values[name]), name
    with measuring(net):
        assert report.loss == pytest.approx(evaluate_loss(net, batches, F.cross_entropy).item(), rel=1e-6)
    again = measure_sharpness(net, batches, F.cross_entropy, rho=0.05, m=3, eig_iters=3, trace_samples=2, seed=4)
    assert {k: v for k, v in again.to_dict().items() if k != 'seconds'} == \
        {k: v for k, v in report.to_dict().items() if k != 'seconds'}  # seeded: reproducible


def test_report_fields_and_flat_dict():
    model, batches, _, _ = _quadratic()
    report = measure_sharpness(model, batches, _half_mse, rho=0.05, m=8, eig_iters=5, trace_samples=3)
    assert isinstance(report, SharpnessReport)
    flat = report.to_dict()
    assert set(flat) == {'loss', 'top_eigenvalue', 'eig_iterations', 'eig_converged', 'm_sharpness', 'm', 'rho',
                         'hessian_trace', 'trace_std_error', 'trace_samples', 'num_samples', 'seconds'}
    assert all(isinstance(v, (float, int, bool)) for v in flat.values())
    assert (flat['m'], flat['num_samples'], flat['trace_samples']) == (8, 64, 3)
    bare = measure_sharpness(model, batches, _half_mse, rho=None, eig_iters=2).to_dict()
    assert 'm_sharpness' not in bare and 'hessian_trace' not in bare and 'm' not in bare
    assert measure_sharpness(model, batches, _half_mse, rho=0.05).m == 40  # m=None: the (largest) batch


@pytest.mark.parametrize('kwargs, message', [
    (dict(eig_iters=-1), r'eig_iters=-1 is invalid'),
    (dict(trace_samples=1), r'trace_samples=1 is invalid: give 0 \(no trace\) or at least 2'),
    (dict(rho=0.0), r'rho=0.0 is invalid'),
])
def test_bad_arguments_are_named(kwargs, message):
    model, batches, _, _ = _quadratic()
    with pytest.raises(ValueError, match=message):
        measure_sharpness(model, batches, _half_mse, **kwargs)


def test_low_precision_and_empty_inputs_are_refused():
    net = _net(0).bfloat16()
    with pytest.raises(ValueError, match=r"parameter 'conv.weight' is torch.bfloat16; .*fp32 copy"):
        measure_sharpness(net, _image_batches(), F.cross_entropy)
    with pytest.raises(ValueError, match=r'no batches given'):
        measure_sharpness(_net(0), [], F.cross_entropy)


def test_load_model_state_reads_trainer_timm_and_plain_files(tmp_path):
    import argparse

    from esam_timm.sharpness import CheckpointError, load_into, load_model_state
    net = _net(30)
    state = net.state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save({'state_dict': state, 'state_dict_ema': ema, 'arch': 'tiny', 'args': {'model': 'tiny', 'img_size': 5}},
               tmp_path / 'trainer.pth.tar')
    # timm's train.py stores its flags as an argparse.Namespace, DDP runs' keys carry 'module.'
    torch.save({'state_dict': {f'module.{k}': v for k, v in state.items()}, 'arch': 'tiny',
                'args': argparse.Namespace(model='tiny', num_classes=3)}, tmp_path / 'timm.pth.tar')
    torch.save(state, tmp_path / 'plain.pth')
    trainer = load_model_state(str(tmp_path / 'trainer.pth.tar'))
    assert (trainer.arch, trainer.args['img_size'], trainer.ema) == ('tiny', 5, False)
    assert all(torch.equal(trainer.state_dict[k], v) for k, v in state.items())
    assert torch.equal(load_model_state(str(tmp_path / 'trainer.pth.tar'), ema=True).state_dict['head.bias'],
                       ema['head.bias'])
    timm_style = load_model_state(str(tmp_path / 'timm.pth.tar'))
    assert timm_style.args == {'model': 'tiny', 'num_classes': 3} and set(timm_style.state_dict) == set(state)
    plain = load_model_state(str(tmp_path / 'plain.pth'))
    assert (plain.args, plain.arch) == ({}, None)
    other = _net(31)
    load_into(other, plain, 'tiny')
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(CheckpointError, match=r"plain.pth' is a plain state dict, without EMA weights: drop --ema"):
        load_model_state(str(tmp_path / 'plain.pth'), ema=True)
    with pytest.raises(CheckpointError, match=r"timm.pth.tar' has no EMA weights \(state_dict_ema"):
        load_model_state(str(tmp_path / 'timm.pth.tar'), ema=True)
    (tmp_path / 'notes.txt').write_text('not a checkpoint')
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*notes.txt' .*not a file written by torch"):
        load_model_state(str(tmp_path / 'notes.txt'))
    del plain.state_dict['head.bias']
    with pytest.raises(CheckpointError, match=r"does not fit model tiny: 1 missing keys \(e.g. head.bias\)"):
        load_into(other, plain, 'tiny')

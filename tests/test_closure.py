"""ESAM outside train_step: step(closure) as closure-driven loops (Lightning) call it, and no silent SGD."""
import copy

import pytest
import timm
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from esam_timm import ESAM, train_step
from esam_timm.losses import PerSampleCrossEntropy

LR, MOMENTUM, RHO, BETA, SEED = 0.05, 0.9, 0.05, 0.5, 7


def batches(n: int, batch: int = 12):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)]


def lightning_closure(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                      autocast: bool = False, zero_grad: bool = True):
    """What Lightning's automatic optimisation hands to optimizer.step: training_step, zero_grad, backward."""
    def closure():
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        if zero_grad:
            optimizer.zero_grad()
        loss.backward()
        return loss
    return closure


def esam(model: nn.Module, **kwargs) -> ESAM:
    return ESAM(model.parameters(), 'sgd', lr=LR, momentum=MOMENTUM, rho=RHO, beta=BETA, gamma=1.0, seed=SEED,
                **kwargs)


@pytest.mark.parametrize('autocast,zero_grad', [(False, True), (False, False), (True, True)])
def test_closure_step_matches_train_step_with_gamma_1_on_the_same_draw(autocast, zero_grad):
    model = timm.create_model('test_resnet', num_classes=10)
    twin = copy.deepcopy(model)
    optimizer, twin_optimizer = esam(model), esam(twin)
    data = batches(3)
    for x, y in data:
        loss = optimizer.step(lightning_closure(model, optimizer, x, y, autocast, zero_grad))
        stats = train_step(twin, twin_optimizer, x, y, PerSampleCrossEntropy(), bn_mode='all',
                           amp_dtype=torch.bfloat16 if autocast else None)
        torch.testing.assert_close(loss.detach().float(), stats['loss'], rtol=1e-5, atol=1e-6)
    # running stats too: both closure calls update BatchNorm, as train_step's bn_mode='all' does
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(next(model.parameters()), next(timm.create_model('test_resnet', num_classes=10).parameters()))


def test_closure_step_ascends_only_the_drawn_tensors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, rho=RHO, beta=BETA, gamma=1.0, seed=1)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    probe = torch.Generator().manual_seed(1)  # the draw the optimizer will make
    keep = (torch.rand(4, generator=probe) < BETA).tolist()
    assert 0 < sum(keep) < 4
    w = [p.detach().clone() for p in model.parameters()]
    seen = []

    def closure():
        optimizer.zero_grad()
        seen.append([p.detach().clone() for p in model.parameters()])
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    first, second = seen
    assert all(torch.equal(a, b) for a, b in zip(first, w))
    moved = [not torch.equal(a, b) for a, b in zip(second, w)]
    assert moved == keep
    norm = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(second, w)))
    assert norm.item() == pytest.approx(RHO / BETA, rel=1e-5)


def test_closure_with_sds_is_refused_pointing_to_train_step():
    model = nn.Linear(4, 2)
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, beta=1.0, gamma=0.5)
    with pytest.raises(ValueError, match=r'gamma=0.5.*esam_timm.train_step'):
        optimizer.step(lambda: 0.0)


def test_bare_backward_then_step_raises_instead_of_training_sgd():
    model = timm.create_model('test_resnet', num_classes=10)
    optimizer = timm.optim.create_optimizer_v2(model, 'esam', lr=0.1, rho=0.05, beta=1.0, gamma=1.0)
    w = [p.detach().clone() for p in model.parameters()]
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()  # the timm-style loop a new user writes
    with pytest.raises(RuntimeError, match=r'no ascent.*plain SGD update.*esam_timm.train_step'):
        optimizer.step()
    assert all(torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))
    assert not optimizer.state


def test_each_step_needs_its_own_ascent():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, beta=1.0, gamma=1.0)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    train_step(model, optimizer, x, y, PerSampleCrossEntropy())
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match='no ascent'):
        optimizer.step()
    lookahead = timm.optim.create_optimizer_v2(model, 'lookahead_esam', lr=0.1)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match='no ascent'):
        lookahead.step()
    # by hand: draw, B1, perturb, B3, restore, step is accepted
    optimizer.draw_swp()
    F.cross_entropy(model(x), y).backward()
    optimizer.perturb()
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.restore()
    optimizer.step()


def test_skipped_fp16_update_leaves_no_ascent_for_a_later_bare_step():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, beta=1.0, gamma=1.0)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 8)
    calls = []
    model[1].weight.register_hook(lambda g: g * float('inf') if calls.append(1) or len(calls) == 2 else g)
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 5, (8,))
    train_step(model, optimizer, x, y, PerSampleCrossEntropy(), amp_dtype=torch.float16, scaler=scaler)
    assert scaler.get_scale() == 2.0 ** 7  # B3 overflowed: the scaler skipped the base step
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match='no ascent'):
        optimizer.step()


def test_fp16_grad_scaler_with_a_closure_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, beta=1.0, gamma=1.0)
    scaler = torch.amp.GradScaler('cpu')
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 5, (8,))

    def closure():
        optimizer.zero_grad()
        with torch.autocast('cpu', dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        return loss

    w = [p.detach().clone() for p in model.parameters()]
    closure()  # Lightning's 16-mixed plugin runs the closure itself, then calls scaler.step(optimizer)
    with pytest.raises(RuntimeError, match='Closure use is not currently supported'):
        scaler.step(optimizer, closure=closure)  # torch refuses a keyword closure itself
    with pytest.raises(RuntimeError, match='cannot run under an fp16 GradScaler'):
        scaler.step(optimizer, closure)  # a positional one reaches ESAM, which refuses it
    with pytest.raises(RuntimeError, match=r'no ascent.*GradScaler cannot drive a closure'):
        scaler.step(optimizer)
    assert all(torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))


@pytest.mark.parametrize('unscaled_first', [True, False])
def test_grad_scaler_step_unscales_and_skips_like_a_plain_optimizer(unscaled_first):
    """ESAM takes GradScaler's optimizer-side protocol; the result must equal the scaler's own path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
    twin = copy.deepcopy(model)
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, rho=0.05, beta=1.0, gamma=1.0)
    reference = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    scalers = [torch.amp.GradScaler('cpu', init_scale=2.0 ** 10) for _ in range(2)]
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 5, (8,))
    for overflow in (False, True, False):
        for net, opt, scaler in ((model, optimizer, scalers[0]), (twin, reference, scalers[1])):
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y) * (float('inf') if overflow else 1.0)
            scaler.scale(loss).backward()
            if opt is optimizer:
                optimizer.ascent_taken = True  # stands for a finished ascent: the scaler part is tested here
            if unscaled_first:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)
    assert scalers[0].get_scale() == 2.0 ** 9


def _sharded_worker(rank: int, init_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=0, world_size=1)
    try:
        model = fully_shard(nn.Linear(4, 2))
        with pytest.raises(NotImplementedError, match=r'2 sharded parameters \(DTensor.*docs/training.md'):
            ESAM(model.parameters(), 'sgd', lr=0.1, beta=1.0, gamma=1.0)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        train_step(model, sgd, torch.randn(4, 4), torch.randint(0, 2, (4,)), PerSampleCrossEntropy())
        plain = nn.Linear(4, 2)
        optimizer = ESAM(plain.parameters(), 'sgd', lr=0.1, beta=1.0, gamma=1.0)
        fully_shard(plain)  # sharded after the optimizer was made: train_step refuses it
        with pytest.raises(NotImplementedError, match='sharded with FSDP'):
            train_step(plain, optimizer, torch.randn(4, 4), torch.randint(0, 2, (4,)), PerSampleCrossEntropy())
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_parameters_are_refused_with_the_design_pointer(tmp_path):
    mp.spawn(_sharded_worker, args=(str(tmp_path / 'init'),), nprocs=1, join=True)

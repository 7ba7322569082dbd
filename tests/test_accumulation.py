"""Gradient accumulation: each micro-batch is a rank (own ascent, own selection), one update per batch."""
import copy
import os
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from esam_timm import ESAM, train_step
from esam_timm.losses import PerSampleCrossEntropy
from recording import record_before_step
from reference_sam import esam_gradient, swp_keep_mask

RHO, BETA, GAMMA, SEED, LR, MOMENTUM = 0.05, 0.5, 0.5, 4, 0.05, 0.9
MICRO, STEPS = 8, 2


def initial_model() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model('test_resnet', num_classes=10)


def global_batches(micro_batches: int, steps: int = STEPS):
    g = torch.Generator().manual_seed(11)
    size = MICRO * micro_batches
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g))
            for _ in range(steps)]


def esam(model: nn.Module, **kwargs) -> ESAM:
    return ESAM(model.parameters(), 'sgd', lr=LR, momentum=MOMENTUM, rho=RHO, beta=BETA, gamma=GAMMA,
                seed=SEED, **kwargs)


def clipped(grads, clip):
    if clip is None:
        return grads
    total = torch.sqrt(sum((g ** 2).sum() for g in grads))
    return [g * min(1.0, clip / (total.item() + 1e-6)) for g in grads]


@pytest.mark.parametrize('accum,clip', [(2, None), (4, None), (2, 0.5)])
def test_update_is_the_mean_of_independent_reference_esam_gradients(accum, clip):
    model = initial_model()
    optimizer = esam(model)
    seen = record_before_step(optimizer.base_optimizer, list(model.parameters()))
    data = global_batches(accum)
    for x, y in data:
        stats = train_step(model, optimizer, x, y, PerSampleCrossEntropy(), accum_steps=accum, clip_grad=clip)
        assert stats['num_selected'] == accum * MICRO // 2 and stats['selected_fraction'] == 0.5
        assert stats['skipped_ascents'].item() == 0
        assert stats['perturb_norm'].item() == pytest.approx(RHO / BETA, rel=1e-5)
    generator = torch.Generator().manual_seed(SEED)
    reference = initial_model()
    for step, (x, y) in enumerate(data):
        keep = swp_keep_mask(generator, len(list(reference.parameters())), BETA)  # one draw per update
        with torch.no_grad():
            for p, w in zip(reference.parameters(), seen['weights'][step]):
                p.copy_(w)
        per_micro = []
        for xm, ym in zip(x.split(MICRO), y.split(MICRO)):
            replica = copy.deepcopy(reference)
            per_micro.append(esam_gradient(replica, list(replica.parameters()), xm, ym, RHO, BETA, GAMMA, keep))
        expected = clipped([sum(g) / accum for g in zip(*per_micro)], clip)
        for want, got in zip(expected, seen['grads'][step]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_plain_optimizer_accumulation_equals_the_full_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 5))
    twin = copy.deepcopy(model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, twin)]
    x, y = torch.randn(24, 3, 4, 4), torch.randint(0, 5, (24,))
    for _ in range(3):
        whole = train_step(model, optimizers[0], x, y, PerSampleCrossEntropy())
        split = train_step(twin, optimizers[1], x, y, PerSampleCrossEntropy(), accum_steps=3)
        torch.testing.assert_close(split['loss'], whole['loss'])
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_clean_bn_mode_keeps_running_stats_as_the_micro_batches_f1_left_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 5))
    reference = copy.deepcopy(model)
    x, y = torch.randn(12, 3, 6, 6), torch.randint(0, 5, (12,))
    train_step(model, esam(model), x, y, PerSampleCrossEntropy(), accum_steps=3)
    with torch.no_grad():
        for xm in x.split(4):
            reference(xm)  # only the three F1 passes, in order
    for name, buffer in reference[1].named_buffers():
        assert torch.equal(getattr(model[1], name), buffer), name


@pytest.mark.parametrize('overflow_call', [1, 3])  # fc.weight gradients: B1, B3 of micro-batch 0, then of 1
def test_fp16_overflow_in_any_micro_batch_skips_the_update_bitwise(overflow_call):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
    optimizer = ESAM(model.parameters(), 'sgd', lr=0.1, rho=0.05, beta=1.0, gamma=0.5)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 8)
    calls = []
    model[1].weight.register_hook(
        lambda g: g * float('inf') if calls.append(1) or len(calls) - 1 == overflow_call else g)
    w = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 5, (8,))
    stats = train_step(model, optimizer, x, y, PerSampleCrossEntropy(), accum_steps=2,
                       amp_dtype=torch.float16, scaler=scaler)
    assert len(calls) == 4 and stats['skipped_ascents'].item() == 0
    assert all(torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))
    assert scaler.get_scale() == 2.0 ** 7  # one unscale, one (skipped) step, one update for the window
    assert not optimizer.state


def test_fp16_accumulation_without_overflow_matches_fp32_accumulation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 5, (8,))
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 8)
    train_step(model, ESAM(model.parameters(), 'sgd', lr=0.1, beta=1.0, gamma=1.0), x, y, PerSampleCrossEntropy(), accum_steps=2,
               scaler=scaler)  # a scaler without autocast: fp32 passes, scaled gradients
    train_step(twin, ESAM(twin.parameters(), 'sgd', lr=0.1, beta=1.0, gamma=1.0), x, y, PerSampleCrossEntropy(), accum_steps=2)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('accum,match', [(3, r'accum_steps=3 does not divide the batch of 16.*\[1, 2, 4, 8, 16\]'),
                                         (0, 'accum_steps=0 is invalid'),
                                         (2.0, 'accum_steps=2.0 is invalid')])
def test_bad_accum_steps_are_named(accum, match):
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    with pytest.raises(ValueError, match=match):
        train_step(model, esam(model), torch.randn(16, 3, 2, 2), torch.randint(0, 5, (16,)),
                   PerSampleCrossEntropy(), accum_steps=accum)


# ------------------------------------------------------------------------------ against real ranks
WORLD = 2


def count_allreduces(model: DistributedDataParallel):
    calls = []
    model.register_comm_hook(None, lambda state, bucket: calls.append(1) or allreduce_hook(state, bucket))
    return calls


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    out = {}
    for sds in ('exact', 'first-order'):
        for accum in (1, 2):  # each rank takes its share of the global batch: 1 or 2 micro-batches
            model = DistributedDataParallel(initial_model())
            calls = count_allreduces(model)
            optimizer = esam(model.module, sds=sds)
            counts, params = [], []
            for x, y in global_batches(WORLD * accum):
                share = slice(rank * accum * MICRO, (rank + 1) * accum * MICRO)
                train_step(model, optimizer, x[share], y[share], PerSampleCrossEntropy(), accum_steps=accum)
                counts.append(len(calls))
                params.append([p.detach().clone() for p in model.module.parameters()])
            out[f'{sds}/{accum}'] = {'params': params, 'reductions': counts}
    model = DistributedDataParallel(initial_model())
    calls = count_allreduces(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    counts = []
    for x, y in global_batches(WORLD):
        train_step(model, optimizer, x[rank * MICRO:(rank + 1) * MICRO], y[rank * MICRO:(rank + 1) * MICRO],
                   PerSampleCrossEntropy())
        counts.append(len(calls))
    out['sgd'] = {'reductions': counts}
    torch.save(out, os.path.join(out_dir, f'rank{rank}.pt'))
    dist.destroy_process_group()


@pytest.mark.slow
def test_accumulation_equals_the_same_batch_over_gloo_ranks_and_composes_with_ddp(tmp_path: Path):
    mp.spawn(worker, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(WORLD)]
    sgd = ranks[0]['sgd']['reductions']  # bucket all-reduces after each SGD step (DDP rebuilds buckets once)
    assert sgd[0] >= 1
    for sds in ('exact', 'first-order'):
        for accum in (1, 2):
            run = f'{sds}/{accum}'
            for p0, p1 in zip(ranks[0][run]['params'][-1], ranks[1][run]['params'][-1]):
                assert torch.equal(p0, p1), run  # DDP + accumulation: ranks stay bitwise equal
            # the buckets of one SGD step per update, whatever the accumulation: only the last B3 syncs
            assert ranks[0][run]['reductions'] == sgd, run
            # one process accumulating all WORLD * accum micro-batches makes the same update. (One update:
            # over more, rounding-level differences flip near-tied top-k choices and the runs part.)
            model = initial_model()
            x, y = global_batches(WORLD * accum)[0]
            train_step(model, esam(model, sds=sds), x, y, PerSampleCrossEntropy(), accum_steps=WORLD * accum)
            for p, q in zip(model.parameters(), ranks[0][run]['params'][0]):
                torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=run)

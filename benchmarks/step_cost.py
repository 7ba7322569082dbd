"""Cost of one training step for SGD, SAM and ESAM (each SDS mode) through esam_timm.train_step.

Each arm gets its own model copy and optimizer; steps are interleaved (SGD, SAM, ESAM, SGD, ...) so
machine noise hits all of them alike; each arm reports the median over rounds of its step time
divided by the eager SGD step time of the same round (and the range of those ratios), next to the
pass-count model of that ratio (:func:`pass_model`: a backward = two forwards). With
``--compile`` every chosen method runs twice, eager and ``torch.compile``-d (inductor), side by side;
compilation happens in the untimed warm-up steps.
Peak memory during a step, above what the model, optimizer state and batch hold: on CUDA torch's
peak allocation; on the CPU glibc's peak live heap (mallinfo2, polled) in a fresh child process per
method, i.e. the bytes really in use, not the allocator's cached slack that RSS would include.
An '/accum4' arm makes one update from 4 micro-batches of --batch-size (train_step's accum_steps); its
time ratio is per micro-batch, and its extra memory over the plain arm is what accumulation holds.

    python benchmarks/step_cost.py                      # CPU: resnet18 (CIFAR stem), 32 px, batch 128
    python benchmarks/step_cost.py --compile --no-memory --methods sgd 'esam(0.5,0.5)' 'esam-fo(0.5,0.5)'
    python benchmarks/step_cost.py --device cuda        # ResNet-50, 224 px, bf16, channels-last, + compiled
    # issue 21's shape on the CPU; --clock cpu --threads 1 when other work shares the machine
    OMP_WAIT_POLICY=PASSIVE python benchmarks/step_cost.py --model resnet50 --img-size 224 -b 16 --channels-last \
        --num-classes 1000 --steps 4 --no-memory --methods sgd sam 'esam(0.6,0.5)' 'esam-fo(0.6,0.5)' msam
    python benchmarks/step_cost.py --model vit_small_patch16_224 --img-size 224 -b 32 --base-opt adamw  # a ViT
"""
import argparse
import copy
import ctypes
import json
import multiprocessing as mp
import statistics
import threading
import time
from typing import Callable, Dict, List, Tuple

import timm
import torch

import esam_timm
from esam_timm.head import classifier_tap
from esam_timm.losses import PerSampleCrossEntropy

METHODS: Dict[str, Dict] = {
    'sgd': dict(opt='sgd'),
    'sam': dict(opt='sam', rho=0.05),
    'esam(0.5,0.5)': dict(opt='esam', rho=0.05, beta=0.5, gamma=0.5),
    'esam(0.6,0.5)': dict(opt='esam', rho=0.05, beta=0.6, gamma=0.5),
    'esam-fo(0.5,0.5)': dict(opt='esam', rho=0.05, beta=0.5, gamma=0.5, sds='first-order'),
    'esam-fo(0.6,0.5)': dict(opt='esam', rho=0.05, beta=0.6, gamma=0.5, sds='first-order'),
    'esam-loss(0.5,0.5)': dict(opt='esam', rho=0.05, beta=0.5, gamma=0.5, sds='loss'),
    'esam-fo(0.5,0.4)': dict(opt='esam', rho=0.05, beta=0.5, gamma=0.4, sds='first-order'),
    'esam-loss(0.5,0.4)': dict(opt='esam', rho=0.05, beta=0.5, gamma=0.4, sds='loss'),
    'esam-fo(0.5,0.3)': dict(opt='esam', rho=0.05, beta=0.5, gamma=0.3, sds='first-order'),
    'esam-fo(0.2,0.5)': dict(opt='esam', rho=0.02, beta=0.2, gamma=0.5, sds='first-order'),
    # the noise-robust rules (their cost is their signal's) and the paper's ablations
    'esam-trim(0.5,0.5)': dict(opt='esam', rho=0.05, beta=0.5, gamma=0.5, sds='exact-trim'),
    'esam-bal(0.5,0.5)': dict(opt='esam', rho=0.05, beta=0.5, gamma=0.5, sds='exact-balanced'),
    'esam-fo-bal(0.5,0.5)': dict(opt='esam', rho=0.05, beta=0.5, gamma=0.5, sds='first-order-balanced'),
    'esam-rel-bal(0.5,0.5)': dict(opt='esam', rho=0.05, beta=0.5, gamma=0.5, sds='exact-relative-balanced'),
    'esam-fo-rel-bal(0.5,0.5)': dict(opt='esam', rho=0.05, beta=0.5, gamma=0.5, sds='first-order-relative-balanced'),
    'esam-fo-trim(0.5,0.5)': dict(opt='esam', rho=0.05, beta=0.5, gamma=0.5, sds='first-order-trim'),
    'esam-swp-only(0.5)': dict(opt='esam', rho=0.05, beta=0.5, gamma=1.0),
    'esam-sds-only(0.5)': dict(opt='esam', rho=0.05, beta=1.0, gamma=0.5),
    # Momentum-SAM: one forward/backward at w - rho v / ||v||
    'msam': dict(opt='msam', rho=3.0),
    # gradient accumulation: 4 micro-batches of --batch-size per step (times are per micro-batch)
    'sgd/accum4': dict(opt='sgd', accum=4),
    'esam(0.5,0.5)/accum4': dict(opt='esam', rho=0.05, beta=0.5, gamma=0.5, accum=4),
}
COMPILE_METHODS = ['sgd', 'sam', 'esam(0.5,0.5)', 'esam(0.6,0.5)', 'esam-fo(0.5,0.5)', 'esam-fo(0.6,0.5)', 'msam']
COMPILED = '+compile'


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--model', default=None, help='timm model (default: resnet18_cifar on CPU, resnet50 on CUDA)')
    parser.add_argument('--img-size', type=int, default=None)
    parser.add_argument('--batch-size', '-b', type=int, default=None,
                        help='default: 128 on the CPU; on CUDA the largest of 256, 128, 64, ... whose SAM step fits')
    parser.add_argument('--amp-dtype', default=None, choices=['bfloat16', 'float16', 'none'])
    parser.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument('--steps', type=int, default=5, help='timed steps per method')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per method')
    parser.add_argument('--num-classes', type=int, default=None)
    parser.add_argument('--clock', default='wall', choices=['wall', 'cpu'],
                        help="'wall': elapsed time; 'cpu': this process's CPU time (with --threads 1 and "
                             "OMP_WAIT_POLICY=PASSIVE, steady on a machine other work keeps busy)")
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s)')
    parser.add_argument('--base-opt', default='sgd',
                        help="timm optimizer of the plain 'sgd' arm and base of every wrapper (e.g. adamw for a ViT)")
    parser.add_argument('--no-memory', action='store_true', help='skip the memory measurement')
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS),
                        help='methods to time, eager (default: all)')
    parser.add_argument('--out', default=None, help='also write the table as JSON (for plot_tradeoff.py)')
    parser.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                        help=f'also time the methods among {" ".join(COMPILE_METHODS)} torch.compile-d '
                             f'(inductor), side by side with eager (default: on for cuda)')
    args = parser.parse_args()
    cuda = args.device == 'cuda'
    defaults = dict(model='resnet50' if cuda else 'resnet18_cifar', img_size=224 if cuda else 32,
                    batch_size=0 if cuda else 128, amp_dtype='bfloat16' if cuda else 'none',
                    channels_last=cuda, num_classes=1000 if cuda else 10, compile=cuda)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    methods = list(dict.fromkeys(['sgd'] + args.methods))  # every ratio is to eager SGD of the same round
    args.arms = methods + [m + COMPILED for m in methods if args.compile and m in COMPILE_METHODS]
    return args


def pass_model(arm: str) -> float:
    """The step's cost in passes over SGD's, a backward counting as two forwards (input and weight
    gradients): SGD 3 (F + B), SAM 6; ESAM F1 + B1 with only the SWP share beta of the weight gradients
    (2 + beta), F2 when it selects by exact sharpness (1), F3 + B3 on the selected share gamma (3 gamma);
    msam one pass at w~ (3). Parameter-sized work (ascent, restore, the optimizer) is not in it."""
    spec = METHODS[arm.removesuffix(COMPILED)]
    if spec['opt'] in ('sgd', 'msam'):
        return 1.0
    if spec['opt'] == 'sam':
        return 2.0
    beta, gamma = spec.get('beta', esam_timm.optim.DEFAULT_BETA), spec.get('gamma', esam_timm.optim.DEFAULT_GAMMA)
    exact_f2 = gamma < 1 and spec.get('sds', 'exact').startswith('exact')
    return (2 + beta + exact_f2 + 3 * gamma) / 3


def build(args: argparse.Namespace, base: torch.nn.Module, arm: str) -> Tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The arm's model (compiled for a '+compile' arm) and its optimizer (built on the plain model)."""
    model = copy.deepcopy(base)  # carries the base's classifier tap
    spec = dict(METHODS[arm.removesuffix(COMPILED)])
    spec.pop('accum', None)
    opt = spec.pop('opt')
    if opt == 'sgd':
        opt = args.base_opt
    else:
        spec['base_optimizer'] = args.base_opt
    optimizer = timm.optim.create_optimizer_v2(model, opt, lr=0.05, weight_decay=5e-4, momentum=0.9, **spec)
    if arm.endswith(COMPILED):
        model = torch.compile(model, backend='inductor')
    return model, optimizer


def accum_steps(arm: str) -> int:
    return METHODS[arm.removesuffix(COMPILED)].get('accum', 1)


def make_stepper(args: argparse.Namespace, arm: str, model, optimizer) -> Callable[[], None]:
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    accum = accum_steps(arm)
    x = torch.randn(args.batch_size * accum, 3, args.img_size, args.img_size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch_size * accum,), generator=g).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    amp = None if args.amp_dtype == 'none' else getattr(torch, args.amp_dtype)
    scaler = torch.amp.GradScaler(args.device) if amp == torch.float16 else None
    loss_fn = PerSampleCrossEntropy()

    def step() -> None:
        esam_timm.train_step(model, optimizer, x, y, loss_fn, accum_steps=accum, amp_dtype=amp, scaler=scaler)
        if device.type == 'cuda':
            torch.cuda.synchronize()
    return step


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks',
        'keepcost')]


class LiveHeapSampler:
    """Peak of the bytes malloc has handed out and not yet taken back (glibc mallinfo2: heap in use +
    mmapped chunks), polled from a thread. Unlike RSS it excludes freed memory the allocator keeps."""

    def __init__(self, interval_s: float = 0.0005) -> None:
        self._mallinfo2 = ctypes.CDLL('libc.so.6').mallinfo2
        self._mallinfo2.restype = _MallInfo2
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()

    def live_bytes(self) -> int:
        info = self._mallinfo2()
        return info.uordblks + info.hblkhd

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.live_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> 'LiveHeapSampler':
        self.peak = self.live_bytes()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cpu_peak_live_heap(args: argparse.Namespace, method: str, queue) -> None:
    """Runs in a fresh (spawned) process: peak live heap over a few steps of one method, above the
    live heap after the model, optimizer and batch were built and one step was taken."""
    torch.manual_seed(0)
    base = timm.create_model(args.model, num_classes=args.num_classes).train()
    model, optimizer = build(args, base, method)
    step = make_stepper(args, method, model, optimizer)
    step()  # optimizer state (momentum buffers) exists from here on for every method
    sampler = LiveHeapSampler()
    baseline = sampler.live_bytes()
    with sampler:
        for _ in range(2):
            step()
    queue.put(sampler.peak - baseline)


def fit_batch_size(args: argparse.Namespace, base: torch.nn.Module) -> int:
    """The largest batch of 256, 128, 64, ... whose SAM step (eager and, with --compile, compiled: the
    arms with the most live memory) fits on the CUDA device."""
    batch = 256
    while batch >= 8:
        args.batch_size = batch
        try:
            for arm in ['sam'] + (['sam' + COMPILED] if args.compile else []):
                model, optimizer = build(args, base, arm)
                make_stepper(args, arm, model, optimizer)()
                del model, optimizer
            return batch
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f'batch {batch} does not fit; trying {batch // 2}', flush=True)
            batch //= 2
    raise SystemExit('step_cost.py: not even a batch of 8 fits on this device')


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == 'cpu' else time.perf_counter
    torch.manual_seed(0)
    base = timm.create_model(args.model, num_classes=args.num_classes).to(args.device).train()
    if args.channels_last:
        base = base.to(memory_format=torch.channels_last)
    # Dynamo shares one compiled forward between instances of a class and does not guard on hooks:
    # every copy gets the first-order SDS tap before anything is compiled.
    classifier_tap(base)
    if not args.batch_size:
        args.batch_size = fit_batch_size(args, base)
        print(f'batch {args.batch_size}: the largest up to 256 whose SAM step fits', flush=True)
    param_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    steppers = {}
    peak: Dict[str, float] = {}
    for method in args.arms:
        model, optimizer = build(args, base, method)
        steppers[method] = make_stepper(args, method, model, optimizer)
        warm_start = time.perf_counter()
        for _ in range(args.warmup):
            steppers[method]()
        print(f'{method}: {args.warmup} warm-up steps in {time.perf_counter() - warm_start:.1f} s', flush=True)
    times: Dict[str, List[float]] = {m: [] for m in args.arms}
    for i in range(args.steps):
        for method, step in steppers.items():
            start = clock()
            step()
            times[method].append(clock() - start)
        print(f'round {i + 1}/{args.steps}: ' + ', '.join(f'{m} {t[-1] * 1e3:.0f} ms' for m, t in times.items()),
              flush=True)
    steppers.clear()  # free the timed models before measuring memory one method at a time
    measure_memory = not args.no_memory
    if measure_memory and args.device == 'cuda':
        for method in args.arms:
            model, optimizer = build(args, base, method)
            step = make_stepper(args, method, model, optimizer)
            step()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            peak[method] = torch.cuda.max_memory_allocated() - before
            del model, optimizer, step
    elif measure_memory:
        ctx = mp.get_context('spawn')  # fork after OpenMP work can deadlock
        for method in args.arms:
            queue = ctx.Queue()
            child = ctx.Process(target=cpu_peak_live_heap, args=(args, method, queue))
            child.start()
            peak[method] = queue.get()
            child.join()

    print(f'\nmodel {args.model}, {args.img_size} px, batch {args.batch_size}, base optimizer {args.base_opt} '
          f"(the 'sgd' arm runs it plain), device {args.device}, "
          f'amp {args.amp_dtype}, channels_last {args.channels_last}, threads {torch.get_num_threads()}, '
          f'{args.steps} interleaved rounds, {args.clock} clock; parameters {param_bytes / 2**20:.1f} MiB')
    print(f'{"arm":<27}{"median ms":>10}{"x SGD":>8}{"model":>7}{"range":>13}{"peak mem MiB":>14}'
          f'{"extra vs SGD MiB":>18}')
    # each round's step time over the SGD step of the same round: noise common to a round cancels
    ratios = {method: [a / accum_steps(method) / b for a, b in zip(t, times['sgd'])] for method, t in times.items()}
    for method, t in times.items():
        mem = peak.get(method)
        mem_txt = f'{mem / 2**20:14.0f}{(mem - peak["sgd"]) / 2**20:18.0f}' if mem is not None else ''
        print(f'{method:<27}{statistics.median(t) * 1e3:10.1f}{statistics.median(ratios[method]):8.2f}'
              f'{pass_model(method):7.2f}{min(ratios[method]):7.2f}-{max(ratios[method]):<5.2f}{mem_txt}')
    if any(accum_steps(m) > 1 for m in times):
        print('/accum arms: median ms is per update (all micro-batches), x SGD per micro-batch')
    if args.out:
        rows = {method: dict(median_ms=statistics.median(t) * 1e3, x_sgd=statistics.median(ratios[method]),
                             model=pass_model(method), ratios=ratios[method],
                             peak_mib=peak[method] / 2**20 if method in peak else None)
                for method, t in times.items()}
        config = {k: v for k, v in vars(args).items() if k != 'arms'}
        with open(args.out, 'w') as f:
            json.dump({'config': config, 'arms': rows, 'threads': torch.get_num_threads(),
                       'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, f, indent=1)
        print(f'wrote {args.out}')


if __name__ == '__main__':
    main()

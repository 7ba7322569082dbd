"""The first GPU run (issue 24) in two commands, each at most 10 minutes on one H100/H200-class GPU.

Each command prints its tables as it goes, so a run cut off at its limit still leaves its figures, and
appends every figure as a JSON line to ``<out>/gpu_check.jsonl``:

- ``part1``: the environment (versions, GPU, driver, what the code needs of timm); the CUDA-marked tests
  (``pytest -m cuda``: fp16 overflow, drop-path replay under torch.compile, bf16 sharpness ranking at 224 px,
  GPU decode, stream prefetch); ResNet-50 at 224 px, bf16, channels-last, at the largest batch up to 256
  that fits, eager and compiled, for SGD, SAM, ESAM (0.6, 0.5), its first-order mode and msam, with peak
  memory, next to each method's pass-count model and the issue's targets (``benchmarks/step_cost.py``).
- ``part2``: ImageNet-sized JPEG shards (500x375); a short ``train_esam.py`` run per data path (``--decode
  pil``, ``fast``, ``gpu``; bf16, channels-last): img/s, the share of the step spent waiting for data, peak
  memory; then a run stopped with SIGTERM mid-epoch and resumed from its recovery checkpoint.

Without CUDA both go as far as the CPU allows (environment; shards and a CPU smoke test of every decode
path) and stop with one line and exit code 2.

On a GPU node with torch and timm but no package index, from the checkout, without ``pip install -e``:
fetch the wheels the node lacks on a machine with an index, once (webdataset and braceexpand are pure
Python; TorchCodec must match the node's torch: 0.16 or 0.17 for torch >= 2.11, CUDA 13 builds on PyPI)::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d wheels \\
        webdataset==1.0.2 braceexpand==0.1.7 torchcodec==0.17.0

then on the node (one command installs them beside its torch; the repository root goes on the path)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl && \\
        export PYTHONPATH=/tmp/site:$PWD
    python3 benchmarks/gpu_check.py part1 --out results/    # then: part2 --out results/

wandb is optional (runs log to the console and summary.csv without it).
"""
import argparse
import importlib
import inspect
import json
import multiprocessing as mp
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the checkout is the package: no pip install -e on the node
sys.path.insert(1, os.path.join(ROOT, 'benchmarks'))

STEP_COST_METHODS = ['sgd', 'sam', 'esam(0.6,0.5)', 'esam-fo(0.6,0.5)', 'msam']
# The targets on one H100/H200-class GPU: each method within 0.05x of its pass-count model, and
TARGETS = {'sam': 2.05, 'esam(0.6,0.5)': 1.75, 'esam-fo(0.6,0.5)': 1.42, 'msam': 1.05}
BACKENDS = ['pil', 'fast', 'gpu']
_PEAK = 'GPU_CHECK_PEAK_MIB='
# The trainer's interval line: "... 1234.5/s (1200.0/s)  LR: ...  Data: 1.2 (1.5) ms, wait 3%"
_LINE = re.compile(r'([\d.]+)/s \(([\d.]+)/s\).*Data: ([\d.]+) \(([\d.]+)\) ms, wait (\d+)%')
REQUIRED = ('torch', 'timm', 'webdataset', 'braceexpand', 'yaml', 'PIL', 'numpy')
OPTIONAL = ('torchcodec', 'wandb')


class Report:
    """Prints as it goes and appends each record to ``<out>/gpu_check.jsonl``."""

    def __init__(self, out: Optional[str]) -> None:
        self.path = None
        if out:
            os.makedirs(out, exist_ok=True)
            self.path = os.path.join(out, 'gpu_check.jsonl')

    def say(self, text: str) -> None:
        print(f'[gpu_check {time.strftime("%H:%M:%S")}] {text}', flush=True)

    def record(self, kind: str, **values: Any) -> None:
        if self.path:
            with open(self.path, 'a') as f:
                f.write(json.dumps(dict(kind=kind, time=time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()),
                                        **values), default=str) + '\n')

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        print('| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header), flush=True)
        for row in rows:
            print('| ' + ' | '.join(str(v) for v in row) + ' |', flush=True)


def environment(report: Report) -> bool:
    """Versions, GPU and driver, the packages the code needs and what it needs of timm; False (after one
    line naming what is missing and how to install it) when a required package is missing."""
    rows: List[List[Any]] = [['python', platform.python_version()]]
    missing = []
    for name in REQUIRED + OPTIONAL:
        try:
            module = importlib.import_module(name)
            rows.append([name, getattr(module, '__version__', 'present')])
        except Exception as exc:  # a broken install raises more than ImportError (TorchCodec without its torch)
            rows.append([name, f'not usable: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}'])
            if name in REQUIRED:
                missing.append(name)
    import torch
    rows.append(['torch CUDA / cuDNN', f'{torch.version.cuda} / {torch.backends.cudnn.version()}'])
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rows.append(['GPU', f'{props.name}, {props.total_memory / 2 ** 30:.0f} GiB, {props.multi_processor_count} SMs'])
        smi = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                             capture_output=True, text=True)
        rows.append(['driver', smi.stdout.strip() or 'nvidia-smi: ' + smi.stderr.strip()[:80]])
    else:
        rows.append(['GPU', 'none: torch.cuda.is_available() is False'])
    if 'timm' not in missing:
        from timm.optim import create_optimizer_v2
        accepted = inspect.signature(create_optimizer_v2).parameters
        needed = ('layer_decay', 'layer_decay_min_scale', 'layer_decay_no_opt_scale')
        rows.append(['timm create_optimizer_v2', ', '.join(f'{n} {"yes" if n in accepted else "NO"}' for n in needed)
                     + ' (the trainer passes the last two only when set, and refuses them in one line otherwise)'])
    report.table(['what', 'found'], rows)
    report.record('environment', **{str(k): v for k, v in rows})
    if missing:
        print(f'gpu_check: missing {", ".join(missing)}: install the wheels as the docstring of '
              f'benchmarks/gpu_check.py says (pip install --no-index --no-deps --target /tmp/site wheels/*.whl, '
              f'then PYTHONPATH=/tmp/site:$PWD)', flush=True)
        return False
    try:
        importlib.import_module('esam_timm')
    except Exception as exc:
        print(f'gpu_check: esam_timm does not import here: {type(exc).__name__}: {exc}', flush=True)
        return False
    return True


def _env() -> Dict[str, str]:
    """The environment of the child processes: the checkout first on the path."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep),
                PYTHONUNBUFFERED='1')


def _stop_without_cuda(report: Report, step: str) -> None:
    import torch
    if not torch.cuda.is_available():
        report.record('stopped', reason='no CUDA', before=step)
        print(f'gpu_check: stopped before {step}, the first step that needs CUDA: torch.cuda.is_available() is '
              f'False here (the steps before it passed)', flush=True)
        sys.exit(2)


def cuda_tests(report: Report) -> bool:
    """``pytest -m cuda`` on the checkout's tests, its output streamed; every CUDA test must pass."""
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-m', 'cuda', '-p', 'no:cacheprovider', '-rs',
                           'tests'], cwd=ROOT, env=_env(), capture_output=True, text=True)
    print(proc.stdout[-6000:], proc.stderr[-2000:], flush=True)
    summary = (proc.stdout.strip().splitlines() or ['(no output)'])[-1]
    ok = proc.returncode == 0 and 'skipped' not in summary
    report.record('cuda_tests', ok=ok, summary=summary)
    report.say(f'CUDA tests: {"all passed" if ok else "FAILED or skipped"}: {summary}')
    return ok


def step_cost(report: Report, out: str, steps: int) -> Optional[Dict[str, Any]]:
    """benchmarks/step_cost.py on CUDA (its rounds print live), then the table against the targets."""
    path = os.path.join(out, 'step_cost.json')
    cmd = [sys.executable, os.path.join(ROOT, 'benchmarks', 'step_cost.py'), '--device', 'cuda', '--steps', str(steps),
           '--warmup', '2', '--out', path, '--methods', *STEP_COST_METHODS]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env())
    if proc.returncode != 0 or not os.path.exists(path):
        report.record('step_cost', error=f'exit {proc.returncode}')
        return None
    with open(path) as f:
        result = json.load(f)
    arms, rows = result['arms'], []
    sgd_peak = arms['sgd'].get('peak_mib')
    for method in STEP_COST_METHODS:
        eager, compiled = arms.get(method, {}), arms.get(method + '+compile', {})
        model = eager.get('model', float('nan'))
        ratio = eager.get('x_sgd', float('nan'))
        peak = eager.get('peak_mib')
        rows.append([method, f'{ratio:.2f}', f'{model:.2f}', f'{ratio - model:+.2f}',
                     f'{compiled.get("x_sgd", float("nan")):.2f}', f'{eager.get("median_ms", float("nan")):.1f}',
                     f'{compiled.get("median_ms", float("nan")):.1f}',
                     '-' if peak is None or not sgd_peak else f'{peak / sgd_peak:.2f}',
                     'yes' if abs(ratio - model) <= 0.05 and ratio <= TARGETS.get(method, 9) else 'NO'])
    report.say(f'step cost, ResNet-50 224 px bf16 channels-last, batch {result["config"]["batch_size"]}:')
    report.table(['method', 'eager x SGD', 'model', 'vs model', 'compiled x compiled SGD', 'eager ms',
                  'compiled ms', 'peak mem x SGD', 'target met'], rows)
    report.record('step_cost', batch_size=result['config']['batch_size'], arms=arms)
    return result


def _jpeg(args: Sequence[int]) -> bytes:
    import numpy as np
    from loader import photo_like_jpeg
    seed, width, height = args
    return photo_like_jpeg(np.random.default_rng(seed), width, height, 90)


def make_shards(workdir: str, images: int, num_classes: int = 100) -> str:
    """ImageNet-sized JPEGs (500x375 and 375x500, photo-like content, quality 90) as shards with _info.json,
    made in parallel on the node's cores."""
    from esam_timm.data import ShardRecord, has_info, write_info, write_split
    if not has_info(workdir):
        sizes = [(i, 500, 375) if i % 4 else (i, 375, 500) for i in range(images)]
        with mp.get_context('fork').Pool(max(1, (os.cpu_count() or 2) - 1)) as pool:
            jpegs = pool.map(_jpeg, sizes, chunksize=16)
        records = [ShardRecord(key=f'img{i:06d}', image=data, ext='jpg', label=i % num_classes)
                   for i, data in enumerate(jpegs)]
        write_info(workdir, 'gpucheck', {'train': write_split(records, workdir, 'train', prefix='gpucheck',
                                                               max_count=256, progress=False)})
    return workdir


def loader_smoke(workdir: str) -> str:
    """A few batches of each decode path on the CPU (GPU decode's code with device='cpu'); the TorchCodec
    version, or why there is none (then only --decode pil can train)."""
    from esam_timm.data import create_train_loader, resolve_source
    from esam_timm.data.decode import jpeg_decoder
    from esam_timm.data.gpu_decode import GpuDecodeLoader
    try:
        jpeg_decoder()
        import torchcodec
        codec = f'TorchCodec {torchcodec.__version__}'
    except ValueError as exc:
        codec = f'no usable TorchCodec: {exc}'
    source = resolve_source(workdir, 'train')
    for decode in ('pil', 'fast', 'encoded') if codec.startswith('TorchCodec') else ('pil',):
        loader = create_train_loader(source, batch_size=16, img_size=224, num_workers=0, decode=decode,
                                     shuffle_buffer=32)
        if decode == 'encoded':
            loader = GpuDecodeLoader(loader, 'cpu', 224, batch_size=16)
        for i, (images, labels) in enumerate(loader):
            assert len(images) == len(labels) == 16, decode
            if i == 2:
                break
    return codec


def _train_argv(shards: str, out_dir: str, name: str, args: argparse.Namespace, steps: int,
                decode: str) -> List[str]:
    return [shards, '--dataset', 'wds/gpucheck', '--val-split', '', '--model', 'resnet50', '--num-classes', '100',
            '-b', str(args.batch_size), '--epochs', '1', '--train-num-samples', str(steps * args.batch_size),
            '--opt', 'esam', '--amp', '--amp-dtype', 'bfloat16', '--channels-last', '--decode', decode,
            '--workers', str(args.workers), '--log-interval', '20', '--no-progress', '--output', out_dir,
            '--experiment', name]


def train_run(report: Report, shards: str, decode: str, args: argparse.Namespace, out_dir: str) -> Dict[str, Any]:
    """One short run through train_esam.py: the last interval's img/s, data-wait share and the peak memory."""
    argv = _train_argv(shards, out_dir, f'gpucheck-{decode}', args, args.steps, decode)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--train-child', *argv], cwd=ROOT,
                          env=_env(), capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    lines, peak = _LINE.findall(text), re.findall(_PEAK + r'([\d.]+)', text)
    if proc.returncode != 0 or not lines:
        print(text[-3000:], flush=True)
        result: Dict[str, Any] = {'decode': decode, 'error': f'exit {proc.returncode}'}
    else:
        sps, _, data_ms, _, wait = lines[-1]
        result = {'decode': decode, 'img_s': float(sps), 'step_ms': 1000. * args.batch_size / float(sps),
                  'data_ms': float(data_ms), 'data_wait_share': int(wait) / 100,
                  'peak_mib': float(peak[-1]) if peak else None}
    report.record('train', batch_size=args.batch_size, workers=args.workers, steps=args.steps, **result)
    return result


def stop_and_resume(report: Report, shards: str, args: argparse.Namespace, out_dir: str) -> Dict[str, Any]:
    """A --decode fast run stopped with SIGTERM to its process group after 20 updates, then resumed with the
    command it printed: exit codes, the recovery checkpoint, and whether the resumed run finished."""
    argv = _train_argv(shards, out_dir, 'gpucheck-sigterm', args, 60, 'fast')
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train_esam.py'), *argv], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output, sent = [], False
    for line in proc.stdout:
        output.append(line)
        if not sent and re.search(r'Train: 0 \[\s+20/', line):
            os.killpg(proc.pid, signal.SIGTERM)  # as SLURM delivers it: the trainer and its loader workers
            sent = True
    proc.wait()
    stops = [l for l in output if l.startswith('train_esam.py: stopped by SIGTERM')]
    result: Dict[str, Any] = {'stopped_exit': proc.returncode, 'signal_sent': sent, 'stop_line': bool(stops)}
    if stops:
        command = stops[-1].split('resume with: ', 1)[1].split()
        result['checkpoint'] = command[-1]
        resumed = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=_env(), capture_output=True, text=True)
        result['resumed_exit'] = resumed.returncode
        if resumed.returncode != 0:
            print(resumed.stderr[-3000:], flush=True)
    else:
        print(''.join(output[-40:]), flush=True)
    result['ok'] = result.get('stopped_exit') == 143 and result.get('resumed_exit') == 0
    report.record('sigterm_resume', **result)
    return result


def train_child(argv: List[str]) -> None:
    """Run train_esam.py in this process, then print the peak CUDA memory for the parent to read."""
    import runpy

    import torch
    sys.argv = [os.path.join(ROOT, 'train_esam.py'), *argv]
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name='__main__')
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    print(f'{_PEAK}{torch.cuda.max_memory_allocated() / 2 ** 20:.0f}', flush=True)
    sys.exit(code)


def part1(args: argparse.Namespace, report: Report) -> int:
    report.say('part 1/2, step 1/3: environment')
    if not environment(report):
        return 2
    _stop_without_cuda(report, 'step 2/3 (the CUDA-marked tests)')
    report.say('part 1/2, step 2/3: the CUDA-marked tests')
    tests_ok = cuda_tests(report)
    report.say('part 1/2, step 3/3: step cost (benchmarks/step_cost.py --device cuda), eager and compiled')
    cost = step_cost(report, args.out, args.step_cost_steps)
    return 0 if tests_ok and cost is not None else 1


def part2(args: argparse.Namespace, report: Report) -> int:
    report.say('part 2/2, step 1/4: environment')
    if not environment(report):
        return 2
    shards = os.path.join(args.workdir, 'shards')
    report.say(f'part 2/2, step 2/4: {args.images} ImageNet-sized JPEGs as shards in {shards}; CPU smoke test of '
               f'the decode paths')
    make_shards(shards, args.images)
    codec = loader_smoke(shards)
    report.say(codec)
    report.record('loader_smoke', codec=codec)
    _stop_without_cuda(report, 'step 3/4 (a training run per data path)')
    backends = BACKENDS if codec.startswith('TorchCodec') else ['pil']
    report.say(f'part 2/2, step 3/4: {args.steps}-update train_esam.py runs (ResNet-50, bf16, channels-last, eager, '
               f'batch {args.batch_size}, {args.workers} workers) for --decode {", ".join(backends)}')
    runs = []
    for decode in backends:
        runs.append(train_run(report, shards, decode, args, os.path.join(args.workdir, 'runs')))
        run = runs[-1]
        report.table(['decode', 'img/s', 'step ms', 'data ms', 'data-wait share', 'peak MiB'], [
            [run['decode'], run.get('error') or f'{run["img_s"]:.0f}', f'{run.get("step_ms", 0):.1f}',
             f'{run.get("data_ms", 0):.1f}', f'{run.get("data_wait_share", 0):.0%}', run.get('peak_mib')]])
    report.say('part 2/2, step 4/4: SIGTERM to a --decode fast run after 20 updates, then its resume command')
    stopped = stop_and_resume(report, shards, args, os.path.join(args.workdir, 'runs'))
    report.table(['stopped run exit', 'recovery checkpoint', 'resumed run exit', 'as expected (143, then 0)'],
                 [[stopped.get('stopped_exit'), stopped.get('checkpoint', '-'), stopped.get('resumed_exit', '-'),
                   'yes' if stopped['ok'] else 'NO']])
    return 0 if stopped['ok'] and all('error' not in r for r in runs) else 1


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == '--train-child':
        train_child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('part', choices=['part1', 'part2'], help='part1: environment, CUDA tests, step cost; '
                                                                  'part2: data paths, SIGTERM and resume')
    parser.add_argument('--out', default=None, help='folder for gpu_check.jsonl and step_cost.json '
                                                    '(default: a temporary folder)')
    parser.add_argument('--workdir', default=None, help='shards and run folders (default: a temporary folder)')
    parser.add_argument('--images', type=int, default=2048, help='JPEGs in the part-2 shards (the stream repeats them)')
    parser.add_argument('--steps', type=int, default=100, help='updates per part-2 training run')
    parser.add_argument('--batch-size', type=int, default=256, help='per-step batch of the part-2 runs')
    parser.add_argument('--workers', type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)),
                        help='loader workers of the part-2 runs')
    parser.add_argument('--step-cost-steps', type=int, default=5, help='timed rounds of the step cost')
    args = parser.parse_args()
    args.out = args.out or tempfile.mkdtemp(prefix='esam_gpu_check_out_')
    args.workdir = args.workdir or tempfile.mkdtemp(prefix='esam_gpu_check_')
    report = Report(args.out)
    report.say(f'{args.part}: figures go to {os.path.join(args.out, "gpu_check.jsonl")}')
    sys.exit((part1 if args.part == 'part1' else part2)(args, report))


if __name__ == '__main__':
    main()

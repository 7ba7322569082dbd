"""One-shot GPU check: CUDA tests, step cost, and short training runs per decode backend, in one table.

Steps, in order (the first two run anywhere; without CUDA the script stops before step 3 with one
line and exit code 2):

1. writes 1,024 generated 320x240 JPEGs (100 classes) as WebDataset shards with ``_info.json``;
2. CPU smoke test of the loaders: a few batches through ``decode='pil'``, ``'fast'`` and GPU decode's
   code on the CPU (the workers' ``'encoded'`` batches decoded by TorchCodec on the host); prints the
   TorchCodec version (``--decode fast|gpu`` need it: install its wheel before going to an air-gapped node);
3. the CUDA-marked tests (``pytest -m cuda``);
4. ``benchmarks/step_cost.py --device cuda`` (ResNet-50, 224 px, bf16, channels-last, eager and
   compiled) for sgd, sam, esam(0.5,0.5), esam-fo(0.5,0.5), msam;
5. for each decode backend, a 200-step ``train_esam.py`` run on the shards with ``--amp --amp-dtype
   bfloat16 --channels-last --torchcompile`` (ESAM 0.5/0.5, batch 128), recording the last log
   interval's img/s and data time and the peak CUDA memory;

then prints one table: step time x SGD (step_cost) and, per backend, img/s, step time, the share of
the step spent waiting for data, and peak memory. Budget: under 8 minutes on one H100/H200-class GPU
(torch.compile of ResNet-50 takes most of it).

Run: ``python benchmarks/gpu_check.py [--workdir DIR] [--workers 8]``.
"""
import argparse
import json
import os
import re
import runpy
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_COST_METHODS = ['sgd', 'sam', 'esam(0.5,0.5)', 'esam-fo(0.5,0.5)', 'msam']
BACKENDS = ['pil', 'fast', 'gpu']
_PEAK = 'GPU_CHECK_PEAK_MIB='
# The trainer's console line: "... 1234.5/s (1200.0/s)  LR: ...  Data: 1.2 (1.5) ms"
_LINE = re.compile(r'([\d.]+)/s \(([\d.]+)/s\).*Data: ([\d.]+) \(([\d.]+)\) ms')


def _say(text: str) -> None:
    print(f'[gpu_check {time.strftime("%H:%M:%S")}] {text}', flush=True)


def make_shards(workdir: str, images: int = 1024, num_classes: int = 100) -> str:
    """Generated 320x240 JPEGs (a 224 crop is a real crop) as shards with timm's _info.json."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from loader import photo_like_jpeg

    from esam_timm.data import ShardRecord, has_info, write_info, write_split
    if not has_info(workdir):
        rng = np.random.default_rng(0)
        records = [ShardRecord(key=f'img{i:06d}', image=photo_like_jpeg(rng, 320, 240, 90), ext='jpg',
                               label=i % num_classes) for i in range(images)]
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


def run_cuda_tests() -> str:
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-m', 'cuda', '-p', 'no:cacheprovider', 'tests'],
                          cwd=ROOT, capture_output=True, text=True)
    tail = (proc.stdout.strip().splitlines() or ['(no output)'])[-1]
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-2000:])
    return f'{"ok" if proc.returncode == 0 else "FAILED"}: {tail}'


def run_step_cost(out_json: str, steps: int) -> Optional[List[Dict]]:
    cmd = [sys.executable, os.path.join(ROOT, 'benchmarks', 'step_cost.py'), '--device', 'cuda', '--steps', str(steps),
           '--warmup', '2', '--out', out_json, '--methods', *STEP_COST_METHODS]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout[-6000:])
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        return None
    with open(out_json) as f:
        return json.load(f)


def trainer_has_decode_flag() -> bool:
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'train_esam.py'), '--help'], cwd=ROOT,
                         capture_output=True, text=True).stdout
    return '--decode' in out


def run_training(workdir: str, backend: str, args: argparse.Namespace, out_dir: str) -> Dict[str, object]:
    """One 200-step run; its last interval's img/s and data ms, and the peak CUDA memory."""
    steps = 200
    train_args = [workdir, '--dataset', 'wds/gpucheck', '--val-split', '', '--model', 'resnet50', '--num-classes',
                  '100', '-b', str(args.batch_size), '--epochs', '1', '--train-num-samples', str(steps * args.batch_size),
                  '--opt', 'esam', '--amp', '--amp-dtype', 'bfloat16', '--channels-last', '--torchcompile',
                  '--workers', str(args.workers), '--log-interval', '50', '--no-progress', '--output', out_dir,
                  '--experiment', f'gpucheck-{backend}']
    if backend != 'pil':
        train_args += ['--decode', backend]
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--train-child', *train_args], cwd=ROOT,
                          capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    lines = _LINE.findall(text)
    peak = re.findall(_PEAK + r'([\d.]+)', text)
    if proc.returncode != 0 or not lines:
        print(text[-3000:])
        return {'backend': backend, 'error': f'exit {proc.returncode}'}
    sps, _, data_ms, _ = (float(v) for v in lines[-1])
    step_ms = 1000. * args.batch_size / sps
    return {'backend': backend, 'img_s': sps, 'step_ms': step_ms, 'data_share': data_ms / step_ms,
            'peak_mib': float(peak[-1]) if peak else float('nan')}


def train_child(argv: List[str]) -> None:
    """Run train_esam.py in this process, then print the peak CUDA memory for the parent to read."""
    import torch
    sys.argv = [os.path.join(ROOT, 'train_esam.py'), *argv]
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name='__main__')
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    print(f'{_PEAK}{torch.cuda.max_memory_allocated() / 2 ** 20:.0f}', flush=True)
    sys.exit(code)


def print_table(tests: str, step_cost: Optional[List[Dict]], runs: List[Dict[str, object]]) -> None:
    print('\n== gpu_check summary ==')
    print(f'cuda tests: {tests}')
    if step_cost:
        print('\n| arm | eager x SGD | compiled x SGD | peak extra MiB |\n|---|---:|---:|---:|')
        for row in step_cost:
            print(f'| {row.get("method", row.get("arm"))} | {row.get("ratio", row.get("eager_ratio", ""))} | '
                  f'{row.get("compiled_ratio", "")} | {row.get("extra_mib", row.get("memory_mib", ""))} |')
    print('\n| decode backend | img/s | step ms | data-wait share | peak MiB |\n|---|---:|---:|---:|---:|')
    for run in runs:
        if 'error' in run:
            print(f'| {run["backend"]} | {run["error"]} | | | |')
        else:
            print(f'| {run["backend"]} | {run["img_s"]:.0f} | {run["step_ms"]:.1f} | {run["data_share"]:.1%} | '
                  f'{run["peak_mib"]:.0f} |')


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == '--train-child':
        train_child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--workdir', help='shards and run folders (default: a temp folder)')
    parser.add_argument('--workers', type=int, default=8, help='loader workers of the training runs')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--step-cost-steps', type=int, default=5)
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix='esam_gpu_check_')
    shards = os.path.join(workdir, 'shards')
    _say(f'1/5 writing shards in {shards}')
    make_shards(shards)
    _say('2/5 CPU smoke test of the decode paths (pil, fast, GPU decode on the CPU)')
    codec = loader_smoke(shards)
    _say(codec)

    import torch
    if not torch.cuda.is_available():
        print('gpu_check: stopped before step 3/5 (the CUDA-marked tests), the first that needs CUDA: '
              'torch.cuda.is_available() is False here; steps 1-2 (shards, CPU loader smoke test) passed', flush=True)
        sys.exit(2)
    _say(f'3/5 CUDA-marked tests on {torch.cuda.get_device_name()}')
    tests = run_cuda_tests()
    _say(f'4/5 step_cost.py --device cuda ({" ".join(STEP_COST_METHODS)}), eager and compiled')
    step_cost = run_step_cost(os.path.join(workdir, 'step_cost.json'), args.step_cost_steps)
    backends = BACKENDS if trainer_has_decode_flag() and codec.startswith('TorchCodec') else ['pil']
    if backends == ['pil']:
        _say('no --decode flag in train_esam.py or no usable TorchCodec: only the default (PIL) backend is trained')
    runs = []
    for backend in backends:
        _say(f'5/5 200-step train_esam.py run, decode {backend}')
        runs.append(run_training(shards, backend, args, os.path.join(workdir, 'runs')))
    print_table(tests, step_cost, runs)


if __name__ == '__main__':
    main()

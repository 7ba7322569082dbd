"""benchmarks/gpu_check.py without a GPU (issue 24): both commands go as far as the CPU allows, print what
they found as they go, and stop with one line and exit code 2 at the first step that needs CUDA."""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'benchmarks', 'gpu_check.py')


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the stop without CUDA')
@pytest.mark.parametrize('part, stop', [('part1', 'step 2/3 (the CUDA-marked tests)'),
                                        ('part2', 'step 3/4 (a training run per data path)')])
def test_without_cuda_each_part_stops_at_its_first_cuda_step(tmp_path, part, stop):
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}  # the script finds the checkout itself
    proc = subprocess.run([sys.executable, SCRIPT, part, '--out', str(tmp_path / 'out'), '--workdir',
                           str(tmp_path / 'work'), '--images', '16'], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path), env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == (
        f'gpu_check: stopped before {stop}, the first step that needs CUDA: torch.cuda.is_available() is False '
        f'here (the steps before it passed)')
    assert f'| torch | {torch.__version__} |' in proc.stdout and '| GPU | none' in proc.stdout
    records = [json.loads(line) for line in (tmp_path / 'out' / 'gpu_check.jsonl').read_text().splitlines()]
    assert [r['kind'] for r in records] == (['environment', 'stopped'] if part == 'part1' else
                                            ['environment', 'loader_smoke', 'stopped'])
    if part == 'part2':
        assert records[1]['codec'].startswith('TorchCodec')  # every decode path ran a few batches on the CPU
        assert len(list((tmp_path / 'work' / 'shards').glob('gpucheck-train-*.tar'))) >= 1

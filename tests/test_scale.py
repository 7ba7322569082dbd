"""Ready for many GPUs (issue 21), tested on the CPU: each rank's device, timm's CUDA speed defaults, no
collective timeout from one rank's work, resume on another number of processes, preemption as SLURM and
torchrun deliver it, and what a run at scale prints."""
import math
import multiprocessing
import os
import signal
import subprocess
import time

import pytest
import torch

from data_helpers import write_identity_shards
from esam_timm.data import create_train_loader, resolve_source

SIZES = [7, 2, 4]


# ------------------------------------------------------------------ 4. an epoch is whole updates

@pytest.mark.parametrize('world_size, accum', [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1)])
def test_an_epoch_is_a_whole_number_of_full_global_batches(tmp_path, world_size, accum):
    """13 samples, batch 2: ceil(13 / (2 x processes x accumulation)) updates, each of full batches, the
    same for 2 processes and for 1 process accumulating 2 (a run can resume on the other)."""
    write_identity_shards(tmp_path, SIZES)
    source = resolve_source(str(tmp_path), 'train')
    lengths = {len(create_train_loader(source, batch_size=2, img_size=16, rank=rank, world_size=world_size,
                                       batches_per_update=accum, num_workers=0)) for rank in range(world_size)}
    updates = math.ceil(13 / (2 * world_size * accum))
    assert lengths == {updates * accum}
    loader = create_train_loader(source, batch_size=2, img_size=16, world_size=world_size,
                                 batches_per_update=accum, num_workers=0)
    assert [labels.shape[0] for _, labels in loader] == [2] * updates * accum
    with pytest.raises(ValueError, match='batches_per_update must be >= 1, got 0'):
        create_train_loader(source, batch_size=2, img_size=16, batches_per_update=0)


# ------------------------------------------------------------------ 5. workers leave the stop to the trainer

def test_a_sigterm_from_outside_does_not_kill_the_loader_workers(tmp_path):
    """SLURM's and torchrun's SIGTERM reach the workers from another process than the trainer: they ignore
    it and the epoch goes on (PyTorch's own worker handler used to let them die of it)."""
    write_identity_shards(tmp_path, SIZES)
    loader = create_train_loader(resolve_source(str(tmp_path), 'train', num_samples=40), batch_size=2,
                                 img_size=16, num_workers=2, seed=3, shuffle_buffer=4, prefetch_factor=1)
    batches = iter(loader)
    first = next(batches)
    workers = [p.pid for p in multiprocessing.active_children()]
    assert len(workers) == 2
    for pid in workers:  # sent by another process, as a scheduler does
        subprocess.run(['kill', '-TERM', str(pid)], check=True)
        subprocess.run(['kill', '-INT', str(pid)], check=True)
    time.sleep(0.5)
    rest = list(batches)
    assert 1 + len(rest) == len(loader) == 20
    assert first[0].shape == (2, 3, 16, 16)

"""Never a short or missing batch: on every decode path (pil, fast, gpu run on the CPU) a shard with
undecodable images still gives every rank exactly len() full batches, so timm's Mixup/CutMix (an even
batch), gradient accumulation (an even split) and DDP (the same number of updates on every rank) run
through the epoch. Two gloo ranks, one loader worker each, a real DDP model and esam_timm's train_step."""
import json
import os
from pathlib import Path

import pytest

from data_helpers import gloo_group, run_ranks, truncated_jpeg, write_identity_shards

SIZES = [10, 10, 12]
# Every 4th sample is bad, so each rank meets bad data in each epoch (the seeds are fixed): every 8th is not
# an image at all (the worker's header check rejects it), the others are JPEGs cut short (the header parses;
# the decode fails, in the worker or on the device).
BAD = {i: {'jpg': b'not a jpeg' if i % 8 == 1 else truncated_jpeg(i)} for i in range(1, sum(SIZES), 4)}
DECODES = ('pil', 'fast', 'gpu')
BATCH, ACCUM, EPOCHS = 4, 2, 2


def _rank(rank: int, world_size: int, port: int, data_dir: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from timm.data import Mixup

    import esam_timm.data.backend_wds as backend_wds
    import esam_timm.data.gpu_decode as gpu_decode
    from esam_timm.data.backends import Augmentation, ImageConfig, LoaderConfig
    from esam_timm.step import train_step

    for module in (backend_wds, gpu_decode):  # GPU decode runs its device code on the CPU here
        module.check_cuda_device = torch.device
    with gloo_group(rank, world_size, port):
        backend = backend_wds.WdsBackend('wds/data', data_dir)
        split = backend.split('train', training=True)
        image = ImageConfig(input_size=(3, 16, 16), interpolation='bilinear', mean=(0.5,) * 3, std=(0.25,) * 3,
                            crop_pct=1.0)
        for decode in DECODES:
            torch.manual_seed(0)
            model = torch.nn.parallel.DistributedDataParallel(
                torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 32)))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=32)
            config = LoaderConfig(batch_size=BATCH, image=image, device=torch.device('cpu'), rank=rank,
                                  world_size=world_size, workers=1, batches_per_update=ACCUM, num_classes=32)
            loader = backend.train_loader(split, config, Augmentation(color_jitter=0.4), seed=3, decode=decode,
                                          mixup_fn=mixup)
            result = {'len': len(loader), 'epochs': []}
            for epoch in range(EPOCHS):
                loader.set_epoch(epoch)
                sizes, updates, window = [], 0, []
                for images, targets in loader:
                    assert targets.shape == (BATCH, 32)  # mixed soft targets: Mixup ran on the batch
                    sizes.append(images.shape[0])
                    window.append((images, targets))
                    if len(window) == ACCUM:  # the trainer's update: a window of batches, split again
                        inputs = torch.cat([x for x, _ in window])
                        soft = torch.cat([y for _, y in window])
                        train_step(model, optimizer, inputs, soft,
                                   lambda logits, y: torch.sum(-y * F.log_softmax(logits, dim=-1), dim=-1),
                                   accum_steps=ACCUM)  # DDP all-reduces in each update's backward
                        updates += 1
                        window = []
                report = loader.data_report()
                result['epochs'].append({'sizes': sizes, 'updates': updates, 'samples': report.samples,
                                         'bad_by_shard': report.bad_samples_by_shard})
                dist.barrier()
            with open(os.path.join(out_dir, f'{decode}-rank{rank}.json'), 'w') as f:
                json.dump(result, f)


@pytest.mark.slow
def test_every_decode_path_gives_full_equal_batches_around_undecodable_images(tmp_path):
    data_dir = tmp_path / 'data'
    names = write_identity_shards(data_dir, SIZES, overrides=BAD)
    run_ranks(_rank, str(data_dir), str(tmp_path))
    updates = -(-sum(SIZES) // (BATCH * 2 * ACCUM))  # ceil(32 / global batch of 16) = 2 updates per epoch
    for decode in DECODES:
        for rank in range(2):
            result = json.loads(Path(tmp_path / f'{decode}-rank{rank}.json').read_text())
            assert result['len'] == updates * ACCUM, decode
            for epoch in result['epochs']:
                assert epoch['sizes'] == [BATCH] * (updates * ACCUM), (decode, rank, epoch)
                assert epoch['updates'] == updates and epoch['samples'] == BATCH * updates * ACCUM
                assert sum(epoch['bad_by_shard'].values()) >= 1, (decode, rank, epoch)  # it did meet bad data
                assert set(epoch['bad_by_shard']) <= {str(data_dir / name) for name in names}

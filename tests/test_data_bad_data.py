"""DataReport arithmetic, the --max-bad-fraction check, and the cross-rank merge on 2 gloo processes."""
import dataclasses
import json
import logging
import os
import pickle

import pytest
import torch

from data_helpers import gloo_group, run_ranks, truncate_in_sample, write_identity_shards
from esam_timm.data import (
    BadDataError,
    DataPipelineError,
    DataReport,
    check_bad_fraction,
    create_train_loader,
    create_val_loader,
    is_resource_failure,
    reduce_data_report,
    resolve_source,
)


def _report(samples, by_shard, broken):
    return DataReport(samples=samples, bad_samples=sum(by_shard.values()), bad_shards=dict(broken),
                      bad_samples_by_shard=dict(by_shard))


def test_merge_counts_each_shard_once_and_keeps_the_first_error():
    a = _report(10, {'s.tar': 2, 'a.tar': 1}, {'s.tar': 'cut first'})
    b = _report(20, {'s.tar': 1}, {'s.tar': 'cut again', 'b.tar': 'gone'})
    a.merge(b)
    assert (a.samples, a.bad_samples, a.num_bad_shards) == (30, 4, 2)
    assert a.bad_shards == {'s.tar': 'cut first', 'b.tar': 'gone'}
    assert a.bad_samples_by_shard == {'s.tar': 3, 'a.tar': 1}
    assert a.worst_shards() == [('s.tar', 3, 'cut first'), ('a.tar', 1, None), ('b.tar', 0, 'gone')]
    assert a.worst_shards(1) == [('s.tar', 3, 'cut first')]
    assert a.metrics() == {'samples': 30.0, 'bad_samples': 4.0, 'bad_shards': 2.0, 'bad_fraction': 4 / 34}
    assert a.summary() == ('4 bad of 34 samples (11.76%), 2 bad shard(s); worst: s.tar (3 bad samples, '
                           'unreadable: cut first); a.tar (1 bad samples); b.tar (0 bad samples, unreadable: gone)')
    copy = a.copy()
    copy.add_bad_samples('a.tar')
    copy.add_bad_shard('c.tar', 'new')
    assert (a.bad_samples, a.num_bad_shards) == (4, 2)  # the copy is independent


def test_bad_fraction_edges():
    assert DataReport().bad_fraction == 0.0 and not DataReport().has_bad_data()
    assert _report(0, {}, {'x.tar': 'gone'}).bad_fraction == 1.0  # nothing read, a shard failed
    assert _report(3, {'x.tar': 1}, {}).bad_fraction == 0.25


def test_check_bad_fraction_warns_then_raises_past_the_threshold(caplog):
    report = _report(99, {'x.tar': 1}, {})
    with caplog.at_level(logging.WARNING, logger='esam_timm.data.bad_data'):
        check_bad_fraction(report, 0.01, what='val')  # exactly 1%: allowed
    assert 'val: 1 bad of 100 samples (1.00%)' in caplog.text
    caplog.clear()
    check_bad_fraction(DataReport(samples=5), 0.0)
    with pytest.raises(BadDataError) as info:
        check_bad_fraction(report, 0.005, warn=False)
    assert str(info.value) == (
        'data: 1 of 100 samples unreadable (1.00%), more than --max-bad-fraction 0.005 (0.50%); worst shards: '
        'x.tar (1 bad samples). Fix or remove these shards (and their entries in _info.json), or raise '
        '--max-bad-fraction.')
    assert isinstance(info.value, RuntimeError) and info.value.max_fraction == 0.005
    copy = pickle.loads(pickle.dumps(info.value))  # crosses process boundaries intact
    assert (str(copy), copy.report, copy.max_fraction) == (str(info.value), report, 0.005)
    assert not caplog.text
    for bad in (-0.1, 1.5, float('nan')):
        with pytest.raises(ValueError, match=r'--max-bad-fraction\) must be in \[0, 1\]'):
            check_bad_fraction(report, bad)


def test_reduce_without_process_group_is_a_copy():
    report = _report(5, {'x.tar': 2}, {'x.tar': 'cut'})
    reduced = reduce_data_report(report)
    assert reduced == report and reduced is not report


# ---------------------------------------------------------------- 2 ranks (gloo, CPU)

def _reduce_worker(rank: int, world_size: int, port: int, data_dir: str, out_dir: str) -> None:
    with gloo_group(rank, world_size, port):
        result = {}
        mine = [_report(10, {'shared.tar': 2, 'r0.tar': 1}, {'shared.tar': 'cut on rank 0'}),
                _report(20, {'shared.tar': 1}, {'shared.tar': 'cut on rank 1', 'r1.tar': 'gone'})][rank]
        result['hand'] = dataclasses.asdict(reduce_data_report(mine))
        result['clean'] = dataclasses.asdict(reduce_data_report(DataReport(samples=rank + 1)))
        src = resolve_source(data_dir, 'train')
        val = create_val_loader(src, batch_size=2, img_size=16, num_workers=2, rank=rank, world_size=world_size)
        result['val_labels'] = [int(y) for _, ys in val for y in ys]
        result['val_local'] = dataclasses.asdict(val.data_report())
        reduced = reduce_data_report(val.data_report())
        result['val'] = dataclasses.asdict(reduced)
        try:
            check_bad_fraction(reduced, 0.01, what='validation', warn=False)
        except BadDataError as exc:
            result['val_error'] = str(exc)
        train = create_train_loader(src, batch_size=2, img_size=16, num_workers=2, seed=0, rank=rank,
                                    world_size=world_size, shuffle_buffer=4)
        train.set_epoch(0)
        result['train_batches'] = len(list(train))
        result['train'] = dataclasses.asdict(reduce_data_report(train.data_report()))
        with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
            json.dump(result, f)


@pytest.mark.slow
def test_two_ranks_merge_reports_counting_a_shared_shard_once(tmp_path):
    data_dir = tmp_path / 'data'
    # shard 0 (0..5) is cut in sample 4 and shared by both ranks (fewer shards than 2 x 2 streams);
    # shard 1 (6..8) has no labels
    names = write_identity_shards(data_dir, [6, 3], overrides={i: {'cls': None} for i in range(6, 9)})
    truncate_in_sample(data_dir / names[0], 4)
    run_ranks(_reduce_worker, str(data_dir), str(tmp_path))
    results = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2)]
    shard0, shard1 = (str(data_dir / n) for n in names)
    for res in results:
        assert res['hand'] == {'samples': 30, 'bad_samples': 4,
                               'bad_shards': {'shared.tar': 'cut on rank 0', 'r1.tar': 'gone'},
                               'bad_samples_by_shard': {'shared.tar': 3, 'r0.tar': 1}}
        assert res['clean'] == {'samples': 3, 'bad_samples': 0, 'bad_shards': {}, 'bad_samples_by_shard': {}}
        assert res['val']['samples'] == 4 and res['val']['bad_samples'] == 5
        assert list(res['val']['bad_shards']) == [shard0]  # both ranks hit it: listed once
        assert res['val']['bad_samples_by_shard'] == {shard0: 2, shard1: 3}
        assert res['val_error'].startswith('validation: 5 of 9 samples unreadable (55.56%)')
        assert f'{shard1} (3 bad samples)' in res['val_error']
        assert res['train_batches'] == 3
        assert list(res['train']['bad_shards']) == [shard0] and res['train']['bad_samples_by_shard'][shard1] > 0
        assert res['train'] == results[0]['train']  # the same merged report on every rank
    for res in results:  # each rank saw the shared shard itself
        assert shard0 in res['val_local']['bad_shards']
    assert sorted(results[0]['val_labels'] + results[1]['val_labels']) == [0, 1, 2, 3]


# ---------------------------------------------------------------- errors that are not bad data

@pytest.mark.parametrize('error,resource', [
    (MemoryError(), True),
    (torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB'), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"), True),
    (RuntimeError('decode_images, DecodeJpegCuda.cpp:471, Failed to synchronize CUDA stream: 700'), True),
    (RuntimeError('decode_jpeg: torchcodec was not compiled with nvJPEG support'), True),
    (ImportError('libnvjpeg.so.13: cannot open shared object file'), True),
    (RuntimeError('decode_rows, DecodeJpeg.cpp:287, Image is incomplete or truncated.'), False),
    (RuntimeError('Failed to decode batch: 9'), False),
    (OSError('image file is truncated (66 bytes not processed)'), False),
    (ValueError('invalid literal for int()'), False),
])
def test_is_resource_failure_tells_the_machine_from_the_data(error, resource):
    assert is_resource_failure(error) is resource


@pytest.mark.parametrize('num_workers', [0, 1])
def test_out_of_memory_while_decoding_stops_the_loader_with_one_line(tmp_path, monkeypatch, num_workers):
    """A MemoryError in the fast decode is the machine's failure: the iteration stops with one
    DataPipelineError line naming the sample (also from a worker process), and no sample is counted bad."""
    from esam_timm.data.decode import FastTrainTransform

    def out_of_memory(self, data):
        raise MemoryError()

    monkeypatch.setattr(FastTrainTransform, '__call__', out_of_memory)  # forked workers inherit it
    write_identity_shards(tmp_path, [6])
    loader = create_train_loader(resolve_source(str(tmp_path), 'train'), batch_size=2, img_size=16, decode='fast',
                                 num_workers=num_workers, seed=0, shuffle_buffer=1, persistent_workers=False)
    with pytest.raises(DataPipelineError) as info:
        list(loader)
    message = str(info.value)
    assert '\n' not in message and message.startswith("a loader worker failed on sample '000000' of ")
    assert '(MemoryError: )' in message and 'nothing is counted as bad' in message
    assert loader.data_report().bad_samples == 0

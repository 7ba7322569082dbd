"""Console lines in timm's style, log lines that keep off the progress bar, the epoch meter's state."""
import io
import logging

import pytest
import torch

from esam_timm import console
from esam_timm.train import StepMeter, format_train_line


def stats(loss: float, skipped: int = 0):
    return {'loss': torch.tensor(loss), 'sharpness': torch.tensor(loss / 10), 'perturb_norm': torch.tensor(0.1),
            'skipped_ascents': torch.tensor(float(skipped)), 'selected_fraction': 0.5}


def test_line_shows_interval_values_and_running_averages():
    interval, epoch = StepMeter(), StepMeter()
    for loss in (4.0, 2.0):
        epoch.update(stats(loss), 32, 0.001)
    interval.update(stats(2.0, skipped=1), 32, 0.003)
    epoch.update(stats(2.0, skipped=1), 32, 0.003)
    line = format_train_line(0, 3, 10, interval.read(), epoch.read(), lr=0.1)
    assert line.startswith('Train: 0 [    3/10 ( 30%)]')
    assert 'Loss: 2.0000 (2.6667)' in line
    assert 'Sharpness: 0.2000 (0.2667)' in line
    assert 'Data: 3.0 (1.7) ms' in line
    assert 'LR: 1.000e-01' in line and 'Selected: 0.50' in line and 'Skipped ascents: 1' in line


def test_epoch_meter_state_continues_bitwise():
    whole = StepMeter()
    for loss in (0.1, 0.7, 0.3):
        whole.update(stats(loss), 8, 0.0)
    resumed = StepMeter()
    resumed.load_state_dict(whole.state_dict(), torch.device('cpu'))
    for meter in (whole, resumed):
        meter.update(stats(0.9), 8, 0.0)
    a, b = whole.read(), resumed.read()
    for key in ('loss', 'sharpness', 'perturb_norm', 'skipped_ascents', 'selected_share'):
        assert a[key] == b[key], key
    assert resumed.samples == 32 and resumed.steps == 4


def test_log_lines_go_above_an_active_progress_bar(monkeypatch):
    written = []
    monkeypatch.setattr('tqdm.tqdm.write', staticmethod(lambda text, file=None: written.append(text)))
    stream = io.StringIO()
    handler = console._ProgressSafeHandler(stream)
    logger = logging.getLogger('test_reporting_bar')
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning('plain')
        monkeypatch.setattr(console.ProgressBar, 'active', 1)
        logger.warning('with a bar')
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == 'plain\n' and written == ['with a bar']


@pytest.mark.parametrize('value', [float('nan'), None])
def test_missing_values_print_as_dash(value):
    interval = {'samples_per_sec': 10.0, 'data_time': 0.0, 'selected_share': 1.0, 'loss': value}
    assert 'Loss: - (-)' in format_train_line(0, 1, 1, interval, dict(interval), lr=0.1)

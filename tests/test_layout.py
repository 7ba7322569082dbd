"""Imports run one way: train -> sharpness -> the shared modules; the data layer never imports train."""
import subprocess
import sys

_BLOCK_TRAIN = '''
import importlib.abc
import sys


class _RefuseTrain(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == 'esam_timm.train' or name.startswith('esam_timm.train.'):
            raise ImportError(f'{name} is blocked: this module must not need the trainer')
        return None


sys.meta_path.insert(0, _RefuseTrain())
import esam_timm.data
import esam_timm.data.backend_folder
import esam_timm.data.backend_wds
import esam_timm.sharpness
import esam_timm.sharpness.cli
import esam_timm.sharpness.__main__
loaded = sorted(m for m in sys.modules if m.startswith('esam_timm.train'))
assert not loaded, loaded
'''


def test_sharpness_and_data_import_with_the_trainer_blocked():
    proc = subprocess.run([sys.executable, '-c', _BLOCK_TRAIN], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

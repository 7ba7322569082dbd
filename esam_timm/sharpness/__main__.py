"""``python -m esam_timm.sharpness CHECKPOINT [CHECKPOINT ...]``: see :mod:`esam_timm.sharpness.cli`."""
import sys

from .cli import main

if __name__ == '__main__':
    sys.exit(main())

"""Command line: write an ImageFolder tree as WebDataset shards with timm's ``_info.json``.

``python -m esam_timm.data.make_shards SRC OUT [--splits train=train validation=val] ...``; the writer
itself is :mod:`esam_timm.data.shards` (kept apart so that ``-m`` runs this module exactly once).
"""
import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from .shards import LAYOUT_HELP, make_shards
from .sources import INFO_NAME

_logger = logging.getLogger(__name__)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python -m esam_timm.data.make_shards',
        description=f'Write an ImageFolder tree as shuffled WebDataset shards with timm\'s {INFO_NAME}.',
        epilog=(
            f'Layout: {LAYOUT_HELP} Every split is checked before anything is written. '
            'Validation: every image is decoded while it is packed; corrupt ones are skipped, logged and listed '
            f'under "corrupt_files" of their split in {INFO_NAME}, never packed. '
            'Re-runs: writing into OUT replaces the splits written: their previous shards (listed in the old '
            f'{INFO_NAME} or named PREFIX-SPLIT-NNNN.tar) are removed, so {INFO_NAME} and OUT agree; other files '
            'are left alone, and shard files no split lists are named in a warning.'))
    parser.add_argument('src', help='folder holding split folders (train/, val/), each with one folder per class')
    parser.add_argument('out', help=f'output folder for the shards, {INFO_NAME} and class_map.txt')
    parser.add_argument('--splits', nargs='+', metavar='NAME[=FOLDER]',
                        help='splits to write (default: train and val/validation found in SRC)')
    parser.add_argument('--prefix', help='shard file name prefix (default: name of SRC)')
    parser.add_argument('--max-count', type=int, default=1000, help='maximum samples per shard (default 1000)')
    parser.add_argument('--workers', type=int, default=os.cpu_count() or 1, help='parallel writer processes')
    parser.add_argument('--seed', type=int, default=0, help='seed of the sample shuffle')
    parser.add_argument('--class-map', help='class map file, one class name per line (default: sorted folders)')
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command line entry point."""
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    args = _parse_args(argv)
    try:
        info = make_shards(
            args.src, args.out, splits=args.splits, prefix=args.prefix, max_count=args.max_count,
            workers=args.workers, seed=args.seed, class_map=args.class_map, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f'make_shards: error: {exc}') from exc
    _logger.info('done: %s', info)


if __name__ == '__main__':
    main(sys.argv[1:])

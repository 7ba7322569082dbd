"""Command line: write an ImageFolder tree as WebDataset shards with timm's ``_info.json``.

``python -m esam_timm.data.make_shards SRC OUT [--splits train=train validation=val] ...``; the writer
itself is :mod:`esam_timm.data.shards` (kept apart so that ``-m`` runs this module exactly once).
"""
import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from .shards import make_shards

_logger = logging.getLogger(__name__)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python -m esam_timm.data.make_shards',
        description='Write an ImageFolder tree as shuffled WebDataset shards with timm\'s _info.json.')
    parser.add_argument('src', help='folder holding split folders (train/, val/), each with one folder per class')
    parser.add_argument('out', help='output folder for the shards, _info.json and class_map.txt')
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
    info = make_shards(
        args.src, args.out, splits=args.splits, prefix=args.prefix, max_count=args.max_count,
        workers=args.workers, seed=args.seed, class_map=args.class_map, progress=not args.no_progress)
    _logger.info('done: %s', info)


if __name__ == '__main__':
    main(sys.argv[1:])

#!/usr/bin/env python3
"""Train a timm model with ESAM (or SAM, or any timm optimizer): timm's train.py flags plus ESAM's.

    python train_esam.py -c configs/demo.yaml                       # CPU demo on built-in shards
    python train_esam.py -c configs/imagenet_resnet50_esam.yaml --data-dir /data/imagenet-wds
    torchrun --nproc_per_node 8 train_esam.py -c configs/imagenet_resnet50_esam.yaml --data-dir ...

See docs/training.md. The logic lives in esam_timm.train; this script only parses, builds and runs.
A run that cannot start (bad data, paths, checkpoint, labels beyond --num-classes) ends with one line and
exit code 2, as a bad flag;
a run that meets more unreadable data than --max-bad-fraction allows ends with one line and code 1.
"""
import sys

from esam_timm.data import BadDataError, LabelRangeError
from esam_timm.train import SetupError, parse_args, setup_logging, train


def main() -> None:
    setup_logging()
    args, args_text = parse_args()
    try:
        train(args, args_text)
    except (SetupError, LabelRangeError) as e:
        sys.stderr.write(f'train_esam.py: error: {e}\n')
        sys.exit(2)
    except BadDataError as e:
        sys.stderr.write(f'train_esam.py: error: {e}\n')
        sys.exit(1)


if __name__ == '__main__':
    main()

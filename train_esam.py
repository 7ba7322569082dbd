#!/usr/bin/env python3
"""Train a timm model with ESAM (or SAM, or any timm optimizer): timm's train.py flags plus ESAM's.

    python train_esam.py -c configs/demo.yaml                       # CPU demo on built-in shards
    python train_esam.py -c configs/imagenet_resnet50_esam.yaml --data-dir /data/imagenet-wds
    torchrun --nproc_per_node 8 train_esam.py -c configs/imagenet_resnet50_esam.yaml --data-dir ...

See docs/training.md. The logic lives in esam_timm.train; this script only parses, builds and runs.
"""
from esam_timm.train import parse_args, setup_logging, train


def main() -> None:
    args, args_text = parse_args()
    setup_logging()
    train(args, args_text)


if __name__ == '__main__':
    main()

#!/usr/bin/env python3
"""Train a timm model with ESAM (or SAM, or any timm optimizer): timm's train.py flags plus ESAM's.

    python train_esam.py -c configs/demo.yaml                       # CPU demo on built-in shards
    python train_esam.py -c configs/imagenet_resnet50_esam.yaml --data-dir /data/imagenet-wds
    torchrun --nproc_per_node 8 train_esam.py -c configs/imagenet_resnet50_esam.yaml --data-dir ...

See docs/training.md. The logic lives in esam_timm.train; this script only parses, builds and runs.
Every way a run ends early is one message on stderr and an exit code:
  2    the run cannot start (bad flag, data, paths, checkpoint, labels beyond --num-classes);
  1    it failed on the way: more unreadable data than --max-bad-fraction, a data pipeline that cannot
       go on (out of memory, a CUDA fault, a broken decoder), divergence (non-finite loss or weights),
       a full disk;
  128 + signal (130, 143)    SIGINT/SIGTERM stopped it after writing a checkpoint; the message holds
       the command that resumes it (130 also for a Ctrl-C during setup or shutdown, at once).
"""
import sys

from esam_timm.console import setup_logging
from esam_timm.data import BadDataError, DataPipelineError, LabelRangeError
from esam_timm.fileio import DiskFullError
from esam_timm.train import DivergedError, SetupError, TrainingStopped, parse_args, train


def main() -> None:
    setup_logging()
    args, args_text = parse_args()
    try:
        train(args, args_text)
    except (SetupError, LabelRangeError) as e:
        sys.stderr.write(f'train_esam.py: error: {e}\n')
        sys.exit(2)
    except (BadDataError, DataPipelineError, DivergedError, DiskFullError) as e:
        sys.stderr.write(f'train_esam.py: error: {e}\n')
        sys.exit(1)
    except TrainingStopped as e:
        sys.stderr.write(f'train_esam.py: {e}\n')
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C during setup or shutdown (the trainer handles it while it trains)
        sys.stderr.write('train_esam.py: interrupted (SIGINT) during setup or shutdown; checkpoints already '
                         'written are intact\n')
        sys.exit(130)


if __name__ == '__main__':
    main()

"""Data layer: the backend seam (:mod:`.backends`: ``--dataset`` -> splits, class count, loaders), WebDataset
sources and loaders with per-epoch bad-data reports, fast CPU and GPU decode, device prefetcher, shard
writer, demo."""
from .backends import (BACKENDS, DECODES, Augmentation, DataBackend, ImageConfig, Loader, LoaderConfig, Split,
                       backend_for, open_data)
from .bad_data import (BadDataError, DataPipelineError, DataReport, check_bad_fraction, is_resource_failure,
                       reduce_data_report)
from .demo import make_demo_dataset
from .prefetch import DevicePrefetcher, LabelRangeError
from .shards import ShardRecord, make_shards, write_info, write_split
from .sources import INFO_NAME, ShardSource, has_info, num_classes_from_info, read_info, resolve_source
from .wds import WdsLoader, create_train_loader, create_val_loader

__all__ = [
    'BACKENDS', 'DECODES', 'Augmentation', 'BadDataError', 'DataBackend', 'DataPipelineError', 'DataReport',
    'DevicePrefetcher', 'INFO_NAME', 'ImageConfig', 'LabelRangeError', 'Loader', 'LoaderConfig', 'ShardRecord',
    'ShardSource', 'Split', 'WdsLoader', 'backend_for', 'check_bad_fraction', 'create_train_loader',
    'create_val_loader', 'has_info', 'is_resource_failure', 'make_demo_dataset', 'make_shards',
    'num_classes_from_info', 'open_data', 'read_info', 'reduce_data_report', 'resolve_source', 'write_info',
    'write_split',
]

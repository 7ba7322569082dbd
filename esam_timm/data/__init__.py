"""Data layer: WebDataset sources, loaders with per-epoch bad-data reports, device prefetcher, shard writer, demo."""
from .demo import make_demo_dataset
from .prefetch import DevicePrefetcher, LabelRangeError
from .report import BadDataError, DataReport, check_bad_fraction, reduce_data_report
from .shards import ShardRecord, make_shards, write_info, write_split
from .sources import INFO_NAME, ShardSource, has_info, num_classes_from_info, read_info, resolve_source
from .wds import WdsLoader, create_train_loader, create_val_loader

__all__ = [
    'BadDataError', 'DataReport', 'DevicePrefetcher', 'INFO_NAME', 'LabelRangeError', 'ShardRecord', 'ShardSource', 'WdsLoader',
    'check_bad_fraction', 'create_train_loader', 'create_val_loader', 'has_info', 'make_demo_dataset',
    'make_shards', 'num_classes_from_info', 'read_info', 'reduce_data_report', 'resolve_source', 'write_info',
    'write_split',
]

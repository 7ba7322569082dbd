"""Data layer: WebDataset sources and loaders, the device-side prefetcher, shard writer, demo data."""
from .demo import make_demo_dataset
from .loader import DevicePrefetcher
from .shards import ShardRecord, make_shards, write_info, write_split
from .wds import (
    DataStats,
    ShardSource,
    WdsLoader,
    all_reduce_sums,
    create_train_loader,
    create_val_loader,
    resolve_source,
)

__all__ = [
    'DataStats', 'DevicePrefetcher', 'ShardRecord', 'ShardSource', 'WdsLoader', 'all_reduce_sums',
    'create_train_loader', 'create_val_loader', 'make_demo_dataset', 'make_shards', 'resolve_source',
    'write_info', 'write_split',
]

"""Amazon Kinesis Data Streams as a Spark streaming source (botocore-based).

:mod:`offsets` (per-shard positions, the checkpointed JSON), :mod:`shards`
(lineage across splits and merges), :mod:`client` (the botocore calls) and
:mod:`source` (the Spark Python data source).
"""

from cloud.engine.kinesis.source import (
    SCHEMA,
    SOURCE_NAME,
    KinesisDataSource,
    OptionError,
    SourceOptions,
    lag_from_progress,
)

__all__ = [
    "SCHEMA",
    "SOURCE_NAME",
    "KinesisDataSource",
    "OptionError",
    "SourceOptions",
    "lag_from_progress",
]

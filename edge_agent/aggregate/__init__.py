"""Pre-aggregation: sum flow records per key per time window.

The relay ships :data:`AGG_DTYPE` rows, not raw records; see
:mod:`edge_agent.aggregate.schema` for the row and
:mod:`edge_agent.aggregate.window` for the windowing rules.
"""

from edge_agent.aggregate.reduce import group_by_words, order_by_addresses, reduce_rows
from edge_agent.aggregate.schema import (
    AGG_COLUMNS,
    AGG_DTYPE,
    KEY_FIELDS,
    concat_rows,
    empty_rows,
    to_aggregate_rows,
)
from edge_agent.aggregate.window import (
    AggregatedWindow,
    AggregateStats,
    Aggregator,
    FlushReason,
)

__all__ = [
    "AGG_COLUMNS",
    "AGG_DTYPE",
    "KEY_FIELDS",
    "AggregateStats",
    "AggregatedWindow",
    "Aggregator",
    "FlushReason",
    "concat_rows",
    "empty_rows",
    "group_by_words",
    "order_by_addresses",
    "reduce_rows",
    "to_aggregate_rows",
]

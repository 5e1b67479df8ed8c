"""The relay's shipper: spooled batches to Amazon Kinesis Data Streams.

See :mod:`edge_agent.ship.kinesis` for the delivery, retry and ordering
contract and :mod:`edge_agent.ship.config` for endpoints and partitions.
"""

from edge_agent.ship.backoff import Backoff
from edge_agent.ship.config import (
    KINESIS_MAX_BYTES_PER_CALL,
    KINESIS_MAX_RECORD_BYTES,
    KINESIS_MAX_RECORDS_PER_CALL,
    ShipperConfig,
    ShipperConfigError,
    make_kinesis_client,
)
from edge_agent.ship.kinesis import THROTTLING_CODES, KinesisShipper, ShipperStats
from edge_agent.ship.plan import CallPlan, plan_call, record_bytes

__all__ = [
    "KINESIS_MAX_BYTES_PER_CALL",
    "KINESIS_MAX_RECORDS_PER_CALL",
    "KINESIS_MAX_RECORD_BYTES",
    "THROTTLING_CODES",
    "Backoff",
    "CallPlan",
    "KinesisShipper",
    "ShipperConfig",
    "ShipperConfigError",
    "ShipperStats",
    "make_kinesis_client",
    "plan_call",
    "record_bytes",
]

"""Per-micro-batch engine metrics to Amazon CloudWatch (boto3).

:class:`CloudWatchPublisher` has the engine's ``MetricsPublisher`` shape
(``publish_batch(micro_batch, values)``, ``publish_lag(millis)``, see
:mod:`cloud.engine.metrics`) without importing it, so it needs no Spark.
Every datum carries the dimensions ``Engine`` and ``Query``.

Metrics (namespace ``Sampleflow/Engine`` by default):

======================  ============  ==========================================
name                    unit          from
======================  ============  ==========================================
``MicroBatchDuration``  Milliseconds  ``total_ms``: the micro-batch's running time
``InputRows``           Count         ``records``: Kinesis records read
``MillisBehindLatest``  Milliseconds  the largest lag over the source's shards
``InvalidRecords``      Count         ``invalid``: summed over error kinds
(other counters)        Count or ms   each numeric field, CamelCase; a name
                                      ending ``_ms`` becomes ``...Duration``
======================  ============  ==========================================

Publishing never raises into the engine: a failed ``PutMetricData`` is
logged (warning, then one line per 100 failures) and counted in
:attr:`CloudWatchPublisher.failures`; that micro-batch's figures are lost to
CloudWatch but stay in the engine's log line.
"""

from __future__ import annotations

import collections
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import botocore.exceptions
import structlog

log = structlog.get_logger(__name__)

DEFAULT_NAMESPACE = "Sampleflow/Engine"
#: PutMetricData accepts at most 1,000 data per request.
_MAX_DATA_PER_CALL = 1000
_LOG_EVERY_FAILURES = 100

#: Engine counter -> (metric name, unit) where the generic rule is not wanted.
_NAMED: dict[str, tuple[str, str]] = {
    "total_ms": ("MicroBatchDuration", "Milliseconds"),
    "records": ("InputRows", "Count"),
    "invalid": ("InvalidRecords", "Count"),
    "flows": ("InputFlows", "Count"),
}


def metric_for(field: str) -> tuple[str, str]:
    """The CloudWatch (name, unit) of an engine counter field."""
    if field in _NAMED:
        return _NAMED[field]
    if field.endswith("_ms"):
        return _camel(field[: -len("_ms")]) + "Duration", "Milliseconds"
    return _camel(field), "Count"


def _camel(snake: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in snake.split("_"))


class CloudWatchPublisher:
    """Publishes engine figures with ``PutMetricData``.

    ``client`` is a boto3 CloudWatch client (``endpoint_url`` for a local
    server); ``engine`` and ``query`` are the dimension values.  Inert
    until used.
    """

    def __init__(
        self,
        client: Any,
        engine: str,
        query: str,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.dimensions = [
            {"Name": "Engine", "Value": engine},
            {"Name": "Query", "Value": query},
        ]
        #: Failed PutMetricData calls by error code.
        self.failures: collections.Counter[str] = collections.Counter()
        self.published = 0

    def publish_micro_batch(
        self,
        *,
        duration_ms: float,
        input_rows: int,
        millis_behind_latest: int | None = None,
        timestamp: dt.datetime | None = None,
    ) -> bool:
        """Publish the three headline figures of one micro-batch."""
        values: dict[str, float] = {"total_ms": duration_ms, "records": input_rows}
        data = self._data(values, timestamp)
        if millis_behind_latest is not None:
            data += self._lag_data(millis_behind_latest, timestamp)
        return self._put(data)

    def publish_batch(self, micro_batch: int, values: Mapping[str, Any]) -> None:
        """The engine protocol: every numeric field of the micro-batch report
        (``invalid``, a mapping of error kind to count, as its sum)."""
        self._put(self._data(values, None))

    def publish_lag(self, millis_behind_latest: Mapping[str, int]) -> None:
        """The engine protocol: the largest lag over the shards (0 if none)."""
        worst = max(millis_behind_latest.values(), default=0)
        self._put(self._lag_data(worst, None))

    def _data(
        self, values: Mapping[str, Any], timestamp: dt.datetime | None
    ) -> list[dict[str, Any]]:
        at = timestamp or dt.datetime.now(dt.UTC)
        data = []
        for field, raw in values.items():
            value = raw
            if isinstance(raw, Mapping):
                value = sum(v for v in raw.values() if isinstance(v, int | float))
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            name, unit = metric_for(field)
            data.append(self._datum(name, unit, float(value), at))
        return data

    def _lag_data(
        self, millis: int, timestamp: dt.datetime | None
    ) -> list[dict[str, Any]]:
        at = timestamp or dt.datetime.now(dt.UTC)
        return [self._datum("MillisBehindLatest", "Milliseconds", float(millis), at)]

    def _datum(
        self, name: str, unit: str, value: float, at: dt.datetime
    ) -> dict[str, Any]:
        return {
            "MetricName": name,
            "Dimensions": self.dimensions,
            "Timestamp": at,
            "Value": value,
            "Unit": unit,
        }

    def _put(self, data: Sequence[dict[str, Any]]) -> bool:
        ok = True
        for lo in range(0, len(data), _MAX_DATA_PER_CALL):
            chunk = list(data[lo : lo + _MAX_DATA_PER_CALL])
            try:
                self.client.put_metric_data(Namespace=self.namespace, MetricData=chunk)
                self.published += len(chunk)
            except botocore.exceptions.ClientError as exc:
                ok = False
                self._failed(exc.response["Error"]["Code"], exc)
            except botocore.exceptions.BotoCoreError as exc:
                ok = False
                self._failed(type(exc).__name__, exc)
        return ok

    def _failed(self, code: str, exc: Exception) -> None:
        self.failures[code] += 1
        total = sum(self.failures.values())
        if total == 1 or total % _LOG_EVERY_FAILURES == 0:
            log.warning(
                "cloudwatch_put_failed",
                namespace=self.namespace,
                code=code,
                failures=total,
                error=str(exc),
            )

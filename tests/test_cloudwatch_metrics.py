"""Engine metrics to CloudWatch, read back from MiniStack over HTTP."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.config
import pytest

from cloud.store.metrics import DEFAULT_NAMESPACE, CloudWatchPublisher, metric_for
from tests.servers import MiniStack, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def cloudwatch(ministack: MiniStack) -> Iterator[Any]:
    client = boto3.client(
        "cloudwatch", endpoint_url=ministack.endpoint_url, region_name="us-east-1"
    )
    try:
        yield client
    finally:
        client.close()


def _query_name() -> str:
    return f"q-{time.monotonic_ns()}"


def _stats(
    client: Any, query: str, name: str, at: dt.datetime, unit: str
) -> dict[str, float]:
    """One 5-minute datapoint around ``at`` for the metric of this query."""
    points = client.get_metric_statistics(
        Namespace=DEFAULT_NAMESPACE,
        MetricName=name,
        Dimensions=[
            {"Name": "Engine", "Value": "eng-1"},
            {"Name": "Query", "Value": query},
        ],
        StartTime=at - dt.timedelta(minutes=5),
        EndTime=at + dt.timedelta(minutes=5),
        Period=600,
        Statistics=["Sum", "Maximum", "SampleCount"],
        Unit=unit,
    )["Datapoints"]
    assert len(points) == 1, points
    return {k: points[0][k] for k in ("Sum", "Maximum", "SampleCount")}


def test_micro_batch_figures_read_back(cloudwatch: Any) -> None:
    """Running time, input rows and lag of two micro-batches come back as
    their sums, maxima and counts, with the Engine/Query dimensions."""
    query = _query_name()
    pub = CloudWatchPublisher(cloudwatch, engine="eng-1", query=query)
    at = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
    assert pub.publish_micro_batch(
        duration_ms=1200.0, input_rows=5000, millis_behind_latest=0, timestamp=at
    )
    assert pub.publish_micro_batch(
        duration_ms=800.0, input_rows=3000, millis_behind_latest=1500, timestamp=at
    )
    assert _stats(cloudwatch, query, "InputRows", at, "Count") == {
        "Sum": 8000.0,
        "Maximum": 5000.0,
        "SampleCount": 2.0,
    }
    assert _stats(cloudwatch, query, "MicroBatchDuration", at, "Milliseconds") == {
        "Sum": 2000.0,
        "Maximum": 1200.0,
        "SampleCount": 2.0,
    }
    lag = _stats(cloudwatch, query, "MillisBehindLatest", at, "Milliseconds")
    assert lag["Maximum"] == 1500.0
    listed = cloudwatch.list_metrics(
        Namespace=DEFAULT_NAMESPACE,
        Dimensions=[{"Name": "Query", "Value": query}],
    )["Metrics"]
    assert {m["MetricName"] for m in listed} == {
        "InputRows",
        "MicroBatchDuration",
        "MillisBehindLatest",
    }
    assert pub.published == 6
    assert not pub.failures


def test_engine_report_fields_become_metrics(cloudwatch: Any) -> None:
    """publish_batch turns every numeric report field into a metric; invalid
    records by kind are summed; publish_lag sends the worst shard's lag."""
    query = _query_name()
    pub = CloudWatchPublisher(cloudwatch, engine="eng-1", query=query)
    report = {
        "records": 40,
        "batches_accepted": 38,
        "duplicates_across": 2,
        "invalid": {"bad_magic": 2, "truncated": 3},
        "flows": 123_456,
        "decode_ms": 350.5,
        "total_ms": 910.0,
    }
    at = dt.datetime.now(dt.UTC)
    pub.publish_batch(7, report)
    pub.publish_lag({"shardId-000": 10, "shardId-001": 250})
    assert _stats(cloudwatch, query, "InvalidRecords", at, "Count")["Sum"] == 5.0
    assert _stats(cloudwatch, query, "InputFlows", at, "Count")["Sum"] == 123_456.0
    assert _stats(cloudwatch, query, "BatchesAccepted", at, "Count")["Sum"] == 38.0
    assert (
        _stats(cloudwatch, query, "DecodeDuration", at, "Milliseconds")["Sum"] == 350.5
    )
    assert (
        _stats(cloudwatch, query, "MillisBehindLatest", at, "Milliseconds")["Maximum"]
        == 250.0
    )


def test_unreachable_cloudwatch_is_counted_not_raised() -> None:
    """Nothing listening: the publisher returns False and counts the failure;
    the engine keeps running."""
    client = boto3.client(
        "cloudwatch",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        region_name="us-east-1",
        config=botocore.config.Config(
            retries={"max_attempts": 1}, connect_timeout=0.5, read_timeout=0.5
        ),
    )
    pub = CloudWatchPublisher(client, engine="eng-1", query="q")
    assert pub.publish_micro_batch(duration_ms=1.0, input_rows=1) is False
    pub.publish_lag({"s": 1})
    assert sum(pub.failures.values()) == 2
    assert pub.published == 0


def test_metric_names_and_units() -> None:
    """Report fields map to the documented CloudWatch names and units."""
    assert metric_for("total_ms") == ("MicroBatchDuration", "Milliseconds")
    assert metric_for("records") == ("InputRows", "Count")
    assert metric_for("store_ms") == ("StoreDuration", "Milliseconds")
    assert metric_for("late_partials") == ("LatePartials", "Count")

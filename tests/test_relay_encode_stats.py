"""When the relay counts a window as encoded (``windows_encoded_total``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from edge_agent.aggregate import AGG_DTYPE, AggregatedWindow, FlushReason
from edge_agent.flows.schema import address_bytes
from edge_agent.relay.config import load_settings
from edge_agent.relay.pipeline import RelayPipeline
from edge_agent.wire import EncodedBatch


def test_a_window_counts_as_encoded_once_its_batches_are_spooled(
    tmp_path: Path,
) -> None:
    """A window of three exporters' rows goes out as three batches; while
    each is being spooled the window is not yet counted as encoded, and
    once encode_window returns it is, with all three in the spool (so a
    reader seeing every window encoded and the spool empty has seen every
    batch shipped)."""
    settings = load_settings(
        None,
        {
            "SAMPLEFLOW_RELAY_TENANT_ID": "acme",
            "SAMPLEFLOW_RELAY_RELAY_ID": "edge-1",
            "SAMPLEFLOW_RELAY_STATE_DIR": str(tmp_path / "state"),
            "SAMPLEFLOW_COLLECTOR_LISTEN_ADDRESSES": "127.0.0.1",
            "SAMPLEFLOW_COLLECTOR_PORTS": "0",
            "SAMPLEFLOW_KINESIS_REGION": "us-east-1",
            # nothing listens there: the batches stay in the spool
            "SAMPLEFLOW_KINESIS_ENDPOINT_URL": "http://127.0.0.1:9",
            "SAMPLEFLOW_METRICS_ENABLED": "false",
            "SAMPLEFLOW_FILTER_ENABLED": "false",
        },
    )
    pipeline = RelayPipeline(settings)
    rows = np.zeros(6, dtype=AGG_DTYPE)
    exporters = ["192.0.2.1"] * 2 + ["192.0.2.2"] * 2 + ["192.0.2.3"] * 2
    rows["exporter"] = [np.void(address_bytes(a)) for a in exporters]
    rows["src_port"] = np.arange(6)
    rows["flow_count"] = 1
    window = AggregatedWindow(0, 10_000, rows, FlushReason.CLOSED)
    seen: list[tuple[int, int]] = []  # (windows counted, batches spooled)
    spool_one = pipeline._spool

    def spool_and_look(batch: EncodedBatch) -> None:
        seen.append((pipeline.encode_stats.windows, pipeline.encode_stats.spooled))
        spool_one(batch)

    pipeline._spool = spool_and_look  # type: ignore[method-assign]

    async def scenario() -> None:
        await pipeline.start()
        try:
            await asyncio.to_thread(pipeline.encode_window, window)
            assert pipeline.encode_stats.windows == 1
            assert pipeline.encode_stats.spooled == 3
        finally:
            await pipeline.stop()

    asyncio.run(scenario())
    assert seen == [(0, 0), (0, 1), (0, 2)]

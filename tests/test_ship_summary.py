"""The shipper's ``ship_summary`` line at stop, against a real MiniStack."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from edge_agent.ship import KinesisShipper, ShipperConfig
from edge_agent.spool import Spool, SpooledBatch
from tests.servers import MiniStack, create_stream, kinesis_client


async def _ship_all_then_stop(shipper: KinesisShipper, spool: Spool) -> None:
    task = asyncio.create_task(shipper.run())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120.0  # only catches a hang
    try:
        while spool.stats.count:
            if task.done():
                task.result()
                raise AssertionError("shipper stopped on its own")
            if loop.time() > deadline:
                raise AssertionError(f"hung: {shipper.stats}")
            await asyncio.sleep(0.02)
    finally:
        await shipper.stop()
        await task


@pytest.mark.integration
def test_stop_logs_one_ship_summary_with_the_batches_shipped(
    ministack: MiniStack, tmp_path: Path
) -> None:
    """Five batches shipped by run(), then stop(): exactly one ship_summary
    line, and it counts the five batches (the summary loop, woken by the
    stop, no longer logs a second one next to run()'s last)."""
    client = kinesis_client(ministack.endpoint_url)
    try:
        create_stream(client, "summary-once", 1)
    finally:
        client.close()
    config = ShipperConfig(
        stream_name="summary-once",
        endpoint_url=ministack.endpoint_url,
        region="us-east-1",
        idle_poll_s=0.05,
        summary_interval_s=3600.0,
    )
    with Spool(tmp_path / "spool") as spool:
        for i in range(5):
            spool.append(
                SpooledBatch(f"b-{i}", "key", b"x" * (100 + i), spool.next_seq())
            )
        shipper = KinesisShipper(spool, config)
        with capture_logs() as logs:
            asyncio.run(_ship_all_then_stop(shipper, spool))
    summaries = [e for e in logs if e["event"] == "ship_summary"]
    assert len(summaries) == 1, summaries
    assert summaries[0]["batches"] == 5
    assert summaries[0]["bytes"] == sum(100 + i for i in range(5))
    assert summaries[0]["spool_count"] == 0

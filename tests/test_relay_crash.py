"""kill -9 of a relay that is spooling and shipping: nothing accepted is lost.

The relay here is a small script around the real Spool and KinesisShipper
(until ``sampleflow relay run`` is wired, this stands in for it): it
appends batches continuously, printing each batch id once ``append``
returned (the batch is then accepted), while its shipper sends to
MiniStack through the fault proxy.  The test SIGKILLs it at random points
several times, restarts it on the same spool, finally lets it drain, and
reads the stream back.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge_agent.spool import Spool
from tests.faultproxy import PTEE, Action, FailRecords, FaultProxy, Pass
from tests.servers import MiniStack, create_stream, kinesis_client, read_all_records

PROJECT_ROOT = Path(__file__).resolve().parents[1]

_RELAY = textwrap.dedent(
    """
    import asyncio
    import random
    import sys
    from pathlib import Path

    import structlog

    from edge_agent.ship import KinesisShipper, ShipperConfig
    from edge_agent.spool import Spool, SpooledBatch

    # stdout carries accepted batch ids only.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    spool_dir, endpoint, stream, run, mode = sys.argv[1:6]

    async def main() -> None:
        spool = Spool(Path(spool_dir))
        shipper = KinesisShipper(
            spool,
            ShipperConfig(
                stream_name=stream,
                endpoint_url=endpoint,
                region="us-east-1",
                backoff_base_s=0.01,
                backoff_max_s=0.1,
                idle_poll_s=0.02,
            ),
        )
        task = asyncio.create_task(shipper.run())
        if mode == "drain":
            while spool.stats.count:
                await asyncio.sleep(0.02)
            await shipper.stop()
            await task
            print("drained", flush=True)
            return
        rng = random.Random(run)
        i = 0
        while True:
            i += 1
            seq = spool.next_seq()
            batch_id = f"{run}-{i}"
            body = rng.randbytes(rng.randint(100, 3000))
            payload = f"{batch_id}|{seq}|".encode() + body
            key = f"exporter-{rng.randint(1, 3)}"
            batch = SpooledBatch(batch_id, key, payload, seq)
            await asyncio.to_thread(spool.append, batch)
            print(batch_id, flush=True)
            shipper.notify()
            await asyncio.sleep(rng.random() * 0.005)

    asyncio.run(main())
    """
)


def _start_relay(
    script: Path, spool_dir: Path, *, endpoint: str, stream: str, run: str, mode: str
) -> subprocess.Popen[str]:
    with (script.parent / f"relay-{run}.log").open("w") as log:
        return subprocess.Popen(
            [sys.executable, str(script), str(spool_dir), endpoint, stream, run, mode],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=PROJECT_ROOT,
            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        )


def _log_tail(script: Path, run: str) -> str:
    lines = (script.parent / f"relay-{run}.log").read_text().splitlines()
    return "\n".join(lines[-30:])


def _faults(n: int) -> Action:
    # Some partial failures so kills also land between a failure and its retry.
    return FailRecords((None, PTEE)) if random.Random(n).random() < 0.2 else Pass()


@pytest.mark.integration
@pytest.mark.slow
def test_sigkill_mid_ship_loses_no_accepted_batch(
    ministack: MiniStack, tmp_path: Path
) -> None:
    """Six SIGKILLs at random points; afterwards every accepted batch is in the stream.

    Also: no spool file is damaged by a kill, and per exporter the first
    arrival of each batch follows its seq (duplicates of batches in flight
    at a kill may come later).
    """
    rng = random.Random(2024)
    stream = "crash"
    client = kinesis_client(ministack.endpoint_url)
    try:
        create_stream(client, stream, 2)
    finally:
        client.close()
    script = tmp_path / "relay.py"
    script.write_text(_RELAY)
    spool_dir = tmp_path / "spool"
    accepted: list[str] = []
    with FaultProxy(ministack.endpoint_url, _faults) as proxy:
        for run in range(6):
            relay = _start_relay(
                script,
                spool_dir,
                endpoint=proxy.endpoint_url,
                stream=stream,
                run=f"r{run}",
                mode="produce",
            )
            assert relay.stdout is not None
            # The kill point: after a random number of accepted batches, so
            # it falls anywhere in append, PutRecords or ack.
            for _ in range(rng.randint(5, 120)):
                line = relay.stdout.readline()
                assert line, f"relay r{run} exited:\n{_log_tail(script, f'r{run}')}"
                accepted.append(line.strip())
            relay.send_signal(signal.SIGKILL)
            accepted.extend(line.strip() for line in relay.stdout)
            relay.stdout.close()
            assert relay.wait(30) == -signal.SIGKILL
        drain = _start_relay(
            script,
            spool_dir,
            endpoint=proxy.endpoint_url,
            stream=stream,
            run="final",
            mode="drain",
        )
        out, _ = drain.communicate(timeout=300)
        assert drain.returncode == 0, _log_tail(script, "final")
        assert out.strip() == "drained"

    client = kinesis_client(ministack.endpoint_url)
    try:
        records = read_all_records(client, stream)
    finally:
        client.close()
    arrived: dict[str, int] = {}
    first_arrivals: dict[str, list[int]] = {}
    for record in records:
        batch_id, seq, _ = record["Data"].split(b"|", 2)
        name = batch_id.decode()
        if name not in arrived:
            first_arrivals.setdefault(record["PartitionKey"], []).append(int(seq))
        arrived[name] = arrived.get(name, 0) + 1
    missing = [b for b in accepted if b not in arrived]
    assert not missing, f"{len(missing)} accepted batches lost: {missing[:10]}"
    for key, seqs in first_arrivals.items():
        assert seqs == sorted(seqs), key
    with Spool(spool_dir) as spool:
        assert spool.stats.count == 0
        assert spool.stats.corrupt_total == 0
    assert not list((spool_dir / "corrupt").iterdir())

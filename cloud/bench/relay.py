"""``sampleflow bench relay``: the real relay's throughput, loss and memory.

What runs, all on loopback:

* MiniStack, the local AWS server, started from the local stack's own
  part definition (:meth:`cloud.local.stack.LocalStack.parts`), unless
  ``--endpoint-url`` names a running Kinesis (``sampleflow local up``'s);
* the relay, ``sampleflow relay run`` as a child process pinned to one
  core (``os.sched_setaffinity`` before it execs, so every thread it starts
  stays there), with its default filter and a short aggregation window;
* a sender process on another core replaying real capture payloads
  (:mod:`cloud.bench.streams`: NetFlow v5, v9 and IPFIX, sequence numbers
  and export times rewritten) at ``--rate`` flow records per second for
  ``--seconds``;
* before the relay, the peer (:mod:`cloud.bench.peer`): a bare asyncio-dgram
  loop that only counts datagrams, on the relay's core, fed by the same
  sender at the same rate.

Once the sender is done the benchmark waits until the relay has decoded
every datagram it received, reads the kernel's drop count of its socket
(``/proc/PID/net/udp``) and its CPU time (``/proc/PID/stat``), then waits
until every window is closed, encoded, spooled and acknowledged by Kinesis
(spool empty), reads the relay's peak RSS (``VmHWM`` in
``/proc/PID/status``), stops it, and reads the stream back to check that
the flow counts shipped equal the records decoded.

Loss is counted where it happens: the kernel (socket buffer full), the
collector's queue (``queue_full``), the decoder (errors by reason, and the
records the rewritten sequence numbers say are missing), the encoder and
the spool.  Targets: at least 200,000 flow records/s with no loss in the
relay, peak RSS under 150 MB.  Numbers from a shared machine are noisy;
the CPU figures (relay and peer CPU seconds per datagram) are steadier
than the rates.  Linux only (``/proc``, ``sched_setaffinity``).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cloud.bench.peer import run_peer, udp_socket_drops
from cloud.bench.sender import run_sender
from cloud.bench.streams import ExportStream
from cloud.local.settings import LocalSettings
from cloud.local.stack import LocalStack, log_tail, stop_process_group
from edge_agent.relay.commands import read_metrics
from edge_agent.wire import decode_batch

TARGET_RECORDS_PER_S = 200_000
TARGET_PEAK_RSS_MB = 150.0
_START_TIMEOUT_S = 60.0
#: Seconds between the relay answering and the sending (see the use).
WARM_UP_S = 3.0
#: Seconds between two samples of the relay's queues while sending.
SAMPLE_S = 0.5
_TENANT = "bench"
_RELAY_ID = "bench-relay"
_P = "sampleflow_relay_"

Metrics = dict[str, list[tuple[dict[str, str], float]]]


class RelayBenchError(RuntimeError):
    """The benchmark could not run (a part did not start, a timeout)."""


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _total(metrics: Metrics, name: str, **labels: str) -> float:
    return sum(
        v
        for lab, v in metrics.get(_P + name, [])
        if all(lab.get(k) == x for k, x in labels.items())
    )


def _by_label(metrics: Metrics, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for lab, v in metrics.get(_P + name, []):
        if v:
            out[lab.get(label, "")] = out.get(lab.get(label, ""), 0.0) + v
    return out


def _cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid``, seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _pinned(argv: list[str], core: int | None) -> list[str]:
    """``argv`` run by a trampoline that pins itself to ``core`` and execs
    it: the affinity is set before the program starts any thread."""
    if core is None:
        return argv
    code = (
        f"import os, sys; os.sched_setaffinity(0, {{{core}}}); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", code, *argv]


@dataclass
class MiniStackProcess:
    """MiniStack started from the local stack's part definition."""

    workdir: Path
    core: int | None = None
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    stack: LocalStack | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start and wait until healthy; raises RelayBenchError."""
        self.port = free_port()
        settings = LocalSettings(state_dir=self.workdir, ministack_port=self.port)
        self.stack = LocalStack(settings)
        [part] = [p for p in self.stack.parts() if p.name == "ministack"]
        if part.unavailable:
            raise RelayBenchError(f"ministack cannot run here: {part.unavailable}")
        part.cwd.mkdir(parents=True, exist_ok=True)
        log = self.workdir / "ministack.log"
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                _pinned(part.argv, self.core),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=part.cwd,
                env=self.stack.child_env(part.env),
                start_new_session=True,
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while part.health() is not None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RelayBenchError(f"ministack did not start:\n{log_tail(log)}")
            time.sleep(0.1)

    def kinesis(self) -> Any:
        """A Kinesis client for it."""
        assert self.stack is not None
        return self.stack.aws_client("kinesis")

    def stop(self) -> None:
        """Stop its process group."""
        if self.process is not None:
            stop_process_group(self.process.pid, 10.0, self.process)
            self.process = None


@dataclass(frozen=True)
class Plan:
    """What one benchmark run sends and how the relay is set up.

    ``rate`` in flow records/s, times in seconds; cores None: not pinned.
    """

    streams: list[ExportStream]
    rate: float
    seconds: float
    relay_core: int | None = None
    sender_core: int | None = None
    window_s: float = 2.0
    lateness_s: float = 1.0
    rcvbuf: int = 32 * 1024 * 1024
    ack_timeout_s: float = 300.0


@dataclass
class PeerResult:
    """The bare receive loop's figures at the same rate."""

    sent: dict[str, Any]
    received: int
    kernel_drops: int | None
    cpu_s: float
    rcvbuf: int


@dataclass
class RelayResult:
    """The relay's figures (see the module doc)."""

    sent: dict[str, Any]
    rate: float
    received: int  # datagrams the collector read
    decoded_datagrams: int
    records: int  # flow records decoded
    kernel_drops: int | None
    queue_full: int
    decode_errors: dict[str, float]
    estimated_lost: int  # per the sequence numbers
    other_drops: dict[str, float]  # encoder, spool, ...
    decode_s: float  # first datagram sent to last record decoded
    acked_s: float  # first datagram sent to spool empty
    cpu_s: float  # relay CPU from start of sending to all decoded
    peak_rss_kb: int | None
    rcvbuf: int
    batches_shipped: int
    bytes_shipped: int
    rows_out: int
    express_rows: int
    filter_model: str
    passthrough: dict[str, float]
    stream_records: int  # flow_count summed over the stream read back
    stream_batches: int
    log_path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def records_per_s(self) -> float:
        """Flow records decoded per second of sending: the rate sustained
        when nothing was lost (the relay caught up within ``lag_s``)."""
        seconds = float(self.sent["seconds"])
        return self.records / seconds if seconds else 0.0

    @property
    def lag_s(self) -> float:
        """Seconds from the last datagram sent to the last record decoded
        (includes the benchmark's polling, ~0.2 s)."""
        return max(0.0, self.decode_s - float(self.sent["seconds"]))

    @property
    def relay_loss(self) -> int:
        """Datagrams lost inside the relay (kernel buffer, queue, decoder)."""
        return (
            (self.kernel_drops or 0)
            + self.queue_full
            + int(self.received - self.queue_full - self.decoded_datagrams)
        )


def _relay_config(
    plan: Plan, workdir: Path, endpoint: str, stream: str, ports: tuple[int, int]
) -> Path:
    port, metrics_port = ports
    path = workdir / "relay.toml"
    path.write_text(
        "\n".join(
            [
                "[relay]",
                f'tenant_id = "{_TENANT}"',
                f'relay_id = "{_RELAY_ID}"',
                f"state_dir = {json.dumps(str(workdir / 'state'))}",
                "[collector]",
                'listen_addresses = ["127.0.0.1"]',
                f"ports = [{port}]",
                f"rcvbuf_bytes = {plan.rcvbuf}",
                "[aggregate]",
                f"window_s = {plan.window_s!r}",
                f"lateness_s = {plan.lateness_s!r}",
                "[kinesis]",
                f'stream_name = "{stream}"',
                'region = "us-east-1"',
                f'endpoint_url = "{endpoint}"',
                "[metrics]",
                'listen_address = "127.0.0.1"',
                f"port = {metrics_port}",
                "",
            ]
        )
    )
    return path


def _get_metrics(port: int) -> Metrics:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return read_metrics(resp.read().decode())


def _wait(
    check: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1
) -> float:
    """Wait until ``check()``; return the monotonic time it held."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise RelayBenchError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)


def _start_sender(ctx: Any, plan: Plan, port: int) -> tuple[Any, Any]:
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=run_sender,
        kwargs={
            "streams": plan.streams,
            "target": ("127.0.0.1", port),
            "rate": plan.rate,
            "seconds": plan.seconds,
            "core": plan.sender_core,
            "conn": child,
        },
        daemon=True,
    )
    proc.start()
    child.close()
    return proc, parent


def run_peer_round(plan: Plan) -> PeerResult:
    """The bare receive loop at the plan's rate (see :mod:`cloud.bench.peer`)."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port(socket.SOCK_DGRAM)
    stop = ctx.Event()
    parent, child = ctx.Pipe(duplex=False)
    peer = ctx.Process(
        target=run_peer,
        kwargs={
            "port": port,
            "rcvbuf": plan.rcvbuf,
            "core": plan.relay_core,
            "stop": stop,
            "conn": child,
        },
        daemon=True,
    )
    peer.start()
    child.close()
    try:
        if not parent.poll(_START_TIMEOUT_S):
            raise RelayBenchError("the peer did not start")
        ready = parent.recv()
        sender, results = _start_sender(ctx, plan, port)
        sent = results.recv()
        sender.join(10)
        time.sleep(0.5)  # let the peer read what is queued
        stop.set()
        if not parent.poll(30):
            raise RelayBenchError("the peer did not report")
        got = parent.recv()
    finally:
        stop.set()
        peer.join(10)
        if peer.is_alive():
            peer.kill()
    return PeerResult(
        sent=sent,
        received=int(got["datagrams"]),
        kernel_drops=got["kernel_drops"],
        cpu_s=float(got["cpu_s"]),
        rcvbuf=int(ready["rcvbuf"]),
    )


def run_relay_round(
    plan: Plan, workdir: Path, endpoint: str, kinesis: Any
) -> RelayResult:
    """One run of the real relay; see the module doc."""
    workdir.mkdir(parents=True, exist_ok=True)
    stream_name = f"bench-{int(plan.rate)}-{time.monotonic_ns() % 10**9}"
    kinesis.create_stream(StreamName=stream_name, ShardCount=2)
    _wait(
        lambda: (
            kinesis.describe_stream_summary(StreamName=stream_name)[
                "StreamDescriptionSummary"
            ]["StreamStatus"]
            == "ACTIVE"
        ),
        30,
        "the stream",
    )
    port = free_port(socket.SOCK_DGRAM)
    metrics_port = free_port()
    config = _relay_config(plan, workdir, endpoint, stream_name, (port, metrics_port))
    log_path = workdir / "relay.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMPLEFLOW_")}
    env.setdefault("AWS_ACCESS_KEY_ID", "local")
    env.setdefault("AWS_SECRET_ACCESS_KEY", "local")
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    argv = [sys.executable, "-m", "edge_agent.cli", "relay", "run"]
    with log_path.open("ab") as out:
        relay = subprocess.Popen(
            _pinned([*argv, "--config", str(config)], plan.relay_core),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        return _measure_relay(
            plan, relay, (port, metrics_port), (kinesis, stream_name), log_path
        )
    finally:
        if relay.poll() is None:
            stop_process_group(relay.pid, 30.0, relay)


def _measure_relay(
    plan: Plan,
    relay: subprocess.Popen[bytes],
    ports: tuple[int, int],
    stream: tuple[Any, str],
    log_path: Path,
) -> RelayResult:
    port, metrics_port = ports
    kinesis, stream_name = stream
    ack_timeout_s = plan.ack_timeout_s

    def healthy() -> bool:
        if relay.poll() is not None:
            raise RelayBenchError(
                f"the relay exited with {relay.returncode}:\n{log_tail(log_path)}"
            )
        try:
            _get_metrics(metrics_port)
        except (urllib.error.URLError, OSError):
            return False
        return True

    _wait(healthy, _START_TIMEOUT_S, "the relay to start")
    ctx = multiprocessing.get_context("spawn")
    # The shipper makes its boto3 client in the background after start-up
    # (~0.5 s of CPU): let that finish before the CPU clock starts.
    time.sleep(WARM_UP_S)
    cpu_before = _cpu_seconds(relay.pid)
    started = time.monotonic()
    sender, results = _start_sender(ctx, plan, port)
    peaks = _Peaks(relay.pid, metrics_port)
    while not results.poll(SAMPLE_S):
        peaks.sample()
    sent = results.recv()
    sender.join(10)
    state: dict[str, Any] = {}

    def all_decoded() -> bool:
        m = _get_metrics(metrics_port)
        received = _total(m, "datagrams_total")
        queue_full = _total(m, "dropped_total", stage="collector", reason="queue_full")
        decoded = _total(m, "exporter_datagrams_total")
        state["m"] = m
        return (
            decoded + queue_full >= received
            and _total(m, "collector_queued_datagrams") == 0
            and received >= state.get("last_received", -1)
            and _settled(state, received)
        )

    decoded_at = _wait(all_decoded, ack_timeout_s, "the relay to decode", 0.05)
    cpu_s = _cpu_seconds(relay.pid) - cpu_before
    kernel_drops = udp_socket_drops(port, relay.pid)
    m = state["m"]

    def all_acked() -> bool:
        now = _get_metrics(metrics_port)
        state["m"] = now
        return (
            _total(now, "aggregator_held_rows") == 0
            and _total(now, "windows_total") == _total(now, "windows_encoded_total")
            and _total(now, "spool_batches") == 0
            and _total(now, "batches_spooled_total") > 0
        )

    acked_at = _wait(all_acked, ack_timeout_s, "every batch to be acknowledged")

    def counted() -> bool:
        now = _get_metrics(metrics_port)
        state["m"] = now
        return _total(now, "batches_shipped_total") >= _total(
            now, "batches_spooled_total"
        )

    # The shipper acks a call's batches in the spool before it counts
    # them: read the counters once they have, or after a short grace (a
    # batch the spool dropped never gets counted).
    with contextlib.suppress(RelayBenchError):
        _wait(counted, 5.0, "the shipped counters")
    peaks.sample()
    peak = _status_kb(relay.pid, "VmHWM")
    final = state["m"]
    relay.send_signal(signal.SIGTERM)
    relay.wait(60)
    records_back, batches_back = _read_stream(kinesis, stream_name)
    models = [lab["version"] for lab, _ in final.get(_P + "filter_model_info", [])]
    return RelayResult(
        sent=sent,
        rate=plan.rate,
        received=int(_total(m, "datagrams_total")),
        decoded_datagrams=int(_total(m, "exporter_datagrams_total")),
        records=int(_total(m, "exporter_records_total")),
        kernel_drops=kernel_drops,
        queue_full=int(
            _total(m, "dropped_total", stage="collector", reason="queue_full")
        ),
        decode_errors=_by_label(m, "exporter_errors_total", "reason"),
        estimated_lost=int(_total(m, "exporter_estimated_lost_total")),
        other_drops={
            f"{lab['stage']}/{lab['reason']}": v
            for lab, v in final.get(_P + "dropped_total", [])
            if v and lab["stage"] not in ("collector", "decoder")
        },
        decode_s=decoded_at - started,
        acked_s=acked_at - started,
        cpu_s=cpu_s,
        peak_rss_kb=peak,
        rcvbuf=int(_total(m, "receive_buffer_bytes")),
        batches_shipped=int(_total(final, "batches_shipped_total")),
        bytes_shipped=int(_total(final, "bytes_shipped_total")),
        rows_out=int(_total(final, "records_out_total")),
        express_rows=int(_total(final, "filter_express_rows_total")),
        filter_model=models[0] if models else "none",
        passthrough=_by_label(final, "filter_passthrough_total", "reason"),
        stream_records=records_back,
        stream_batches=batches_back,
        log_path=str(log_path),
        extra={
            "peak_queued_datagrams": peaks.queued,
            "peak_held_rows": peaks.held_rows,
            "rss_mb_samples": peaks.rss_mb,
        },
    )


class _Peaks:
    """Samples, while the sender runs, the relay's collector queue, rows
    held by the aggregator and RSS (one metrics scrape each: ~1% of a
    core at :data:`SAMPLE_S`)."""

    def __init__(self, pid: int, metrics_port: int) -> None:
        self.pid = pid
        self.metrics_port = metrics_port
        self.queued = 0
        self.held_rows = 0
        self.rss_mb: list[float] = []

    def sample(self) -> None:
        try:
            m = _get_metrics(self.metrics_port)
        except (urllib.error.URLError, OSError):
            return
        self.queued = max(self.queued, int(_total(m, "collector_queued_datagrams")))
        self.held_rows = max(self.held_rows, int(_total(m, "aggregator_held_rows")))
        rss = _status_kb(self.pid, "VmRSS")
        if rss is not None:
            self.rss_mb.append(round(rss / 1024, 1))


def _settled(state: dict[str, Any], received: float) -> bool:
    """True once the received count has not moved for two polls (datagrams
    still in the kernel buffer keep it moving)."""
    same = state.get("last_received") == received
    state["stable"] = state.get("stable", 0) + 1 if same else 0
    state["last_received"] = received
    return bool(state["stable"] >= 2)


def _read_stream(kinesis: Any, stream_name: str) -> tuple[int, int]:
    """(flow_count summed, batches) over every record of the stream."""
    records = batches = 0
    shards = kinesis.list_shards(StreamName=stream_name)["Shards"]
    for shard in shards:
        iterator = kinesis.get_shard_iterator(
            StreamName=stream_name,
            ShardId=shard["ShardId"],
            ShardIteratorType="TRIM_HORIZON",
        )["ShardIterator"]
        while iterator:
            page = kinesis.get_records(ShardIterator=iterator, Limit=10000)
            for record in page["Records"]:
                batch = decode_batch(record["Data"])
                records += int(batch.columns["flow_count"].sum())
                batches += 1
            if not page["Records"] and page.get("MillisBehindLatest", 0) == 0:
                break
            iterator = page.get("NextShardIterator")
    return records, batches


def print_report(
    relay: RelayResult, peer: PeerResult | None, stream: TextIO
) -> list[tuple[str, bool]]:
    """The figures, the loss by where, the peer ratio and the targets;
    returns the targets printed as (label, passed)."""

    def line(label: str, value: str) -> None:
        print(f"{label:<34} {value}", file=stream)

    sent = relay.sent
    line("target rate", f"{relay.rate:,.0f} flow records/s")
    line(
        "sent",
        f"{sent['datagrams']:,} datagrams, {sent['records']:,} flow records in "
        f"{sent['seconds']:.2f} s ({sent['records'] / sent['seconds']:,.0f} rec/s)",
    )
    line(
        "relay received / decoded",
        f"{relay.received:,} / {relay.decoded_datagrams:,} datagrams, "
        f"{relay.records:,} flow records",
    )
    line(
        "relay throughput",
        f"{relay.records_per_s:,.0f} flow records/s decoded over the sending "
        f"time (last record decoded {relay.lag_s:.2f} s after the last sent)",
    )
    busy = relay.cpu_s / relay.decode_s if relay.decode_s else 0.0
    per_core = f"; ~{relay.records / relay.cpu_s:,.0f} rec/s per core"
    line(
        "relay CPU",
        f"{relay.cpu_s:.2f} s = {busy:.0%} of its core; "
        f"{relay.cpu_s / max(1, relay.received) * 1e6:.1f} us per datagram, "
        f"{relay.cpu_s / max(1, relay.records) * 1e6:.2f} us per record"
        + (per_core if relay.cpu_s else ""),
    )
    line("all acknowledged by Kinesis", f"after {relay.acked_s:.2f} s")
    print("loss, by where:", file=stream)
    line("  kernel socket buffer (drops)", _opt(relay.kernel_drops))
    line("  collector queue_full", f"{relay.queue_full:,}")
    line(
        "  decoder errors",
        ", ".join(f"{k} {v:.0f}" for k, v in relay.decode_errors.items()) or "none",
    )
    line("  missing per sequence numbers", f"{relay.estimated_lost:,}")
    line(
        "  encoder / spool",
        ", ".join(f"{k} {v:.0f}" for k, v in relay.other_drops.items()) or "none",
    )
    not_received = sent["datagrams"] - relay.received
    line("  sent but never read", f"{not_received:,} datagrams")
    line(
        "shipped",
        f"{relay.batches_shipped:,} batches, {relay.bytes_shipped:,} bytes, "
        f"{relay.rows_out:,} aggregated rows, {relay.express_rows:,} express",
    )
    line(
        "stream read back",
        f"{relay.stream_batches:,} batches, flow_count sum {relay.stream_records:,} "
        f"({'equals' if relay.stream_records == relay.records else 'DIFFERS FROM'} "
        "the records decoded)",
    )
    line("filter", relay.filter_model + (
        f", passed through: {relay.passthrough}" if relay.passthrough else ""
    ))  # fmt: skip
    rss_mb = relay.peak_rss_kb / 1024 if relay.peak_rss_kb else None
    line("relay peak RSS (VmHWM)", "?" if rss_mb is None else f"{rss_mb:.1f} MB")
    line("socket receive buffer granted", f"{relay.rcvbuf:,} bytes")
    x = relay.extra
    if x:
        line(
            "peaks while sending",
            f"collector queue {x['peak_queued_datagrams']:,} datagrams, "
            f"aggregator {x['peak_held_rows']:,} rows; RSS (MB) "
            f"{x['rss_mb_samples'][:24]}",
        )
    if peer is not None:
        print("peer (bare asyncio-dgram loop, same core, same sender):", file=stream)
        line(
            "  received",
            f"{peer.received:,} of {peer.sent['datagrams']:,} datagrams, kernel "
            f"drops {_opt(peer.kernel_drops)}, CPU {peer.cpu_s:.2f} s",
        )
        relay_share = relay.received / max(1, sent["datagrams"])
        peer_share = peer.received / max(1, peer.sent["datagrams"])
        line(
            "  relay / peer, datagrams read",
            f"{relay_share / peer_share if peer_share else 0:.3f}",
        )
        per_peer = peer.cpu_s / max(1, peer.received)
        per_relay = relay.cpu_s / max(1, relay.received)
        line(
            "  relay / peer, CPU per datagram",
            f"{per_relay / per_peer if per_peer else 0:.1f}x "
            f"({per_relay * 1e6:.1f} vs {per_peer * 1e6:.1f} us)",
        )
    lossless = relay.relay_loss == 0 and relay.estimated_lost == 0
    verdicts = [
        (
            f"{TARGET_RECORDS_PER_S:,} flow records/s without loss in the relay",
            relay.records_per_s >= TARGET_RECORDS_PER_S and lossless,
        ),
        (
            f"peak RSS under {TARGET_PEAK_RSS_MB:.0f} MB",
            rss_mb is not None and rss_mb < TARGET_PEAK_RSS_MB,
        ),
    ]
    for label, ok in verdicts:
        print(f"{'PASS' if ok else 'FAIL'} {label}", file=stream)
    return verdicts


def _opt(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def result_json(relay: RelayResult, peer: PeerResult | None) -> dict[str, Any]:
    """The figures as JSON (``--json``)."""
    out: dict[str, Any] = {
        "relay": {
            **{k: v for k, v in relay.__dict__.items() if k != "extra"},
            "records_per_s": relay.records_per_s,
            "relay_loss": relay.relay_loss,
        }
    }
    if peer is not None:
        out["peer"] = dict(peer.__dict__)
    return out

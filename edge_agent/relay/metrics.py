"""The relay's metrics endpoint: Prometheus text on /metrics, /healthz.

Every figure is read from the components' own counters at scrape time by
one custom collector (:class:`RelayCollector`), so nothing is counted
twice and nothing can drift: the UDP collector's per-port counters, the
decoder's per-exporter :class:`~edge_agent.flows.counters.DecodeStats`,
the aggregator's, the encoder's (:class:`EncodeStats`), the spool's and
the shipper's snapshots.

Per-exporter series carry an ``exporter`` label (``address:port``); their
number is bounded by the decoder's ``max_exporters`` (past it, exporters
share one overflow entry, labelled ``overflow``).

``sampleflow_relay_dropped_total{stage, reason}`` gathers every drop in one
family.  Its unit depends on the stage: ``collector`` counts datagrams,
``decoder`` datagrams or sets (per the decoder's reason), ``encoder`` and
``spool`` batches.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_agent.flows.counters import DecodeStats
from edge_agent.flows.schema import address_text

if TYPE_CHECKING:
    from edge_agent.modelsync.service import ModelSyncService
    from edge_agent.relay.pipeline import RelayPipeline

PREFIX = "sampleflow_relay_"


@dataclass
class EncodeStats:
    """Counters of the pipeline's encode-and-spool stage."""

    windows: int = 0  # aggregated windows handed to the encoder
    rows: int = 0  # aggregated rows encoded
    batches: int = 0  # batches encoded
    batch_bytes: int = 0  # data + partition key bytes of those batches
    spooled: int = 0  # batches the spool accepted
    spooled_rows: int = 0
    #: batches (with their rows) not spooled, by reason: ``encode_error``,
    #: ``spool_full`` (reject_new), ``spool_write_error``, ``spool_error``
    #: and ``encoder_bug`` (both bugs; logged in full)
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    dropped_rows: collections.Counter[str] = field(default_factory=collections.Counter)
    express_rows: int = 0  # rows of flagged host windows, shipped first


def _exporter_label(key: tuple[bytes, int]) -> str:
    address, port = key
    if key == DecodeStats.OVERFLOW_KEY:
        return "overflow"
    try:
        text = address_text(address)
    except ValueError:
        text = address.hex()
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def _counter(name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))


class RelayCollector(Collector):
    """Reads a :class:`RelayPipeline`'s components at every scrape."""

    def __init__(self, pipeline: RelayPipeline) -> None:
        self.pipeline = pipeline

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family (called by prometheus_client)."""
        p = self.pipeline
        yield from self._relay(p)
        yield from self._collector(p)
        yield from self._decoder(p)
        yield from self._aggregate(p)
        yield from self._filter(p)
        yield from self._encoder(p)
        yield from self._spool(p)
        yield from self._shipper(p)
        yield from self._drops(p)

    def _relay(self, p: RelayPipeline) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            PREFIX + "info",
            "The relay's identity (value 1).",
            labels=["tenant_id", "relay_id", "stream"],
        )
        s = p.settings
        info.add_metric([p.tenant_id, s.relay.relay_id, s.kinesis.stream_name or ""], 1)
        yield info
        up = _gauge("uptime_seconds", "Seconds since the pipeline started.")
        up.add_metric([], p.uptime_s)
        yield up

    def _collector(self, p: RelayPipeline) -> Iterator[Metric]:
        stats = p.collector.stats
        received = _counter("datagrams_total", "UDP datagrams received.", ["port"])
        octets = _counter(
            "datagram_bytes_total", "UDP payload bytes received.", ["port"]
        )
        errors = _counter("receive_errors_total", "Socket receive errors.", ["port"])
        for port, c in sorted(list(stats.ports.items())):
            received.add_metric([str(port)], c.datagrams)
            octets.add_metric([str(port)], c.bytes)
            errors.add_metric([str(port)], c.receive_errors)
        yield from (received, octets, errors)
        queued = _gauge("collector_queued_datagrams", "Datagrams waiting for decode.")
        queued.add_metric([], stats.queued_datagrams)
        yield queued
        rcvbuf = _gauge(
            "receive_buffer_bytes", "SO_RCVBUF the kernel granted (smallest socket)."
        )
        rcvbuf.add_metric([], p.collector.receive_buffer)
        yield rcvbuf

    def _decoder(self, p: RelayPipeline) -> Iterator[Metric]:
        # list() copies under the GIL: the event loop may add exporters
        # while this runs in the HTTP thread.
        by = list(p.decoder.stats.by_exporter.items())
        label = ["exporter"]
        families: dict[str, tuple[Any, str, Callable[[Any], int]]] = {
            "exporter_datagrams_total": (
                _counter, "Datagrams decoded, per exporter.", lambda c: c.datagrams
            ),
            "exporter_bytes_total": (
                _counter, "Datagram bytes decoded, per exporter.", lambda c: c.bytes
            ),
            "exporter_records_total": (
                _counter, "Flow records decoded, per exporter.", lambda c: c.records
            ),
            "exporter_sequence_gaps_total": (
                _counter, "Sequence gaps seen, per exporter.", lambda c: c.sequence_gaps
            ),
            "exporter_estimated_lost_total": (
                _counter,
                "Records (v5/IPFIX) or datagrams (v9/sFlow) lost per the "
                "sequence numbers, per exporter.",
                lambda c: c.estimated_lost,
            ),
            "exporter_templates": (
                _gauge, "Templates known, per exporter.", lambda c: c.templates
            ),
            "exporter_pending_expired_total": (
                _counter,
                "Held data sets dropped before their template came, per exporter.",
                lambda c: c.pending_expired,
            ),
        }  # fmt: skip
        for name, (make, doc, read) in families.items():
            family = make(name, doc, label)
            for key, counters in by:
                family.add_metric([_exporter_label(key)], read(counters))
            yield family
        errors = _counter(
            "exporter_errors_total",
            "Decode errors by reason, per exporter.",
            ["exporter", "reason"],
        )
        for key, counters in by:
            for reason, count in sorted(list(counters.errors.items())):
                errors.add_metric([_exporter_label(key), reason], count)
        yield errors

    def _aggregate(self, p: RelayPipeline) -> Iterator[Metric]:
        a = p.aggregator.stats
        records_in = _counter("records_in_total", "Flow records into the aggregator.")
        records_in.add_metric([], a.records_in)
        rows = _counter("records_out_total", "Aggregated rows out of the aggregator.")
        rows.add_metric([], a.records_out)
        ratio = _gauge(
            "aggregation_ratio",
            "Records in per aggregated row out, since start (0 before any).",
        )
        ratio.add_metric([], a.records_in / a.records_out if a.records_out else 0.0)
        windows = _counter("windows_total", "Windows emitted, by reason.", ["reason"])
        for reason, count in sorted(list(a.by_reason.items())):
            windows.add_metric([reason], count)
        fallback = _counter(
            "records_windowed_by_receive_time_total",
            "Records windowed by receive time instead of their end time, by why.",
            ["reason"],
        )
        fallback.add_metric(["untimed"], a.untimed_records)
        fallback.add_metric(["late"], a.late_records)
        fallback.add_metric(["future"], a.future_records)
        held = _gauge("aggregator_held_rows", "Rows held in open windows.")
        held.add_metric([], p.aggregator.held_rows)
        yield from (records_in, rows, ratio, windows, fallback, held)

    def _filter(self, p: RelayPipeline) -> Iterator[Metric]:
        f = p.filter
        enabled = _gauge("filter_enabled", "1 if the scoring filter is on.")
        enabled.add_metric([], 0 if f is None else 1)
        yield enabled
        if f is None:
            return
        c = f.counters
        model = f.model
        info = _gauge(
            "filter_model_info", "The model scoring now (value 1).", ["version"]
        )
        if model is not None:
            info.add_metric([model.version], 1)
        yield info
        for name, doc, value in (
            ("filter_windows_total", "Windows the filter processed.", c.batches),
            ("filter_rows_in_total", "Rows into the filter.", c.records_in),
            ("filter_rows_out_total", "Rows out of the filter.", c.records_out),
            ("filter_express_rows_total",
             "Rows of flagged host windows, kept in detail and shipped first.",
             c.records_express),
            ("filter_host_windows_scored_total",
             "Host windows scored (once per window of rows they appear in).",
             c.host_windows_scored),
            ("filter_host_windows_express_total",
             "Host windows at or above the alert threshold.",
             c.host_windows_express),
            ("filter_passthrough_rows_total",
             "Rows passed through unfiltered.", c.passthrough_records),
            ("filter_model_loads_total", "Models loaded.", c.model_loads),
            ("filter_history_restarts_total",
             "Times the scoring history hit its bound (filter.history_rows).",
             c.history_restarts),
        ):  # fmt: skip
            counter = _counter(name, doc)
            counter.add_metric([], value)
            yield counter
        passthrough = _counter(
            "filter_passthrough_total",
            "Windows passed through unfiltered, by reason.",
            ["reason"],
        )
        reasons = collections.Counter(dict(list(c.passthrough_batches.items())))
        if p.window_encoder.filter_errors:
            reasons["filter_error"] += p.window_encoder.filter_errors
        for reason, count in sorted(reasons.items()):
            passthrough.add_metric([reason], count)
        yield passthrough
        failures = _counter(
            "filter_model_load_failures_total", "Failed model loads, by reason.",
            ["reason"],
        )  # fmt: skip
        for reason, count in sorted(list(c.model_load_failures.items())):
            failures.add_metric([reason], count)
        yield failures

    def _encoder(self, p: RelayPipeline) -> Iterator[Metric]:
        e = p.encode_stats
        windows = _counter(
            "windows_encoded_total", "Windows filtered, encoded and spooled."
        )
        windows.add_metric([], e.windows)
        yield windows
        batches = _counter("batches_encoded_total", "Batches encoded.")
        batches.add_metric([], e.batches)
        octets = _counter(
            "batch_bytes_total", "Bytes of encoded batches (data + partition key)."
        )
        octets.add_metric([], e.batch_bytes)
        spooled = _counter("batches_spooled_total", "Batches the spool accepted.")
        spooled.add_metric([], e.spooled)
        queued = _gauge("encode_queue_windows", "Closed windows waiting for encode.")
        queued.add_metric([], p.encode_queue_size)
        yield from (batches, octets, spooled, queued)

    def _spool(self, p: RelayPipeline) -> Iterator[Metric]:
        spool = p.spool
        if spool is None:
            return
        s = spool.stats
        for name, doc, value in (
            ("spool_batches", "Batches waiting in the spool.", s.count),
            ("spool_bytes", "File bytes of the batches in the spool.", s.bytes),
            ("spool_max_bytes", "The spool's bound, bytes.", s.max_bytes),
            (
                "spool_oldest_batch_age_seconds",
                "Age of the oldest batch in the spool (0 when empty).",
                s.oldest_age_s or 0.0,
            ),
        ):
            gauge = _gauge(name, doc)
            gauge.add_metric([], value)
            yield gauge
        corrupt = _counter(
            "spool_corrupt_total", "Spool files set aside as corrupt.", ["reason"]
        )
        for reason, count in sorted(s.corrupt.items()):
            corrupt.add_metric([reason], count)
        yield corrupt

    def _shipper(self, p: RelayPipeline) -> Iterator[Metric]:
        shipper = p.shipper
        if shipper is None:
            return
        s = shipper.stats
        for name, doc, value in (
            ("batches_shipped_total", "Batches Kinesis acknowledged.",
             s.batches_shipped),
            ("bytes_shipped_total", "Payload bytes Kinesis acknowledged.",
             s.bytes_shipped),
            ("batches_retried_total", "Records sent again after a failure.",
             s.records_retried),
            ("put_calls_total", "PutRecords calls.", s.calls),
            ("put_calls_failed_total", "PutRecords calls failed after retries.",
             s.calls_failed),
            ("throttled_total", "Records or attempts refused as throttled.",
             s.throttled),
        ):  # fmt: skip
            counter = _counter(name, doc)
            counter.add_metric([], value)
            yield counter
        errors = _counter(
            "record_errors_total", "Per-record PutRecords errors, by code.", ["code"]
        )
        for code, count in sorted(s.record_errors.items()):
            errors.add_metric([code], count)
        yield errors
        since = _gauge(
            "seconds_since_ship",
            "Seconds since Kinesis last acknowledged a record (-1: never).",
        )
        since.add_metric(
            [], -1.0 if s.seconds_since_success is None else s.seconds_since_success
        )
        yield since

    def _drops(self, p: RelayPipeline) -> Iterator[Metric]:
        drops = _counter(
            "dropped_total",
            "Everything dropped, by stage and reason (units: see the docs).",
            ["stage", "reason"],
        )
        # Summed here over list() copies rather than with the components'
        # totals(), which iterate dicts the event loop may be growing.
        collector: collections.Counter[str] = collections.Counter()
        for _, port in list(p.collector.stats.ports.items()):
            collector.update(dict(port.dropped))
        for reason, count in sorted(collector.items()):
            drops.add_metric(["collector", reason], count)
        decoder: collections.Counter[str] = collections.Counter()
        for _, counters in list(p.decoder.stats.by_exporter.items()):
            decoder.update(dict(counters.errors))
        for reason, count in sorted(decoder.items()):
            drops.add_metric(["decoder", reason], count)
        for reason, count in sorted(list(p.encode_stats.dropped.items())):
            drops.add_metric(["encoder", reason], count)
        spool = p.spool
        if spool is not None:
            s = spool.stats
            drops.add_metric(["spool", "drop_oldest"], s.dropped_full)
            for reason, count in sorted(s.rejected.items()):
                drops.add_metric(["spool", f"rejected_{reason}"], count)
        yield drops


class ModelSyncCollector(Collector):
    """Reads the in-process model-update agent's counters at every scrape.

    Registered next to :class:`RelayCollector` when ``[modelsync]`` is
    configured; families are named ``sampleflow_relay_modelsync_*``.
    """

    def __init__(self, service: ModelSyncService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        """Yield every model-update family (called by prometheus_client)."""
        s = self.service
        c = s.counters
        info = _gauge(
            "modelsync_info",
            "The IoT thing and broker the update agent uses (value 1).",
            ["thing", "endpoint"],
        )
        info.add_metric(
            [s.config.thing_name, f"{s.config.endpoint}:{s.config.port}"], 1
        )
        yield info
        for name, doc, value in (
            ("modelsync_connected", "1 while the MQTT connection is up.",
             1 if s.connected else 0),
            ("modelsync_agent_running", "1 while the agent thread runs.",
             1 if s.alive else 0),
            ("modelsync_update_in_progress",
             "1 while a job execution is being installed.",
             1 if s.agent.current_job else 0),
        ):  # fmt: skip
            gauge = _gauge(name, doc)
            gauge.add_metric([], value)
            yield gauge
        model = _gauge(
            "modelsync_model_info",
            "The model the update agent last put in place (value 1).",
            ["model", "version"],
        )
        running = s.installer.running
        if running is not None:
            model.add_metric(
                [str(running.get("name", "")), str(running.get("version", ""))], 1
            )
        yield model
        for name, doc, value in (
            ("modelsync_jobs_started_total", "Job executions taken.", c.jobs_started),
            ("modelsync_jobs_succeeded_total", "Executions installed (SUCCEEDED).",
             c.jobs_succeeded),
            ("modelsync_jobs_resumed_total", "Executions resumed after a restart.",
             c.resumed),
            ("modelsync_rolled_back_total",
             "Installs undone because their job ended without them.",
             c.rolled_back),
            ("modelsync_downloads_total", "Files downloaded (manifests and models).",
             c.downloads),
            ("modelsync_download_bytes_total", "Bytes downloaded.",
             c.downloaded_bytes),
            ("modelsync_reconnects_total", "Broker connections resumed.",
             c.reconnects),
            ("modelsync_connect_failures_total", "Failed first connections.",
             c.connect_failures),
            ("modelsync_reports_failed_total",
             "Status reports the broker refused.", c.reports_failed),
            ("modelsync_requests_rejected_total",
             "Other jobs requests the broker refused.", c.requests_rejected),
            ("modelsync_cycle_errors_total",
             "Unexpected errors in a work cycle (logged).", c.cycle_errors),
        ):  # fmt: skip
            counter = _counter(name, doc)
            counter.add_metric([], value)
            yield counter
        failed = _counter(
            "modelsync_jobs_failed_total",
            "Executions refused (FAILED), by reason.",
            ["reason"],
        )
        for reason, count in sorted(list(c.failures.items())):
            failed.add_metric([reason], count)
        yield failed


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr (scrapes every few seconds would flood it)."""

    def log_message(self, format: str, *args: Any) -> None:
        return


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class MetricsServer:
    """Serves /metrics (Prometheus text) and /healthz on a local HTTP port.

    ``health`` returns (healthy, details); /healthz answers 200 or 503 with
    the details as JSON.  Inert until :meth:`start`; :meth:`stop` closes
    the socket.  ``port`` is the bound port once started.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        health: Callable[[], tuple[bool, dict[str, Any]]],
        address: str = "127.0.0.1",
        port: int = 9464,
    ) -> None:
        self.registry = registry
        self.health = health
        self.address = address
        self.port = port
        self._server: _ThreadingServer | None = None
        self._thread: threading.Thread | None = None

    def _app(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            healthy, details = self.health()
            body = json.dumps(
                {"status": "ok" if healthy else "unhealthy", **details}
            ).encode()
            start_response(
                "200 OK" if healthy else "503 Service Unavailable",
                [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                ],
            )
            return [body]
        metrics: Iterable[bytes] = self._metrics_app(environ, start_response)
        return metrics

    def start(self) -> None:
        """Bind and serve in a daemon thread (raises OSError if it cannot)."""
        self._metrics_app = make_wsgi_app(self.registry)
        server = make_server(
            self.address,
            self.port,
            self._app,
            server_class=_ThreadingServer,
            handler_class=_QuietHandler,
        )
        self._server = server
        self.port = server.server_port
        self._thread = threading.Thread(
            target=server.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class LogSampler:
    """At most one log line per event per ``interval`` seconds.

    Hot-path errors are counted in metrics; the log only needs a sample,
    so a flood of bad input cannot flood the log.  :meth:`allow` returns
    the number of occurrences suppressed since the last line, or None when
    this one should not be logged.
    """

    def __init__(
        self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._next: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()

    def allow(self, event: str) -> int | None:
        """Return the suppressed count to log now, or None to skip."""
        now = self._clock()
        if now < self._next.get(event, 0.0):
            self._suppressed[event] += 1
            return None
        self._next[event] = now + self.interval
        return self._suppressed.pop(event, 0)

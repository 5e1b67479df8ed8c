"""From one closed aggregation window to the batches the relay ships.

:class:`WindowEncoder` runs the filter on the window's rows and encodes
them per exporter: the rows of flagged host windows (express) first, then
the rest.  It yields one :class:`EncodedGroup` per (express or not,
exporter) so that the pipeline spools each as it comes and can wake the
shipper between the express groups and the others; ``sampleflow bench
wire`` runs the same code without a spool, so what it measures is what the
relay ships.

Without a filter (``filter.enabled = false``) every row is one group per
exporter, unscored.  A filter that raises (a bug) is counted in
:attr:`WindowEncoder.filter_errors` and the window goes out unfiltered.
Batches are written in :data:`~edge_agent.wire.FORMAT_MAJOR` (2) unless
``format_major`` says 1 (for as long as some reader knows only version 1).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import structlog

from edge_agent.aggregate import AggregatedWindow
from edge_agent.filter import HOST_SCORE_DTYPE, FilterResult, RelayFilter
from edge_agent.relay.metrics import LogSampler
from edge_agent.relay.partition import partition_key
from edge_agent.wire import (
    FORMAT_MAJOR,
    EncodedBatch,
    HeaderFields,
    WireFormatError,
    encode_batches,
)

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class EncodedGroup:
    """The batches of one exporter's rows of one window (express or not).

    ``error`` is set (and ``batches`` empty) when the rows could not be
    encoded; they are then lost and the caller counts them.
    """

    express: bool
    exporter: bytes
    rows: int
    batches: list[EncodedBatch]
    error: WireFormatError | None = None


class WindowEncoder:
    """Filter and encode closed windows; see the module docstring.

    ``partition_scheme`` is a :mod:`edge_agent.relay.partition` scheme;
    ``format_major`` the wire format version to write (1 or 2);
    ``encode`` the batch encoder (:func:`~edge_agent.wire.encode_batches`;
    ``sampleflow bench wire`` passes one that also measures version 1).
    One thread calls :meth:`encode` at a time (the filter's contract).
    """

    def __init__(
        self,
        tenant_id: str,
        relay_id: str,
        partition_scheme: str,
        relay_filter: RelayFilter | None,
        *,
        format_major: int = FORMAT_MAJOR,
        encode: Callable[..., list[EncodedBatch]] = encode_batches,
    ) -> None:
        self.tenant_id = tenant_id
        self.relay_id = relay_id
        self.partition_scheme = partition_scheme
        self.filter = relay_filter
        self.format_major = format_major
        self._encode = encode
        #: windows the filter raised on (a bug), encoded unfiltered
        self.filter_errors = 0
        self._sampler = LogSampler()

    def encode(
        self, window: AggregatedWindow, next_seq: Callable[[], int]
    ) -> Iterator[EncodedGroup]:
        """The window's groups: every express group, then the others.

        ``next_seq`` numbers the batches (the spool's ``next_seq``); it is
        called as each group is encoded, so groups must be spooled in the
        order they come.
        """
        rows = window.records
        if self.filter is None:
            yield from self._groups(
                window, rows, None, None, express=False, next_seq=next_seq
            )
            return
        result = self._filter(rows)
        mask = result.express_mask
        scores = result.row_scores
        for express in (True, False):
            keep = mask if express else ~mask
            yield from self._groups(
                window,
                result.records[keep],
                None if scores is None else scores[keep],
                result.model_version,
                express=express,
                next_seq=next_seq,
            )

    def _filter(self, rows: np.ndarray) -> FilterResult:
        assert self.filter is not None
        try:
            return self.filter.process(rows)
        except Exception:
            self.filter_errors += 1
            suppressed = self._sampler.allow("filter_error")
            if suppressed is not None:
                log.exception(
                    "filter_error", rows=int(rows.shape[0]), suppressed=suppressed
                )
            return FilterResult(
                records=rows,
                host_scores=np.zeros(0, dtype=HOST_SCORE_DTYPE),
                model_version=None,
                express_mask=np.zeros(rows.shape[0], dtype=bool),
                flow_count=rows["flow_count"].astype(np.int64),
                passthrough_reason="filter_error",
            )

    def _groups(
        self,
        window: AggregatedWindow,
        rows: np.ndarray,
        scores: np.ndarray | None,
        model_version: str | None,
        *,
        express: bool,
        next_seq: Callable[[], int],
    ) -> Iterator[EncodedGroup]:
        fields = HeaderFields(
            self.tenant_id,
            self.relay_id,
            window.start_ms,
            window.end_ms,
            model_version,
        )
        for exporter, lo, hi in split_by_exporter(rows):
            key = partition_key(
                self.partition_scheme, self.tenant_id, self.relay_id, exporter
            )
            try:
                batches = self._encode(
                    rows[lo:hi],
                    fields,
                    next_seq,
                    key,
                    scores=None if scores is None else scores[lo:hi],
                    format_major=self.format_major,
                )
            except WireFormatError as exc:
                yield EncodedGroup(express, exporter, hi - lo, [], exc)
                continue
            yield EncodedGroup(express, exporter, hi - lo, batches)


def split_by_exporter(rows: np.ndarray) -> list[tuple[bytes, int, int]]:
    """Split AGG_DTYPE rows (ordered by exporter, as the aggregator and the
    filter emit them) into (exporter address, lo, hi) runs, vectorised."""
    n = int(rows.shape[0])
    if n == 0:
        return []
    exporters = np.ascontiguousarray(rows["exporter"]).view(np.uint8).reshape(n, 16)
    change = np.flatnonzero(np.any(exporters[1:] != exporters[:-1], axis=1)) + 1
    bounds = [0, *change.tolist(), n]
    return [(bytes(exporters[lo]), lo, hi) for lo, hi in itertools.pairwise(bounds)]

"""sFlow v5 decoding (placeholder until the sFlow decoder lands).

The interface is fixed: ``SflowDecoder(sampling).decode(...)``.
"""

from __future__ import annotations

import numpy as np

from edge_agent.flows.counters import ExporterCounters
from edge_agent.flows.sampling import SamplingTable
from edge_agent.flows.schema import empty_records


class SflowDecoder:
    """Decode sFlow v5 datagrams into flow records."""

    def __init__(self, sampling: SamplingTable) -> None:
        self.sampling = sampling

    def decode(
        self,
        payload: bytes,
        exporter: bytes,
        exporter_port: int,
        received_ms: int,
        counters: ExporterCounters,
    ) -> np.ndarray:
        """Return the flow samples of one datagram as FLOW_DTYPE records."""
        counters.errors["sflow_not_implemented"] += 1
        return empty_records(0)

"""Which 1-in-N packet sampling rate applies to a record.

Rates are learnt per (exporter address, domain, sampler id) from the
NetFlow v5 header, v9/IPFIX options data and sFlow samples.  An operator
may set a default (used when nothing was announced) and a per-exporter
override (which wins over anything announced).

Lookup order for a record: override for the exporter; the rate announced
for (exporter, domain, sampler id); the rate announced for (exporter,
domain) with sampler id 0 (exporters that announce one rate for the whole
domain); the rate last announced by any sampler of (exporter, domain)
(exporters that name a sampler in options data but not in data records);
the operator default; else 0, meaning unknown.
"""

from __future__ import annotations

from collections.abc import Mapping

from edge_agent.flows.schema import address_bytes

#: Key of an announced rate: (exporter address as 16 bytes, domain, sampler).
SamplerKey = tuple[bytes, int, int]


class SamplingTable:
    """Announced sampling rates plus operator defaults and overrides.

    ``overrides`` maps an exporter address (text, e.g. ``"192.0.2.1"``) to a
    rate.  The table is bounded by ``max_entries``; announcements past the
    bound are ignored and counted in :attr:`rejected`.
    """

    def __init__(
        self,
        default_rate: int = 0,
        overrides: Mapping[str, int] | None = None,
        max_entries: int = 65536,
    ) -> None:
        if default_rate < 0:
            raise ValueError(f"default sampling rate must be >= 0, got {default_rate}")
        self.default_rate = default_rate
        self.overrides: dict[bytes, int] = {}
        for address, rate in (overrides or {}).items():
            if rate < 1:
                raise ValueError(
                    f"sampling override for {address} must be >= 1, got {rate}"
                )
            self.overrides[address_bytes(address)] = rate
        self.max_entries = max_entries
        self.announced: dict[SamplerKey, int] = {}
        #: the last rate announced per (exporter, domain), any sampler
        self.latest: dict[tuple[bytes, int], int] = {}
        self.rejected = 0
        #: bumped whenever an announcement changes the table: a lookup made
        #: at generation g holds as long as the generation is still g
        self.generation = 0

    def changes(self, exporter: bytes, domain: int, sampler_id: int, rate: int) -> bool:
        """Whether announcing ``rate`` would change any lookup result."""
        if rate < 1:
            return False
        return (
            self.announced.get((exporter, domain, sampler_id)) != rate
            or self.latest.get((exporter, domain)) != rate
        )

    def announce(
        self, exporter: bytes, domain: int, sampler_id: int, rate: int
    ) -> bool:
        """Record a rate announced by an exporter (ignored if ``rate < 1``).

        Returns whether the table changed.
        """
        if rate < 1:
            return False
        key = (exporter, domain, sampler_id)
        if key not in self.announced and len(self.announced) >= self.max_entries:
            self.rejected += 1
            return False
        changed = self.announced.get(key) != rate
        self.announced[key] = rate
        domain_key = (exporter, domain)
        if self.latest.get(domain_key) != rate:
            self.latest[domain_key] = rate
            changed = True
        if changed:
            self.generation += 1
        return changed

    def override(self, exporter: bytes) -> int:
        """The operator override for an exporter, 0 if none."""
        return self.overrides.get(exporter, 0)

    def lookup(self, exporter: bytes, domain: int, sampler_id: int = 0) -> int:
        """Return the rate for a record, or 0 when it is unknown."""
        rate = self.overrides.get(exporter)
        if rate is not None:
            return rate
        rate = self.announced.get((exporter, domain, sampler_id))
        if rate is not None:
            return rate
        if sampler_id:
            rate = self.announced.get((exporter, domain, 0))
            if rate is not None:
                return rate
        rate = self.latest.get((exporter, domain))
        if rate is not None:
            return rate
        return self.default_rate
